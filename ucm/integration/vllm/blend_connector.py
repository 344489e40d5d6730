"""BlendConnector: reuse the KV of documents that are not a prefix (CacheBlend), on vLLM 0.32.

A prompt is split into chunks (a separator token, or `kv_transfer_params={"ucm_blend_chunks":
[[start, end], ...]}`); each chunk's blocks have ids that restart from the root seed, so a document
cached on its own is found anywhere in a later prompt.

Saving: every chunk a request computes rather than reuses is stored (its full blocks not stored yet, in
the blend page format below) once the chunk is computed, from the K/V captured during that forward
pass, with keys rotated back so the chunk's first token sits at position 0. A document is cached the
first time any prompt contains it, or by sending it alone; concurrent first saves of one block: the
first publish wins.

Blending, for a request whose chunks are (partly) stored: vLLM is told of no external tokens and
computes the prompt; before each prefill step's forward pass the worker reads the stored blocks that
hold tokens of that step, rotates their keys to the new positions (ucm/kernels/rope.py), writes them
into the paged cache of every layer, and activates a `BlendStep` (blend_step.py): the layers up to
`blend.check_layer` run on every token of the step, the check layer keeps the `recompute_ratio` share
of the step's reused tokens whose keys deviate most (plus every token not reused, the prompt's last
token among them), and the later layers run on those tokens only. A prompt prefilled in several steps (chunked
prefill) is blended step by step; later steps attend to the KV the earlier ones left in the cache.
Anything that prevents blending (no chunks or hits, RoPE that is not a pure rotation, the patches not
applied) falls back to UCMConnector's prefix caching, with a log line.

Blend page of a chunk block: [layers, 2 (K, V), block_size, kv_heads, head_dim] in the cache dtype,
keys at canonical positions (the chunk's first token at position 0). Same bytes per page as
UCMConnector's pages; the ids differ (the seed's `extra` gains "|blend").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorRole

from ucm.chunks import Chunk, from_boundaries, split_by_separator
from ucm.config import BlendConfig
from ucm.hashing import RequestHasher
from ucm.integration.vllm import blend_step
from ucm.integration.vllm.ucm_connector import UCMConnector, UCMConnectorMetadata, request_salt
from ucm.kernels.rope import RopeSpec, RopeUnsupported, rerotate
from ucm.logger import get_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = get_logger("Blend")
CHUNKS_PARAM = "ucm_blend_chunks"


@dataclass
class ChunkLoad:
    ids: list[bytes]  # stored blocks of the chunk that hold the tokens below, in order
    start: int  # the first token placed, as a position in this prompt
    tokens: int  # tokens placed from `start` on
    origin: int  # the chunk's first token in this prompt: stored keys (chunk start at 0) rotate by this

    def within(self, a: int, b: int, block_size: int) -> "ChunkLoad | None":
        """The part of this load that one prefill step computes (positions [a, b)), or None."""
        lo, hi = max(a, self.start), min(b, self.start + self.tokens)
        if lo >= hi:
            return None
        first = (self.start - self.origin) // block_size  # the chunk block that ids[0] is
        b0, b1 = (lo - self.origin) // block_size - first, -(-(hi - self.origin) // block_size) - first
        return ChunkLoad(self.ids[b0:b1], lo, hi - lo, self.origin)


@dataclass
class ChunkSave:
    ids: list[bytes]  # the chunk's blocks to store, in order
    start: int  # first token of those blocks in this prompt
    end: int
    origin: int  # the chunk's first token in this prompt (stored keys are rotated back from here to 0)
    part: tuple[int, int] = (0, 0)  # tokens of the chunk this step computes (their K/V are captured)
    final: bool = False  # the chunk is complete after this step: save it


@dataclass
class BlendRequestMeta:
    req_id: str
    block_ids: list[int]
    loads: list[ChunkLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


@dataclass
class BlendMetadata(UCMConnectorMetadata):
    blend: list[BlendRequestMeta] = field(default_factory=list)


@dataclass
class _Plan:
    """Scheduler side: what a request reuses and what it saves."""

    loads: list[ChunkLoad]
    saves: list[ChunkSave]
    block_ids: list[int] = field(default_factory=list)


class BlendConnector(UCMConnector):
    """kv_connector="BlendConnector"; the `blend` section of the YAML configures it."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        # blended steps bypass vLLM's per-layer connector calls after the check layer: loads are whole
        self.config = self.config.replace(transfer=dataclasses.replace(self.config.transfer, layerwise_load=False))
        self.blend = self.config.blend or BlendConfig()
        seed = self.request_hasher.seed
        self.chunk_hasher = RequestHasher(dataclasses.replace(seed, extra=f"{seed.extra}|blend"))
        self._plans: dict[str, _Plan] = {}
        self.rope: RopeSpec | None = None
        self._why_not = ""
        try:
            self.rope = RopeSpec.from_hf_config(vllm_config.model_config.hf_config)
        except (RopeUnsupported, TypeError, AttributeError) as e:
            self._why_not = f"RoPE cannot be re-rotated ({e})"
        from ucm.integration.vllm.patch.apply_patch import patch_report

        report = patch_report()
        for name in ("attention", "decoder_layer"):
            state = report.get(name, "missing")
            if state != "APPLIED" and not state.startswith("PENDING"):
                self._why_not = self._why_not or f"patch {name} is {state}"
        if self._why_not:
            log.warning("blending disabled, prefix caching only: %s", self._why_not)
        self._layer_names: list[str] = []  # worker: attention layers, in order
        self._captures: list = []  # this step's (request, chunk) saves, in capture order
        self._partial: dict[tuple[str, int], list] = {}  # (request, chunk start) -> captured parts so far
        log.info("blend connector (%s): separator %s, recompute %.0f%%, check layer %d, chunks >= %d tokens",
                 "scheduler" if role == KVConnectorRole.SCHEDULER else "worker", self.blend.separator,
                 100 * self.blend.recompute_ratio, self.blend.check_layer, self.blend.min_chunk_tokens)

    # ---- scheduler side ---------------------------------------------------------------------------
    def _chunks(self, request: "Request") -> list[Chunk]:
        tokens = request.prompt_token_ids or []
        params = getattr(request, "kv_transfer_params", None) or {}
        if CHUNKS_PARAM in params:
            try:
                return from_boundaries(params[CHUNKS_PARAM], len(tokens), self.blend.min_chunk_tokens)
            except ValueError as e:
                log.warning("req %s: kv_transfer_params[%r] ignored: %s", request.request_id, CHUNKS_PARAM, e)
                return []
        if self.blend.separator is None:
            return []
        return split_by_separator(tokens, self.blend.separator, self.blend.min_chunk_tokens)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """Blend when stored chunks reach further than the exact prefix hit (UCMConnector's); otherwise
        take the prefix hit. Either way, plan saves of the chunk blocks this request computes."""
        external, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if self._why_not:
            return external, is_async
        chunks = self._chunks(request)
        tokens = request.prompt_token_ids or []
        bs, salt = self.block_size, request_salt(request)
        found, loads = [], []
        for c in chunks:
            ids = self.chunk_hasher.generate_block_hashes(tokens[c.start:c.end], bs, salt=salt)
            if not ids:
                continue
            stored = self.store.lookup_prefix(ids)
            found.append((c, ids, stored))
            reuse = min(stored * bs, len(tokens) - 1 - c.start)  # the last prompt token is always computed
            if reuse > 0 and c.start >= num_computed_tokens:
                loads.append(ChunkLoad(ids[:-(-reuse // bs)], c.start, reuse, c.start))
        if loads and num_computed_tokens + external >= max(x.start + x.tokens for x in loads):
            log.debug("req %s: the prefix hit (%d tokens) covers every stored chunk: not blended",
                      request.request_id, num_computed_tokens + external)
            loads = []
        computed = num_computed_tokens if loads else num_computed_tokens + external
        saves = []
        for c, ids, stored in found:  # blocks not stored yet are computed (never reused) here
            first = max(stored, -(-(computed - c.start) // bs))
            if first < len(ids):
                saves.append(ChunkSave(ids[first:], c.start + first * bs, c.start + len(ids) * bs, c.start))
        if not loads:
            self._state(request).save_limit = None
            if saves:
                self._plans[request.request_id] = _Plan([], saves)
            if not chunks:
                log.debug("req %s: no chunks (separator %s absent, or every chunk under %d tokens)",
                          request.request_id, self.blend.separator, self.blend.min_chunk_tokens)
            return external, is_async
        self._plans[request.request_id] = _Plan(loads, saves)
        # blended KV is approximate from the first reused token on: no exact prefix pages past that block
        self._state(request).save_limit = min(x.start for x in loads) // bs
        if external:  # the prefix hit super() counted is not loaded
            self._lookups["loaded_tokens"] -= external
            self._write_counters()
        log.debug("req %s: %d chunks, %d stored in part or whole (%d tokens)", request.request_id, len(chunks),
                  len(loads), sum(x.tokens for x in loads))
        return 0, False  # vLLM computes the prompt; the worker blends the stored chunks into it

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        base = super().build_connector_meta(scheduler_output)
        meta = BlendMetadata(requests=base.requests, preempted=base.preempted)
        sched = scheduler_output.num_scheduled_tokens
        steps = [(r.req_id, r.num_computed_tokens, list(r.block_ids[0])) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self._plans.get(req_id)
            if plan is not None and cached.new_block_ids[i] is not None:
                plan.block_ids += cached.new_block_ids[i][0]
            steps.append((req_id, cached.num_computed_tokens[i], None))
        for req_id, computed, block_ids in steps:
            plan = self._plans.get(req_id)
            if plan is None:
                continue
            if block_ids is not None:
                plan.block_ids = block_ids
            after = computed + sched.get(req_id, 0)
            rm = BlendRequestMeta(req_id, list(plan.block_ids))
            # each prefill step blends the reused tokens it computes (chunked prefill: several steps)
            rm.loads = [p for p in (x.within(computed, after, self.block_size) for x in plan.loads) if p]
            plan.loads = [x for x in plan.loads if x.start + x.tokens > after]
            rm.saves = [dataclasses.replace(s, part=(max(s.start, computed), min(s.end, after)), final=s.end <= after)
                        for s in plan.saves if computed < s.end and s.start < after]
            plan.saves = [s for s in plan.saves if s.end > after]
            if rm.loads or rm.saves:
                meta.blend.append(rm)
            if rm.loads or rm.saves:  # blending and capturing are armed before the forward pass
                scheduler_output.has_sync_kv_loads = True
            if not plan.saves and not plan.loads:
                self._plans.pop(req_id, None)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        self._plans.pop(request.request_id, None)
        return super().request_finished(request, block_ids)

    # ---- worker side ------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        super().register_kv_caches(kv_caches)
        self._layer_names = sorted(kv_caches, key=blend_step.layer_index)

    def _layers(self, forward_context: "ForwardContext") -> list | None:
        """The attention layers in order, if their backend is the one blending knows (vLLM 0.32 CPU)."""
        layers = [forward_context.no_compile_layers[n] for n in self._layer_names]
        impl = type(layers[0].impl).__name__
        if impl != "CPUAttentionBackendImpl":
            if not self._why_not:
                self._why_not = f"attention backend {impl} (blending runs on vLLM's CPU backend)"
                log.warning("blending disabled, prefix caching only: %s", self._why_not)
            return None
        return layers

    def _page_shape(self, layers) -> tuple[int, ...]:
        a = layers[0]
        return (len(layers), 2, self.block_size, a.num_kv_heads, a.head_size)

    def _slots(self, block_ids: list[int], start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        return torch.tensor(block_ids, dtype=torch.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def _rope_backend(self, t: torch.Tensor) -> str:
        return "triton" if t.is_cuda else "torch"

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)
        blend_step.set_active(None)
        meta = self._get_connector_metadata()
        todo = [rm for rm in getattr(meta, "blend", []) if rm.loads or rm.saves]
        if not todo or self._why_not:
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
        reused, cached_k, capture, self._captures = [], [], [], []
        # a prompt's last token is never reused (see the scheduler side), so it is always recomputed; the
        # last token of an intermediate chunked-prefill step is not needed (vLLM discards that sample)
        always: list[int] = []
        for rm in todo:
            for load in rm.loads:
                got = self._load_chunk(rm, load, layers, batch_positions)
                if got is not None:
                    idx, keys = got
                    first = self.blend.chunk_start_tokens
                    always += idx[:first].tolist()
                    reused.append(idx[first:])
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
            always=always, capture_idx=torch.cat(capture) if capture else None)
        blend_step.set_active(step)
        if reused:
            n = step.reused_idx.numel()
            self._stats.data["blend_reused_tokens"] = self._stats.data.get("blend_reused_tokens", 0) + n
            log.info("blend: %d tokens of %d requests reused at new positions (loaded and rotated in %.1f ms); "
                     "recomputing %.0f%% of them from layer %d", n, sum(1 for rm in todo if rm.loads),
                     1e3 * (time.perf_counter() - t0), 100 * self.blend.recompute_ratio, self.blend.check_layer + 1)

    def _load_chunk(self, rm: BlendRequestMeta, load: ChunkLoad, layers, batch_positions):
        """Read a chunk's blocks, rotate their keys, write them into every layer's paged cache with
        vLLM's own cache op; (batch positions, check-layer keys) of the tokens placed, or None if the
        chunk cannot be used (it is then computed in full)."""
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
        return idx, k[min(self.blend.check_layer, n_layers - 1)][live]

    def wait_for_save(self):
        step = blend_step.ACTIVE
        blend_step.set_active(None)
        if step is not None and step.reused_idx.numel():
            self._stats.data["blend_recomputed_tokens"] = (self._stats.data.get("blend_recomputed_tokens", 0)
                                                           + step.recomputed)
            log.info("blend: recomputed %d of %d reused tokens after layer %d (%d other tokens computed in all "
                     "layers)", step.recomputed, step.reused_idx.numel(), step.check_layer,
                     0 if step.sel is None else step.sel.numel() - step.recomputed)
        super().wait_for_save()
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

    def get_finished(self, finished_req_ids: set[str]):
        for key in [k for k in self._partial if k[0] in finished_req_ids]:
            del self._partial[key]  # a request that ended before its chunk was complete
        return super().get_finished(finished_req_ids)

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
