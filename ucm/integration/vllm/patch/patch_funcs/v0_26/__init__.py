"""vLLM 0.26.x (the GPU build ucm runs on torch 2.11). Checked against 0.26.0's source (its wheel): the
blend patch targets are those of 0.32 (`Attention.forward` in vllm.model_executor.layers.attention.attention
and `LlamaDecoderLayer.forward`, same signatures), so 0.32's patch functions serve.

- KV cache allocation: not needed. 0.26 has no CPU build ucm supports; on a GPU the KV cache comes from
  CUDA's allocator (aligned), and SSD hits are loaded whole through the host tier, not by O_DIRECT reads
  into the KV cache.
- SchedulerOutput, KV cache manager: not needed, as on 0.32 (the connector API carries ucm's metadata
  and its prefix hits).
- Attention, decoder layers: BlendConnector's selective recompute on FlashAttention (FA3 on Hopper), in
  eager mode (a compiled model would run its traced layers, not the patched ones; blend/__init__.py).
"""

from ucm.integration.vllm.patch.apply_patch import Patch
from ucm.integration.vllm.patch.patch_funcs.v0_32.vllm_patch import _patch_attention, _patch_llama_decoder_layer

_NO_BLEND = "BlendConnector cannot blend (it falls back to prefix caching); UCMConnector is unaffected"
PATCHES = (
    Patch("kv_cache_allocation", "KV cache allocation patch", None, None, None,
          "vLLM 0.26 runs ucm on GPUs only: CUDA allocations are aligned, and SSD hits load through the host tier"),
    Patch("scheduler_output", "SchedulerOutput patch", None, None, None,
          "vLLM 0.26 carries connector metadata in SchedulerOutput.kv_connector_metadata"),
    Patch("kv_cache_manager", "KV cache manager patch", None, None, None,
          "prefix hits go through the connector API (get_num_new_matched_tokens, update_state_after_alloc)"),
    Patch("attention", "Attention patch", "vllm.model_executor.layers.attention.attention", "Attention",
          _patch_attention, "BlendConnector's selective recompute on FlashAttention: check layer, attention for "
          "the selected tokens", _NO_BLEND),
    Patch("decoder_layer", "Decoder layer patch (Llama family)", "vllm.model_executor.models.llama",
          "LlamaDecoderLayer", _patch_llama_decoder_layer,
          "BlendConnector: layers after the check layer run on the recomputed tokens only", _NO_BLEND),
)

__all__ = ["PATCHES"]
