"""The blend worker: around each forward pass with blended requests (vLLM 0.32's CPU attention backend).

Before the forward pass (`start_step`): read the stored blocks that hold reused tokens of this step,
rotate their keys to the new positions (ucm/kernels/rope.py), write them into the paged cache of every
layer with vLLM's own cache op, and activate a `BlendStep` (step.py): the layers up to `check_layer` run
on every token, the check layer keeps the `recompute_ratio` share of reused tokens whose keys deviate
most (plus every token not reused), and later layers run on those tokens only.

After it (`end_step`): the K/V captured for chunks being saved are assembled; a chunk complete after
this step is stored as blend pages: [layers, 2 (K, V), block_size, kv_heads, head_dim] in the cache
dtype, keys rotated back so the chunk's first token sits at position 0.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ucm.config import BlendConfig
from ucm.integration.vllm.blend import step as blend_step
from ucm.integration.vllm.blend.plan import BlendRequestMeta, ChunkLoad, ChunkSave
from ucm.integration.vllm.connector.metadata import UCMConnectorMetadata
from ucm.kernels.rope import RopeSpec, rerotate
from ucm.logger import get_logger

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

    from ucm.integration.vllm.connector.worker import WorkerSide

log = get_logger("Blend")


class BlendWorker:
    def __init__(self, blend: BlendConfig, rope: RopeSpec | None, worker: "WorkerSide", why_not: str):
        self.blend, self.rope, self.worker, self.why_not = blend, rope, worker, why_not
        self.block_size = worker.block_size
        self._layer_names: list[str] = []  # attention layers, in order
        self._captures: list = []  # this step's (request, chunk) saves, in capture order
        self._partial: dict[tuple[str, int], list] = {}  # (request, chunk start) -> captured parts so far

    @property
    def store(self):
        return self.worker.store

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layer_names = sorted(kv_caches, key=blend_step.layer_index)

    def _layers(self, forward_context: "ForwardContext") -> list | None:
        """The attention layers in order, if their backend is the one blending knows (vLLM 0.32 CPU)."""
        layers = [forward_context.no_compile_layers[n] for n in self._layer_names]
        impl = type(layers[0].impl).__name__
        if impl != "CPUAttentionBackendImpl":
            if not self.why_not:
                self.why_not = f"attention backend {impl} (blending runs on vLLM's CPU backend)"
                log.warning("blending disabled, prefix caching only: %s", self.why_not)
            return None
        return layers

    def _page_shape(self, layers) -> tuple[int, ...]:
        a = layers[0]
        return (len(layers), 2, self.block_size, a.num_kv_heads, a.head_size)

    def _slots(self, block_ids: list[int], start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        return torch.tensor(block_ids, dtype=torch.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    @staticmethod
    def _rope_backend(t: torch.Tensor) -> str:
        return "triton" if t.is_cuda else "torch"

    # ---- before the forward pass ------------------------------------------------------------------
    def start_step(self, forward_context: "ForwardContext", meta: UCMConnectorMetadata) -> None:
        blend_step.set_active(None)
        for key in [k for k in self._partial if k[0] in meta.preempted]:
            del self._partial[key]  # a preempted request computes its chunks again when it resumes
        todo = [rm for rm in meta.blend if rm.loads or rm.saves]
        if not todo or self.why_not:
            return
        layers = self._layers(forward_context)
        if layers is None:
            return
        slot_mapping = forward_context.slot_mapping[self._layer_names[0]]
        md = forward_context.attn_metadata[self._layer_names[0]]
        n_batch = int(md.query_start_loc[-1])
        batch_slots = slot_mapping[:n_batch].long()
        live = batch_slots >= 0  # padding has slot -1
        inverse = torch.full((int(batch_slots.max()) + 1,), -1, dtype=torch.int64)
        inverse[batch_slots[live]] = torch.arange(n_batch)[live]

        def batch_positions(slots: torch.Tensor) -> torch.Tensor:
            idx = inverse[slots.clamp(max=inverse.numel() - 1)]
            return torch.where(slots < inverse.numel(), idx, torch.full_like(idx, -1))

        t0 = time.perf_counter()
        reused, cached_k, owner, positions, capture, self._captures = [], [], [], [], [], []
        # a prompt's last token is never reused (see the planner), so it is always recomputed; the last
        # token of an intermediate chunked-prefill step is not needed (vLLM discards that sample)
        always: list[int] = []
        for r, rm in enumerate(todo):
            for load in rm.loads:
                got = self._load_chunk(rm, load, layers, batch_positions)
                if got is not None:
                    idx, pos, keys = got
                    first = self.blend.chunk_start_tokens
                    always += idx[:first].tolist()
                    reused.append(idx[first:])
                    positions.append(pos[first:])
                    owner.append(torch.full_like(idx[first:], r))
                    cached_k.append(keys[first:])
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
        if not reused and not capture:
            return
        a = layers[0]
        step = blend_step.BlendStep(
            self.blend.check_layer, self.blend.recompute_ratio, self.blend.recompute_span,
            torch.cat(reused) if reused else torch.empty(0, dtype=torch.int64),
            torch.cat(cached_k) if cached_k else torch.empty(0, a.num_kv_heads, a.head_size),
            reused_req=torch.cat(owner) if owner else None, reused_pos=torch.cat(positions) if positions else None,
            always=always, capture_idx=torch.cat(capture) if capture else None)
        blend_step.set_active(step)
        if reused:
            n = step.reused_idx.numel()
            self.worker.stats.add(blend_reused_tokens=n)
            alone = sum(x.alone for rm in todo for x in rm.loads)
            log.info("blend: %d tokens of %d requests reused at new positions (loaded and rotated in %.1f ms); "
                     "recomputing %.0f%% of them from layer %d; chunk pages computed alone %d, in context %d", n,
                     sum(1 for rm in todo if rm.loads), 1e3 * (time.perf_counter() - t0),
                     100 * self.blend.recompute_ratio, self.blend.check_layer + 1, alone,
                     sum(len(rm.loads) for rm in todo) - alone)

    def _load_chunk(self, rm: BlendRequestMeta, load: ChunkLoad, layers, batch_positions):
        """Read a chunk's blocks, rotate their keys, write them into every layer's paged cache with
        vLLM's own cache op; (batch positions, prompt positions, check-layer keys) of the tokens placed,
        or None if the chunk cannot be used (it is then computed in full)."""
        shape = self._page_shape(layers)
        n_layers, _, bs, heads, dim = shape
        dtype = layers[0].kv_cache.dtype
        buf = torch.empty((len(load.ids),) + shape, dtype=dtype)
        task = self.store.load(load.ids, 0, buf.view(len(load.ids), -1).view(torch.uint8))
        if self.store.wait(task):
            log.warning("req %s: chunk at %d not reused: %s", rm.req_id, load.start, next(iter(task.errors.values())))
            return None
        n, skip = load.tokens, (load.start - load.origin) % bs  # tokens placed; rows of ids[0] before them
        # [blocks, layers, 2, bs, heads, dim] -> per layer [tokens, heads, dim]
        k = buf[:, :, 0].permute(1, 0, 2, 3, 4).reshape(n_layers, -1, heads, dim)[:, skip:skip + n].contiguous()
        v = buf[:, :, 1].permute(1, 0, 2, 3, 4).reshape(n_layers, -1, heads, dim)[:, skip:skip + n].contiguous()
        if load.origin:
            rerotate(k.view(n_layers * n, heads, dim), load.origin, self.rope, self._rope_backend(k))
        slots = self._slots(rm.block_ids, load.start, n)
        idx = batch_positions(slots)
        live = idx >= 0  # tokens this step computes (not already in vLLM's cache)
        slots, idx = slots[live], idx[live]
        for layer, attn in enumerate(layers):
            attn.impl.do_kv_cache_update(attn, k[layer][live], v[layer][live], attn.kv_cache, slots)
        return idx, torch.arange(load.start, load.start + n)[live], k[min(self.blend.check_layer, n_layers - 1)][live]

    # ---- after the forward pass -------------------------------------------------------------------
    def end_step(self, meta: UCMConnectorMetadata) -> None:
        step = blend_step.ACTIVE
        blend_step.set_active(None)
        if step is not None and step.reused_idx.numel():
            self.worker.stats.add(blend_recomputed_tokens=step.recomputed)
            log.info("blend: recomputed %d of %d reused tokens after layer %d (%d other tokens computed in all "
                     "layers)", step.recomputed, step.reused_idx.numel(), step.check_layer,
                     0 if step.sel is None else step.sel.numel() - step.recomputed)
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
        page = torch.empty((blocks, n_layers, 2, bs, heads, dim), dtype=k0.dtype)
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
            rerotate(keys, -save.origin, self.rope, self._rope_backend(keys))
            page[:, :, 0] = keys.view(n_layers, blocks, bs, heads, dim).permute(1, 0, 2, 3, 4)
        task = self.store.dump(save.ids, 0, page.view(blocks, -1).view(torch.uint8))
        self.store.wait(task)
        self.store.commit(save.ids, [i not in task.errors for i in range(blocks)])
        log.debug("req %s: saved chunk [%d, %d) as %d blend blocks", rm.req_id, save.start, save.end, blocks)
