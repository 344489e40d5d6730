"""Patches for vLLM 0.33.x: the 0.32 patch set. Checked against 0.33.0's source (its wheel): the patch
targets are unchanged (`allocate_kv_cache` imported into vllm.v1.worker.gpu_model_runner, `Attention.forward`
and `LlamaDecoderLayer.forward` with 0.32's signatures). 0.33 needs torch 2.14, so no machine here runs it."""

from ucm.integration.vllm.patch.patch_funcs.v0_32.vllm_patch import PATCHES

__all__ = ["PATCHES"]
