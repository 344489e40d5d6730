"""Patches for vLLM 0.32.x."""

from ucm.integration.vllm.patch.patch_funcs.v0_32.vllm_patch import PATCHES

__all__ = ["PATCHES"]
