"""RoPE re-rotation of cached keys on a GPU (device tool); writes bench/results/rope.md.

Keys of Llama-3-8B (32 layers x 8 KV heads x 128 dims, bf16) for a document of `tokens` tokens, held as
one [layers * tokens, heads, head_dim] tensor (as a blend load holds them before writing the KV
cache), rotated in place by one delta. The floor is moving the keys once: read + write of every byte,
timed as a device-to-device copy of the same bytes in the same run. Compared: the Triton kernel, the
torch reference on the same GPU. Medians of triton.testing.do_bench.

Run (on the device): python3 bench/rope.py
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_results  # noqa: E402
from ucm.kernels.rope import RopeSpec, rerotate_torch, rerotate_triton  # noqa: E402

LAYERS, HEADS, DIM = 32, 8, 128


def main() -> None:
    assert torch.cuda.is_available(), "run on a GPU (device tool)"
    spec = RopeSpec(DIM, DIM, 500000.0, "neox", ("llama3", 8.0, 1.0, 4.0, 8192.0))
    rows = []
    for tokens in (512, 4096, 32768):
        n = LAYERS * tokens
        keys = torch.randn(n, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        other = torch.empty_like(keys)
        deltas = 1000  # a document moves as a whole
        nbytes = keys.numel() * keys.element_size()
        # correctness on this exact input first
        a, b = keys.clone(), keys.clone()
        rerotate_torch(a, deltas, spec)
        rerotate_triton(b, deltas, spec)
        assert torch.equal(a, b), "triton and reference differ"
        copy_ms = triton.testing.do_bench(lambda: other.copy_(keys), return_mode="median")
        tri_ms = triton.testing.do_bench(lambda: rerotate_triton(keys, deltas, spec), return_mode="median")
        ref_ms = triton.testing.do_bench(lambda: rerotate_torch(keys, deltas, spec), return_mode="median")
        gbs = lambda ms: 2 * nbytes / ms / 1e6  # noqa: E731 - read + write
        rows.append(f"| {tokens} | {nbytes / 2**20:.0f} | {copy_ms * 1e3:.0f} ({gbs(copy_ms):.0f} GB/s) | "
                    f"{tri_ms * 1e3:.0f} ({gbs(tri_ms):.0f} GB/s) | {copy_ms / tri_ms:.0%} | {ref_ms * 1e3:.0f} | "
                    f"{ref_ms / tri_ms:.1f}x |")
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name()
    lines = [
        "# RoPE re-rotation of cached keys",
        "",
        f"{datetime.date.today()}, {name}, torch {torch.__version__}, triton {triton.__version__}. "
        "`python3 bench/rope.py` on the device tool. Keys of Llama-3-8B (32 layers, 8 KV heads, head dim 128, "
        "bf16, llama3 rope scaling) for one document, rotated in place by one delta; bit-identical to the "
        "torch reference (checked on each input before timing). Times are medians of "
        "triton.testing.do_bench; GB/s counts bytes read plus written.",
        "",
        "| tokens | key MiB | d2d copy of the keys, us | Triton re-rotation, us | copy / Triton | torch reference, us "
        "| reference / Triton |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_results("rope.md", lines)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "rope.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
