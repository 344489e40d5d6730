"""Store benchmarks on this machine; writes bench/results/store.md.

1. RequestHasher.generate_block_hashes for a 128K-token prompt, and TieredStore.lookup of its 8,192 ids
   (block 16), median of repeated runs. Goal: <= 5 ms and <= 1 ms.
2. SSD tier write (flush) and read (load with promotion) throughput with O_DIRECT, against `dd` with
   direct I/O on the same disk in the same run (host tier memory allocated beforehand: the steady
   state; a brand-new host tier also pays its first allocation once). Goal: >= 90% of dd.
3. Host tier dump and load throughput against a plain tensor copy of the same bytes. Goal: >= 90%.

Run: .venv/bin/python bench/store.py [--blocks 256] [--page-mib 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

from common import drop_page_cache, write_results
from ucm.config import from_dict
from ucm.hashing import HashSeed, RequestHasher
from ucm.tiers import TieredStore



def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def dd_gbps(args: list[str], nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return nbytes / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--page-mib", type=float, default=2.0, help="page size (Llama-3-8B, block 16, bf16: 2 MiB)")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rows: list[tuple[str, str, str, str]] = []

    # 1. hashing and lookup -------------------------------------------------------------------------
    hasher = RequestHasher(HashSeed("meta-llama/Meta-Llama-3-8B", "bfloat16", "gpu", 16))
    tokens = [random.randrange(128000) for _ in range(128 * 1024)]
    ids = hasher.generate_block_hashes(tokens)
    hash_ms = median_ms(lambda: hasher.generate_block_hashes(tokens), 30)
    root = tempfile.mkdtemp(prefix="ucm-bench-", dir=args.dir)
    shm = tempfile.mkdtemp(prefix="ucm-bench-", dir="/dev/shm")  # host tiers live in memory
    page = int(args.page_mib * 2**20)
    n = args.blocks
    cfg = from_dict({"host": {"capacity": f"{(n + 8) * page}B", "path": os.path.join(shm, "host")},
                     "ssd": {"path": os.path.join(root, "ssd"), "capacity": f"{(2 * n + 8) * page}B",
                             "direct_io": True}, "io_threads": 4}, "bench")
    with TieredStore(cfg, 4096) as small:  # lookup cost does not depend on the page size
        present = ids[:4096]
        small.wait(small.dump(present, 0, torch.zeros(len(present), 4096, dtype=torch.uint8)))
        small.commit(present)
        small.flush()
        lookup_ms = median_ms(lambda: small.lookup(ids), 50)
        prefix_ms = median_ms(lambda: small.lookup_prefix(ids), 50)
    rows.append(("generate_block_hashes, 128K tokens (8,192 blocks)", f"{hash_ms:.2f} ms", "<= 5 ms",
                 "ok" if hash_ms <= 5 else "MISSED"))
    rows.append(("lookup of 8,192 ids (half present, host + SSD)", f"{lookup_ms:.2f} ms", "<= 1 ms",
                 "ok" if lookup_ms <= 1 else "MISSED"))
    rows.append(("lookup_prefix of 8,192 ids", f"{prefix_ms:.2f} ms", "<= 1 ms", "ok" if prefix_ms <= 1 else "MISSED"))

    # 2. SSD tier vs dd (direct I/O) ------------------------------------------------------------------
    nbytes = n * page
    src = torch.randint(0, 256, (n, page), dtype=torch.uint8)
    ddfile = os.path.join(root, "dd.bin")
    dd_w, dd_r, ssd_w, ssd_r = [], [], [], []
    for rep in range(args.reps):
        dd_w.append(dd_gbps([f"if=/dev/zero", f"of={ddfile}", f"bs={page}", f"count={n}", "oflag=direct",
                             "conv=notrunc"], nbytes))
        dd_r.append(dd_gbps([f"if={ddfile}", "of=/dev/null", f"bs={page}", f"count={n}", "iflag=direct"], nbytes))
        ids_rep = hasher.generate_block_hashes(list(range(16 * n)), salt=f"rep{rep}")
        host_dir = os.path.join(shm, f"host{rep}")
        with TieredStore(cfg.replace(host=cfg.host.__class__(capacity=cfg.host.capacity, path=host_dir)), page) as s:
            s.wait(s.dump(ids_rep, 0, src))
            t = time.perf_counter()
            s.commit(ids_rep)
            s.flush()
            ssd_w.append(nbytes / (time.perf_counter() - t) / 1e9)
        drop_page_cache(os.path.join(root, "ssd"))
        host_dir2 = os.path.join(shm, f"hostr{rep}")
        with TieredStore(cfg.replace(host=cfg.host.__class__(capacity=cfg.host.capacity, path=host_dir2)), page) as s:
            s.host.slots.ensure(list(range(s.host.num_slots)))  # steady state: host memory already allocated
            dst = torch.empty_like(src)
            t = time.perf_counter()
            failed = s.wait(s.load(ids_rep, 0, dst))
            ssd_r.append(nbytes / (time.perf_counter() - t) / 1e9)
            assert failed == 0 and torch.equal(dst, src)
        shutil.rmtree(host_dir, ignore_errors=True)
        shutil.rmtree(host_dir2, ignore_errors=True)
    for what, mine, ref in (("write", ssd_w, dd_w), ("read", ssd_r, dd_r)):
        m, r = statistics.median(mine), statistics.median(ref)
        rows.append((f"SSD tier {what}, {n} x {page / 2**20:.1f} MiB pages, O_DIRECT", f"{m:.2f} GB/s",
                     f"dd {r:.2f} GB/s; goal >= 90%", f"{100 * m / r:.0f}% {'ok' if m >= 0.9 * r else 'MISSED'}"))

    # 3. host tier vs a plain tensor copy -----------------------------------------------------------
    hcfg = cfg.replace(ssd=None, host=cfg.host.__class__(capacity=cfg.host.capacity, path=os.path.join(shm, "hh")))
    with TieredStore(hcfg, page) as s:
        plain_dst = torch.empty_like(src)
        plain_dst.copy_(src)
        ids_h = hasher.generate_block_hashes(list(range(16 * n)), salt="host")
        s.wait(s.dump(ids_h, 0, src))  # first touch of the pages outside the timing
        s.commit(ids_h, False)
        dump_t, load_t, copy_t = [], [], []
        for rep in range(args.reps + 2):
            idr = hasher.generate_block_hashes(list(range(16 * n)), salt=f"h{rep}")
            t = time.perf_counter()
            s.wait(s.dump(idr, 0, src))
            s.commit(idr)
            dump_t.append(time.perf_counter() - t)
            dst = torch.empty_like(src)
            dst.fill_(1)
            t = time.perf_counter()
            s.wait(s.load(idr, 0, dst))
            load_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_dst.copy_(src)
            copy_t.append(time.perf_counter() - t)
            s.host.evict(idr)
        c = nbytes / statistics.median(copy_t) / 1e9
        for what, ts in (("dump", dump_t), ("load", load_t)):
            g = nbytes / statistics.median(ts) / 1e9
            rows.append((f"host tier {what}, {n} x {page / 2**20:.1f} MiB", f"{g:.2f} GB/s",
                         f"tensor copy {c:.2f} GB/s; goal >= 90%", f"{100 * g / c:.0f}% {'ok' if g >= 0.9 * c else 'MISSED'}"))
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    out = [f"# Store benchmarks", "",
           f"Machine: {os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
           f"date {datetime.date.today()}; torch {torch.__version__}.",
           f"Command: `.venv/bin/python bench/store.py --blocks {n} --page-mib {args.page_mib}`", "",
           "| measurement | result | reference / goal | verdict |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    write_results("store.md", out)


if __name__ == "__main__":
    main()
