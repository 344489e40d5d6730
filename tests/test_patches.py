"""The import hook, vLLM 0.32's patch set, and `ucm verify` in each state (fresh interpreters)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.vllm

STATE = """
import json, sys
from ucm.integration.vllm.patch import apply_patch as ap
import vllm.v1.worker.gpu_model_runner as g
print("STATE " + json.dumps({"hook": ap.hook_installed(), "report": ap.patch_report(),
                             "patched": getattr(g.allocate_kv_cache, "__ucm_patch__", None)}))
"""


def _python(code: str, env=None, timeout=180) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("UCM_DISABLE_PATCHES", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=timeout)


def _state(code: str, env=None) -> dict:
    import json

    p = _python(textwrap.dedent(code) + STATE, env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("STATE ")), None)
    assert line, p.stderr[-3000:]
    return json.loads(line[6:])


def test_import_ucm_then_vllm_applies_patches_on_import():
    s = _state("import ucm\n")
    assert s["hook"] and s["patched"] == "kv_cache_allocation"
    assert s["report"] == {"kv_cache_allocation": "APPLIED", "scheduler_output": "NOT NEEDED",
                           "kv_cache_manager": "NOT NEEDED", "attention": "APPLIED", "decoder_layer": "APPLIED"}


def test_vllm_imported_first_is_patched_by_apply_all_patches():
    code = """
    import vllm.v1.worker.gpu_model_runner as g
    import ucm  # the hook comes late; install_import_hook() patches what is already imported
    """
    s = _state(code)
    assert s["hook"] and s["patched"] == "kv_cache_allocation"


def test_disabled_patches_leave_vllm_alone():
    s = _state("import ucm\n", env={"UCM_DISABLE_PATCHES": "1"})
    assert not s["hook"] and s["patched"] is None
    assert s["report"]["kv_cache_allocation"] == "DISABLED"


def test_reapplying_is_idempotent_and_verbose_logs_say_so():
    code = """
    import ucm
    import vllm.v1.worker.gpu_model_runner as g
    from ucm.integration.vllm.patch.apply_patch import apply_all_patches, install_import_hook
    first = g.allocate_kv_cache
    apply_all_patches(); install_import_hook(); apply_all_patches()
    assert g.allocate_kv_cache is first, "re-applying replaced the patched function"
    assert not hasattr(first.__wrapped__, "__wrapped__"), "patched twice"
    import sys
    assert sum(type(f).__name__ == "UCMPatchFinder" for f in sys.meta_path) == 1
    print("IDEMPOTENT")
    """
    p = _python(code, env={"UCM_PATCH_VERBOSE": "1"})
    assert "IDEMPOTENT" in p.stdout, p.stderr[-3000:]
    assert "[UCM.Patch] applied kv_cache_allocation" in p.stderr
    assert "already applied" in p.stderr


def test_unsupported_vllm_version_warns_once_and_never_crashes(monkeypatch):
    import logging

    from ucm.integration.vllm.patch import apply_patch as ap

    monkeypatch.setattr(ap, "vllm_version", lambda: "0.9.2")
    monkeypatch.setattr(ap, "_warned_unsupported", False)
    monkeypatch.delenv("UCM_DISABLE_PATCHES", raising=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("UCM.Patch").addHandler(handler)
    try:
        assert ap.install_import_hook() is False
        ap.apply_all_patches()
        ap.install_import_hook()
    finally:
        logging.getLogger("UCM.Patch").removeHandler(handler)
    warnings = [r.getMessage() for r in records if "has no ucm patch set" in r.getMessage()]
    assert warnings == ["vLLM 0.9.2 has no ucm patch set (supported: 0.26, 0.32, 0.33); vLLM runs unpatched"]
    assert ap.patch_report() == {"vllm": "UNSUPPORTED vLLM 0.9.2 (supported: 0.26, 0.32, 0.33)"}


def test_aligned_zeros_are_4k_aligned_and_zero():
    from ucm.integration.vllm.patch.patch_funcs.v0_32.vllm_patch import _aligned_torch

    at = _aligned_torch(torch)
    for n in (1, 4097, 1 << 20):
        t = at.zeros(n, dtype=torch.int8, device="cpu")
        assert t.data_ptr() % 4096 == 0 and t.numel() == n and not t.any()
    assert at.float32 is torch.float32  # everything else is torch's


VERIFY = [sys.executable, "-m", "ucm.tools.cli", "verify"]


def test_verify_reports_every_line_with_patches_on(tmp_path):
    cfg = tmp_path / "ucm.yaml"
    cfg.write_text(f"host: {{capacity: 64MiB, path: {tmp_path}/host}}\nssd: {{path: {tmp_path}/ssd, capacity: 64MiB}}\n")
    p = subprocess.run(VERIFY[:-1] + ["--config", str(cfg), "verify"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "UCM_DISABLE_PATCHES"})
    out = p.stdout
    assert p.returncode == 0, out + p.stderr[-2000:]
    assert out.startswith("=== UCM Patch Verification ===\n\n1. Import Hook: INSTALLED\n")
    for line in ("2. SchedulerOutput patch: NOT NEEDED (vLLM 0.32 carries connector metadata",
                 "3. Attention patch: APPLIED (BlendConnector", "4. UCMDirectConnector: AVAILABLE",
                 "5. KV cache allocation patch: APPLIED", "vLLM version: 0.32", f"Config: LOADED ({cfg})",
                 f"Storage (ssd): WRITABLE ({tmp_path}/ssd", "Hash determinism: OK", "0 failed, 0 warnings"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_verify_with_patches_disabled_and_with_a_broken_config(tmp_path):
    cfg = tmp_path / "ucm.yaml"
    cfg.write_text(f"host: {{capacity: 64MiB, path: {tmp_path}/host}}\nssd: {{path: {tmp_path}/ssd, capacity: 64MiB}}\n")
    p = subprocess.run(VERIFY[:-1] + ["--config", str(cfg), "verify"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, UCM_DISABLE_PATCHES="1"))
    assert "1. Import Hook: DISABLED (UCM_DISABLE_PATCHES=1)" in p.stdout
    assert "5. KV cache allocation patch: DISABLED (UCM_DISABLE_PATCHES=1: layer-wise SSD reads go through a bounce" \
        in p.stdout
    assert "3. Attention patch: DISABLED" in p.stdout and "Decoder layer patch (Llama family): DISABLED" in p.stdout
    assert p.returncode == 0 and "0 failed, 4 warnings" in p.stdout, p.stdout
    assert "1. Import Hook: DISABLED (UCM_DISABLE_PATCHES=1)   <- WARNING\n" in p.stdout, "each warning is marked"
    assert "\nwarnings: Import Hook, " in p.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("host: {capacity: 64, path: /tmp/x}\n")
    p = subprocess.run(VERIFY[:-1] + ["--config", str(bad), "verify"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "Config: ERROR" in p.stdout and "host.capacity" in p.stdout and "<- FAILED" in p.stdout


def test_verify_when_vllm_was_imported_before_ucm():
    code = """
    import vllm.v1.worker.gpu_model_runner  # vLLM first, as a serving script might
    from ucm.tools.verify import verify
    checks, code = verify()
    print("LINES " + "|".join(f"{c.title}={c.status}" for c in checks[:5]) + f" CODE {code}")
    """
    p = _python(code)
    line = next((l for l in p.stdout.splitlines() if l.startswith("LINES ")), None)
    assert line, p.stderr[-3000:]
    assert line == ("LINES Import Hook=INSTALLED|SchedulerOutput patch=NOT NEEDED|Attention patch=APPLIED|"
                    "UCMDirectConnector=AVAILABLE|KV cache allocation patch=APPLIED CODE 0")
