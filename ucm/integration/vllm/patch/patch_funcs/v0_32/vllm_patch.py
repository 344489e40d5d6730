"""vLLM 0.32 patch points, each with the reason it exists, or why this version does not need it.

- KV cache allocation (`_patch_kv_cache_allocation`): vLLM allocates the whole KV cache with one
  `torch.zeros`, 64-byte aligned on a CPU. O_DIRECT reads need 4 KiB aligned memory, so without the
  patch a layer-wise SSD load goes through a bounce buffer and a CPU copy; with it, the disk's DMA
  writes the KV cache directly. The patch over-allocates 4 KiB and hands vLLM an aligned slice.
- SchedulerOutput: not needed. vLLM 0.32's SchedulerOutput carries any
  connector's metadata in `kv_connector_metadata` (ucm's is a `UCMConnectorMetadata`).
- KV cache manager: not needed for prefix reuse. The connector API
  (`get_num_new_matched_tokens` / `update_state_after_alloc`) covers prefix hits; only non-prefix
  (blend) reuse would have to change which blocks vLLM treats as computed.
- Attention layer: not needed for UCMConnector. vLLM 0.32 already calls
  the connector's `wait_for_layer_load` and `save_kv_layer` around every attention layer
  (`maybe_transfer_kv_layer`); the blend connector's KV mixing is what would need it.
"""

from __future__ import annotations

import types

from ucm.integration.vllm.patch.apply_patch import Patch

ALIGN = 4096  # bytes


def _aligned_torch(torch):
    """A stand-in for the `torch` module whose CPU `zeros` returns a 4 KiB aligned tensor."""

    class AlignedTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*size, dtype=None, device=None, **kw):
            if torch.device(device or "cpu").type != "cpu" or kw or len(size) != 1 or not isinstance(size[0], int):
                return torch.zeros(*size, dtype=dtype, device=device, **kw)
            n = size[0]
            itemsize = torch.empty(0, dtype=dtype).element_size()
            raw = torch.zeros(n + ALIGN // itemsize, dtype=dtype, device=device)
            skew = ((-raw.data_ptr()) % ALIGN) // itemsize
            return raw[skew:skew + n]

    return AlignedTorch("torch")


def _patch_kv_cache_allocation(gpu_model_runner) -> None:
    """gpu_model_runner.allocate_kv_cache (also used by the CPU model runner): same function, run with
    a `torch` whose CPU zeros are 4 KiB aligned. vLLM builds its views from the buffer's own storage
    offset, so an aligned slice is transparent to it."""
    import torch

    original = gpu_model_runner.allocate_kv_cache
    patched = types.FunctionType(original.__code__, {**original.__globals__, "torch": _aligned_torch(torch)},
                                 original.__name__, original.__defaults__, original.__closure__)
    patched.__kwdefaults__ = original.__kwdefaults__
    patched.__doc__ = original.__doc__
    patched.__wrapped__ = original
    gpu_model_runner.allocate_kv_cache = patched


PATCHES = (
    Patch("kv_cache_allocation", "KV cache allocation patch", "vllm.v1.worker.gpu_model_runner",
          "allocate_kv_cache", _patch_kv_cache_allocation,
          "CPU KV cache 4 KiB aligned, so layer-wise SSD reads land in it by DMA (no bounce buffer)",
          "layer-wise SSD reads go through a bounce buffer and I/O threads (slower time to first token)"),
    Patch("scheduler_output", "SchedulerOutput patch", None, None, None,
          "vLLM 0.32 carries connector metadata in SchedulerOutput.kv_connector_metadata"),
    Patch("kv_cache_manager", "KV cache manager patch", None, None, None,
          "prefix hits go through the connector API (get_num_new_matched_tokens, update_state_after_alloc)"),
    Patch("attention", "Attention patch", None, None, None,
          "vLLM 0.32 calls wait_for_layer_load/save_kv_layer around each attention layer (maybe_transfer_kv_layer)"),
)
