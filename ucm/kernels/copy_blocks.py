"""pack / unpack: move whole blocks between vLLM's paged KV tensors and contiguous pages.

    pack(layout, block_ids, pages, page_index)    pages[page_index[i]] = block block_ids[i], all layers
    unpack(layout, block_ids, pages, page_index)  the reverse

`pages` is a 2-D uint8 tensor [P, page_stride] (page_stride >= layout.page_size): a GPU staging buffer,
a pinned host buffer or the host tier's slots (written directly through UVA), or CPU memory.
`page_index` defaults to 0..N-1.

Three implementations compute the same bytes:
* `triton`: one launch for all layers; a grid of (block, segment, tile) tiles, persistent when
  `num_programs` is given (a copy kernel should leave SMs to the model). Runs on CUDA, and on CPU
  tensors under TRITON_INTERPRET=1 (tests).
* `torch`: the CPU path vLLM's CPU backend uses: one `index_select`/`index_copy_` per segment over
  strided byte views (no per-block Python loop).
* `reference`: a per-block, per-segment loop of plain copies; the definition the others are tested against.
"""

from __future__ import annotations

import os

import torch

from ucm.kernels.layout import KVLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the CPU path usable without it
    triton = None

TILE_BYTES = 32768  # bytes one program moves per loop iteration


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _copy_blocks_kernel(
        src_base, src_stride, dst_base, dst_stride, seg_words,  # per-segment tables (int64; bytes, words)
        src_block, dst_block,  # per-block indices (int64)
        n_items, n_segs, tiles_per_seg, total_tiles,
        WORD: tl.constexpr, ALIGN: tl.constexpr, ITEMS: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
    ):
        """Tile t copies words [tile*BLOCK, +BLOCK) of ITEMS consecutive (block, segment) items."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs = tl.arange(0, BLOCK)
        lanes = tl.arange(0, ITEMS)
        for t in range(pid, total_tiles, nprog):
            tile = t % tiles_per_seg
            item = (t // tiles_per_seg) * ITEMS + lanes
            live = item < n_items
            seg = item % n_segs
            blk = item // n_segs
            src = (tl.load(src_base + seg, mask=live, other=0)
                   + tl.load(src_block + blk, mask=live, other=0) * tl.load(src_stride + seg, mask=live, other=0))
            dst = (tl.load(dst_base + seg, mask=live, other=0)
                   + tl.load(dst_block + blk, mask=live, other=0) * tl.load(dst_stride + seg, mask=live, other=0))
            src = tl.multiple_of(src, ALIGN)
            dst = tl.multiple_of(dst, ALIGN)
            w = tile * BLOCK + offs
            sp = src.to(tl.pointer_type(WORD))[:, None] + w[None, :]
            dp = dst.to(tl.pointer_type(WORD))[:, None] + w[None, :]
            if EVEN:
                m = live[:, None]
            else:
                m = live[:, None] & (w[None, :] < tl.load(seg_words + seg, mask=live, other=0)[:, None])
            x = tl.load(sp, mask=m)
            tl.store(dp, x, mask=m)


class _Plan:
    """Per-segment tables for one (layout, pages) pair, cached on device."""

    def __init__(self, layout: KVLayout, pages: torch.Tensor, pack: bool):
        dev = layout.device
        word = min(layout.word_bytes, 16)
        pstride = pages.stride(0) * pages.element_size()
        base = pages.data_ptr()
        from math import gcd
        word = gcd(word, gcd(pstride, base % 16 or 16))
        word = max(w for w in (16, 8, 4, 2, 1) if word % w == 0)
        self.word_bytes = word
        self.align = word
        elem = 8 if word == 16 else word
        self.elem_bytes = elem
        kv_addr = [s.addr for s in layout.segments]
        kv_stride = [s.block_stride for s in layout.segments]
        pg_addr = [base + s.page_offset for s in layout.segments]
        pg_stride = [pstride] * len(layout.segments)
        src = (kv_addr, kv_stride) if pack else (pg_addr, pg_stride)
        dst = (pg_addr, pg_stride) if pack else (kv_addr, kv_stride)
        t = lambda v: torch.tensor(v, dtype=torch.int64, device=dev)
        self.src_base, self.src_stride = t(src[0]), t(src[1])
        self.dst_base, self.dst_stride = t(dst[0]), t(dst[1])
        self.words = [s.length // elem for s in layout.segments]
        self.seg_words = t(self.words)
        self.max_words = max(self.words)


def _plan(layout: KVLayout, pages: torch.Tensor, pack: bool) -> _Plan:
    """Tables cached on the layout itself (never by id(): a freed layout's id and a re-mapped page
    buffer's address can both come back, and stale addresses would copy garbage)."""
    plans = layout.__dict__.get("_plans")
    if plans is None:
        plans = {}
        object.__setattr__(layout, "_plans", plans)
    key = (pages.data_ptr(), pages.stride(0), pack)
    p = plans.get(key)
    if p is None:
        if len(plans) > 16:
            plans.clear()
        p = plans[key] = _Plan(layout, pages, pack)
    return p


def _check(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor, page_index: torch.Tensor | None):
    if pages.dim() != 2 or pages.dtype != torch.uint8 or pages.stride(1) != 1:
        raise ValueError(f"pages must be a 2-D uint8 tensor with contiguous rows, got {tuple(pages.shape)} "
                         f"{pages.dtype} strides {pages.stride()}")
    if pages.shape[1] < layout.page_size:
        raise ValueError(f"pages rows hold {pages.shape[1]} B, a page needs {layout.page_size} B")
    n = block_ids.numel()
    if page_index is not None and page_index.numel() != n:
        raise ValueError(f"{n} block ids but {page_index.numel()} page indices")
    if page_index is None and pages.shape[0] < n:
        raise ValueError(f"{n} blocks do not fit in {pages.shape[0]} pages")


def copy_blocks_triton(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor,
                       page_index: torch.Tensor | None = None, *, pack: bool = True,
                       num_programs: int | None = None, block_words: int | None = None,
                       items: int | None = None) -> None:
    """The Triton path. `num_programs`: persistent grid size (default: one program per tile);
    `block_words` and `items`: words per segment and segments per tile (default: about TILE_BYTES)."""
    _check(layout, block_ids, pages, page_index)
    n = block_ids.numel()
    if n == 0:
        return
    dev = layout.device
    plan = _plan(layout, pages, pack)
    kv_idx = block_ids.to(device=dev, dtype=torch.int64)
    pg_idx = (torch.arange(n, device=dev) if page_index is None else page_index.to(device=dev, dtype=torch.int64))
    src_idx, dst_idx = (kv_idx, pg_idx) if pack else (pg_idx, kv_idx)
    words = plan.max_words
    if block_words is None:  # about 32 KiB per tile: enough bytes in flight per program for PCIe reads
        block_words = min(triton.next_power_of_2(words), TILE_BYTES // plan.elem_bytes)
        if _interpret():
            block_words = min(triton.next_power_of_2(words), 4096)
    if items is None:  # small segments: several per tile
        items = max(1, min(16, TILE_BYTES // (block_words * plan.elem_bytes)))
        items = 1 << (items.bit_length() - 1)
    tiles_per_seg = triton.cdiv(words, block_words)
    even = all(w % block_words == 0 for w in plan.words)
    n_segs = len(layout.segments)
    n_items = n * n_segs
    total = triton.cdiv(n_items, items) * tiles_per_seg
    grid = (min(total, num_programs) if num_programs else total,)
    _copy_blocks_kernel[grid](
        plan.src_base, plan.src_stride, plan.dst_base, plan.dst_stride, plan.seg_words,
        src_idx, dst_idx, n_items, n_segs, tiles_per_seg, total,
        WORD=_tl_word(plan.elem_bytes), ALIGN=plan.align, ITEMS=items, BLOCK=block_words, EVEN=even,
        num_warps=8 if items * block_words * plan.elem_bytes >= 16384 else 4,
    )


def _tl_word(nbytes: int):
    return {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}[nbytes]


# ---- CPU path -------------------------------------------------------------------------------------
def _segment_views(layout: KVLayout) -> list[torch.Tensor]:
    """One strided [num_blocks, length] uint8 view per segment, over the tensors' storages."""
    views = getattr(layout, "_views", None)
    if views is None:
        views = []
        for s in layout.segments:
            t = layout.tensors[s.tensor_index]
            storage = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
            views.append(storage.as_strided((layout.num_blocks, s.length), (s.block_stride, 1), s.storage_offset))
        object.__setattr__(layout, "_views", views)
    return views


def _wide(t: torch.Tensor, word: int) -> torch.Tensor:
    """The same bytes viewed as `word`-byte integers (index_copy_ is ~5x faster on int64 than on
    uint8 on the CPU); the uint8 view when the bytes do not allow it."""
    dt = {8: torch.int64, 4: torch.int32, 2: torch.int16}.get(min(word, 8))
    if dt is None:
        return t
    try:
        return t.view(dt)
    except RuntimeError:
        return t


def copy_blocks_torch(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor,
                      page_index: torch.Tensor | None = None, *, pack: bool = True) -> None:
    """Vectorised torch path (CPU backend): one gather (uint8 index_select) and one scatter (word-wide
    index_copy_) per segment; no per-block Python loop."""
    _check(layout, block_ids, pages, page_index)
    if block_ids.numel() == 0:
        return
    idx = block_ids.to(device=layout.device, dtype=torch.int64)
    pidx = None if page_index is None else page_index.to(device=pages.device, dtype=torch.int64)
    n = idx.numel()
    word = layout.word_bytes
    for s, view in zip(layout.segments, _segment_views(layout)):
        cols = slice(s.page_offset, s.page_offset + s.length)
        if pack:
            data = view.index_select(0, idx)
            if pidx is None:
                pages[:n, cols].copy_(data)
            else:
                _wide(pages[:, cols], word).index_copy_(0, pidx, _wide(data, word))
        else:
            data = pages[:n, cols] if pidx is None else pages[:, cols].index_select(0, pidx)
            _wide(view, word).index_copy_(0, idx, _wide(data.to(view.device), word))


def copy_blocks_reference(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor,
                          page_index: torch.Tensor | None = None, *, pack: bool = True) -> None:
    """Definition: for each block, for each segment, copy its bytes (slow; for tests)."""
    _check(layout, block_ids, pages, page_index)
    views = _segment_views(layout)
    pidx = list(range(block_ids.numel())) if page_index is None else page_index.tolist()
    for i, b in enumerate(block_ids.tolist()):
        for s, view in zip(layout.segments, views):
            page_part = pages[pidx[i], s.page_offset:s.page_offset + s.length]
            if pack:
                page_part.copy_(view[b])
            else:
                view[b].copy_(page_part)


def _dispatch(layout: KVLayout, block_ids, pages, page_index, pack: bool, backend: str | None, **kw) -> None:
    if backend is None:
        backend = "triton" if layout.device.type == "cuda" else "torch"
    if backend == "triton":
        copy_blocks_triton(layout, block_ids, pages, page_index, pack=pack, **kw)
    elif backend == "torch":
        copy_blocks_torch(layout, block_ids, pages, page_index, pack=pack)
    elif backend == "reference":
        copy_blocks_reference(layout, block_ids, pages, page_index, pack=pack)
    else:
        raise ValueError(f"unknown backend {backend!r}; use triton, torch or reference")


def pack(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor, page_index: torch.Tensor | None = None,
         backend: str | None = None, **kw) -> None:
    """pages[page_index[i]] <- block block_ids[i] of every layer."""
    _dispatch(layout, block_ids, pages, page_index, True, backend, **kw)


def unpack(layout: KVLayout, block_ids: torch.Tensor, pages: torch.Tensor, page_index: torch.Tensor | None = None,
           backend: str | None = None, **kw) -> None:
    """Block block_ids[i] of every layer <- pages[page_index[i]]."""
    _dispatch(layout, block_ids, pages, page_index, False, backend, **kw)
