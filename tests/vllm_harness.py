"""Helpers for end-to-end tests: run vLLM in a fresh process, build real-text prompts, compare outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32
EXT = "vllm:prompt_tokens_by_source{source=external_kv_transfer}"


def model_path() -> str:
    from ucm.tools.model_export import ensure_model

    return ensure_model()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def real_text() -> str:
    from ucm.tools.demo import real_text as text

    return text()


def prompt_tokens(n: int, offset: int = 0) -> list[int]:
    """n real-text token ids starting at token `offset` of the text."""
    ids = tokenizer()(real_text())["input_ids"]
    assert len(ids) >= offset + n, f"text too short: {len(ids)} tokens"
    return ids[offset:offset + n]


def ucm_connector(root: str, *, host: str = "256MiB", ssd: str | None = "1GiB", module_path: bool = False,
                  name: str = "UCMConnector", planner: bool = False, **extra) -> dict:
    """`planner`: transfer.load_planner. Off unless a test is about it: its choices follow timings of
    this shared machine, and the other tests count exact hits."""
    cfg = {"host": {"capacity": host, "path": os.path.join(root, "host")}}
    # inline keys merge over the embedded default (docs/configuration.md): null turns its SSD tier off
    cfg["ssd"] = {"path": os.path.join(root, "ssd"), "capacity": ssd} if ssd else None
    cfg["transfer"] = {"load_planner": planner, **(extra.pop("transfer", None) or {})}
    cfg.update(extra)
    c = {"kv_connector": name, "extra": cfg}
    if module_path:
        c["kv_connector_module_path"] = "ucm.integration.vllm.ucm_connector"
    return c


def omp_core() -> str:
    """The core vLLM's compute threads are bound to (VLLM_CPU_OMP_THREADS_BIND): one per pytest-xdist
    worker (`make test` runs two on CI's two cores; bound to one core, a vLLM run leaves the other idle)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return str(int(worker[2:] or 0) % (os.cpu_count() or 1))


def run_vllm(phases, *, connector=None, prefix_caching=False, multiprocessing=False, dtype="bfloat16",
             max_tokens=8, max_num_batched_tokens=None, kv_cache_bytes=256 << 20, max_model_len=4096, env=None,
             timeout=600, hooks=None, logprobs=1, close_store=True, model=None, engine=None, fault=None) -> dict:
    """One fresh vLLM process running `phases`. `model`: a model directory (default: the exported
    SmolLM2); `engine`: more LLM(...) arguments (e.g. load_format); `fault`: a fault the runner injects
    (vllm_runner.py)."""
    spec = {"close_store": close_store, "model": model or model_path(), "engine": engine or {}, "fault": fault, "connector": connector, "prefix_caching": prefix_caching, "dtype": dtype,
            "block_size": BLOCK, "max_tokens": max_tokens, "max_num_batched_tokens": max_num_batched_tokens,
            "kv_cache_bytes": kv_cache_bytes, "max_model_len": max_model_len, "phases": phases,
            "hooks": {str(k): v for k, v in (hooks or {}).items()}, "logprobs": logprobs}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    e = dict(os.environ)
    e.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
              "VLLM_CPU_OMP_THREADS_BIND": omp_core(),  # the same threads with and without a connector
              "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
              # vLLM compiles its logprobs gather with torch.compile: 3.3 s of dynamo tracing in every process
              # on this 2-core machine, for an op eager mode runs in microseconds
              "TORCHDYNAMO_DISABLE": "1"})
    e.update(env or {})
    p = subprocess.run([sys.executable, os.path.join(HERE, "vllm_runner.py"), f.name], capture_output=True,
                       text=True, timeout=timeout, env=e)
    os.unlink(f.name)
    line = next((l for l in p.stdout.splitlines() if l.startswith("UCM-RESULT ")), None)
    if line is None:
        raise AssertionError(f"vLLM run failed (rc {p.returncode}):\n{p.stderr[-6000:]}")
    out = json.loads(line[len("UCM-RESULT "):])
    out["log"] = p.stderr
    return out


def assert_identical(got: list[dict], ref: list[dict], tol: float = 1e-5) -> None:
    """Greedy tokens equal and chosen-token logprobs within tol (DESIGN.md's exact test)."""
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g["tokens"] == r["tokens"], f"request {i}: tokens differ: {g['tokens']} vs {r['tokens']}"
        worst = max(abs(a - b) for a, b in zip(g["logprobs"], r["logprobs"]))
        assert worst <= tol, f"request {i}: logprobs differ by {worst:.2e} (> {tol})"
