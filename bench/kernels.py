"""GPU benchmark of pack/unpack (run on the device machine); writes bench/results/kernels.md.

For each shape (Llama-3-8B, SmolLM2-135M, an MLA model) and N blocks:
  * GPU->GPU pack and unpack (Triton) in GB/s counting bytes read + written, against the
    device-to-device copy ceiling of the same bytes measured in the same run, torch index_select
    (one gather per layer), and a per-block copy loop;
  * pack straight into pinned host memory and unpack from it (UVA, persistent grid of <= 8 programs),
    against the pinned DMA ceiling (cudaMemcpy of the same bytes) measured in the same run;
  * the staged design: pack into GPU staging, then one DMA copy to pinned host memory;
  * overlap: each host transfer design running beside a bf16 matrix product on another stream.

Run: python bench/kernels.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import write_results  # noqa: E402
from ucm.kernels import KVLayout, pack, unpack  # noqa: E402

SHAPES = {
    # name: (layers, per-layer tensor shape given num_blocks, dtype)
    "Llama-3-8B (32 L, 8 KV heads, hd 128, block 16, bf16)": (32, lambda nb: (2, nb, 16, 8, 128), torch.bfloat16),
    "SmolLM2-135M (30 L, 3 KV heads, hd 64, block 16, bf16)": (30, lambda nb: (2, nb, 16, 3, 64), torch.bfloat16),
    "MLA (27 L, latent 576, block 64, bf16)": (27, lambda nb: (nb, 64, 576), torch.bfloat16),
}
NS = (16, 64, 256, 1024)


def bench(fn, reps=50) -> float:
    """Median milliseconds (CUDA events)."""
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def make_cache(shape_fn, layers, dtype, n_blocks):
    return [torch.randn(shape_fn(n_blocks), device="cuda").to(dtype) for _ in range(layers)]


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def tune(lay, ids, pages, pack_dir=True, num_programs=None):
    """Best (ms, block_words) over a few tile sizes."""
    best = None
    for bw in (None, 512, 1024, 2048, 4096):
        f = (lambda bw=bw: (pack if pack_dir else unpack)(lay, ids, pages, backend="triton",
                                                         num_programs=num_programs, block_words=bw))
        ms = bench(f)
        if best is None or ms < best[0]:
            best = (ms, bw)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    card = f"{props.name}, {props.multi_processor_count} SMs"
    rows, host_rows, overlap_rows, raw = [], [], [], []
    ns = NS[:2] if args.quick else NS
    for sname, (layers, shape_fn, dtype) in SHAPES.items():
        nb = max(ns) * 2 + 8
        kv = make_cache(shape_fn, layers, dtype, nb)
        lay = KVLayout.from_tensors(kv, nb)
        for n in ns:
            ids = torch.randperm(nb, device="cuda")[:n]
            nbytes = n * lay.page_size
            pages = torch.empty((n, lay.page_size), dtype=torch.uint8, device="cuda")
            flat_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            flat_dst = torch.empty_like(flat_src)
            ceil = gbps(2 * nbytes, bench(lambda: flat_dst.copy_(flat_src)))
            pk_ms, pk_bw = tune(lay, ids, pages, True)
            up_ms, up_bw = tune(lay, ids, pages, False)
            # baselines: index_select per layer (gathers every segment of a layer), per-block copy loop
            if kv[0].dim() == 5:
                stage = [torch.empty((2, n) + tuple(kv[0].shape[2:]), dtype=dtype, device="cuda") for _ in kv]
                isel = lambda: [torch.index_select(t, 1, ids, out=s) for t, s in zip(kv, stage)]
            else:
                stage = [torch.empty((n,) + tuple(kv[0].shape[1:]), dtype=dtype, device="cuda") for _ in kv]
                isel = lambda: [torch.index_select(t, 0, ids, out=s) for t, s in zip(kv, stage)]
            isel_ms = bench(isel, reps=20)
            idl = ids.tolist()
            views = [p.view(lay.page_size) for p in pages]

            def loop():
                for i, b in enumerate(idl):
                    off = 0
                    for t in kv:
                        blk = t[:, b] if t.dim() == 5 else t[b]
                        nbt = blk.numel() * blk.element_size()
                        views[i][off:off + nbt].view(dtype).view(blk.shape).copy_(blk)
                        off += nbt
            loop_ms = bench(loop, reps=20) if n <= 256 else float("nan")
            rows.append((sname, n, nbytes, ceil, gbps(2 * nbytes, pk_ms), gbps(2 * nbytes, up_ms),
                         gbps(2 * nbytes, isel_ms), gbps(2 * nbytes, loop_ms), pk_bw, up_bw))
            print(rows[-1], flush=True)

            # host transfers (Llama and SmolLM2 shapes; N >= 64)
            if n < 64:
                continue
            host = torch.empty((n, lay.page_size), dtype=torch.uint8, pin_memory=True)
            dma_d2h = gbps(nbytes, bench(lambda: host.copy_(pages, non_blocking=True), reps=30))
            dma_h2d = gbps(nbytes, bench(lambda: pages.copy_(host, non_blocking=True), reps=30))
            res = {"shape": sname, "n": n, "dma_d2h": dma_d2h, "dma_h2d": dma_h2d}
            for progs in (4, 8, 16):
                res[f"direct_pack_{progs}"] = gbps(nbytes, tune(lay, ids, host, True, progs)[0])
                res[f"direct_unpack_{progs}"] = gbps(nbytes, tune(lay, ids, host, False, progs)[0])

            def staged_pack(programs=None):
                pack(lay, ids, pages, backend="triton", num_programs=programs)
                host.copy_(pages, non_blocking=True)

            def staged_pack8():
                staged_pack(8)

            def staged_unpack():
                pages.copy_(host, non_blocking=True)
                unpack(lay, ids, pages, backend="triton")
            res["staged_pack"] = gbps(nbytes, bench(staged_pack, reps=30))
            res["staged_pack8"] = gbps(nbytes, bench(staged_pack8, reps=30))
            res["staged_unpack"] = gbps(nbytes, bench(staged_unpack, reps=30))
            host_rows.append(res)
            print(res, flush=True)

            if n == 256 and "Llama" in sname:
                a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
                c = torch.empty_like(a)
                s_mm, s_tr = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)  # transfers: high priority
                designs = {
                    "direct, 8 programs": lambda: pack(lay, ids, host, backend="triton", num_programs=8, block_words=2048),
                    "direct, 132 programs": lambda: pack(lay, ids, host, backend="triton", num_programs=132, block_words=2048),
                    "staged (full-grid kernel + DMA)": staged_pack,
                    "staged (8-program kernel + DMA)": staged_pack8,
                }
                mm_ms = bench(lambda: torch.matmul(a, b, out=c), reps=30)
                for dname, fn in designs.items():
                    tr_ms = bench(fn, reps=30)
                    reps_tr = 1
                    k_mm = max(1, round(tr_ms * 4 / mm_ms))  # matmul run ~4x a transfer
                    reps_tr = max(1, round(k_mm * mm_ms / tr_ms))

                    def mm_only():
                        for _ in range(k_mm):
                            torch.matmul(a, b, out=c)

                    def tr_only():
                        for _ in range(reps_tr):
                            fn()

                    def both():
                        cur = torch.cuda.current_stream()
                        s_mm.wait_stream(cur)
                        s_tr.wait_stream(cur)
                        with torch.cuda.stream(s_mm):
                            mm_only()
                        with torch.cuda.stream(s_tr):
                            tr_only()
                        cur.wait_stream(s_mm)
                        cur.wait_stream(s_tr)
                    trip = []
                    for _ in range(5):  # interleaved triplets: clocks drift between designs
                        t_mm, t_tr, t_both = bench(mm_only, 150), bench(tr_only, 150), bench(both, 150)
                        trip.append((t_both / max(t_mm, t_tr), t_mm, t_tr, t_both))
                    trip.sort()
                    r, t_mm, t_tr, t_both = trip[2]
                    overlap_rows.append((dname, t_mm, t_tr, t_both, r))
                    print(overlap_rows[-1], flush=True)
        del kv
        torch.cuda.empty_cache()

    raw = {"card": card, "rows": rows, "host": host_rows, "overlap": overlap_rows}
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(raw, f, indent=1, default=str)
    write_table(raw)


def write_table(raw: dict) -> None:
    out = ["# Pack/unpack kernels on the GPU", "",
           f"Card: {raw['card']}; date {datetime.date.today()}; torch {torch.__version__}, triton {triton.__version__}.",
           "Command (device tool): `python bench/kernels.py` (median of CUDA-event timings, triton do_bench).",
           "GB/s count bytes read plus bytes written. Ceiling: a contiguous device-to-device copy of the same bytes.",
           "", "## GPU -> GPU", "",
           "| shape | N | MiB | ceiling GB/s | pack GB/s (% ceil) | unpack GB/s (% ceil) | index_select GB/s | per-block loop GB/s | tile words (pack/unpack) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for s, n, nbytes, ceil, pk, up, isel, loop, pbw, ubw in raw["rows"]:
        out.append(f"| {s} | {n} | {nbytes / 2**20:.0f} | {ceil:.0f} | {pk:.0f} ({100 * pk / ceil:.0f}%) | "
                   f"{up:.0f} ({100 * up / ceil:.0f}%) | {isel:.0f} | {loop:.1f} | {pbw}/{ubw} |")
    out += ["", "## GPU <-> pinned host", "",
            "GB/s count bytes moved once (one direction). DMA ceiling: cudaMemcpy of the same bytes, contiguous.", "",
            "| shape | N | DMA D2H | direct pack 4 / 8 / 16 programs | staged pack (full grid / 8 programs) | DMA H2D | direct unpack 4 / 8 / 16 | staged unpack |",
            "|---|---|---|---|---|---|---|---|"]
    for r in raw["host"]:
        d, h = r["dma_d2h"], r["dma_h2d"]
        out.append(f"| {r['shape']} | {r['n']} | {d:.1f} | "
                   + " / ".join(f"{r[f'direct_pack_{p}']:.1f} ({100 * r[f'direct_pack_{p}'] / d:.0f}%)" for p in (4, 8, 16))
                   + f" | {r['staged_pack']:.1f} ({100 * r['staged_pack'] / d:.0f}%) / {r['staged_pack8']:.1f} ({100 * r['staged_pack8'] / d:.0f}%) | {h:.1f} | "
                   + " / ".join(f"{r[f'direct_unpack_{p}']:.1f} ({100 * r[f'direct_unpack_{p}'] / h:.0f}%)" for p in (4, 8, 16))
                   + f" | {r['staged_unpack']:.1f} ({100 * r['staged_unpack'] / h:.0f}%) |")
    out += ["", "## Overlap with a bf16 8192^3 matrix product on another stream (Llama-3-8B shapes, 256 blocks, pack to host)", "",
            "Transfers run on a high-priority stream; median of 5 interleaved (alone, alone, both) triplets.", "",
            "| design | matmul alone ms | transfers alone ms | both ms | both / longer |", "|---|---|---|---|---|"]
    for d, a, b, c, r in raw["overlap"]:
        out.append(f"| {d} | {a:.2f} | {b:.2f} | {c:.2f} | {r:.3f} |")
    write_results("kernels.md", out)


if __name__ == "__main__":
    main()
