"""The blend worker: around each forward pass with blended requests (vLLM 0.32's CPU attention backend,
vLLM 0.26's FlashAttention on a GPU; blend/attention.py).

`register` decides once, from the attention layers' implementation, whether blending runs here.

Before the forward pass (`start_step`): where each reused token of this step goes, then the stored blocks
that hold them on their way into vLLM's paged cache, keys rotated to the new positions (chunk_kv.py: on a
GPU beside the forward pass), and a `BlendStep` active (step.py): the layers up to `check_layer` run on
every token, the check layer keeps the `recompute_ratio` share of reused tokens whose keys deviate most
(plus every token not reused, and those whose pages failed), and later layers run on those tokens only.

After it (`end_step`): the K/V captured for chunks being saved are assembled; a chunk complete after
this step is stored as blend pages: [layers, 2 (K, V), block_size, kv_heads, head_dim] in the cache
dtype, keys rotated back so the chunk's first token sits at position 0.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import torch

from ucm.config import BlendConfig
from ucm.integration.vllm.blend import step as blend_step
from ucm.integration.vllm.blend.attention import SubsetAttention, for_backend
from ucm.integration.vllm.blend.chunk_kv import ChunkKV, Piece
from ucm.integration.vllm.blend.plan import BlendRequestMeta, ChunkLoad, ChunkSave
from ucm.integration.vllm.connector.metadata import UCMConnectorMetadata
from ucm.kernels.rope import RopeSpec, rerotate
from ucm.logger import get_logger

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

    from ucm.integration.vllm.connector.worker import WorkerSide

log = get_logger("Blend")
TIMING_ENV = "UCM_BLEND_TIMING"  # "1": the selection is timed after a device synchronize (benchmarks)


class BlendWorker:
    def __init__(self, blend: BlendConfig, rope: RopeSpec | None, worker: "WorkerSide", why_not: str,
                 layers: Callable[[], dict] = dict):
        """`layers`: vLLM's attention layers by name (the static forward context; asked at `register`,
        when the model is built)."""
        self.blend, self.rope, self.worker, self.why_not = blend, rope, worker, why_not
        self.block_size = worker.block_size
        self._layer_names: list[str] = []  # attention layers, in order
        self._all_layers = layers
        self._attention: SubsetAttention | None = None  # the backend's adapter (register)
        self._stream = None  # a GPU's stream for the reused KV's way into the cache (chunk_kv.py)
        self.timed = os.environ.get(TIMING_ENV, "") not in ("", "0")  # device synchronized around timed parts
        self._captures: list = []  # this step's (request, chunk) saves, in capture order
        self._partial: dict[tuple[str, int], list] = {}  # (request, chunk start) -> captured parts so far

    @property
    def store(self):
        return self.worker.store

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The attention layers, and the one decision of whether their backend can blend."""
        self._layer_names = sorted(kv_caches, key=blend_step.layer_index)
        layer = self._all_layers().get(self._layer_names[0]) if self._layer_names else None
        impl = getattr(layer, "impl", None)
        self._attention = for_backend(impl) if impl is not None else None
        if self._attention is None and not self.why_not:
            self.why_not = (f"attention backend {type(impl).__name__} (blending runs on vLLM's CPU backend and "
                            "on FlashAttention)")
            log.warning("blending disabled, prefix caching only: %s", self.why_not)
        elif self._attention is not None:
            log.info("blend worker: attention backend %s, KV cache on %s", self._attention.name,
                     next(iter(kv_caches.values())).device)

    def _layers(self, forward_context: "ForwardContext") -> list:
        return [forward_context.no_compile_layers[n] for n in self._layer_names]

    def _slots(self, block_ids: list[int], start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        return torch.tensor(block_ids, dtype=torch.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---- before the forward pass ------------------------------------------------------------------
    def start_step(self, forward_context: "ForwardContext", meta: UCMConnectorMetadata) -> None:
        blend_step.set_active(None)
        for key in [k for k in self._partial if k[0] in meta.preempted]:
            del self._partial[key]  # a preempted request computes its chunks again when it resumes
        todo = [rm for rm in meta.blend if rm.loads or rm.saves]
        if not todo or self.why_not:
            return
        layers = self._layers(forward_context)
        slot_mapping = forward_context.slot_mapping[self._layer_names[0]]
        md = forward_context.attn_metadata[self._layer_names[0]]
        n_batch = int(md.query_start_loc[-1])
        batch_slots = slot_mapping[:n_batch].long().cpu()
        known, order = batch_slots.sort()  # padding has slot -1: never asked for

        def batch_positions(slots: torch.Tensor) -> torch.Tensor:
            """Each slot's position in this step's batch, -1 where the step computes no token there."""
            at = torch.searchsorted(known, slots).clamp(max=known.numel() - 1)
            return torch.where(known[at] == slots, order[at], torch.full_like(slots, -1))

        t0 = time.perf_counter()
        # a prompt's last token is never reused (see the planner), so it is always recomputed; the last
        # token of an intermediate chunked-prefill step is not needed (vLLM discards that sample)
        pieces, ids, owner, positions, always = [], [], [], [], []
        for r, rm in enumerate(todo):
            for load in rm.loads:
                piece = self._piece(rm, load, len(ids), batch_positions)
                if piece is None:
                    continue
                pieces.append(piece)
                ids += load.ids
                owner.append(torch.full_like(piece.idx, r))
                positions.append(torch.arange(load.start, load.start + load.tokens)[piece.live])
        capture: list[torch.Tensor] = []
        self._captures = []
        for rm in todo:
            for save in rm.saves:
                a, b = save.part
                idx = batch_positions(self._slots(rm.block_ids, a, b - a))
                if (idx < 0).any():  # not expected: the scheduler names this step's tokens
                    log.warning("req %s: chunk [%d, %d) not saved: tokens %d..%d are not in this step",
                                rm.req_id, save.start, save.end, a, b)
                    self._partial.pop((rm.req_id, save.start), None)
                    continue
                capture.append(idx)
                self._captures.append((rm, save))
        if not pieces and not capture:
            return
        chunks, reused, cached_rows = None, torch.empty(0, dtype=torch.int64), None
        if pieces:
            if self._stream is None and layers[0].kv_cache.is_cuda:
                self._stream = torch.cuda.Stream(device=layers[0].kv_cache.device)
            chunks = ChunkKV(self.store, ids, pieces, layers, self.blend.check_layer, self.rope, self.block_size,
                             self._stream)
            chunks.start()
            # each chunk's first `chunk_start_tokens` tokens are computed in every layer, not reused
            first = self.blend.chunk_start_tokens
            rows, at = [], 0
            for p in pieces:
                m = p.idx.numel()
                always += p.idx[:first].tolist()
                rows.append(torch.arange(at + min(first, m), at + m))
                at += m
            cached_rows = torch.cat(rows)
            reused = torch.cat([p.idx for p in pieces])[cached_rows]
            owner, positions = torch.cat(owner)[cached_rows], torch.cat(positions)[cached_rows]
        step = blend_step.BlendStep(
            self.blend.check_layer, self.blend.recompute_ratio, self.blend.recompute_span, reused, None,
            reused_req=owner if pieces else None, reused_pos=positions if pieces else None, always=always,
            capture_idx=torch.cat(capture) if capture else None, attention=self._attention, chunks=chunks,
            cached_rows=cached_rows, timed=self.timed, last_layer=blend_step.layer_index(self._layer_names[-1]))
        blend_step.set_active(step)
        if reused.numel():
            n = reused.numel()
            self.worker.stats.add(blend_reused_tokens=n)
            alone = sum(x.alone for rm in todo for x in rm.loads)
            log.info("blend: %d tokens of %d requests reused at new positions (their loads enqueued in %.1f ms, %d "
                     "copies); recomputing %.0f%% of them from layer %d; chunk pages computed alone %d, in context %d",
                     n, sum(1 for rm in todo if rm.loads), 1e3 * (time.perf_counter() - t0), chunks.copies,
                     100 * self.blend.recompute_ratio, self.blend.check_layer + 1, alone,
                     sum(len(rm.loads) for rm in todo) - alone)

    def _piece(self, rm: BlendRequestMeta, load: ChunkLoad, row: int, batch_positions) -> Piece | None:
        """Where a chunk load's tokens go in this step (its blocks from buffer row `row` on), or None if
        none of them is computed in this step."""
        n, skip = load.tokens, (load.start - load.origin) % self.block_size
        slots = self._slots(rm.block_ids, load.start, n)
        idx = batch_positions(slots)
        live = idx >= 0  # tokens this step computes (not already in vLLM's cache)
        if not live.any():
            return None
        return Piece((row, row + len(load.ids)), skip, n, live, slots[live], idx[live], load.origin)

    # ---- after the forward pass -------------------------------------------------------------------
    def end_step(self, meta: UCMConnectorMetadata) -> None:
        step = blend_step.ACTIVE
        blend_step.set_active(None)
        if step is not None and step.chunks is not None:
            step.chunks.close()
            for i, why in step.chunks.failed:
                log.warning("blend: a chunk's pages failed (%s): its %d tokens were recomputed", why,
                            step.chunks.pieces[i].idx.numel())
        if step is not None and step.reused_idx.numel():
            self.worker.stats.add(blend_recomputed_tokens=step.recomputed)
            log.info("blend: recomputed %d of %d reused tokens after layer %d (%d other tokens computed in all "
                     "layers; selection %.1f ms; reused KV read, rotated and written in %.1f ms%s, its writes "
                     "enqueued in %.1f ms during the first layers)", step.recomputed,
                     step.reused_idx.numel(), step.check_layer,
                     0 if step.sel is None else step.sel.numel() - step.recomputed, 1e3 * step.select_seconds,
                     1e3 * step.chunks.seconds(), ", on a stream beside the forward pass" if step.chunks.gpu else "",
                     1e3 * step.chunks.write_seconds)
        if step is not None and step.capture_idx is not None:
            if len(step.captured) != len(self._layer_names):
                log.warning("chunks not saved: %d of %d layers captured", len(step.captured), len(self._layer_names))
                self._captures = []
            at = 0
            for rm, save in self._captures:  # this step's part of each chunk, in capture order
                n = save.part[1] - save.part[0]
                parts = self._partial.setdefault((rm.req_id, save.start), [])
                parts.append([(k[at:at + n], v[at:at + n]) for k, v in (step.captured[i]
                                                                        for i in range(len(self._layer_names)))])
                at += n
                if save.final:
                    self._save_chunk(rm, save, self._partial.pop((rm.req_id, save.start)))
        self._captures = []

    def finished(self, finished_req_ids: set[str]) -> None:
        for key in [k for k in self._partial if k[0] in finished_req_ids]:
            del self._partial[key]  # a request that ended before its chunk was complete

    def _save_chunk(self, rm: BlendRequestMeta, save: ChunkSave, parts: list) -> None:
        """Blend pages of a chunk from the K/V captured during the forward passes that computed it."""
        n_layers = len(self._layer_names)
        k0 = parts[0][0][0]
        heads, dim = k0.shape[1], k0.shape[2]
        n, blocks, bs = save.end - save.start, len(save.ids), self.block_size
        page = torch.empty((blocks, n_layers, 2, bs, heads, dim), dtype=k0.dtype, device=k0.device)
        for layer in range(n_layers):
            k = torch.cat([p[layer][0] for p in parts])
            v = torch.cat([p[layer][1] for p in parts])
            if k.shape[0] != n:
                log.warning("req %s: chunk [%d, %d) not saved: %d of its tokens captured", rm.req_id, save.start,
                            save.end, k.shape[0])
                return
            page[:, layer, 0] = k.reshape(blocks, bs, heads, dim)
            page[:, layer, 1] = v.reshape(blocks, bs, heads, dim)
        if save.origin:  # canonical positions: the chunk's first token at 0
            keys = page[:, :, 0].permute(1, 0, 2, 3, 4).reshape(n_layers * n, heads, dim).contiguous()
            rerotate(keys, -save.origin, self.rope)
            page[:, :, 0] = keys.view(n_layers, blocks, bs, heads, dim).permute(1, 0, 2, 3, 4)
        task = self.store.dump(save.ids, 0, page.view(blocks, -1).view(torch.uint8))
        self.store.wait(task)
        self.store.commit(save.ids, [i not in task.errors for i in range(blocks)])
        log.debug("req %s: saved chunk [%d, %d) as %d blend blocks", rm.req_id, save.start, save.end, blocks)
