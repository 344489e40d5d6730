"""End-to-end TTFT and batch throughput on vLLM's GPU build; writes bench/results/gpu_e2e.md.

Runs on the GPU machine (tests/gpu/README.md brings vLLM 0.26 there). Llama-3-8B shapes with dummy
weights (`load_format="dummy"`, no tokenizer, random token prompts), block 16, bf16, eager mode in every
configuration. Each configuration is one fresh process, which runs every prompt length in turn:

  plain             no connector, vLLM's prefix cache on: each prompt cold (no cache), then again
                    (vLLM's own in-memory hit: the floor, nothing to load)
  offload           vLLM's OffloadingConnector (CPU tier, prefix cache on): cold, prefix cache emptied, then
                    again (CPU-tier hit), then once more (that process's floor)
  ucm               UCMConnector, the same phases (host-tier hit)
  ucm ssd           UCMConnector in a fresh process, a new host tier, page cache dropped: SSD hits,
                    every hit loaded (`load_planner: false`), then again with the load planner
  --ablations       also ucm's host-tier hits loaded synchronously layer by layer (`load_mode: sync`) and
                    with the load planner off (no forward-pass timer), each its own process
TTFT = wall time of generate(max_tokens=1) of one prompt (of n + TAIL tokens), median over the prompts; each
phase first runs one more prompt of its length, untimed (a process's first prompt of a shape pays one-time costs in every
configuration). Throughput: 64 prompts of 2K tokens and 64 generated tokens each in one generate call,
(prompt + generated tokens)/s; the first batch of a process warms up and TIMED more batches of new prompts
are timed, their median the process's figure (ucm warm: the first of them again, all from the host tier;
then in a fresh process with the page cache dropped, all on the SSD, with the load planner, after a
warm-up batch). The cold-store cost is split by ablation (`--ablations`), each its own process: ucm
with kv_role kv_consumer (lookups, no saves), with a host tier only (saves, no SSD writes), with SSD
writes from threads of the engine's process (`ssd.writer: thread`, the design before), with a 0.5 ms
GIL switch interval, and (with py-spy) whole under a `--gil` profile. Each batch configuration also times
a prefill-only batch (new prompts, one token each). `--py-spy PATH` samples the timed batch of `plain`
and `ucm` (`--profile idle|gil`), stacks under $OUT. Ceilings in the same run: pinned host<->GPU DMA of 1 GiB, the disk's O_DIRECT read and write (dd).

Run there: python3 bench/gpu_e2e.py [--lengths 2000 8000 32000] [--prompts 4] [--disk /tmp]
"""

from __future__ import annotations

import argparse
import collections
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
TIMED = 3  # timed batches per batch process (new prompts each); the process's figure is their median
TAIL = 8  # TTFT prompts are n + TAIL tokens: half a block no tier holds, computed in every configuration (with
# n a multiple of the block, vLLM's prefix cache lacks the last full block and a connector loads just it)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(1000, 120000) for _ in range(length)] for _ in range(n)]


# ---- one configuration, in a child process ---------------------------------------------------------
def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from ucm.logger import get_logger

    bench_log = get_logger("Bench")
    kw = dict(model=spec["model"], load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", block_size=spec.get("block_size", 16), kv_cache_memory_bytes=spec["kv_bytes"],
              max_model_len=spec["max_len"], enable_prefix_caching=spec["prefix_caching"], seed=0,
              max_num_batched_tokens=spec.get("batched", 16384), disable_log_stats=False)
    if spec.get("connector"):
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector=spec["connector"], kv_role=spec.get("role", "kv_both"),
                                                    kv_connector_extra_config=spec.get("extra") or {})
    if spec.get("switch_interval"):
        sys.setswitchinterval(spec["switch_interval"])  # an experiment: how long a GIL waiter waits to demand it
    llm = LLM(**kw)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 164)))], one, use_tqdm=False)  # warm-up
    out: dict = {"phases": []}
    for phase in spec["phases"]:
        time.sleep(phase.get("sleep", 0))  # lets the saves of the phase before finish
        if phase.get("drop_caches"):
            subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)
        reset = _reset_prefix_cache(llm) if phase.get("reset_prefix") else None
        ps = prompts(phase["n"], phase["length"] + phase.get("tail", 0), phase["seed"])
        external0 = _external(llm)
        if phase.get("mark"):
            print(f"GPU-E2E-MARK {phase['mark']} {time.time()}", flush=True)
        if phase["kind"] == "ttft":
            times = []
            for p in ps:
                t = time.perf_counter()
                llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
                times.append(time.perf_counter() - t)
                if spec.get("debug"):  # the prompt's span on the debug log's clock
                    bench_log.debug("prompt of %d tokens: generate returned, %.1f ms", len(p), 1e3 * times[-1])
            # the phase's first prompt meets its shapes first (allocator growth, kernel choice) in every
            # configuration alike: kept apart, not in the median
            out["phases"].append({"warmup": times[0], "ttft": times[1:]} if phase.get("warmup") else {"ttft": times})
        else:
            params = SamplingParams(max_tokens=phase.get("gen", BATCH_GEN), temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], params, use_tqdm=False)
            dt = time.perf_counter() - t
            toks = sum(len(p) for p in ps) + sum(len(r.outputs[0].token_ids) for r in res)
            out["phases"].append({"seconds": dt, "tokens_per_s": toks / dt})
        if phase.get("mark"):
            print(f"GPU-E2E-MARK end {time.time()}", flush=True)
        out["phases"][-1].update(external=_external(llm) - external0, role=phase.get("role", ""),
                                 length=phase["length"], **({"reset": reset} if reset is not None else {}))
    llm.llm_engine.engine_core.shutdown()
    from ucm.tiers.store import close_shared

    close_shared()
    return out


def _reset_prefix_cache(llm, tries: int = 50) -> bool:
    """Empty vLLM's GPU prefix cache (the connector's tiers keep their blocks), so the next phase's prompts
    load from the connector; True once vLLM did. vLLM refuses while a finished request's blocks wait for
    its saves, and an offline engine only learns they are done in a step: a prompt shorter than a block
    (nothing to save) steps it before each retry."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for _ in range(tries):
        if llm.reset_prefix_cache():
            return True
        llm.generate([TokensPrompt(prompt_token_ids=list(range(200, 208)))], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        time.sleep(0.05)
    return False


def _external(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:prompt_tokens_by_source"
               and m.labels.get("source") == "external_kv_transfer")


ONLY: set[str] = set()  # --only: the configurations to run (names as in the log); empty: all


PROFILE_FLAGS = {"idle": ["--idle"], "gil": ["--gil"]}


def run(spec: dict, log, py_spy: str | None = None) -> dict:
    """One configuration in a fresh process; with `py_spy`, its marked phase is sampled (raw stacks):
    spec["profile"] "idle" (every thread, waits included; the default) or "gil" (only the thread that
    holds the GIL in each sample)."""
    if ONLY and spec["name"].split(" #")[0] not in ONLY:  # "ttft ucm" also picks its repeats ("ttft ucm #2")
        return {"skipped": True}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    if spec.get("debug"):
        env["UNIFIED_CACHE_LOG_LEVEL"] = "DEBUG"  # ucm's lookup and load times per request
        env["UNIFIED_CACHE_STEP_TRACE"] = "1"  # and every step's connector calls (connector/steptrace.py)
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    errf = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=env)
    spy, lines = None, []
    raw = os.path.join(os.environ.get("OUT", "/tmp"), f"py-spy-{spec['name'].replace(' ', '-')}.txt")
    for line in proc.stdout:
        lines.append(line)
        if py_spy and line.startswith("GPU-E2E-MARK ") and spy is None and not line.startswith("GPU-E2E-MARK end"):
            flags = PROFILE_FLAGS[spec.get("profile", "idle")]
            spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--rate", "100", "--threads", *flags,
                                    "--nonblocking", "--format", "raw", "--output", raw],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if spy is not None and line.startswith("GPU-E2E-MARK end"):
            spy.send_signal(2)  # SIGINT: py-spy writes its samples and exits
            spy.wait(timeout=60)
    proc.wait(timeout=900)
    errf.seek(0)
    err = errf.read()
    log.write(f"=== {spec['name']} ({time.perf_counter() - t0:.0f} s, rc {proc.returncode})\n{err[-6000:]}\n")
    if spec.get("debug"):
        with open(os.path.join(os.environ.get("OUT", "/tmp"), f"stderr-{spec['name'].replace(' ', '-')}.txt"), "w") as f:
            f.write(err)
    log.flush()
    line = next((l for l in lines if l.startswith("GPU-E2E ")), None)
    if line is None:
        last = [l for l in err.splitlines() if "Error" in l]
        return {"crash": (last[-1] if last else f"exit {proc.returncode}")[:200]}
    res = json.loads(line[len("GPU-E2E "):])
    if spy is not None and os.path.exists(raw):
        res["profile"] = summarize_profile(raw)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_e2e.partial.jsonl"), "a") as f:
        f.write(json.dumps({"name": spec["name"], **res}) + "\n")  # kept if a later configuration runs out of time
    return res


BLOCKING = ("Event.synchronize", "Stream.synchronize", "Condition.wait", "FileSlots.write", "_report_continuous_usage",
            "page_checksum", "_populate", "posix_fallocate")  # calls that wait, or run without the GIL


def summarize_profile(raw: str) -> dict:
    """From py-spy's raw stacks: the engine (main) thread's samples split into GPU waits and its own
    Python; per other thread the samples outside a blocking call (`idle`: the ones that may hold the
    GIL) or, for a `gil` profile, every sample (there only the GIL's holder is sampled)."""
    main = {"samples": 0, "gpu_waits": 0, "python": 0}
    busy: collections.Counter = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            frames, n = stack.split(";"), int(n)
            thread = frames[0].split(": ")[-1]
            names = [fr.split(" (")[0] for fr in frames[1:]]
            blocked = any(b in name for name in names for b in BLOCKING)
            if thread == "MainThread":
                main["samples"] += n
                main["gpu_waits" if any(x.endswith("synchronize") for x in names) else "python"] += n
            elif not blocked:
                busy[thread] += n
    return {"main_thread": main, "other_threads_outside_blocking_calls": dict(busy.most_common())}


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
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--disk", default="/tmp")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--ablations", action="store_true", help="also the TTFT and batch variants that split ucm's costs")
    ap.add_argument("--py-spy", help="py-spy binary: profile the timed batch of plain and ucm")
    ap.add_argument("--spy-warm", action="store_true",
                    help="with --py-spy: profile ucm's warm batch, not its first timed one")
    ap.add_argument("--profile", default="idle", choices=sorted(PROFILE_FLAGS), help="py-spy's mode for plain and ucm")
    ap.add_argument("--results", default="gpu_e2e.md", help="table file under bench/results")
    ap.add_argument("--repeat", type=int, default=1, help="batch: run no connector and ucm (cold) this many times; "
                    "TTFT: OffloadingConnector and ucm; alternating, each in a fresh process")
    ap.add_argument("--ucm-debug", action="store_true",
                    help='keep the debug logs of the ucm TTFT processes and of "batch ucm" under $OUT')
    ap.add_argument("--only", nargs="+", default=[], help='configurations to run, e.g. "batch ucm" "ttft offload"')
    ap.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "gpu_e2e.log"))
    args = ap.parse_args()
    if args.child:
        print("GPU-E2E " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    import torch

    ONLY.update(args.only)
    log = open(args.log, "w")
    model = tempfile.mkdtemp(prefix="llama3-8b-")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f)
    shm = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir="/dev/shm")
    maxlen = max(args.lengths + [BATCH_LEN]) + 128
    base = {"model": model, "kv_bytes": 48 << 30, "max_len": maxlen}
    h2d, d2h = dma_ceiling()

    def ucm(root: str, host: str, gib: int, ssd: bool = True, writer: str = "process") -> dict:
        return {"host": {"capacity": f"{gib}GiB", "path": os.path.join(shm, host)},
                "ssd": {"path": os.path.join(root, "ssd"), "capacity": f"{gib}GiB", "writer": writer} if ssd else None}

    ttft, batch = {}, {}
    if not args.no_ttft:
        root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
        gib = ((args.prompts + 1) * sum(args.lengths) * KV_PER_TOKEN >> 30) + 2  # every prompt fits each tier
        plain_phases, cold_warm, warm = [], [], []
        n_all = args.prompts + 1  # one more prompt per phase: the first warms up, untimed
        for k, n in enumerate(args.lengths):
            ph = lambda role, **kw: {"kind": "ttft", "n": n_all, "length": n, "tail": TAIL, "seed": k,  # noqa: E731
                                     "warmup": True, "role": role, **kw}
            plain_phases += [ph("cold"), ph("floor", sleep=2)]
            # a connector's process: cold (its saves), vLLM's prefix cache emptied, the same prompts again (the
            # connector's hits), then once more (vLLM's own hits: the floor of this very process)
            cold_warm += [ph("cold"), ph("hit", sleep=2, reset_prefix=True), ph("floor")]
            warm += [ph("ssd", drop_caches=True)]
        ttft["plain"] = run({**base, "name": "ttft plain", "prefix_caching": True, "phases": plain_phases}, log)
        ttft["offload"] = run({**base, "name": "ttft offload", "prefix_caching": True,
                               "connector": "OffloadingConnector", "extra": {"cpu_bytes_to_use": gib << 30},
                               "phases": cold_warm}, log)
        ttft["ucm"] = run({**base, "name": "ttft ucm", "prefix_caching": True, "connector": "UCMConnector",
                           "extra": ucm(root, "ttft", gib), "phases": cold_warm, "debug": args.ucm_debug}, log)
        shutil.rmtree(os.path.join(shm, "ttft"), ignore_errors=True)
        if args.ablations:  # sync loads, copied layer by layer during the forward pass (not recoverable after a
            # load error on vLLM 0.26's GPU runner, which is why `auto` loads asynchronously there)
            root2 = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
            ttft["ucm layers"] = run({**base, "name": "ttft ucm layers", "prefix_caching": True,
                                      "connector": "UCMConnector", "debug": args.ucm_debug, "phases": cold_warm,
                                      "extra": {**ucm(root2, "ttft-layers", gib), "transfer": {"load_mode": "sync"}}},
                                     log)
            shutil.rmtree(os.path.join(shm, "ttft-layers"), ignore_errors=True)
            shutil.rmtree(root2, ignore_errors=True)
            # the defaults less the load planner (and so less its forward-pass timer): every hit loaded
            root3 = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
            ttft["ucm no planner"] = run({**base, "name": "ttft ucm no planner", "prefix_caching": True,
                                          "connector": "UCMConnector", "debug": args.ucm_debug, "phases": cold_warm,
                                          "extra": {**ucm(root3, "ttft-np", gib), "transfer": {"load_planner": False}}},
                                         log)
            shutil.rmtree(os.path.join(shm, "ttft-np"), ignore_errors=True)
            shutil.rmtree(root3, ignore_errors=True)
        # SSD hits in fresh processes (host tier gone, page cache dropped): every hit loaded, then the
        # load planner's choice from the bandwidth and step time measured so far (store/rates/)
        ttft["ssd"] = run({**base, "name": "ttft ucm ssd", "prefix_caching": False, "connector": "UCMConnector",
                           "extra": {**ucm(root, "ttft-fresh", gib), "transfer": {"load_planner": False}},
                           "phases": warm}, log)
        shutil.rmtree(os.path.join(shm, "ttft-fresh"), ignore_errors=True)
        ttft["ssd planned"] = run({**base, "name": "ttft ucm ssd planned", "prefix_caching": False,
                                   "connector": "UCMConnector", "extra": ucm(root, "ttft-planned", gib),
                                   "phases": warm, "debug": args.ucm_debug}, log)
        shutil.rmtree(os.path.join(shm, "ttft-planned"), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        for r in range(2, args.repeat + 1):  # alternating fresh processes: one process's median drifts 10-20%
            ttft[f"offload #{r}"] = run({**base, "name": f"ttft offload #{r}", "prefix_caching": True,
                                         "connector": "OffloadingConnector", "extra": {"cpu_bytes_to_use": gib << 30},
                                         "phases": cold_warm}, log)
            root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
            ttft[f"ucm #{r}"] = run({**base, "name": f"ttft ucm #{r}", "prefix_caching": True,
                                     "connector": "UCMConnector", "extra": ucm(root, f"ttft{r}", gib),
                                     "phases": cold_warm}, log)
            shutil.rmtree(os.path.join(shm, f"ttft{r}"), ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_batch:
        root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
        gib = (2 * BATCH * BATCH_LEN * KV_PER_TOKEN >> 30) + 2
        bt = lambda seed, **kw: {"kind": "batch", "n": BATCH, "length": BATCH_LEN, "seed": seed, **kw}  # noqa: E731
        spy, mode = args.py_spy, args.profile
        # a warm-up batch, then TIMED batches of new prompts (the median is the process's figure; py-spy samples
        # the first), then a prefill-only batch: new prompts, one token each (the prefill steps alone)
        seeds = [2] + [10 + k for k in range(1, TIMED)]
        cold = [bt(1)] + [bt(sd, role="timed", **({"mark": "timed"} if k == 0 else {})) for k, sd in enumerate(seeds)]
        prefill = bt(3, gen=1, role="prefill")
        batch["plain"] = run({**base, "name": "batch plain", "prefix_caching": False, "profile": mode,
                              "phases": cold + [prefill]}, log, spy)
        batch["offload"] = run({**base, "name": "batch offload", "prefix_caching": False,
                                "connector": "OffloadingConnector", "extra": {"cpu_bytes_to_use": gib << 30},
                                "phases": cold + [prefill]}, log)
        ucm_batch = {**base, "prefix_caching": False, "connector": "UCMConnector"}
        # warm: the last timed batch again, the newest in the host tier (it holds about two batches; when the disk
        # writes slower than the engine saves, newer saves take the pages of the oldest unflushed blocks)
        warm_batch = bt(seeds[-1], sleep=2, role="warm")
        phases = cold + [warm_batch, prefill]
        if args.spy_warm:  # py-spy samples ucm's warm batch instead of its first timed one
            unmarked = [{k: v for k, v in ph.items() if k != "mark"} for ph in cold]
            phases = unmarked + [{**warm_batch, "mark": "warm"}, prefill]
        batch["ucm"] = run({**ucm_batch, "name": "batch ucm", "extra": ucm(root, "batch", gib), "profile": mode,
                            "debug": args.ucm_debug, "phases": phases}, log, spy)
        shutil.rmtree(os.path.join(shm, "batch"), ignore_errors=True)
        # every prompt only on the SSD (fresh process, a new host tier, page cache dropped), the load planner
        # on: two SSD hits of the warm-up batch's prompts measure the disk (an unknown figure loads), that whole
        # batch warms the process up (stored already: nothing saved, so nothing evicted from the SSD), then the
        # first timed batch from the SSD is timed
        measure = {"kind": "ttft", "n": 2, "length": BATCH_LEN, "seed": 1, "drop_caches": True}
        batch["ucm ssd"] = run({**ucm_batch, "name": "batch ucm ssd", "extra": ucm(root, "batch-ssd", gib),
                                "phases": [measure, bt(1), bt(seeds[0], drop_caches=True, role="ssd")]}, log)
        shutil.rmtree(os.path.join(shm, "batch-ssd"), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        for r in range(2, args.repeat + 1):  # alternating fresh processes: the machine's drift hits both
            batch[f"plain #{r}"] = run({**base, "name": f"batch plain #{r}", "prefix_caching": False,
                                        "phases": cold + [prefill]}, log)
            root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
            batch[f"ucm #{r}"] = run({**ucm_batch, "name": f"batch ucm #{r}", "extra": ucm(root, f"batch{r}", gib),
                                      "phases": cold + [prefill]}, log)
            shutil.rmtree(os.path.join(shm, f"batch{r}"), ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
        if args.ablations:
            variants = {"consumer": {"role": "kv_consumer"}, "host only": {"ssd": False},
                        "thread writer": {"writer": "thread"}, "switch 0.5 ms": {"switch_interval": 0.0005}}
            if spy:
                variants["gil profile"] = {"profile": "gil"}
            for k, (name, v) in enumerate(variants.items()):
                root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
                extra = ucm(root, f"batch-{k}", gib, ssd=v.pop("ssd", True), writer=v.pop("writer", "process"))
                saves = v.get("role") != "kv_consumer"  # then the last timed batch again, from the host tier
                batch[name] = run({**ucm_batch, **v, "name": f"batch ucm {name}", "extra": extra,
                                   "phases": cold + [warm_batch] * saves + [prefill]},
                                  log, spy if "profile" in v else None)
                shutil.rmtree(os.path.join(shm, f"batch-{k}"), ignore_errors=True)
                shutil.rmtree(root, ignore_errors=True)
    root = tempfile.mkdtemp(prefix="ucm-gpu-e2e-", dir=args.disk)
    ddfile = os.path.join(root, "dd.bin")
    ddw = dd(["if=/dev/zero", f"of={ddfile}", "bs=4M", "count=1024", "oflag=direct"])
    ddr = dd([f"if={ddfile}", "of=/dev/null", "bs=4M", "count=1024", "iflag=direct"])
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_e2e.json"), "w") as f:
        json.dump({"ttft": ttft, "batch": batch, "h2d": h2d, "d2h": d2h, "ddr": ddr, "ddw": ddw}, f, indent=1)
    table(args, ttft, batch, h2d, d2h, ddr, ddw)


def table(args, ttft: dict, batch: dict, h2d: float, d2h: float, ddr: float, ddw: float) -> None:
    import torch
    import vllm

    def med(r: dict, n: int, role: str) -> float:
        """The process's median TTFT (ms) of its phase `role` at prompt length n (nan: not run)."""
        ph = [p for p in r.get("phases", []) if p.get("length") == n and p.get("role") == role and "ttft" in p]
        return statistics.median(ph[0]["ttft"]) * 1e3 if ph else float("nan")

    def ratio(a: float, b: float) -> float:
        return a / b if b == b and b else float("nan")

    card = torch.cuda.get_device_name()
    lines = [f"# End-to-end on vLLM's GPU build ({card})", "",
             f"Card: {card}; vLLM {vllm.__version__}; torch {torch.__version__}; {os.cpu_count()} CPU cores; date "
             f"{datetime.date.today()}. Llama-3-8B shapes, dummy weights, block 16, bf16, eager; TTFT one request "
             f"at a time (median of {args.prompts} prompts, after one untimed prompt of the same length that warms each "
             "phase up); each configuration one fresh process.",
             f"Command: `python3 bench/gpu_e2e.py --lengths {' '.join(map(str, args.lengths))} --prompts {args.prompts}"
             f"{' --no-ttft' if args.no_ttft else ''}{' --no-batch' if args.no_batch else ''}"
             f"{' --ablations' if args.ablations else ''}{f' --repeat {args.repeat}' if args.repeat > 1 else ''}"
             f"{' --ucm-debug' if args.ucm_debug else ''}"
             f"{f' --py-spy PY_SPY --profile {args.profile}' if args.py_spy else ''}{' --spy-warm' if args.spy_warm else ''}"
             f"{' --results ' + args.results if args.results != 'gpu_e2e.md' else ''}"
             f"{' --only ' + ' '.join(repr(o) for o in args.only) if args.only else ''}` on the GPU machine "
             "(tests/gpu/README.md for the vLLM bundle).",
             f"Ceilings measured in the same run: pinned DMA host->GPU {h2d:.1f} GB/s, GPU->host {d2h:.1f} GB/s "
             f"(1 GiB); disk O_DIRECT read {ddr:.2f} GB/s, write {ddw:.2f} GB/s (dd, 4 GiB)."]
    if ttft:
        lines += ["", "Host-tier hits: each connector's process (vLLM's prefix cache on) runs the prompts cold, empties "
                  "vLLM's prefix cache, runs them again (the connector's hit), then once more (vLLM's own hit: that "
                  "process's floor). The connector's cost is its hit less its own process's floor, which the "
                  "process-to-process drift of eager launches (10-20%) leaves out. Prompts are the length shown "
                  f"plus {TAIL} tokens, which no tier holds (without them vLLM's prefix cache lacks the prompt's last "
                  "block, and the floor would include a connector's load of it).", "",
                  "| prompt tokens | no cache ms | floor (vLLM prefix-cache hit) ms | copy limit ms | "
                  "OffloadingConnector CPU hit ms | its process's floor ms | ucm host-tier hit ms | its process's floor ms | "
                  "ucm host / copy limit | ucm host / Offloading | ucm cost over its floor ms | Offloading cost over its "
                  "floor ms | ucm cold / no cache | Offloading cold / no cache | ucm host hit, sync load layer by layer "
                  "(`load_mode: sync`) ms | ucm host hit, load planner off ms | ucm SSD hit, every hit loaded ms | "
                  "ucm SSD / no cache | ucm SSD, load planner ms | planner / no cache | planner: tokens loaded per "
                  "prompt (mean) |", "|---" * 21 + "|"]
        for n in args.lengths:
            nocache, floor = med(ttft["plain"], n, "cold"), med(ttft["plain"], n, "floor")
            limit = max(floor, n * KV_PER_TOKEN / (h2d * 1e9) * 1e3) if floor == floor else \
                n * KV_PER_TOKEN / (h2d * 1e9) * 1e3
            host, host_floor = med(ttft["ucm"], n, "hit"), med(ttft["ucm"], n, "floor")
            off, off_floor = med(ttft["offload"], n, "hit"), med(ttft["offload"], n, "floor")
            ssd = med(ttft.get("ssd", {}), n, "ssd")
            planned = med(ttft.get("ssd planned", {}), n, "ssd")
            ph = [p for p in ttft.get("ssd planned", {}).get("phases", []) if p.get("length") == n]
            loaded = ph[0].get("external", 0) / (args.prompts + 1) if ph else float("nan")
            cells = [f"{nocache:.0f}", f"{floor:.0f}", f"{limit:.0f}", f"{off:.0f}", f"{off_floor:.0f}", f"{host:.0f}",
                     f"{host_floor:.0f}", f"{ratio(host, limit):.2f}x", f"{ratio(host, off):.2f}",
                     f"{host - host_floor:.0f}", f"{off - off_floor:.0f}",
                     f"{ratio(med(ttft['ucm'], n, 'cold'), nocache):.2f}",
                     f"{ratio(med(ttft['offload'], n, 'cold'), nocache):.2f}",
                     f"{med(ttft.get('ucm layers', {}), n, 'hit'):.0f}",
                     f"{med(ttft.get('ucm no planner', {}), n, 'hit'):.0f}", f"{ssd:.0f}", f"{ratio(ssd, nocache):.2f}",
                     f"{planned:.0f}", f"{ratio(planned, nocache):.2f}", f"{loaded:.0f} of {n}"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        pairs = [(o, u) for o, u in [("offload", "ucm")] + [(f"offload #{r}", f"ucm #{r}") for r in range(2, 99)]
                 if "phases" in ttft.get(o, {}) and "phases" in ttft.get(u, {})]
        if len(pairs) > 1:
            lines.append(f"\nEach of {len(pairs)} alternating pairs of fresh processes (OffloadingConnector, then ucm), "
                         "per prompt length: ucm host-tier hit / OffloadingConnector CPU-tier hit; then each one's "
                         "hit less its own process's floor, ms (ucm / Offloading):")
            for n in args.lengths:
                raw = [ratio(med(ttft[u], n, "hit"), med(ttft[o], n, "hit")) for o, u in pairs]
                cost = [(med(ttft[u], n, "hit") - med(ttft[u], n, "floor"),
                         med(ttft[o], n, "hit") - med(ttft[o], n, "floor")) for o, u in pairs]
                lines.append(f"- {n}: {', '.join(f'{x:.2f}' for x in raw)} (median {statistics.median(raw):.2f}); "
                             f"over the floor {', '.join(f'{a:.0f} / {b:.0f}' for a, b in cost)}")
        resets = {k: [p["reset"] for p in v.get("phases", []) if "reset" in p] for k, v in ttft.items()}
        if any(not all(x) for x in resets.values()):
            lines.append(f"\nvLLM refused to empty its prefix cache before some hit phases (those hits may be its "
                         f"own): {resets}")
        ext = {k: [p.get("external") for p in v.get("phases", [])] for k, v in ttft.items()}
        lines.append(f"\nExternal tokens counted by vLLM per phase: {ext}")
        crashed = [f"{k}: {v['crash']}" for k, v in ttft.items() if "crash" in v]
        skipped = [k for k, v in ttft.items() if "skipped" in v]
        if skipped:
            lines.append(f"not run (--only): {skipped}")
        if crashed:
            lines.append(f"crashed: {crashed}")
    if batch:
        def each_tps(r: dict, role: str) -> list[float]:
            """tokens/s of each of a process's batches of one role."""
            return [p["tokens_per_s"] for p in r.get("phases", []) if p.get("role") == role]

        def tps(r: dict, role: str) -> float:
            """The process's figure for a role: the median of its batches."""
            xs = each_tps(r, role)
            return statistics.median(xs) if xs else float("nan")

        def ext(r: dict, role: str):
            return next((p.get("external") for p in r.get("phases", []) if p.get("role") == role), None)

        div = lambda a, b: a / b if b == b and b else float("nan")  # noqa: E731
        plain, plain_prefill = tps(batch["plain"], "timed"), tps(batch["plain"], "prefill")
        names = {"plain": "no connector", "offload": "OffloadingConnector, cold", "ucm": "ucm, cold store",
                 "consumer": "ucm kv_consumer (lookups, no saves), cold",
                 "host only": "ucm host tier only (saves, no SSD writes), cold",
                 "thread writer": "ucm, cold, SSD writes from threads of the engine (`ssd.writer: thread`)",
                 "switch 0.5 ms": "ucm, cold, GIL switch interval 0.5 ms", "gil profile": "ucm, cold (py-spy --gil)",
                 "ucm ssd": "ucm, every prompt only on the SSD (fresh process, page cache dropped; load planner)"}
        lines += ["", f"Batch of {BATCH} x {BATCH_LEN}-token prompts, {BATCH_GEN} generated tokens each "
                  f"((prompt + generated) tokens/s). Each process: a warm-up batch, then {TIMED} timed batches of new "
                  "prompts (the median is shown; every one in the raw JSON), then a prefill-only batch of new prompts "
                  "(one token each); then (ucm processes that save) the last timed batch again, 2 s later:",
                  "", "| configuration | tokens/s | vs no connector | prefill only vs no connector | external tokens |",
                  "|---|---|---|---|---|"]
        for key, r in batch.items():
            if r.get("skipped"):  # not picked by --only
                continue
            if key == "ucm ssd":
                e = ext(r, "ssd")
                if "phases" in r:  # no hit while measuring: no figure, every prompt loads
                    e = f"{e} (measuring the disk: {r['phases'][0].get('external')} of {2 * BATCH_LEN})"
                lines.append(f"| {names[key]} | {tps(r, 'ssd'):.0f} | {div(tps(r, 'ssd'), plain):.2f} | | {e} |")
                continue
            base_key, _, rep = key.partition(" #")
            label = names.get(base_key, base_key) + (f" (process {rep} of each)" if rep else "")
            lines.append(f"| {label} | {tps(r, 'timed'):.0f} | {div(tps(r, 'timed'), plain):.2f} | "
                         f"{div(tps(r, 'prefill'), plain_prefill):.2f} | {ext(r, 'timed')} |")
            if each_tps(r, "warm"):
                lines.append(f"| {label}: then every prompt in the host tier | {tps(r, 'warm'):.0f} | "
                             f"{div(tps(r, 'warm'), plain):.2f} | | {ext(r, 'warm')} |")
        pairs = [(batch[p], batch[u]) for p, u in [("plain", "ucm")] + [(f"plain #{r}", f"ucm #{r}") for r in range(2, 99)]
                 if p in batch and u in batch]
        if len(pairs) > 1:
            each = [div(tps(u, "timed"), tps(p, "timed")) for p, u in pairs]
            pre = [div(tps(u, "prefill"), tps(p, "prefill")) for p, u in pairs]
            spread = [div(max(xs), min(xs)) for r in batch.values() if len(xs := each_tps(r, "timed")) > 1]
            lines.append(f"\nucm cold store / no connector, each of {len(pairs)} alternating pairs of fresh processes: "
                         f"{', '.join(f'{x:.3f}' for x in each)} (median {statistics.median(each):.3f}); prefill only: "
                         f"{', '.join(f'{x:.3f}' for x in pre)} (median {statistics.median(pre):.3f}). Within a "
                         f"process, fastest / slowest timed batch: up to {max(spread, default=float('nan')):.3f}")
        crashed = [f"{k}: {v['crash']}" for k, v in batch.items() if "crash" in v]
        if crashed:
            lines.append(f"\ncrashed: {crashed}")
        for k, r in batch.items():
            if "profile" in r:
                lines.append(f"\npy-spy of the marked batch (the first timed one; ucm's warm one with --spy-warm), "
                             f"{k}: {json.dumps(r['profile'])}")
    write_results(args.results, lines)
    out = os.environ.get("OUT")
    if out:
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.results), out)


if __name__ == "__main__":
    main()
