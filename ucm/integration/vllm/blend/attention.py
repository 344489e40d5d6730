"""vLLM's attention kernel over a blend step's selected tokens, one adapter per attention backend.

After the check layer, a blended pass computes only the selected tokens, which are scattered through their
prompts. `BlendStep.attend` (step.py) runs the backend's own kernel with each run of consecutive selected
tokens as a sequence of its own: queries = the run, keys = the request's whole paged KV up to the run's
last position, causal (a kernel aligns a sequence's queries with its last keys). An adapter turns the
step's metadata into that: (query starts [runs + 1], sequence lengths [runs], request of each run [runs]),
all int64 on the CPU, plus the selected tokens' slots, give the metadata the backend's `forward` takes.

The backend is decided once, where the worker registers the KV cache (`for_backend`): vLLM's CPU backend
(vLLM 0.32) and FlashAttention (FA3 on Hopper, vLLM 0.26's GPU build); any other backend cannot blend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch


class SubsetAttention(Protocol):
    name: str

    def metadata(self, layer, md: Any, qsl: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, dtype: torch.dtype) -> Any:
        """The backend's attention metadata for the runs: `md` is the step's own (every token), `slots`
        the selected tokens' cache slots (the model's device), `dtype` the queries'."""


def _replace(md: Any, **fields) -> Any:
    """`md` with the given fields, skipping those this vLLM version's metadata does not have."""
    own = {f.name for f in dataclasses.fields(md)}
    return dataclasses.replace(md, **{k: v for k, v in fields.items() if k in own})


class CpuSubset:
    """vLLM's CPU backend (CPUAttentionBackendImpl): its scheduler metadata is built for the runs."""

    name = "cpu"

    def metadata(self, layer, md, qsl, seq_lens, rows, slots, dtype):
        from vllm import _custom_ops as ops
        from vllm import envs

        qsl, seq_lens = qsl.to(md.query_start_loc.dtype), seq_lens.to(md.query_start_loc.dtype)
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
            head_dim=layer.head_size, seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=layer.impl.kv_cache_dtype)
        return _replace(md, num_actual_tokens=int(qsl[-1]), max_query_len=int((qsl[1:] - qsl[:-1]).max()),
                        query_start_loc=qsl, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
                        block_table=md.block_table[rows], slot_mapping=slots, scheduler_metadata=sched, causal=True,
                        dynamic_causal=None)


class FlashSubset:
    """vLLM's FlashAttention backend (FlashAttentionImpl; FA3 on Hopper): varlen attention over the paged
    cache, every run a sequence; no cascade, no ahead-of-time scheduling (the kernel plans the runs).
    Context parallelism (DCP) is not handled: its fields keep the step's values."""

    name = "flash_attn"

    def metadata(self, layer, md, qsl, seq_lens, rows, slots, dtype):
        device = md.query_start_loc.device
        n = int(qsl[-1])
        return _replace(
            md, num_actual_tokens=n, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
            query_start_loc=qsl.to(device=device, dtype=torch.int32), max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens.to(device=device, dtype=torch.int32), block_table=md.block_table[rows.to(device)],
            slot_mapping=slots, use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
            prefix_kv_lens=None, suffix_kv_lens=None, scheduler_metadata=None, prefix_scheduler_metadata=None,
            max_num_splits=0, causal=True)


BACKENDS: dict[str, type] = {"CPUAttentionBackendImpl": CpuSubset, "FlashAttentionImpl": FlashSubset}


def for_backend(impl: object) -> SubsetAttention | None:
    """The adapter for a layer's attention implementation (`Attention.impl`), or None if blending cannot
    run on it."""
    if getattr(impl, "dcp_world_size", 1) > 1:
        return None  # context parallelism splits the KV across ranks: the runs' metadata would be wrong
    cls = BACKENDS.get(type(impl).__name__)
    return cls() if cls else None
