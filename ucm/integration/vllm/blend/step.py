"""One forward pass with blended requests: which tokens are recomputed, and attention for that subset.

The blend worker (blend/worker.py) sets `ACTIVE` in `start_load_kv` after starting the reused chunks' KV
(keys rotated to their new positions) on its way into vLLM's paged cache for the layers after the check
layer (`chunks`, blend/chunk_kv.py), and clears it in `wait_for_save`. The patches
(patch_funcs/v0_32/vllm_patch.py, also applied on 0.26's GPU build) consult it:

* layers up to `check_layer` run unchanged on every token, writing fresh KV;
* at `check_layer`, `select()` compares each reused token's fresh key with its cached one and keeps, per
  request, the `ratio` share of that request's reused tokens that deviates most, plus every token that was not reused (missed chunks, separators,
  the question, a prompt's last token);
* in later layers the decoder layer runs on the selected tokens only (their rows gathered once and put
  back after the last layer), and `attend()` (once the layer's
  reused KV is in the cache) writes their KV
  and computes their attention over the whole context from the paged cache, where the other tokens'
  KV is the reused one. That is the work saved;
* `capture()` keeps the fresh K/V of tokens whose chunk is to be saved (vLLM's CPU cache layout is
  the ISA's own, e.g. AMX tiles, so KV is taken as it is computed rather than read back).

Batch positions (`reused_idx`, `always`, `capture_idx`) and the selection's bookkeeping live on the CPU;
keys and the selection used to index the model's tensors (`sel`) live on the model's device. The
attention kernel's metadata for the selected tokens is the backend's (blend/attention.py), chosen once
where the worker registers the KV cache.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from ucm.integration.vllm.blend.attention import SubsetAttention
from ucm.integration.vllm.blend.chunk_kv import ChunkKV

_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """'model.layers.12.self_attn.attn' -> 12."""
    m = _LAYER.search(layer_name)
    if m is None:
        raise ValueError(f"no layer index in {layer_name!r}")
    return int(m.group(1))


@dataclass
class BlendStep:
    check_layer: int
    ratio: float
    span: int  # reused tokens are selected in aligned spans of this many token positions (1: one by one)
    reused_idx: torch.Tensor  # int64 [n], CPU: batch positions of tokens whose KV was reused
    cached_k: torch.Tensor | None  # [n, kv_heads, head_dim], the model's device: their reused keys at the check
                                   # layer (None: `chunks.cached_k[cached_rows]`, once the chunks are settled)
    reused_req: torch.Tensor | None = None  # int64 [n]: the request of each (None: one request)
    reused_pos: torch.Tensor | None = None  # int64 [n]: their positions in that request (None: batch positions)
    always: list[int] = field(default_factory=list)  # batch positions computed in every layer regardless
                                                     # (e.g. each chunk's first tokens)
    capture_idx: torch.Tensor | None = None  # CPU: batch positions whose fresh K/V are kept for saving
    attention: SubsetAttention | None = None  # the backend's attention metadata for the selection (attend)
    chunks: ChunkKV | None = None  # the reused KV on its way into the cache (blend/chunk_kv.py)
    cached_rows: torch.Tensor | None = None  # CPU: rows of chunks.cached_k that are the reused tokens
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (K, V)
    sel: torch.Tensor | None = None  # int64, sorted, the model's device: batch positions computed after the
                                     # check layer
    sel_cpu: torch.Tensor | None = None  # the same on the CPU
    sel_positions: torch.Tensor | None = None  # their token positions (set by the decoder layer)
    last_layer: int | None = None  # the model's last decoder layer (None: the rows go back after every layer)
    full_rows: tuple | None = None  # the batch's (hidden states, residual) while the selected rows go on alone
    recomputed: int = 0  # reused tokens recomputed anyway (the deviating ones)
    timed: bool = False  # UCM_BLEND_TIMING: the device is synchronized around the selection, which is timed
    select_seconds: float = 0.0
    _runs: tuple | None = None  # (query starts, sequence lengths, requests) of the selection's runs
    _metadata: dict = field(default_factory=dict)  # attention metadata of the selection, per layer shape
    _sel_slots: dict = field(default_factory=dict)  # the selection's cache slots, per slot mapping

    def advance(self, layer: int) -> None:
        """After a layer before the check layer was launched: the reused KV's next writes enqueued."""
        if self.chunks is not None:
            self.chunks.advance(layer)

    def select(self, fresh_keys: torch.Tensor) -> None:
        """At the check layer: fresh_keys [batch tokens, kv_heads, head_dim], all tokens. Each request
        keeps its own `ratio` share of its reused tokens (`reused_req`), so what a request recomputes
        depends on that request alone, not on what else is in the batch."""
        n = self.reused_idx.numel()
        if not n:
            return  # nothing reused: every layer runs on every token
        device = fresh_keys.device
        t0 = device_clock(self.timed, device)
        failed = self.chunks.settle() if self.chunks is not None else torch.empty(0, dtype=torch.int64)
        if self.cached_k is None:
            self.cached_k = self.chunks.cached_k[self.cached_rows.to(device)]
        keep = torch.ones(fresh_keys.shape[0], dtype=torch.bool)
        keep[self.reused_idx] = False
        diff = fresh_keys[self.reused_idx.to(device)].float() - self.cached_k.float()
        deviation = (diff * diff).sum(dim=(1, 2)).cpu()
        if failed.numel():  # pages that failed: their tokens are recomputed, outside the budget
            deviation[torch.isin(self.reused_idx, failed)] = -1.0
        reqs = self.reused_req if self.reused_req is not None else torch.zeros(n, dtype=torch.int64)
        pos = self.reused_pos if self.reused_pos is not None else self.reused_idx
        chosen = torch.zeros(n, dtype=torch.bool)
        for r in reqs.unique().tolist():
            mine = (reqs == r).nonzero().squeeze(1)
            chosen[mine[self._choose(deviation[mine], pos[mine])]] = True
        keep[self.reused_idx[chosen]] = True
        self.recomputed = int(chosen.sum())
        if self.always:
            keep[torch.tensor(self.always)] = True
        keep[failed] = True
        self.sel_cpu = keep.nonzero().squeeze(1)
        self.sel = self.sel_cpu.to(device)
        self.select_seconds = device_clock(self.timed, device) - t0

    def _choose(self, deviation: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Indices of one request's reused tokens to recompute: the `ratio` share that deviates most,
        taken in aligned spans of `span` token positions when span > 1 (spans ranked by their most
        deviating token: the recomputed tokens then form runs that the kernel attends as blocks)."""
        n = deviation.numel()
        budget = min(n, math.ceil(self.ratio * n))
        if not budget:
            return torch.empty(0, dtype=torch.int64)
        if self.span <= 1:
            return deviation.topk(budget).indices
        spans, inverse = torch.unique(pos // self.span, return_inverse=True)
        score = torch.full((spans.numel(),), -1.0).scatter_reduce(0, inverse, deviation, "amax")
        counts = torch.bincount(inverse, minlength=spans.numel())
        order = score.argsort(descending=True)
        take = order[:int((counts[order].cumsum(0) < budget).sum()) + 1]
        return torch.isin(inverse, take).nonzero().squeeze(1)

    def capture(self, layer: int, key: torch.Tensor, value: torch.Tensor, subset: bool) -> None:
        """Keep this layer's fresh K/V of the tokens to save (rows of the subset after the check layer;
        tokens saved are never reused ones, so they are always in it)."""
        if self.capture_idx is None:
            return
        rows = torch.searchsorted(self.sel_cpu, self.capture_idx) if subset else self.capture_idx
        rows = rows.to(key.device)
        self.captured[layer] = (key[rows].clone(), value[rows].clone())

    def _query_runs(self, query_start_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selected tokens as runs of consecutive positions of one request: (query start offsets
        [runs + 1], sequence length = last position + 1 [runs], request of each run [runs]), on the CPU."""
        qsl = query_start_loc.cpu()
        req = torch.searchsorted(qsl[1:], self.sel_cpu.to(qsl.dtype), right=True)
        pos = self.sel_positions.cpu()
        new = torch.ones(pos.numel(), dtype=torch.bool)
        new[1:] = (pos[1:] != pos[:-1] + 1) | (req[1:] != req[:-1])
        starts = new.nonzero().squeeze(1)
        ends = torch.cat([starts[1:], torch.tensor([pos.numel()])])
        qsl = torch.cat([starts, torch.tensor([pos.numel()])])
        return qsl, pos[ends - 1] + 1, req[starts]

    def attend(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention for the selected tokens only (query/key/value hold those rows): write their KV with
        vLLM's own cache op, then run vLLM's attention kernel with each run of consecutive selected
        tokens as a sequence that ends at the run's last position (queries are then causal by position;
        the cache layout is the backend's, e.g. AMX tiles on a CPU, so nothing here reads the cache)."""
        from vllm.model_executor.layers.attention.attention import get_attention_context

        if self.chunks is not None:
            self.chunks.wait_layer(layer_index(layer.layer_name))  # its reused KV is in the cache
        md, _, kv_cache, slot_mapping = get_attention_context(layer.layer_name)
        src = md.slot_mapping if slot_mapping is None else slot_mapping
        slots = self._sel_slots.get(src.data_ptr())
        if slots is None:  # one gather per step (the layers of a KV cache group share their slots)
            slots = self._sel_slots[src.data_ptr()] = src[self.sel]
        heads, kv_heads, d, dv = layer.num_heads, layer.num_kv_heads, layer.head_size, layer.head_size_v
        n = self.sel.numel()
        layer.impl.do_kv_cache_update(layer, key.view(n, kv_heads, d), value.view(n, kv_heads, dv), kv_cache, slots)
        shape = (heads, kv_heads, d, query.dtype, getattr(layer, "isa", None), layer.impl.kv_cache_dtype)
        step_md = self._metadata.get(shape)
        if step_md is None:  # the same for every layer of this shape: built once per step
            if self._runs is None:
                self._runs = self._query_runs(md.query_start_loc)
            step_md = self._metadata[shape] = self.attention.metadata(layer, md, *self._runs, slots, query.dtype)
        out = torch.empty(n, heads, dv, dtype=query.dtype, device=query.device)
        layer.impl.forward(layer, query.view(n, heads, d), key.view(n, kv_heads, d), value.view(n, kv_heads, dv),
                           kv_cache, step_md, out)
        return out.view(n, heads * dv)


def device_clock(sync: bool, device: torch.device) -> float:
    """perf_counter, after the device's queued work when `sync` (timings of the blend's own work)."""
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


ACTIVE: BlendStep | None = None  # the forward pass in progress, if it blends


def active() -> BlendStep | None:
    return ACTIVE


def set_active(step: BlendStep | None) -> None:
    global ACTIVE
    ACTIVE = step
