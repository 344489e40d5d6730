"""The reused chunks' KV of one blended forward pass: read from the store, keys rotated to their new
positions, written into vLLM's paged cache, layer group by layer group.

What a blended pass needs of the stored KV (blend/step.py): the check layer's keys, to compare with the
fresh ones, and every layer after it, whose attention reads the reused tokens' KV from the cache. The
layers up to the check layer run on every token and write fresh KV, so their stored KV is not read at all.

On a GPU the work runs on a stream of its own beside the forward pass, in two parts:

* `start` (before the pass): the pages pinned, and per group of layers one strided DMA per run of
  consecutive host slots (the span of each page that holds those layers; kernels/dma.py) into a page
  buffer on the device; the check layer's keys gathered and rotated first, the copies of the later groups
  after them, then an event: the pages have been read.
* `advance` (called by the layers before the check layer, after each has been launched) and at the latest
  `settle`: per later group, per chunk the tokens gathered out of the buffer, their keys rotated (Triton)
  and per layer one write with vLLM's own cache op; an event after each group. This is most of the host's
  enqueueing, so it is spread over the first layers, whose work the device runs meanwhile, instead of
  delaying the pass's start.

The forward pass's stream waits for a layer's group before that layer's attention (`wait_layer`). The
pages stay pinned in the host tier until `settle`, which the check layer calls before its selection: it
waits for the copies only (not for the writes after them), verifies the pages (another process may have
reused a slot while they were copied), and returns the batch positions of tokens whose pages failed,
which the selection then recomputes like tokens that were never reused (the layers up to the check layer
computed them anyway). On a CPU the same steps run inline, in the same order.
"""

from __future__ import annotations

import contextlib
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


def writes_due(pending: int, layer: int, check_layer: int) -> int:
    """How many of `pending` groups' writes to enqueue after `layer` was launched: an even share of the
    layers before the check layer, so that the last of them leaves none (and `settle` none to do)."""
    left = check_layer - layer  # layers before the check layer, this one included
    return -(-pending // left) if pending and left > 0 else 0


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
        self._live: list[torch.Tensor | None] = []  # per piece, its live tokens' indices on the device
        self._cache_slots: torch.Tensor | None = None  # every live token's cache slot, on the device
        self._pending: list[tuple[int, int]] = []  # later groups whose writes are not enqueued yet
        self._copied = None  # event after the last page copy (GPU)
        self._settled = False
        self._marks: list = []  # (start, end) events on the stream, or perf_counter seconds on a CPU
        self._cpu_seconds = 0.0  # a CPU's time in `start`
        self.copies = 0  # page copies enqueued (runs of consecutive host slots, per group)
        self.write_seconds = 0.0  # host time spent enqueueing the later groups' writes (`advance`, `settle`)

    # ---- enqueue ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Pin the pages (promotions from the SSD are waited for), enqueue every group's page copies and
        the check layer's keys; the later groups' writes wait for `advance` (or `settle`)."""
        for p in self.pieces:  # the rotation tables first: building one synchronizes its stream
            if p.delta and self.rope is not None:
                self.rope.tables(p.delta, self.device)
        if self.stream is None:
            t0 = time.perf_counter()
            self._place()
            self._copy()
            self._cpu_seconds += time.perf_counter() - t0
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self._place()  # uploaded while this stream is idle (an upload waits for it)
            self.stream.wait_stream(compute)  # then after the steps already enqueued
            self._marks = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            self._marks[0].record(self.stream)
            self._copy()

    def _place(self) -> None:
        """On the device: each piece's live tokens as indices (None: all), every live token's cache slot.
        Indices, not masks: a mask's indexing would wait for the stream (it counts the tokens)."""
        self._live = [None if bool(p.live.all()) else p.live.nonzero().squeeze(1).to(self.device)
                      for p in self.pieces]
        self._cache_slots = torch.cat([p.slots for p in self.pieces]).to(self.device)

    def _copy(self) -> None:
        """Every group's spans of the pages into the buffer; the check layer's keys gathered right after
        its own span (the check layer reads them first)."""
        shape = (len(self.ids), self.n_layers, 2, self.block_size, self.heads, self.dim)
        self._buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._task = self.store.prepare_load(self.ids)
        batches = list(self._task.ready())  # host hits, then each promotion as it lands
        rows = self._buf.view(len(self.ids), -1).view(torch.uint8)
        layer_bytes = rows.shape[1] // self.n_layers
        runs = [(pages.view(pages.shape[0], -1).view(torch.uint8), list(page_runs(which, slots)))
                for pages, slots, which in batches]
        for first, end in self.groups:
            lo, hi = first * layer_bytes, end * layer_bytes
            for pages, batch_runs in runs:
                self.copies += dma.copy_runs(rows[:, lo:hi], pages[:, lo:hi], batch_runs, self.stream)
            if first == self.check_layer:
                self.cached_k = self._gather(first, end, values=False)[0][0]
                self._mark_group(first, end)
        if self.stream is not None:
            self._copied = torch.cuda.Event()
            self._copied.record(self.stream)
        self._pending = [g for g in self.groups if g[0] != self.check_layer]
        self._end_mark()

    def advance(self, layer: int) -> None:
        """Called after layer `layer` (< the check layer) was launched: enqueue its share of the later
        groups' writes."""
        due = writes_due(len(self._pending), layer, self.check_layer)
        if due:
            self._write(due)

    def _write(self, count: int) -> None:
        """Enqueue the next `count` pending groups' gathers, rotations and cache writes."""
        t0 = time.perf_counter()
        todo, self._pending = self._pending[:count], self._pending[count:]
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for first, end in todo:
                keys, values = self._gather(first, end, values=True)
                for i, layer in enumerate(range(first, end)):
                    attn = self.layers[layer]
                    attn.impl.do_kv_cache_update(attn, keys[i], values[i], attn.kv_cache, self._cache_slots)
                self._mark_group(first, end)
            self._end_mark()
        self.write_seconds += time.perf_counter() - t0

    def _end_mark(self) -> None:
        if self.stream is not None and not self._pending:
            self._marks[1].record(self.stream)

    def _mark_group(self, first: int, end: int) -> None:
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            for layer in range(first, end):
                self.events[layer] = ev

    def _gather(self, first: int, end: int, values: bool):
        """Layers [first, end) of every piece's live tokens: keys rotated to their new positions,
        ([layers, tokens, heads, dim] keys, the same of values or None)."""
        ks, vs = [], []
        lg = end - first
        for p, mask in zip(self.pieces, self._live):
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
        """The current stream waits until `layer`'s stored KV is in the cache (a later layer: after `settle`,
        which enqueued every write; on a CPU the writes are done)."""
        ev = self.events.get(layer)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def settle(self) -> torch.Tensor:
        """Enqueue what is left, wait for the page copies (not the writes after them), verify and unpin the
        pages (once); the batch positions (CPU) of tokens whose pages failed, to be recomputed."""
        if self._settled:
            return torch.empty(0, dtype=torch.int64)
        self._settled = True
        if self._pending:
            self._write(len(self._pending))
        if self.stream is not None:
            self._copied.synchronize()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.events[self.check_layer])  # cached_k is read there
            if self.cached_k is not None:
                self.cached_k.record_stream(compute)
        bad_rows: dict[int, str] = {}
        if self._task is not None:
            self.store.wait(self._task)
            bad_rows = dict(self._task.errors)
        self._buf = None  # freed on its stream: reused only by work enqueued after the writes there
        out = []
        for i, p in enumerate(self.pieces):
            why = next((bad_rows[r] for r in range(*p.rows) if r in bad_rows), None)
            if why is not None:
                self.failed.append((i, why))
                out.append(p.idx)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def seconds(self) -> float:
        """How long the reading, rotating and writing took: on a GPU its stream's span from the first copy
        to the last write (after the pass), on a CPU the time spent in them."""
        if self.stream is None or len(self._marks) != 2:
            return self._cpu_seconds + self.write_seconds
        a, b = self._marks
        return a.elapsed_time(b) / 1e3

    def close(self) -> None:
        """After the forward pass: the pages released (if `settle` never ran) and the stream joined (a
        pass that never attended a later layer never waited for its writes)."""
        self.settle()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

