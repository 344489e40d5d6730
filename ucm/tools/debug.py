"""Connectors and requests built by hand, outside a running vLLM: what docs/debugging.md walks through.

vLLM 0.32 constructs a connector as `UCMDirectConnector(vllm_config, role, kv_cache_config)`; these
helpers build those three arguments for a model directory the way vLLM's CPU engine would, so a lookup,
a save and a load can be stepped through in a Python shell.

    sched = debug_connector(model, "scheduler", config={...})
    worker = debug_connector(model, "worker", config={...})     # owns worker.kv_caches (CPU tensors)
    req = debug_request("test_001", token_ids)
    sched.get_num_new_matched_tokens(req, 0)                    # side-effect free, as in vLLM
    sched.update_state_after_alloc(req, debug_blocks(range(9)), 0)   # vLLM allocated: counted, journaled

`tp_size`/`rank` simulate one rank of a tensor-parallel engine (its block ids and shard), in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def debug_vllm_config(model: str, config: dict | str | None = None, block_size: int = 32, dtype: str = "bfloat16",
                      tp_size: int = 1):
    """A VllmConfig selecting UCMConnector; config: a YAML path, inline keys, or None (the default)."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig

    from ucm.integration.vllm import register

    register()  # what vLLM's plugin loader does; without it: "Unsupported connector type: UCMConnector"
    extra: dict[str, Any] = {"UCM_CONFIG_FILE": config} if isinstance(config, str) else dict(config or {})
    parallel = ParallelConfig()
    parallel.tensor_parallel_size = tp_size  # set after construction: no devices are asked for
    return VllmConfig(model_config=ModelConfig(model=model, dtype=dtype), cache_config=CacheConfig(block_size=block_size),
                      parallel_config=parallel, kv_transfer_config=KVTransferConfig(kv_connector="UCMConnector", kv_role="kv_both",
                                                          kv_connector_extra_config=extra))


def debug_kv_cache_config(vllm_config, num_blocks: int = 64):
    """One attention group with every layer, one backing allocation (vLLM's CPU arrangement)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(mc.get_num_layers(pc))]
    heads = max(1, mc.get_total_num_kv_heads() // pc.tensor_parallel_size)  # this rank's shard
    spec = FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=heads,
                             head_size=mc.get_head_size(), dtype=KV_DTYPES[str(mc.dtype).replace("torch.", "")])
    per_layer = num_blocks * spec.page_size_bytes
    tensor = KVCacheTensor(size=per_layer * len(layers), layers=layers, layer_stride=per_layer,
                           block_stride=spec.page_size_bytes)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


def debug_connector(model: str, role: str = "scheduler", config: dict | str | None = None, block_size: int = 32,
                    num_blocks: int = 64, dtype: str = "bfloat16", tp_size: int = 1, rank: int = 0):
    """A UCMDirectConnector for `role` ("scheduler" or "worker"). A worker also gets CPU KV tensors in
    vLLM's CPU layout [blocks, 2, block_size, kv_heads * head_dim], registered and kept as
    `connector.kv_caches` (layer name -> tensor). `tp_size`, `rank`: one rank of a TP engine."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from ucm.integration.vllm.ucm_connector import UCMDirectConnector

    vc = debug_vllm_config(model, config, block_size, dtype, tp_size)
    kcc = debug_kv_cache_config(vc, num_blocks)
    r = {"scheduler": KVConnectorRole.SCHEDULER, "worker": KVConnectorRole.WORKER}[role]
    conn = UCMDirectConnector(vc, r, kcc)
    if r == KVConnectorRole.WORKER:
        conn.rank = rank
        conn.worker.set_rank(rank)
        group = kcc.kv_cache_groups[0]
        spec = group.kv_cache_spec
        flat = torch.zeros(kcc.kv_cache_tensors[0].size // spec.dtype.itemsize, dtype=spec.dtype)
        shape = (num_blocks, 2, spec.block_size, spec.num_kv_heads * spec.head_size)
        per = flat.numel() // len(group.layer_names)
        conn.kv_caches = {name: flat[i * per:(i + 1) * per].view(shape) for i, name in enumerate(group.layer_names)}
        conn.register_kv_caches(conn.kv_caches)
    return conn


def debug_request(request_id: str, token_ids: list[int], cache_salt: str | None = None):
    """A vLLM Request as the scheduler would hold it (greedy, 1 output token)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id, list(token_ids), SamplingParams(max_tokens=1), None, cache_salt=cache_salt)


def debug_blocks(block_ids) -> "KVCacheBlocks":
    """vLLM's allocation result for these block ids (what `update_state_after_alloc` receives)."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(([KVCacheBlock(i) for i in block_ids],))
