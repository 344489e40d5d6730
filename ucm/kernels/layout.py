"""KV layout descriptor: where each block's bytes live in vLLM's paged KV tensors.

A block in one layer is a few *segments* of contiguous bytes at `base + block * block_stride`:

    vLLM GPU attention  [2, num_blocks, block_size, kv_heads, head_dim]  -> 2 segments (K, V)
    vLLM CPU attention  [num_blocks, kv_heads, block_size, 2*head_dim]   -> 1 segment
    MLA                 [num_blocks, block_size, head_dim]               -> 1 segment
    one allocation for all layers, e.g. [num_blocks, layers, 2, bs, h, d] -> 1 segment (all layers)

A *page* is one block across all layers: the segments concatenated in layer order, then segment order.
Everything is bytes, so every dtype (fp8 included) works; the copy word is the widest that divides all
addresses, strides and lengths (16, 8, 4, 2 or 1 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Mapping, Sequence

import torch


class UnsupportedLayout(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    """Bytes [addr + b * block_stride, +length) of block b; lands at `page_offset` in the page."""

    addr: int  # byte address of block 0's segment
    block_stride: int  # bytes between consecutive blocks
    length: int  # bytes
    page_offset: int  # bytes from the start of the page
    tensor_index: int  # which registered tensor holds it
    storage_offset: int  # addr minus the start of that tensor's storage (bytes)


@dataclass(frozen=True)
class KVLayout:
    """Segments of every layer, for `num_blocks` blocks. `page_size` bytes per block."""

    segments: tuple[Segment, ...]
    num_blocks: int
    page_size: int
    device: torch.device
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]  # kept alive; the addresses point into them

    @property
    def word_bytes(self) -> int:
        """Widest copy word that divides every address, stride, length and page offset (<= 16)."""
        g = 0
        for s in self.segments:
            for v in (s.addr, s.block_stride, s.length, s.page_offset):
                g = math.gcd(g, v)
        g = math.gcd(g, self.page_size)
        return max(w for w in (16, 8, 4, 2, 1) if g % w == 0)

    def describe(self) -> str:
        seg = self.segments[0]
        return (f"{len(self.names)} tensors, {len(self.segments)} segments of {seg.length} B per block, "
                f"page {self.page_size} B, {self.num_blocks} blocks, word {self.word_bytes} B, {self.device}")

    @classmethod
    def from_tensors(cls, kv_caches: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                     num_blocks: int, block_dim: int | None = None,
                     block_stride_bytes: int | None = None) -> "KVLayout":
        """Build from the tensors vLLM registers (one per layer, in layer order, or one for all layers).

        `block_dim`: which dimension indexes blocks; by default the one of size `num_blocks`, and when
        several are, the one whose stride is `block_stride_bytes` (vLLM's KVCacheTensor.block_stride)."""
        if isinstance(kv_caches, Mapping):
            names, tensors = tuple(kv_caches), tuple(kv_caches.values())
        else:
            tensors = tuple(kv_caches)
            names = tuple(str(i) for i in range(len(tensors)))
        if not tensors:
            raise UnsupportedLayout("no KV cache tensors registered")
        device = tensors[0].device
        segments: list[Segment] = []
        page = 0
        for ti, (name, t) in enumerate(zip(names, tensors)):
            if t.device != device:
                raise UnsupportedLayout(f"KV tensor {name} is on {t.device}, others on {device}")
            sbase = t.untyped_storage().data_ptr()
            for off, length, stride in _block_segments(name, t, num_blocks, block_dim, block_stride_bytes):
                addr = t.data_ptr() + off
                segments.append(Segment(addr, stride, length, page, ti, addr - sbase))
                page += length
        return cls(tuple(_merge(segments)), num_blocks, page, device, names, tensors)


def _block_segments(name: str, t: torch.Tensor, num_blocks: int, block_dim: int | None,
                    block_stride_bytes: int | None = None):
    """(byte offset of block 0, length, block stride) of each contiguous piece of one block."""
    shape, strides, elt = tuple(t.shape), tuple(t.stride()), t.element_size()
    where = f"KV tensor {name} with shape {shape}, strides {strides} (elements) and dtype {t.dtype}"
    if block_dim is None:
        cands = [d for d, n in enumerate(shape) if n == num_blocks]
        if len(cands) > 1 and block_stride_bytes is not None:
            cands = [d for d in cands if strides[d] * elt == block_stride_bytes] or cands
        if len(cands) != 1:
            raise UnsupportedLayout(f"{where}: cannot tell which dimension indexes the {num_blocks} blocks "
                                    f"(candidates {cands}); pass block_dim")
        block_dim = cands[0]
    if shape[block_dim] != num_blocks:
        raise UnsupportedLayout(f"{where}: dimension {block_dim} has {shape[block_dim]} entries, not {num_blocks} blocks")
    if any(s < 0 for s in strides):
        raise UnsupportedLayout(f"{where}: negative strides are not supported")
    dims = sorted((d for d in range(len(shape)) if d != block_dim and shape[d] > 1), key=lambda d: strides[d])
    inner = 1  # elements of the contiguous innermost run
    k = 0
    while k < len(dims) and strides[dims[k]] == inner:
        inner *= shape[dims[k]]
        k += 1
    outer = dims[k:]
    bstride = strides[block_dim]
    if bstride < inner and num_blocks > 1:
        raise UnsupportedLayout(f"{where}: blocks interleave inside a contiguous run of {inner} elements; "
                                "ucm copies whole per-block runs")
    offs = [sum(i * strides[d] for i, d in zip(idx, outer)) for idx in product(*(range(shape[d]) for d in outer))]
    for o in sorted(offs):
        yield o * elt, inner * elt, bstride * elt


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join segments that follow each other in one storage and in the page, with the same block stride."""
    out: list[Segment] = []
    for s in segments:
        p = out[-1] if out else None
        if (p is not None and p.block_stride == s.block_stride and p.addr + p.length == s.addr
                and p.page_offset + p.length == s.page_offset
                and p.addr - p.storage_offset == s.addr - s.storage_offset):  # same storage
            out[-1] = Segment(p.addr, p.block_stride, p.length + s.length, p.page_offset, p.tensor_index,
                              p.storage_offset)
        else:
            out.append(s)
    return out
