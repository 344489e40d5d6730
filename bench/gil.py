"""How much of the engine's Python thread the store's background work takes; writes bench/results/gil.md.

vLLM runs its scheduler and (in eager mode) every kernel launch of the forward pass on one Python thread;
ucm's save thread and SSD writers run beside it in the same process. What they do with the GIL held is
taken from that thread: on the H200, a cold store cost 17-20% of batch throughput (gpu_e2e.md), and
py-spy showed the engine thread's Python 2.8x slower while the store saved and flushed.

Here the engine thread is a loop of small Python operations (counted per second), and a save thread
stores requests the way the GPU build does: 125 pages of 2 MiB (a 2,000-token Llama-3-8B request)
reserved with `prepare_dump`, filled by a copy that releases the GIL (the GPU's DMA), committed; the SSD
tier (O_DIRECT) writes them behind. Rows: the loop alone, with saves into a host-only store, with saves
and SSD writes. The cost is the loop's lost share. The SSD rows run until the flushes are done.

Run: .venv/bin/python bench/gil.py [--requests 24] [--disk /tmp]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import threading
import time

import torch

from common import write_results
from ucm.config import from_dict
from ucm.hashing import HashSeed, RequestHasher
from ucm.tiers import TieredStore

PAGE = 2 << 20  # Llama-3-8B, block 16, bf16
BLOCKS = 125  # per 2,000-token request


def python_loop(stop: threading.Event, out: list) -> None:
    """Small Python operations, as a kernel-launching thread does; appends (operations, seconds)."""
    d, n, t = {}, 0, time.perf_counter()
    while not stop.is_set():
        for i in range(200):
            d[i & 63] = i
        n += 1
    out.append((n, time.perf_counter() - t))


def saver(store: TieredStore, ids: list[list[bytes]], src: torch.Tensor) -> None:
    torch.set_num_threads(1)
    for req in ids:
        task = store.prepare_dump(req)
        for i, slot in task.placed:
            task.pages[slot, :PAGE].copy_(src[i % len(src)])  # releases the GIL, like the GPU's DMA
        store.commit(req, [i not in task.errors for i in range(len(req))])


def measure(store: TieredStore | None, ids, src, seconds: float) -> tuple[float, float]:
    """(loop operations per second, seconds the save thread took)."""
    stop, out = threading.Event(), []
    loop = threading.Thread(target=python_loop, args=(stop, out))
    t0 = time.perf_counter()
    loop.start()
    saved = 0.0
    if store is not None:
        saver(store, ids, src)
        saved = time.perf_counter() - t0
        store.flush(timeout=600)
    else:
        time.sleep(seconds)
    stop.set()
    loop.join()
    n, dt = out[0]
    return n / dt, saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--disk", default="/tmp")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    hasher = RequestHasher(HashSeed("meta-llama/Meta-Llama-3-8B", "bfloat16", "gpu", 16))
    src = torch.randint(0, 256, (8, PAGE), dtype=torch.uint8)
    gib = (args.requests * BLOCKS * PAGE >> 30) + 1
    results: dict[str, list[tuple[float, float]]] = {"loop alone": [], "saves, host tier only": [],
                                                    "saves + SSD writes": []}
    for rep in range(args.reps):
        results["loop alone"].append(measure(None, None, src, 2.0))
        for name, ssd in (("saves, host tier only", False), ("saves + SSD writes", True)):
            shm = tempfile.mkdtemp(prefix="ucm-gil-", dir="/dev/shm")
            root = tempfile.mkdtemp(prefix="ucm-gil-", dir=args.disk)
            cfg = {"host": {"capacity": f"{gib}GiB", "path": shm}}
            if ssd:
                cfg["ssd"] = {"path": os.path.join(root, "ssd"), "capacity": f"{gib}GiB"}
            ids = [hasher.generate_block_hashes(list(range(16 * BLOCKS)), salt=f"{name}{rep}-{r}")
                   for r in range(args.requests)]
            with TieredStore(from_dict(cfg), PAGE) as store:
                store.host.slots.ensure(list(range(store.host.num_slots)))  # memory allocated beforehand
                results[name].append(measure(store, ids, src, 0))
            shutil.rmtree(shm, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    base = sorted(r for r, _ in results["loop alone"])[len(results["loop alone"]) // 2]
    gbytes = args.requests * BLOCKS * PAGE / 1e9
    lines = ["# The store's background work against the engine's Python thread", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; disk {args.disk}; "
             f"date {datetime.date.today()}. {args.requests} requests of {BLOCKS} x 2 MiB pages "
             f"({gbytes:.1f} GB); median of {args.reps}.",
             "Command: `.venv/bin/python bench/gil.py " + f"--requests {args.requests} --disk {args.disk}`",
             "A proxy for the GPU build's engine thread: on a machine with few cores the loss also counts the "
             "CPU the writers take (the GPU machine has 16); the GPU figure is bench/results/gpu_e2e.md's.", "",
             "| background | loop operations/s | loop lost | save thread s |", "|---|---|---|---|"]
    for name, rs in results.items():
        rate, saved = sorted(rs)[len(rs) // 2]
        lines.append(f"| {name} | {rate:.0f} | {100 * (1 - rate / base):.0f}% | {saved:.2f} |")
    write_results("gil.md", lines)


if __name__ == "__main__":
    main()
