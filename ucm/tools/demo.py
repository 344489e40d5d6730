"""`ucm demo`: vLLM (CPU build) with the real small model on long real text, twice, in two processes.

The first process runs cold (prefill computed, KV saved through the host tier to the SSD tier); the
second, a fresh process with an empty host tier, loads the KV from the SSD tier. Both use the embedded
default configuration. A per-invocation cache_salt keeps earlier demos from turning the cold run warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

TEXT_MODULES = ("argparse", "subprocess", "asyncio", "unittest", "logging", "decimal", "pickle", "email",
                "collections", "functools", "itertools", "json", "re", "threading", "typing", "pathlib",
                "dataclasses", "inspect", "contextlib", "socket", "sqlite3", "tarfile", "zipfile", "csv")


def real_text() -> str:
    """Long real English text that ships with every Python: its license and the standard library's
    documentation (module, class and function docstrings)."""
    import importlib
    import inspect
    import sysconfig

    parts = []
    lic = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.exists(lic):
        parts.append(open(lic).read())
    for name in TEXT_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer(real_text())["input_ids"]
    if len(ids) < n * length:
        raise RuntimeError(f"the text has {len(ids)} tokens, {n} prompts of {length} need more")
    return [ids[k * length:(k + 1) * length] for k in range(n)]


def _run(phase: str, length: int, n: int, salt: str) -> dict:
    """One vLLM process: TTFT of each prompt (generate 1 token), external hit tokens from vLLM's counters."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from ucm.tools.model_export import ensure_model

    model = ensure_model()
    llm = LLM(model=model, enforce_eager=True, dtype="bfloat16", kv_cache_memory_bytes=1 << 30,
              max_model_len=max(4096, length + 64), enable_prefix_caching=False, disable_log_stats=False,
              kv_transfer_config=KVTransferConfig(kv_connector="UCMConnector", kv_role="kv_both"))
    ps = prompts(AutoTokenizer.from_pretrained(model), n, length)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    def counter(name: str, source: str) -> int:
        return sum(m.value for m in llm.get_metrics() if m.name == name and m.labels.get("source") == source)
    ext = lambda: counter("vllm:prompt_tokens_by_source", "external_kv_transfer")
    disk = lambda: counter("vllm:prompt_tokens_cached_by_source", "disk")
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)  # warm-up
    ttft, hits, disk_hits = [], [], []
    for p in ps:
        before, before_disk = ext(), disk()
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p, cache_salt=salt)], params, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
        hits.append(ext() - before)
        disk_hits.append(disk() - before_disk)
    llm.llm_engine.engine_core.shutdown()  # flushes the connector's saves
    from ucm.tiers.store import close_shared

    close_shared()  # os._exit skips atexit: close the store (drops the host tier if this was its last user)
    return {"phase": phase, "ttft": ttft, "hits": hits, "disk_hits": disk_hits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ucm demo")
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per prompt")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    ap.add_argument("--salt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("UCM-DEMO " + json.dumps(_run(args.child, args.tokens, args.prompts, args.salt)), flush=True)
        os._exit(0)

    from ucm.tools.model_export import ensure_model

    ensure_model()
    salt = uuid.uuid4().hex[:12]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING",
               TOKENIZERS_PARALLELISM="false")
    results = {}
    for phase in ("cold", "warm"):
        print(f"== {phase} run: a fresh vLLM process, {args.prompts} prompts of {args.tokens} tokens ...", flush=True)
        p = subprocess.run([sys.executable, "-m", "ucm.tools.demo", "--child", phase, "--salt", salt,
                            "--tokens", str(args.tokens), "--prompts", str(args.prompts)],
                           capture_output=True, text=True, env=env)
        line = next((l for l in p.stdout.splitlines() if l.startswith("UCM-DEMO ")), None)
        if line is None:
            sys.stderr.write(p.stderr[-5000:])
            print(f"{phase} run failed (exit {p.returncode})")
            return 1
        results[phase] = json.loads(line[len("UCM-DEMO "):])
    cold, warm = results["cold"], results["warm"]
    print()
    print(f"{'prompt':>6} {'tokens':>7} {'TTFT cold ms':>13} {'TTFT warm ms':>13} {'speed-up':>9} {'hit tokens':>11}")
    for k in range(args.prompts):
        c, w = cold["ttft"][k] * 1e3, warm["ttft"][k] * 1e3
        print(f"{k:>6} {args.tokens:>7} {c:>13.1f} {w:>13.1f} {c / w:>8.1f}x {warm['hits'][k]:>11}")
    print(f"\ncold run external hits: {sum(cold['hits'])} tokens (expected 0); "
          f"warm run: {sum(warm['hits'])} tokens loaded, {sum(warm['disk_hits'])} of them from the SSD tier "
          "(vLLM's own counters)")
    print("\nwhat the tiers hold now (`ucm stats`):")
    from ucm.tools.stats import main as stats_main

    stats_main()
    ok = sum(cold["hits"]) == 0 and all(h > 0 for h in warm["hits"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
