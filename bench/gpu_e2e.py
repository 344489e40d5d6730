"""End-to-end TTFT and batch throughput on vLLM's GPU build; writes bench/results/gpu_e2e.md.

Runs on the GPU machine (tests/gpu/README.md brings vLLM 0.26 there). Llama-3-8B shapes with dummy
weights (`load_format="dummy"`, no tokenizer, random token prompts), block 16, bf16, eager mode in every
configuration. Each row below is one fresh process:

  nocache / floor   no connector, vLLM's prefix cache on: each prompt cold (no cache), then again
                    (vLLM's own in-memory hit: the floor, nothing to load)
  offload           vLLM's OffloadingConnector (CPU tier, prefix cache off): cold, then again (CPU-tier hit)
  ucm / ucm host    UCMConnector, prefix cache off: cold (its saves on), then again (host-tier hit)
  ucm ssd           UCMConnector in a fresh process, host tier gone, page cache dropped: SSD hits
TTFT = wall time of generate(max_tokens=1) of one prompt, median over the prompts. Throughput: 64
prompts of 2K tokens and 64 generated tokens each in one generate call, (prompt + generated tokens)/s;
the first batch of a process warms up and a second, different batch is timed (ucm warm: that batch
again, all from the host tier). Ceilings in the same run: pinned host<->GPU DMA of 1 GiB, and
the disk's O_DIRECT read and write with dd.

Run there: python3 bench/gpu_e2e.py [--lengths 2000 8000] [--prompts 4] [--disk /tmp]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
             "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "head_dim": 128}
KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # bytes: 128 KiB
BATCH, BATCH_LEN, BATCH_GEN = 64, 2000, 64


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(1000, 120000) for _ in range(length)] for _ in range(n)]


# ---- one configuration, in a child process ---------------------------------------------------------
def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", block_size=16, kv_cache_memory_bytes=spec["kv_bytes"],
              max_model_len=spec["max_len"], enable_prefix_caching=spec["prefix_caching"], seed=0,
              max_num_batched_tokens=spec.get("batched", 16384), disable_log_stats=False)
    if spec.get("connector"):
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector=spec["connector"], kv_role="kv_both",
                                                    kv_connector_extra_config=spec.get("extra") or {})
    llm = LLM(**kw)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 164)))], one, use_tqdm=False)  # warm-up
    out: dict = {"phases": []}
    for phase in spec["phases"]:
        if phase.get("drop_caches"):
            subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)
        ps = prompts(phase["n"], phase["length"], phase["seed"])
        if phase["kind"] == "ttft":
            times = []
            for p in ps:
                t = time.perf_counter()
                llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
                times.append(time.perf_counter() - t)
            out["phases"].append({"ttft": times})
        else:
            params = SamplingParams(max_tokens=BATCH_GEN, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], params, use_tqdm=False)
            dt = time.perf_counter() - t
            toks = sum(len(p) for p in ps) + sum(len(r.outputs[0].token_ids) for r in res)
            out["phases"].append({"seconds": dt, "tokens_per_s": toks / dt})
        out["phases"][-1]["external"] = sum(m.value for m in llm.get_metrics()
                                            if m.name == "vllm:prompt_tokens_by_source"
                                            and m.labels.get("source") == "external_kv_transfer")
    llm.llm_engine.engine_core.shutdown()
    from ucm.tiers.store import close_shared

    close_shared()
    return out


def run(spec: dict, log) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=900)
    log.write(f"=== {spec['name']} ({time.perf_counter() - t0:.0f} s, rc {p.returncode})\n{p.stderr[-6000:]}\n")
    log.flush()
    line = next((l for l in p.stdout.splitlines() if l.startswith("GPU-E2E ")), None)
    if line is None:
        last = [l for l in p.stderr.splitlines() if "Error" in l]
        return {"crash": (last[-1] if last else f"exit {p.returncode}")[:200]}
    return json.loads(line[len("GPU-E2E "):])


# ---- ceilings --------------------------------------------------------------------------------------
def dma_ceiling() -> tuple[float, float]:
    import torch

    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    best = [float("inf"), float("inf")]
    for _ in range(5):
        for k, (dst, src) in enumerate(((dev, host), (host, dev))):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    return n / best[0] / 1e9, n / best[1] / 1e9


def dd(args: list[str]) -> float:
    p = subprocess.run(["dd", *args], capture_output=True, text=True)
    line = [l for l in p.stderr.splitlines() if "copied" in l]
    return float(line[-1].split(",")[-1].split()[0]) if line else float("nan")  # GB/s as dd prints it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--disk", default="/tmp")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "gpu_e2e.log"))
    args = ap.parse_args()
    if args.child:
        print("GPU-E2E " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    import torch

    log = open(args.log, "w")
    model = tempfile.mkdtemp(prefix="llama3-8b-")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f)
    root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
    shm = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir="/dev/shm")
    maxlen = max(args.lengths + [BATCH_LEN]) + 128
    kv_bytes = 48 << 30
    ttft_gib = (args.prompts * max(args.lengths) * KV_PER_TOKEN >> 30) + 2  # every prompt fits a tier
    batch_gib = (2 * BATCH * BATCH_LEN * KV_PER_TOKEN >> 30) + 2

    def ucm(host: str, gib: int = ttft_gib) -> dict:
        return {"host": {"capacity": f"{gib}GiB", "path": os.path.join(shm, host)},
                "ssd": {"path": os.path.join(root, "ssd"), "capacity": f"{gib}GiB"}}

    offload = {"cpu_bytes_to_use": ttft_gib << 30}
    base = {"model": model, "kv_bytes": kv_bytes, "max_len": maxlen}
    rows, table = {}, []
    for n in args.lengths:
        tt = lambda seed, **kw: {"kind": "ttft", "n": args.prompts, "length": n, "seed": seed, **kw}  # noqa: E731
        two = [tt(n), tt(n)]
        rows[n] = {
            "plain": run({**base, "name": f"plain {n}", "prefix_caching": True, "phases": two}, log),
            "offload": run({**base, "name": f"offload {n}", "prefix_caching": False, "connector": "OffloadingConnector",
                            "extra": offload, "phases": two}, log),
            "ucm": run({**base, "name": f"ucm {n}", "prefix_caching": False, "connector": "UCMConnector",
                        "extra": ucm(f"h{n}"), "phases": two}, log),
        }
        rows[n]["ssd"] = run({**base, "name": f"ucm ssd {n}", "prefix_caching": False, "connector": "UCMConnector",
                              "extra": ucm(f"h{n}-fresh"), "phases": [tt(n, drop_caches=True)]}, log)
        shutil.rmtree(os.path.join(shm, f"h{n}"), ignore_errors=True)
    batch = {}
    if not args.no_batch:
        bt = lambda seed: {"kind": "batch", "n": BATCH, "length": BATCH_LEN, "seed": seed}  # noqa: E731
        batch["plain"] = run({**base, "name": "batch plain", "prefix_caching": False, "phases": [bt(1), bt(2)]}, log)
        batch["offload"] = run({**base, "name": "batch offload", "prefix_caching": False,
                                "connector": "OffloadingConnector", "extra": {"cpu_bytes_to_use": batch_gib << 30},
                                "phases": [bt(1), bt(2)]}, log)
        batch["ucm"] = run({**base, "name": "batch ucm", "prefix_caching": False, "connector": "UCMConnector",
                            "extra": ucm("batch", batch_gib), "phases": [bt(1), bt(2), bt(2)]}, log)
    h2d, d2h = dma_ceiling()
    ddfile = os.path.join(root, "dd.bin")
    ddw = dd(["if=/dev/zero", f"of={ddfile}", "bs=4M", "count=1024", "oflag=direct"])
    ddr = dd([f"if={ddfile}", "of=/dev/null", "bs=4M", "count=1024", "iflag=direct"])
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)

    import vllm

    med = lambda r, k: statistics.median(r["phases"][k]["ttft"]) * 1e3 if "phases" in r else float("nan")  # noqa: E731
    table += [f"# End-to-end on vLLM's GPU build ({torch.cuda.get_device_name()})", "",
              f"Card: {torch.cuda.get_device_name()}; vLLM {vllm.__version__}; torch {torch.__version__}; "
              f"{os.cpu_count()} CPU cores; date {datetime.date.today()}. Llama-3-8B shapes, dummy weights, block 16, "
              f"bf16, eager, one request at a time for TTFT (median of {args.prompts} prompts), each row's "
              "configuration in a fresh process.",
              f"Command: `python3 bench/gpu_e2e.py --lengths {' '.join(map(str, args.lengths))} --prompts {args.prompts}` "
              "on the GPU machine (tests/gpu/README.md for the vLLM bundle).",
              f"Ceilings measured in the same run: pinned DMA host->GPU {h2d:.1f} GB/s, GPU->host {d2h:.1f} GB/s "
              f"(1 GiB); disk O_DIRECT read {ddr:.2f} GB/s, write {ddw:.2f} GB/s (dd, 4 GiB).", "",
              "| prompt tokens | no cache ms | vLLM prefix-cache hit (floor) ms | OffloadingConnector CPU hit ms | "
              "ucm host-tier hit ms | ucm SSD hit ms | copy limit ms | ucm host / copy limit | ucm cold ms | "
              "Offloading cold ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        floor = med(r["plain"], 1)
        limit = max(floor, n * KV_PER_TOKEN / (h2d * 1e9) * 1e3)
        cells = [med(r["plain"], 0), floor, med(r["offload"], 1), med(r["ucm"], 1), med(r["ssd"], 0), limit,
                 med(r["ucm"], 1) / limit, med(r["ucm"], 0), med(r["offload"], 0)]
        table.append(f"| {n} | " + " | ".join(f"{c:.2f}x" if k == 6 else f"{c:.1f}" for k, c in enumerate(cells)) + " |")
    for n, r in rows.items():
        crashed = [f"{k}: {v['crash']}" for k, v in r.items() if "crash" in v]
        ext = {k: [p.get("external") for p in v.get("phases", [])] for k, v in r.items()}
        table.append(f"\n{n} tokens: external tokens counted by vLLM (cumulative per process): {ext}"
                     + (f"; crashed: {crashed}" if crashed else ""))
    if batch:
        tps = lambda r, k: r["phases"][k]["tokens_per_s"] if "phases" in r else float("nan")  # noqa: E731
        plain = tps(batch["plain"], 1)
        table += ["", f"Batch of {BATCH} x {BATCH_LEN}-token prompts, {BATCH_GEN} generated tokens each "
                  "((prompt + generated) tokens/s; second batch of each process; ucm warm: the same prompts again):",
                  "", "| configuration | tokens/s | vs no connector |", "|---|---|---|",
                  f"| no connector | {plain:.0f} | 1.00 |",
                  f"| OffloadingConnector, cold | {tps(batch['offload'], 1):.0f} | {tps(batch['offload'], 1) / plain:.2f} |",
                  f"| ucm, cold store | {tps(batch['ucm'], 1):.0f} | {tps(batch['ucm'], 1) / plain:.2f} |",
                  f"| ucm, every prompt in the host tier | {tps(batch['ucm'], 2):.0f} | {tps(batch['ucm'], 2) / plain:.2f} |"]
        crashed = [f"{k}: {v['crash']}" for k, v in batch.items() if "crash" in v]
        if crashed:
            table.append(f"\ncrashed: {crashed}")
    write_results("gpu_e2e.md", table)
    out = os.environ.get("OUT")
    if out:
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_e2e.md"), out)


if __name__ == "__main__":
    main()
