"""End-to-end TTFT on vLLM (CPU build) with SmolLM2-135M; writes bench/results/e2e.md.

For 4 prompts of real text at each length (2K and 8K tokens), each configuration in fresh processes:
  nocache   no connector, vLLM prefix caching off                       (the cost of a full prefill)
  floor     vLLM's own in-memory prefix-cache hit on the same prompt     (the floor: nothing to load)
  ucm       UCMConnector: a cold process saves, the page cache of the slab files is dropped, a warm
            process with an empty host tier loads every block from the disk, layer by layer
  ucm_whole the same with whole-request loads (transfer.layerwise_load: false)
  ucm_host  the warm process finds the blocks in the host tier (shared memory kept between processes)
  example   vLLM's ExampleConnector (safetensors files per request), same procedure, cache dropped too
TTFT is the wall time of generate(max_tokens=1) for one prompt (prefill + one token), median of 4.

Overhead: batches of 16 requests (512 prompt tokens, 32 generated each) with the connector on a cold
store (no hits) against no connector; both with VLLM_CPU_OMP_THREADS_BIND=0.

Run: .venv/bin/python bench/e2e.py [--lengths 2000 8000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_page_cache, write_results  # noqa: E402

BATCHES = 5  # per process; the first is warm-up (first touches of memory, thread start-up) and not counted
BATCH_TOKENS = 16 * (512 + 32)


def child(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from ucm.tools.demo import prompts
    from ucm.tools.model_export import ensure_model

    model = ensure_model()
    kw = dict(model=model, enforce_eager=True, dtype="bfloat16", kv_cache_memory_bytes=1 << 30,
              max_model_len=8192, enable_prefix_caching=spec["prefix_caching"], disable_log_stats=False)
    if spec.get("connector"):
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector=spec["connector"], kv_role="kv_both",
                                                    kv_connector_extra_config=spec.get("extra") or {})
    llm = LLM(**kw)
    tok = AutoTokenizer.from_pretrained(model)
    out: dict = {}
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1), use_tqdm=False)
    if spec["mode"] == "ttft":
        ps = prompts(tok, 4, spec["length"])
        one = SamplingParams(max_tokens=1, temperature=0.0)
        times = []
        for p in ps:
            for rep in range(spec.get("repeat", 1)):
                t = time.perf_counter()
                llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
                if rep == spec.get("repeat", 1) - 1:
                    times.append(time.perf_counter() - t)
        out["ttft"] = times
    else:  # throughput: batches of 16 new prompts each (every block new to the store)
        ps = prompts(tok, 16 * BATCHES, 512)
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        out["seconds"] = []
        for b in range(BATCHES):
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps[16 * b:16 * (b + 1)]], params,
                         use_tqdm=False)
            out["seconds"].append(time.perf_counter() - t)
    out["external"] = sum(m.value for m in llm.get_metrics() if m.name == "vllm:prompt_tokens_by_source"
                          and m.labels.get("source") == "external_kv_transfer")
    llm.llm_engine.engine_core.shutdown()
    from ucm.tiers.store import close_shared

    close_shared()
    return out


def run_or_crash(spec: dict) -> dict:
    try:
        return run(spec)
    except RuntimeError as e:
        last = [l for l in str(e).splitlines() if "Error" in l]
        return {"crash": last[-1][:160] if last else "crashed", "ttft": [float("nan")], "external": 0}


def run(spec: dict) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0",
               VLLM_LOGGING_LEVEL="WARNING", UNIFIED_CACHE_LOG_LEVEL=os.environ.get("UNIFIED_CACHE_LOG_LEVEL", "WARNING"), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("E2E ")), None)
    if line is None:
        raise RuntimeError(f"child failed: {spec}\n{p.stderr[-4000:]}")
    return json.loads(line[4:])


def ttft_rounds(n: int, rounds: int):
    """TTFT of every configuration at prompt length n. The stores are written once by cold runs; then
    each round measures the floor and every warm configuration back to back (this machine's speed drifts
    between minutes, so ratios are taken within rounds). Returns (n, medians, ucm external tokens,
    Example external tokens, Example crash)."""
    root = tempfile.mkdtemp(prefix="ucm-e2e-", dir=os.path.expanduser("~"))
    shm = os.path.join("/dev/shm", os.path.basename(root))

    def ucm_extra(host: str, layerwise: bool = True) -> dict:
        return {"host": {"capacity": "2GiB", "path": f"{shm}-{host}"},
                "ssd": {"path": os.path.join(root, "ssd"), "capacity": "8GiB"},
                "transfer": {"layerwise_load": layerwise}}

    host_only = {"host": {"capacity": "2GiB", "path": f"{shm}-kept", "keep_after_exit": True}, "ssd": None}

    ttft = {"mode": "ttft", "length": n, "prefix_caching": False}
    example = {"shared_storage_path": os.path.join(root, "example")}
    res = {"nocache": [run(ttft)],
           "ucm_cold": [run({**ttft, "connector": "UCMConnector", "extra": ucm_extra("cold")})],
           "ucm_host_cold": [run({**ttft, "connector": "UCMConnector", "extra": host_only})],
           "example_cold": [run_or_crash({**ttft, "connector": "ExampleConnector", "extra": example})]}
    for r in range(rounds):
        round_res = {"floor": run({**ttft, "prefix_caching": True, "repeat": 2})}
        for name, extra in (("ucm", ucm_extra(f"r{r}")), ("ucm_whole", ucm_extra(f"w{r}", layerwise=False)),
                            ("ucm_host", host_only)):
            drop_page_cache(root)  # every SSD read comes from the disk; ucm_host reads shared memory
            round_res[name] = run({**ttft, "connector": "UCMConnector", "extra": extra})
            if name != "ucm_host":  # the next warm SSD process starts with an empty host tier again
                shutil.rmtree(extra["host"]["path"], ignore_errors=True)
        drop_page_cache(root)
        round_res["example"] = run_or_crash({**ttft, "connector": "ExampleConnector", "extra": example})
        for k, v in round_res.items():
            res.setdefault(k, []).append(v)
    shutil.rmtree(root, ignore_errors=True)
    for d in (f"{shm}-cold", f"{shm}-kept"):
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(statistics.median(x["ttft"]) for x in v) * 1e3 for k, v in res.items()}
    med["ucm_ratio"] = statistics.median(statistics.median(u["ttft"]) / statistics.median(f["ttft"])
                                         for u, f in zip(res["ucm"], res["floor"]))
    return n, med, res["ucm"][-1]["external"], res["example"][-1]["external"], res["example"][-1].get("crash")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        print("E2E " + json.dumps(child(json.loads(args.child))), flush=True)
        os._exit(0)
    rows = []
    for n in args.lengths:
        rows.append(ttft_rounds(n, args.rounds))
        print(n, rows[-1][1], flush=True)
    bases, conns = [], []
    for rep in range(3):  # alternate processes: this machine's speed drifts between minutes
        bases += run({"mode": "batch", "prefix_caching": False})["seconds"][1:]
        root = tempfile.mkdtemp(prefix="ucm-e2e-", dir=os.path.expanduser("~"))
        shm = os.path.join("/dev/shm", os.path.basename(root))
        conns += run({"mode": "batch", "prefix_caching": False, "connector": "UCMConnector",
                      "extra": {"host": {"capacity": "2GiB", "path": shm},
                                "ssd": {"path": os.path.join(root, "ssd"), "capacity": "8GiB"}}})["seconds"][1:]
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    base, conn = statistics.median(bases), statistics.median(conns)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    out = ["# End-to-end TTFT with vLLM (CPU) and SmolLM2-135M", "",
           f"Machine: {os.cpu_count()} cores ({cpu}); date {datetime.date.today()}; vLLM CPU 0.32.0, bf16, block 128, "
           "VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_OMP_THREADS_BIND=0 in every run.",
           f"Command: `.venv/bin/python bench/e2e.py{'' if args.rounds == 3 else f' --rounds {args.rounds}'}`. "
           "Each configuration runs in fresh processes; TTFT = wall time "
           "of generate(max_tokens=1), median of 4 prompts of real text. Cold processes write the stores once; "
           f"then {args.rounds} round(s) each measure the floor and every warm configuration back to back, and each cell is the "
           "median over the rounds (ucm / floor: the median of the per-round ratios). Before every warm process "
           "the page cache of the stored files is dropped (posix_fadvise DONTNEED), and ucm's warm SSD processes "
           "start with an empty host tier: their blocks are read from the disk.", "",
           "ucm warm, SSD: the default, SSD hits read layer group by layer group while the forward pass runs "
           "(`transfer.layerwise_load: true`); ucm whole: the same with whole-request loads before the forward pass. "
           "ucm (host tier) is a host-only configuration whose tier outlives its processes (`keep_after_exit: "
           "true`): its warm processes load from shared memory, which isolates the connector's cost from the disk.",
           "",
           "| prompt tokens | no cache ms | vLLM in-memory hit (floor) ms | ucm warm, SSD ms | ucm / floor | "
           "ucm warm, SSD, whole ms | ucm warm, host tier ms | ExampleConnector warm ms | ucm external tokens | "
           "Example external tokens |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for n, m, ue, ee, crash in rows:
        ex = f"crashed: {crash}" if crash else f"{m['example']:.1f}"
        m.setdefault("example", float("nan"))
        out.append(f"| {n} | {m['nocache']:.0f} | {m['floor']:.1f} | {m['ucm']:.1f} | {m['ucm_ratio']:.2f}x | "
                   f"{m['ucm_whole']:.1f} | {m['ucm_host']:.1f} | {ex} | {ue} | {ee} |")
    ratio = base / conn
    out += ["", "## Overhead when nothing hits", "",
            f"Batches of 16 requests, 512 prompt + 32 generated tokens each, every block new to the store (each "
            f"is copied to the host tier and written through to the SSD). 3 alternating processes per "
            f"configuration, {BATCHES} batches each, the first one not counted; median of the 12 batches.", "",
            "| configuration | seconds per batch | tokens/s |", "|---|---|---|",
            f"| no connector | {base:.2f} | {BATCH_TOKENS / base:.0f} |",
            f"| UCMConnector, cold store | {conn:.2f} | {BATCH_TOKENS / conn:.0f} ({100 * (ratio - 1):+.1f}%) |"]
    write_results("e2e.md", out)


if __name__ == "__main__":
    main()
