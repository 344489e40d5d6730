"""`ucm verify`: is ucm wired into this vLLM, and can it store? Each line is a check that can fail.

    === UCM Patch Verification ===

    1. Import Hook: INSTALLED
    2. SchedulerOutput patch: NOT NEEDED (...)
    3. Attention patch: NOT NEEDED (...)
    4. UCMDirectConnector: AVAILABLE
    5. KV cache allocation patch: APPLIED
    ...

A check is OK, WARN (works, degraded or deliberately off) or FAIL; the exit code is 1 when any FAILs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Check:
    title: str
    status: str  # the word printed: INSTALLED, APPLIED, AVAILABLE, OK, ...
    level: str  # "ok", "warn" or "fail"
    detail: str = ""

    def line(self, n: int) -> str:
        mark = {"warn": "   <- WARNING", "fail": "   <- FAILED"}.get(self.level, "")
        return f"{n}. {self.title}: {self.status}" + (f" ({self.detail})" if self.detail else "") + mark


def _patch_checks() -> list[Check]:
    from ucm.integration.vllm.patch import apply_patch as ap

    disabled = ap.disabled()
    if ap.hook_installed():
        hook = Check("Import Hook", "INSTALLED", "ok")
    elif disabled:
        hook = Check("Import Hook", "DISABLED", "warn", f"{ap.DISABLE_ENV}=1")
    else:
        hook = Check("Import Hook", "NOT FOUND", "fail", "import ucm before vLLM, or call install_import_hook()")
    patches = {p.name: p for p in ap.patches_for() or ()}
    # import the patch targets so the hook (or apply_all_patches) has had its chance
    import vllm.v1.worker.gpu_model_runner  # noqa: F401

    report = ap.apply_all_patches()

    def patch_check(name: str, title: str) -> Check:
        p = patches.get(name)
        if p is None:
            return Check(title, "UNSUPPORTED", "fail", report.get("vllm", ""))
        state = report[name]
        if state == "NOT NEEDED":
            return Check(title, "NOT NEEDED", "ok", p.reason)
        if state == "APPLIED":
            return Check(title, "APPLIED", "ok", p.reason)
        if state == "DISABLED":
            return Check(title, "DISABLED", "warn", f"{ap.DISABLE_ENV}=1: {p.without}")
        return Check(title, state, "fail", p.reason)

    return [hook, patch_check("scheduler_output", "SchedulerOutput patch"), patch_check("attention", "Attention patch"),
            _connector_check(), patch_check("kv_cache_allocation", "KV cache allocation patch"),
            patch_check("kv_cache_manager", "KV cache manager patch"),
            patch_check("decoder_layer", "Decoder layer patch (Llama family)")]


def _connector_check() -> Check:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        from ucm.integration.vllm import register
        from ucm.integration.vllm.ucm_connector import UCMConnector, UCMDirectConnector  # noqa: F401

        register()  # what vLLM's plugin loader does in every vLLM process
        missing = [n for n in ("UCMConnector", "UCMDirectConnector") if n not in KVConnectorFactory._registry]
        if missing:
            return Check("UCMDirectConnector", "NOT REGISTERED", "fail", f"vLLM does not know {missing}")
        return Check("UCMDirectConnector", "AVAILABLE", "ok")
    except Exception as e:  # noqa: BLE001 - report it
        return Check("UCMDirectConnector", "ERROR", "fail", f"{type(e).__name__}: {e}")


def _version_checks() -> list[Check]:
    """The vLLM version, supported or not, and a warning per feature it lacks (versions.py)."""
    from ucm.integration.vllm import versions
    from ucm.integration.vllm.patch.apply_patch import patches_for, vllm_version

    v = vllm_version()
    if v is None:
        return [Check("vLLM version", "NOT INSTALLED", "fail")]
    f = versions.features(v)
    if f is None or patches_for(v) is None:
        return [Check("vLLM version", v, "fail", f"unsupported; supported: {', '.join(versions.SUPPORTED)} "
                      f"({versions.RANGE})")]
    out = [Check("vLLM version", v, "ok", f"supported ({f.tested})")]
    out += [Check("vLLM feature", "MISSING", "warn", why) for why in versions.missing(v)]
    return out


def _config_checks(config_path: str | None) -> list[Check]:
    from ucm.config import ConfigError, check_writable, load_config

    try:
        cfg = load_config(config_path)
    except (ConfigError, OSError) as e:
        return [Check("Config", "ERROR", "fail", str(e))]
    out = [Check("Config", "LOADED", "ok", cfg.source)]
    paths = [("host", cfg.host.path)] + ([("ssd", cfg.ssd.path)] if cfg.ssd else [])
    for tier, path in paths:
        if path == "auto":
            out.append(Check(f"Storage ({tier})", "AUTO", "ok", "a per-user directory in /dev/shm"))
            continue
        try:
            check_writable(path, cfg.source, f"{tier}.path")
            free = shutil.disk_usage(path).free
            cap = cfg.ssd.capacity if tier == "ssd" else cfg.host.capacity
            level = "ok" if free >= cap else "warn"
            out.append(Check(f"Storage ({tier})", "WRITABLE", level,
                             f"{path}: {free / 2**30:.1f} GiB free for a {cap / 2**30:.1f} GiB tier"))
        except (ConfigError, OSError) as e:
            out.append(Check(f"Storage ({tier})", "NOT WRITABLE", "fail", str(e)))
    if cfg.remote is not None:
        out.append(_remote_check(cfg))
    return out


def _remote_check(cfg) -> Check:
    """Connect and authenticate to the remote tier (a wrong password fails; an unreachable server warns:
    vLLM would run with the local tiers until it answers)."""
    from ucm.config import ConfigError
    from ucm.tiers.remote import RemoteTier

    try:
        tier = RemoteTier(cfg.remote, 4096, lambda bid: None, cfg.source)
    except ConfigError as e:
        return Check("Storage (remote)", "REFUSED", "fail", str(e))
    try:
        if not tier.up:
            return Check("Storage (remote)", "UNREACHABLE", "warn", f"{tier.where}: lookups will miss until it answers")
        return Check("Storage (remote)", "CONNECTED", "ok", f"{tier.where}, key prefix {cfg.remote.key_prefix!r}")
    finally:
        tier.close(timeout=1)


_HASH_SNIPPET = ("from ucm.hashing import HashSeed, RequestHasher; "
                 "print(RequestHasher(HashSeed('m', 'bfloat16', 'l', 16)).generate_block_hashes(list(range(64)))[-1].hex())")


def _hash_check() -> Check:
    outs = []
    for seed in ("1", "2"):  # different PYTHONHASHSEED: ids must not depend on process state
        env = dict(os.environ, PYTHONHASHSEED=seed, UCM_DISABLE_PATCHES="1")
        p = subprocess.run([sys.executable, "-c", _HASH_SNIPPET], capture_output=True, text=True, env=env, timeout=60)
        outs.append(p.stdout.strip() or p.stderr.strip()[-200:])
    if outs[0] == outs[1] and len(outs[0]) == 32:
        return Check("Hash determinism", "OK", "ok", "same block ids in two processes")
    return Check("Hash determinism", "DIFFERENT", "fail", f"{outs[0]} vs {outs[1]}")


def verify(config_path: str | None = None) -> tuple[list[Check], int]:
    """All checks, and the exit code (1 if any failed)."""
    checks = _patch_checks() + _version_checks() + _config_checks(config_path) + [_hash_check()]
    return checks, int(any(c.level == "fail" for c in checks))


def main(config_path: str | None = None) -> int:
    checks, code = verify(config_path)
    print("=== UCM Patch Verification ===\n")
    for n, c in enumerate(checks, 1):
        print(c.line(n))
    warn = [c.title for c in checks if c.level == "warn"]
    fail = [c.title for c in checks if c.level == "fail"]
    print(f"\n=== Verification Complete: {len(fail)} failed, {len(warn)} warnings ===")
    for what, titles in (("failed", fail), ("warnings", warn)):
        if titles:
            print(f"{what}: {', '.join(titles)}")
    return code
