"""The whole move of a 32K-token Llama-3-8B prompt on the GPU machine; writes bench/results/gpu_path.md.

Stages (2,048 blocks of 2 MiB = 4 GiB), each against its ceiling measured in the same run:
  1. paged GPU cache -> host tier pages (HostTransfer staged and direct) vs pinned DMA device->host
  2. host tier -> SSD tier (flush, O_DIRECT)                            vs dd oflag=direct
  3. SSD tier -> a fresh host tier (load: read, verify, promote)        vs dd iflag=direct
  4. host tier pages -> paged GPU cache (whole, and layer group by group) vs pinned DMA host->device

Run: python bench/gpu_path.py [--tokens 32768]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import write_results  # noqa: E402
from ucm.config import from_dict  # noqa: E402
from ucm.hashing import HashSeed, RequestHasher  # noqa: E402
from ucm.integration.vllm.connector.layers import layer_plan  # noqa: E402
from ucm.kernels import KVLayout  # noqa: E402
from ucm.kernels.transfer import HostTransfer  # noqa: E402
from ucm.tiers import TieredStore  # noqa: E402



def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def dd(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--disk", default=tempfile.gettempdir())
    args = ap.parse_args()
    bs, layers = 16, 32
    n = args.tokens // bs
    nb = n + 64
    kv = [torch.randn((2, nb, bs, 8, 128), device="cuda").to(torch.bfloat16) for _ in range(layers)]
    lay = KVLayout.from_tensors(kv, nb)
    nbytes = n * lay.page_size
    blocks = torch.randperm(nb)[:n].tolist()
    ids = RequestHasher(HashSeed("meta-llama/Meta-Llama-3-8B", "bfloat16", "gpu", bs)).generate_block_hashes(
        list(range(args.tokens)))
    shm = tempfile.mkdtemp(prefix="ucm-path-", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix="ucm-path-", dir=args.disk)
    cfg = from_dict({"host": {"capacity": f"{nbytes + (64 << 20)}B", "path": os.path.join(shm, "a")},
                     "ssd": {"path": os.path.join(disk, "ssd"), "capacity": f"{nbytes + (64 << 20)}B",
                             "direct_io": True}, "io_threads": 8}, "bench")
    rows = []
    # ceilings: pinned DMA of the same bytes
    pinned = torch.empty((n, lay.page_size), dtype=torch.uint8, pin_memory=True)
    staging = torch.empty((n, lay.page_size), dtype=torch.uint8, device="cuda")
    timed(lambda: pinned.copy_(staging, non_blocking=True))
    d2h = min(timed(lambda: pinned.copy_(staging, non_blocking=True)) for _ in range(3))
    h2d = min(timed(lambda: staging.copy_(pinned, non_blocking=True)) for _ in range(3))
    del staging, pinned
    torch.cuda.empty_cache()

    with TieredStore(cfg, lay.page_size) as s:
        reg = HostTransfer(lay)
        assert reg.register_host(s.host.slots.tensor), "the host tier must be pinned (cudaHostRegister)"
        s.host.on_close(reg.unregister_host)
        tier_flat = s.host.slots.tensor.view(-1)[:nbytes]
        gpu_flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        timed(lambda: tier_flat.copy_(gpu_flat, non_blocking=True))
        d2h_tier = min(timed(lambda: tier_flat.copy_(gpu_flat, non_blocking=True)) for _ in range(3))
        h2d_tier = min(timed(lambda: gpu_flat.copy_(tier_flat, non_blocking=True)) for _ in range(3))
        del gpu_flat
        rows.append(("0. DMA into the host tier's registered memory (contiguous)", d2h_tier, d2h, "pinned DMA D2H"))
        rows.append(("0. DMA from the host tier's registered memory (contiguous)", h2d_tier, h2d, "pinned DMA H2D"))
        for mode in ("staged", "direct"):
            xfer = HostTransfer(lay, mode)
            dump = lambda some: s.wait(xfer.save(t := s.prepare_dump(some), blocks) or t)  # noqa: E731
            # warm-up (kernel compile, first touch), then the timed dump into fresh pages
            dump(ids[:64])
            s.commit(ids[:64], False)
            t_dump = timed(lambda: dump(ids))
            rows.append((f"1. GPU cache -> host tier ({mode})", t_dump, d2h, "pinned DMA D2H"))
            if mode == "staged":  # the same copy without the store's bookkeeping (slot reservation)
                slots = list(range(n))
                t_raw = timed(lambda: xfer.to_host(blocks, s.host.slots.tensor, slots))
                rows.append(("   of which the copy alone (staged, slots 0..N-1)", t_raw, d2h, "pinned DMA D2H"))
            if mode == "staged":
                s.commit(ids, False)  # drop; the direct run dumps them again
        t0 = time.perf_counter()
        s.commit(ids)
        s.flush()
        t_flush = time.perf_counter() - t0
        assert s.usage()["ssd"]["blocks"] == n
    ddfile = os.path.join(disk, "dd.bin")
    t_ddw = dd(["if=/dev/zero", f"of={ddfile}", "bs=2M", f"count={nbytes >> 21}", "oflag=direct"])
    t_ddr = dd([f"if={ddfile}", "of=/dev/null", "bs=2M", f"count={nbytes >> 21}", "iflag=direct"])
    rows.append(("2. host tier -> SSD (flush, O_DIRECT)", t_flush, t_ddw, "dd oflag=direct"))

    cfg2 = cfg.replace(host=cfg.host.__class__(capacity=cfg.host.capacity, path=os.path.join(shm, "b")))
    kv2 = [torch.zeros_like(t) for t in kv]
    lay2 = KVLayout.from_tensors(kv2, nb)
    with TieredStore(cfg2, lay.page_size) as s:
        t0 = time.perf_counter()
        task = s.prepare_load(ids)  # promotion only: SSD -> host tier
        for _ in task.ready():
            pass
        assert s.wait(task) == 0
        t_read = time.perf_counter() - t0
        rows.append(("3. SSD -> host tier (read, checksum, promote)", t_read, t_ddr, "dd iflag=direct"))
        reg = HostTransfer(lay2)
        assert reg.register_host(s.host.slots.tensor)
        s.host.on_close(reg.unregister_host)
        for mode in ("staged", "direct"):
            xfer = HostTransfer(lay2, mode)
            load = lambda some: s.wait(xfer.restore(t := s.prepare_load(some), blocks) or t)  # noqa: E731
            load(ids[:64])
            t_up = timed(lambda: load(ids))
            rows.append((f"4. host tier -> GPU cache ({mode})", t_up, h2d, "pinned DMA H2D"))
        ok = all(torch.equal(a[:, blocks].view(torch.uint8), b[:, blocks].view(torch.uint8)) for a, b in zip(kv, kv2))
        # the GPU connector's layer-by-layer loads, an event after each group: one layer per group, and
        # the groups the connector uses (transfer.layer_read_size, 512 KiB of a page: 1, 2, 4, 8 ... layers)
        for mode, group_bytes in (("staged", 0), ("direct", 0), ("staged", 512 << 10), ("direct", 512 << 10)):
            spans = layer_plan(lay2, group_bytes).spans
            xfer = HostTransfer(lay2, mode)
            for t in kv2:
                t.zero_()

            def layered(some):
                t = s.prepare_load(some)
                batches = [([blocks[i] for i in which], pages, slots) for pages, slots, which in t.ready()]
                t0 = time.perf_counter()
                copies = xfer.from_host_groups(batches, spans)
                enqueue.append(time.perf_counter() - t0)
                copies.synchronize()
                s.wait(t)

            enqueue: list[float] = []
            layered(ids)  # warm-up at full size: the same chunks, so no kernel is compiled in the timed run
            t_up = timed(lambda: layered(ids))
            rows.append((f"4. host tier -> GPU cache, {len(spans)} layer groups ({mode}; host returns after "
                         f"{1e3 * enqueue[-1]:.1f} ms)", t_up, h2d, "pinned DMA H2D"))
            ok = ok and all(torch.equal(a[:, blocks].view(torch.uint8), b[:, blocks].view(torch.uint8))
                            for a, b in zip(kv, kv2))
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(disk, ignore_errors=True)

    props = torch.cuda.get_device_properties(0)
    out = ["# The whole GPU path for one prompt", "",
           f"Card: {props.name}; {os.cpu_count()} CPU cores; date {datetime.date.today()}; "
           f"{args.tokens} tokens of Llama-3-8B (32 layers, 8 KV heads, head_dim 128, block 16, bf16): "
           f"{n} blocks of {lay.page_size >> 20} MiB = {nbytes / 2**30:.1f} GiB.",
           "Command (device tool): `python bench/gpu_path.py`. Host tier in /dev/shm, pinned with cudaHostRegister; "
           "SSD tier with O_DIRECT on the machine's disk. Each ceiling is measured in the same run.",
           f"Round trip bytes identical: {ok}.", "",
           "| stage | time s | GB/s | ceiling | ceiling GB/s | % of ceiling |", "|---|---|---|---|---|---|"]
    for name, t, c, cname in rows:
        out.append(f"| {name} | {t:.3f} | {nbytes / t / 1e9:.2f} | {cname} | {nbytes / c / 1e9:.2f} | {100 * c / t:.0f}% |")
    write_results("gpu_path.md", out)


if __name__ == "__main__":
    main()
