"""The reused chunks' KV of one blended forward pass: read from the store, keys rotated to their new
positions, written into vLLM's paged cache, layer group by layer group.

What a blended pass needs of the stored KV (blend/step.py): the check layer's keys, to compare with the
fresh ones, and every layer after it, whose attention reads the reused tokens' KV from the cache. The
layers up to the check layer run on every token and write fresh KV, so their stored KV is not read at all.

On a GPU the work runs on a stream of its own while the forward pass computes the first layers: per group
of layers, one strided DMA per run of consecutive host slots (the span of each page that holds those
layers; kernels/dma.py) into a page buffer on the device, then per chunk the tokens gathered out of it, their keys rotated (Triton), and
per layer one write with vLLM's own cache op; an event after each group. The forward pass's stream
waits for a layer's group before that layer's attention (`wait_layer`). The pages stay pinned in the host
tier until `settle`, which the check layer calls before its selection: it waits for the copies, verifies
the pages (another process may have reused a slot), and returns the batch positions of tokens whose pages
failed, which the selection then recomputes like tokens that were never reused (the layers up to the
check layer computed them anyway). On a CPU the same steps run inline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import torch

from ucm.kernels import dma
from ucm.kernels.rope import RopeSpec, rerotate
from ucm.tiers.store import page_runs

GROUP_LAYERS = 8  # layers per copy group after the check layer


@dataclass
class Piece:
    """One chunk load's tokens in this step."""

    rows: tuple[int, int]  # its blocks' rows in the page buffer [first, end)
    skip: int  # tokens of its first block before the first one placed
    n: int  # tokens placed (from the chunk's blocks, in order)
    live: torch.Tensor  # bool [n], CPU: the tokens this step computes (the others are in vLLM's cache already)
    slots: torch.Tensor  # int64, CPU: cache slots of the live tokens
    idx: torch.Tensor  # int64, CPU: batch positions of the live tokens
    delta: int  # positions to rotate the stored keys by (the chunk's first token's position here)


def layer_groups(n_layers: int, check_layer: int) -> list[tuple[int, int]]:
    """[first, end) layers per copy group: the check layer alone, then GROUP_LAYERS at a time."""
    c = min(check_layer, n_layers - 1)
    return [(c, c + 1)] + [(a, min(a + GROUP_LAYERS, n_layers)) for a in range(c + 1, n_layers, GROUP_LAYERS)]


class ChunkKV:
    def __init__(self, store, ids: list[bytes], pieces: list[Piece], layers: list, check_layer: int,
                 rope: RopeSpec | None, block_size: int, stream=None):
        """`layers`: vLLM's attention layers in order (their `kv_cache` and `impl.do_kv_cache_update`);
        `ids`: every piece's stored blocks, in buffer row order; `stream`: the CUDA stream to work on
        (None on a CPU)."""
        self.store, self.ids, self.pieces, self.layers, self.rope = store, ids, pieces, layers, rope
        a = layers[0]
        self.n_layers, self.heads, self.dim = len(layers), a.num_kv_heads, a.head_size
        self.block_size, self.check_layer = block_size, min(check_layer, len(layers) - 1)
        self.dtype, self.device = a.kv_cache.dtype, a.kv_cache.device
        self.gpu = self.device.type == "cuda"
        self.stream = stream if self.gpu else None
        self.groups = layer_groups(self.n_layers, check_layer)
        self.events: dict[int, torch.cuda.Event] = {}  # layer -> event after its group's writes
        self.cached_k: torch.Tensor | None = None  # [live tokens, heads, dim]: the check layer's stored keys
        self.failed: list[tuple[int, str]] = []  # (piece, why) of pieces whose pages failed
        self._task = None
        self._buf: torch.Tensor | None = None
        self._settled = False
        self._marks: list = []  # (start, end) events on the stream, or perf_counter seconds on a CPU
        self.copies = 0  # page copies enqueued (runs of consecutive host slots, per group)

    # ---- enqueue ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Pin the pages (promotions from the SSD are waited for) and enqueue every group's work."""
        for p in self.pieces:  # the rotation tables first: building one synchronizes its stream
            if p.delta and self.rope is not None:
                self.rope.tables(p.delta, self.device)
        shape = (len(self.ids), self.n_layers, 2, self.block_size, self.heads, self.dim)
        if self.stream is None:
            t0 = time.perf_counter()
            self._enqueue(shape, *self._placement())
            self._marks = [t0, time.perf_counter()]
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            placement = self._placement()  # uploaded while this stream is idle (an upload waits for it)
            self.stream.wait_stream(compute)  # then after the steps already enqueued
            self._marks = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            self._marks[0].record(self.stream)
            self._enqueue(shape, *placement)
            self._marks[1].record(self.stream)

    def _placement(self) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """On the device: each piece's live tokens as indices (None: all), every live token's cache slot.
        Indices, not masks: a mask's indexing would wait for the stream (it counts the tokens)."""
        live = [None if bool(p.live.all()) else p.live.nonzero().squeeze(1).to(self.device) for p in self.pieces]
        return live, torch.cat([p.slots for p in self.pieces]).to(self.device)

    def _enqueue(self, shape, live: list[torch.Tensor | None], cache_slots: torch.Tensor) -> None:
        self._buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._task = self.store.prepare_load(self.ids)
        batches = list(self._task.ready())  # host hits, then each promotion as it lands
        layer_bytes = self._buf[0, 0].numel() * self._buf.element_size()
        rows = self._buf.view(len(self.ids), -1).view(torch.uint8)
        page_bytes = rows.shape[1]
        # pinned host pages: one strided DMA per run and group (torch's copy of a strided span is a CPU copy)
        runs = [(pages, pages.stride(0) * pages.element_size(), self.gpu and dma.available() and pages.is_pinned(),
                 list(page_runs(which, slots))) for pages, slots, which in batches]
        self.copies = len(self.groups) * sum(len(r) for *_, r in runs)
        for first, end in self.groups:
            lo, hi = first * layer_bytes, end * layer_bytes
            for pages, pitch, direct, batch_runs in runs:
                for r, s, k in batch_runs:
                    if direct:
                        dma.copy_2d(rows.data_ptr() + r * page_bytes + lo, page_bytes, pages.data_ptr() + s * pitch + lo,
                                    pitch, hi - lo, k, self.stream.cuda_stream)
                    else:
                        rows[r:r + k, lo:hi].copy_(pages[s:s + k, lo:hi])
            keys, values = self._gather(first, end, live, values=first != self.check_layer)
            if first == self.check_layer:
                self.cached_k = keys[0]
            else:
                for i, layer in enumerate(range(first, end)):
                    attn = self.layers[layer]
                    attn.impl.do_kv_cache_update(attn, keys[i], values[i], attn.kv_cache, cache_slots)
            if self.stream is not None:
                ev = torch.cuda.Event()
                ev.record(self.stream)
                for layer in range(first, end):
                    self.events[layer] = ev

    def _gather(self, first: int, end: int, live: list[torch.Tensor | None], values: bool):
        """Layers [first, end) of every piece's live tokens: keys rotated to their new positions,
        ([layers, tokens, heads, dim] keys, the same of values or None)."""
        ks, vs = [], []
        lg = end - first
        for p, mask in zip(self.pieces, live):
            part = self._buf[p.rows[0]:p.rows[1], first:end]  # [blocks, layers, 2, bs, heads, dim]

            def tokens(kv: int) -> torch.Tensor:
                t = part[:, :, kv].permute(1, 0, 2, 3, 4).reshape(lg, -1, self.heads, self.dim)[:, p.skip:p.skip + p.n]
                return (t if mask is None else t.index_select(1, mask)).contiguous()

            k = tokens(0)
            if p.delta:
                rerotate(k.view(-1, self.heads, self.dim), p.delta, self.rope)
            ks.append(k)
            if values:
                vs.append(tokens(1))
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1) if values else None

    # ---- the forward pass -------------------------------------------------------------------------
    def wait_layer(self, layer: int) -> None:
        """The current stream waits until `layer`'s stored KV is in the cache (no-op on a CPU)."""
        ev = self.events.get(layer)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def settle(self) -> torch.Tensor:
        """Wait for the copies, verify and unpin the pages (once); the batch positions (CPU) of tokens
        whose pages failed, to be recomputed."""
        if self._settled:
            return torch.empty(0, dtype=torch.int64)
        self._settled = True
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)  # cached_k is read there
            if self.cached_k is not None:
                self.cached_k.record_stream(torch.cuda.current_stream(self.device))
        bad_rows: dict[int, str] = {}
        if self._task is not None:
            self.store.wait(self._task)
            bad_rows = dict(self._task.errors)
        self._buf = None
        out = []
        for i, p in enumerate(self.pieces):
            why = next((bad_rows[r] for r in range(*p.rows) if r in bad_rows), None)
            if why is not None:
                self.failed.append((i, why))
                out.append(p.idx)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def seconds(self) -> float:
        """How long the reading, rotating and writing took on its stream (after `settle`)."""
        if len(self._marks) != 2:
            return 0.0
        a, b = self._marks
        return b - a if self.stream is None else a.elapsed_time(b) / 1e3

    def close(self) -> None:
        """After the forward pass: the pages released (if `settle` never ran) and the stream joined."""
        self.settle()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
