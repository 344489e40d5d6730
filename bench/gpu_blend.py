"""Blending's time to first token on vLLM's GPU build; writes bench/results/blend-gpu-speed.md.

Runs on the GPU machine (tests/gpu/README.md brings vLLM 0.26 there). Llama-3-8B shapes with dummy weights
(`load_format="dummy"`, no tokenizer, random token prompts), block 16, bf16, eager, FlashAttention 3.
A prompt is a 32-token preamble, four documents of D tokens drawn from a pool of eight, and a 32-token
question; each document is a chunk (`kv_transfer_params["ucm_blend_chunks"]`). Each configuration is one
fresh process that runs D = 512, then 2048:

  full        no connector: the prompt prefilled in full
  blend       BlendConnector at the default ratio (15%, check layer 3): the pool's documents cached alone
              first (one batch), then the prompts, whose documents load from the host tier
  blend 0.0   the same with recompute_ratio 0: only the tokens never reused (preamble, question) and the
              pages' check layer computed after the check layer: the least a blended pass costs here
  blend 1.0   the same with recompute_ratio 1.0: every reused token recomputed after the check layer,
              the subset machinery's cost with nothing saved by it

vLLM's prefix cache is on in every process (its default; a blended prompt is never a prefix hit). TTFT =
wall time of generate(max_tokens=1) of one prompt, median over the prompts after one untimed prompt. The
blend processes report their own work (medians per prompt, from the log): the host's enqueueing of the
load before the pass and of its writes during the first layers, reading, rotating and writing the
documents' KV on its own stream beside the first layers (CUDA events), and the host's time in the selection
at the check layer (its waits for the copies and the keys included). `--timed` times the selection after
a device synchronize instead (UCM_BLEND_TIMING=1), which adds those synchronizations to the TTFT.

Run there: python3 bench/gpu_blend.py [--prompts 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402
from gpu_e2e import LLAMA3_8B  # noqa: E402

LENGTHS = (512, 2048)
POOL, PER_PROMPT, PRE, QUESTION = 8, 4, 32, 32


def toks(n: int, r: random.Random) -> list[int]:
    return [r.randrange(1000, 120000) for _ in range(n)]


def workload(length: int, n: int) -> tuple[list[list[int]], list[dict]]:
    """(pool documents, prompts {"tokens", "chunks"}) for documents of `length` tokens."""
    r = random.Random(length)
    pool = [toks(length, r) for _ in range(POOL)]
    prompts = []
    for _ in range(n):
        t, chunks = toks(PRE, r), []
        for d in r.sample(range(POOL), PER_PROMPT):
            chunks.append([len(t), len(t) + length])
            t += pool[d]
        prompts.append({"tokens": t + toks(QUESTION, r), "chunks": chunks})
    return pool, prompts


def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", block_size=16, kv_cache_memory_bytes=16 << 30, max_model_len=16384,
              enable_prefix_caching=True, seed=0, max_num_batched_tokens=16384)
    if spec.get("extra") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="BlendConnector", kv_role="kv_both",
                                                    kv_connector_extra_config=spec["extra"])
    llm = LLM(**kw)

    def params(chunks=None):
        extra = {"extra_args": {"kv_transfer_params": {"ucm_blend_chunks": chunks}}} if chunks else {}
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, **extra)

    out = {}
    for length in LENGTHS:
        pool, prompts = workload(length, spec["prompts"] + 1)
        if spec.get("extra") is not None:
            llm.generate([TokensPrompt(prompt_token_ids=d) for d in pool], [params([[0, length]]) for _ in pool],
                         use_tqdm=False)
            time.sleep(1.0)  # the saves land
        times = []
        for p in prompts:
            print(f"GPU-BLEND-MARK {length}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p["tokens"])], params(p["chunks"]), use_tqdm=False)
            times.append(time.perf_counter() - t)
        out[str(length)] = {"warmup": times[0], "ttft": times[1:]}
    llm.llm_engine.engine_core.shutdown()
    from ucm.tiers.store import close_shared

    close_shared()
    return out


def run_child(spec: dict) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, UCM_BLEND_TIMING="1" if spec.get("timed") else "0")
    p = subprocess.run([sys.executable, __file__, "--child", f.name], capture_output=True, text=True, env=env,
                       timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("GPU-BLEND-RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{spec['name']} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(line[0][len("GPU-BLEND-RESULT "):]), p.stderr


def blend_parts(log: str) -> dict[str, dict[str, float]]:
    """Per document length: medians of the blend's own work in the timed prompts (the log's ms figures)."""
    out: dict[str, dict[str, list[float]]] = {}
    length = None
    for line in log.splitlines():
        m = re.search(r"GPU-BLEND-MARK (\d+)", line)
        if m:
            length = m.group(1)
            continue
        if length is None:
            continue
        d = out.setdefault(length, {"load": [], "select": [], "reused": [], "recomputed": [], "enqueue": [],
                                    "writes": []})
        m = re.search(r"blend: (\d+) tokens of \d+ requests reused at new positions \(their loads enqueued in "
                      r"([\d.]+) ms", line)
        if m:
            d["reused"].append(float(m.group(1)))
            d["enqueue"].append(float(m.group(2)))
        m = re.search(r"blend: recomputed (\d+) of \d+ reused tokens.*selection ([\d.]+) ms; reused KV read, "
                      r"rotated and written in ([\d.]+) ms.*its writes enqueued in ([\d.]+) ms", line)
        if m:
            d["recomputed"].append(float(m.group(1)))
            d["select"].append(float(m.group(2)))
            d["load"].append(float(m.group(3)))
            d["writes"].append(float(m.group(4)))
    return {k: {n: statistics.median(v[1:] or v) if v else float("nan") for n, v in d.items()} for k, d in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--out", default="blend-gpu-speed.md")
    ap.add_argument("--only", nargs="*", help="configurations to run (default: all); the table needs full")
    ap.add_argument("--show", default="", help="print the blend processes' log lines matching this regex")
    ap.add_argument("--timed", action="store_true", help="time the selection after a device synchronize")
    a = ap.parse_args()
    if a.child:
        print("GPU-BLEND-RESULT " + json.dumps(child(json.load(open(a.child)))), flush=True)
        os._exit(0)
    import torch
    import vllm

    model = tempfile.mkdtemp(prefix="llama3-8b-")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f)
    host = tempfile.mkdtemp(prefix="ucm-blend-", dir="/dev/shm")
    configs = [(n, b) for n, b in [("full", None), ("blend", {}), ("blend 0.0", {"recompute_ratio": 0.0}),
                                   ("blend 1.0", {"recompute_ratio": 1.0})] if not a.only or n in a.only]
    results, logs = {}, {}
    for name, blend in configs:
        extra = None if blend is None else {"host": {"capacity": "8GiB", "path": os.path.join(host, name.replace(" ", "-"))},
                                             "ssd": None, "blend": {"separator": None, **blend}}
        t = time.time()
        results[name], logs[name] = run_child({"name": name, "model": model, "prompts": a.prompts, "extra": extra,
                                               "timed": a.timed})
        print(f"[gpu_blend] {name}: {time.time() - t:.0f} s", flush=True)
        if a.show:
            print("\n".join(x[-260:] for x in logs[name].splitlines() if re.search(a.show, x)), flush=True)
    if "full" not in results:
        print(json.dumps(results))
        return
    out_dir = os.environ.get("OUT")
    if out_dir:
        for name, log in logs.items():
            with open(os.path.join(out_dir, f"stderr-blend-{name.replace(' ', '-')}.txt"), "w") as f:
                f.write(log)
        with open(os.path.join(out_dir, "gpu_blend.json"), "w") as f:
            json.dump(results, f)
    parts = {name: blend_parts(logs[name]) for name in logs}
    rows = []
    for length in map(str, LENGTHS):
        full = statistics.median(results["full"][length]["ttft"])
        for name, _ in configs:
            ttft = statistics.median(results[name][length]["ttft"])
            p = parts[name].get(length, {})
            rows.append([f"4 x {length}", name, f"{1e3 * ttft:.1f}", f"{full / ttft:.2f}x",
                         *(f"{p[k]:.1f}" if p.get(k) == p.get(k) and k in p else ""
                           for k in ("enqueue", "writes", "load", "select")),
                         f"{p['recomputed']:.0f} / {p['reused']:.0f}" if "reused" in p and p["reused"] == p["reused"] else ""])
    header = ["prompt", "configuration", "TTFT ms (median)", "speed-up vs full prefill",
              "load enqueued before the pass ms (host)", "writes enqueued during layers 0-2 ms (host)",
              "read + rotate + write ms (own stream)", "selection ms (host)", "reused tokens recomputed / reused"]
    intro = (f"{torch.cuda.get_device_name()}; vLLM {vllm.__version__}; torch {torch.__version__}; "
             f"{datetime.date.today()}. Llama-3-8B shapes, dummy weights, block 16, bf16, eager, FlashAttention; "
             f"prompts of a {PRE}-token preamble, {PER_PROMPT} documents and a {QUESTION}-token question; TTFT median "
             f"of {a.prompts} prompts after one untimed, one process per configuration (bench/gpu_blend.py). "
             "Read + rotate + write: the reused KV's way into the cache, on a stream of its own beside the first "
             "layers' computation (CUDA events, from the first copy to the last write); selection: the host's time "
             "in it at the check layer, " + ("after a device synchronize (--timed, UCM_BLEND_TIMING=1: the "
             "synchronizations are in the TTFT)." if a.timed else "its waits for the copies and the keys included."))
    write_results(a.out, ["# Blending on the GPU: time to first token", "", intro, "",
                          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(r) + " |" for r in rows)])


if __name__ == "__main__":
    main()
