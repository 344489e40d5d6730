"""vLLM 0.26.x (the GPU build ucm runs on torch 2.11): nothing to patch.

- KV cache allocation: not needed. 0.26 has no CPU build ucm supports; on a GPU the KV cache comes from
  CUDA's allocator (aligned), and SSD hits are loaded whole through the host tier, not by O_DIRECT reads
  into the KV cache.
- SchedulerOutput, KV cache manager: not needed, as on 0.32 (the connector API carries ucm's metadata
  and its prefix hits).
- Attention, decoder layers: not needed. They serve BlendConnector's selective recompute, which runs on
  vLLM's CPU attention backend only; on a GPU BlendConnector is a prefix cache.
"""

from ucm.integration.vllm.patch.apply_patch import Patch

_GPU = "vLLM 0.26 runs ucm on GPUs only"
PATCHES = (
    Patch("kv_cache_allocation", "KV cache allocation patch", None, None, None,
          f"{_GPU}: CUDA allocations are aligned, and SSD hits load through the host tier"),
    Patch("scheduler_output", "SchedulerOutput patch", None, None, None,
          "vLLM 0.26 carries connector metadata in SchedulerOutput.kv_connector_metadata"),
    Patch("kv_cache_manager", "KV cache manager patch", None, None, None,
          "prefix hits go through the connector API (get_num_new_matched_tokens, update_state_after_alloc)"),
    Patch("attention", "Attention patch", None, None, None,
          f"{_GPU}; blending needs the CPU attention backend (BlendConnector is a prefix cache here)"),
    Patch("decoder_layer", "Decoder layer patch (Llama family)", None, None, None,
          f"{_GPU}; blending needs the CPU attention backend (BlendConnector is a prefix cache here)"),
)

__all__ = ["PATCHES"]
