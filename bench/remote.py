"""Remote tier throughput against `redis-benchmark` on the same server in the same run; writes
bench/results/remote.md.

A fresh redis-server on a loopback port (no persistence). For each page size, distinct keys holding
`--mib` MiB of pages in all:

* redis-benchmark SET and GET with values of the page size, one connection, `--batch` requests
  pipelined (`-c 1 -P batch -r keys`): what the server and loopback give a client that does nothing else;
* ucm put: pages committed into a host tier, then sent by the remote tier's writer (EXISTS round trip,
  header and xxh3 checksum, pipelined SETs of `batch_size` bytes), timed from commit until flushed;
* ucm get: `RemoteTier.get` of `--batch` pages per call (pipelined GETs, header and checksum verified);
* ucm load: `TieredStore.load` of a second store with its own host tier (4 I/O threads promote pages
  from the server into host memory and copy them into the destination), 64 pages per call.

Each figure is the median of `--reps` runs. Both clients and the server share this machine's cores.

Run: .venv/bin/python bench/remote.py [--mib 256] [--batch 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import write_results
from ucm.config import from_dict
from ucm.tiers import TieredStore

PAGES = [("256 KiB", 256 << 10), ("720 KiB: SmolLM2-135M, bf16, 32 tokens", 737280),
         ("4 MiB: Llama-3-8B, bf16, 32 tokens", 4 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", workdir, "--protected-mode", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
            return p, port
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout


def redis_benchmark(port: int, test: str, size: int, n: int, batch: int) -> float:
    """GB/s of `redis-benchmark -t test` with values of `size` bytes over n distinct keys."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", test, "-d", str(size), "-n", str(n),
                          "-r", str(n), "-c", "1", "-P", str(batch), "--csv"],
                         capture_output=True, text=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if line.startswith(f'"{test.upper()}"')]
    rps = float(rows[-1].split(",")[1].strip('"'))
    return rps * size / 1e9


def store(root: str, host: str, port: int, page: int, mib: int, rep: int) -> TieredStore:
    """A host tier of its own (`host`), the server's pages under this round's key prefix."""
    cfg = {"host": {"capacity": f"{mib + 64}MiB", "path": os.path.join(root, f"host-{host}{rep}")},
           "remote": {"url": f"redis://127.0.0.1:{port}/0", "key_prefix": f"bench-{rep}:", "timeout_ms": 10000,
                      "write_queue": f"{mib + 64}MiB"}}
    return TieredStore(from_dict(cfg, "<bench>"), page)


def ucm_round(root: str, port: int, page: int, n: int, batch: int, mib: int, rep: int) -> dict:
    a = store(root, "a", port, page, mib, rep)
    ids = [os.urandom(16) for _ in range(n)]
    src = torch.randint(0, 256, (64, page), dtype=torch.uint8)
    for k in range(0, n, 64):  # into the host tier first (not timed)
        chunk = ids[k:k + 64]
        a.wait(a.dump(chunk, 0, src[:len(chunk)]))
    t = time.perf_counter()
    a.commit(ids)
    a.remote.flush()
    put = n * page / (time.perf_counter() - t) / 1e9
    assert a.remote.stats.written == n, a.remote.stats

    t = time.perf_counter()
    for k in range(0, n, batch):
        got = a.remote.get(ids[k:k + batch])
        assert not any(isinstance(g, Exception) for g in got)
    get = n * page / (time.perf_counter() - t) / 1e9

    b = store(root, "b", port, page, mib, rep)  # a second instance: empty host tier, same server
    dst = torch.empty(64, page, dtype=torch.uint8)
    t = time.perf_counter()
    for k in range(0, n, 64):
        chunk = ids[k:k + 64]
        task = b.load(chunk, 0, dst[:len(chunk)])
        assert b.wait(task) == 0, task.errors
    load = n * page / (time.perf_counter() - t) / 1e9
    a.close()
    b.close()
    return {"put": put, "get": get, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="MiB of pages per measurement")
    ap.add_argument("--batch", type=int, default=16, help="requests pipelined per round trip")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: scripts/ensure-redis.sh installs Debian's redis-server")
    root = tempfile.mkdtemp(prefix="ucm-bench-remote-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server, port = start_server(root)
    version = cli(port, "info", "server").split("redis_version:")[1].split()[0]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine())
    rows = []
    try:
        for name, page in PAGES:
            n = max(32, (args.mib << 20) // page)
            rb_set, rb_get, ours = [], [], []
            for rep in range(args.reps):
                cli(port, "flushall")
                rb_set.append(redis_benchmark(port, "set", page, n, args.batch))
                rb_get.append(redis_benchmark(port, "get", page, n, args.batch))
                cli(port, "flushall")
                ours.append(ucm_round(root, port, page, n, args.batch, args.mib, rep))
                cli(port, "flushall")
            med = lambda xs: statistics.median(xs)  # noqa: E731
            put, get, load = (med([o[k] for o in ours]) for k in ("put", "get", "load"))
            rows.append(f"| {name} | {n} | {med(rb_set):.2f} | {put:.2f} | {put / med(rb_set):.0%} | {med(rb_get):.2f} | "
                        f"{get:.2f} | {get / med(rb_get):.0%} | {load:.2f} |")
            print(rows[-1], flush=True)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        "# Remote tier (Redis) throughput against redis-benchmark",
        "",
        f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, redis-server {version} on loopback (no "
        f"persistence), redis-py {__import__('redis').__version__}. `.venv/bin/python bench/remote.py "
        f"--mib {args.mib} --batch {args.batch} --reps {args.reps}`: medians of {args.reps} runs, "
        f"{args.mib} MiB of distinct pages per run, one connection, {args.batch} requests pipelined per round "
        "trip for redis-benchmark and for ucm get. GB/s = 10^9 bytes of page payload per second.",
        "",
        "| page | pages | redis-benchmark SET GB/s | ucm put GB/s | put / SET | redis-benchmark GET GB/s | "
        "ucm get GB/s | get / GET | ucm load into host tier GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "ucm put includes an EXISTS round trip per batch (pages the server already holds are not sent again), a "
        "40-byte header and an xxh3-64 checksum per page; ucm get verifies header and checksum of every page. "
        "ucm load is the whole load path of a second instance: pages fetched by 4 I/O threads, placed in its "
        "own host tier and copied into the destination tensor. Server, benchmark client and ucm share the "
        "machine's cores, so a 2-core machine measures the CPU more than the network.",
    ]
    write_results("remote.md", lines)


if __name__ == "__main__":
    main()
