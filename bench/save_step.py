"""The engine-side cost of saving one step's newly full blocks; writes bench/results/save_step.md.

A decode step of a batch of R requests that all cross a block boundary hands R blocks to the saver.
Every save costs Python time in the engine process, on the GIL its kernel launches need (on the H200,
py-spy --gil of a 64 x 2K batch: bench/results/gpu_e2e-2026-12-01.md). Measured through the real worker (vLLM's
CPU objects, SmolLM2-135M, host tier in /dev/shm, no SSD), side by side in one run:
  * one save per step: the step's R blocks in one reservation, copy and commit (the worker's way);
  * one save per request: R saves of one block each (how the worker saved before), emulated by handing
    the R requests to wait_for_save one at a time.
Both copy the same bytes; the difference is the per-save bookkeeping. CPU process time of the worker's
thread is reported with the wall time (this machine's copy is inline: vLLM's CPU build).

Run: .venv/bin/python bench/save_step.py [--requests 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import write_results  # noqa: E402
from ucm.integration.vllm.ucm_connector import RequestMeta, UCMConnectorMetadata  # noqa: E402
from ucm.tools.debug import debug_connector  # noqa: E402
from ucm.tools.model_export import ensure_model  # noqa: E402


def measure(w, requests: int, steps: int, per_request: bool) -> tuple[float, float]:
    """Median (wall ms, CPU ms) per step."""
    walls, cpus = [], []
    for step in range(steps + 2):
        reqs = [RequestMeta(f"s{step}r{k}", dump_block_ids=([os.urandom(16)], [k])) for k in range(requests)]
        groups = [[r] for r in reqs] if per_request else [reqs]
        t, c = time.perf_counter(), time.thread_time()
        for g in groups:
            w.bind_connector_metadata(UCMConnectorMetadata(requests=g))
            w.wait_for_save()
            w.clear_connector_metadata()
        if step >= 2:
            walls.append(time.perf_counter() - t)
            cpus.append(time.thread_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ucm-save-step-", dir="/dev/shm")
    # a small tier, filled first: every save evicts and reuses memory already allocated (a full cache)
    w = debug_connector(ensure_model(), "worker", {"host": {"capacity": "256MiB", "path": os.path.join(root, "h")},
                                                   "ssd": None})
    measure(w, args.requests, 2 * (256 << 20) // (args.requests * w.worker.page_size) + 1, False)
    rows = []
    for _ in range(2):  # alternate, twice: this machine drifts
        for per_request in (False, True):
            rows.append((per_request, *measure(w, args.requests, args.steps, per_request)))
    w.shutdown()
    page = w.worker.page_size
    out = ["# Saving one step's new blocks: one save per step against one save per request", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; date "
           f"{datetime.date.today()}; vLLM CPU build, SmolLM2-135M (page {page} B); a full 256 MiB host tier "
           "(every save evicts), /dev/shm, no SSD.",
           f"Command: `.venv/bin/python bench/save_step.py --requests {args.requests} --steps {args.steps}`. "
           f"A step: {args.requests} requests, one new full block each; median of {args.steps} steps.", "",
           "| saves | wall ms per step | worker thread CPU ms per step |", "|---|---|---|"]
    for per_request, wall, cpu in rows:
        name = f"one per request ({args.requests} saves)" if per_request else "one per step (1 save)"
        out.append(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    one = statistics.median(r[2] for r in rows if not r[0])
    many = statistics.median(r[2] for r in rows if r[0])
    out += ["", f"CPU per step: {many:.1f} ms per request against {one:.1f} ms per step ({many / one:.1f}x)."]
    write_results("save_step.md", out)


if __name__ == "__main__":
    main()
