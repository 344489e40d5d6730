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
- Attention layer (`_patch_attention`): for BlendConnector's selective recompute. UCMConnector needs
  nothing here (vLLM 0.32 calls `wait_for_layer_load` / `save_kv_layer` around every attention layer).
  While a blend step is active (`blend.step.ACTIVE`), the layers before the check layer let the reused
  KV's writes be enqueued once each has been launched, the check layer picks the tokens to recompute,
  and later layers write the selected tokens' KV and attend over the whole context themselves (vLLM's
  kernels assume the queries are a request's last tokens; blended queries are scattered). Otherwise
  the original forward runs.
- Decoder layers (`_patch_llama_decoder_layer`): after the check layer a blended forward pass runs
  each decoder layer (projections, MLP) on the selected tokens only; the others keep the reused KV. The
  selected rows are gathered once, after the check layer, and put back into the batch after the last.
  Llama's layer class serves the Llama family (Llama, SmolLM2, Mistral-style models built on it).
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


def _replace_forward(cls, make) -> None:
    """cls.forward = make(original forward), once (a second application finds the marker)."""
    original = cls.forward
    if getattr(original, "__ucm_blend__", False):
        return
    forward = make(original)
    forward.__ucm_blend__ = True
    forward.__wrapped__ = original
    cls.forward = forward


def _patch_attention(attention_module) -> None:
    """Attention.forward: blend-aware while a blend step is active, else the original."""
    _replace_forward(attention_module.Attention, _blend_attention_forward)


def _blend_attention_forward(original):
    from ucm.integration.vllm.blend import step as blend_step

    def forward(self, query, key, value, output_shape=None, output_dtype=None):
        step = blend_step.ACTIVE
        if step is None or key is None:
            return original(self, query, key, value, output_shape, output_dtype)
        idx = blend_step.layer_index(self.layer_name)
        subset = step.sel is not None and idx > step.check_layer
        if subset:
            out = step.attend(self, query, key, value)
        else:
            out = original(self, query, key, value, output_shape, output_dtype)
            if idx < step.check_layer:
                step.advance(idx)
            elif idx == step.check_layer and step.sel is None:
                step.select(key.view(-1, self.num_kv_heads, self.head_size))
        step.capture(idx, key.view(-1, self.num_kv_heads, self.head_size),
                     value.view(-1, self.num_kv_heads, self.head_size_v), subset)
        return out

    return forward


def _patch_llama_decoder_layer(llama_module) -> None:
    """LlamaDecoderLayer.forward: after the check layer of a blend step, run on the selected rows, which
    pass from layer to layer as they are and return into the batch's rows after the last layer."""
    _replace_forward(llama_module.LlamaDecoderLayer, _blend_decoder_forward)


def _blend_decoder_forward(original):
    from ucm.integration.vllm.blend import step as blend_step

    def forward(self, positions, hidden_states, residual, **kwargs):
        step = blend_step.ACTIVE
        if step is None or step.sel is None or residual is None:
            return original(self, positions, hidden_states, residual, **kwargs)
        sel = step.sel
        if not sel.numel():  # a chunked-prefill step whose tokens are all reused: nothing to compute
            return hidden_states, residual
        if step.full_rows is None:  # the first layer after the check layer: the selected rows taken once
            step.sel_positions = positions[sel]
            step.full_rows = (hidden_states, residual)
            hidden_states, residual = hidden_states[sel], residual[sel]
        h, r = original(self, step.sel_positions, hidden_states, residual, **kwargs)
        if step.last_layer is not None and blend_step.layer_index(self.self_attn.attn.layer_name) < step.last_layer:
            return h, r  # the selected rows alone go on to the next layer
        full_h, full_r = step.full_rows  # the last layer: back into the batch's rows (the others keep the
        step.full_rows = None            # check layer's output, which nothing after the model reads)
        return full_h.index_copy(0, sel, h), full_r.index_copy(0, sel, r)

    return forward


PATCHES = (
    Patch("kv_cache_allocation", "KV cache allocation patch", "vllm.v1.worker.gpu_model_runner",
          "allocate_kv_cache", _patch_kv_cache_allocation,
          "CPU KV cache 4 KiB aligned, so layer-wise SSD reads land in it by DMA (no bounce buffer)",
          "layer-wise SSD reads go through a bounce buffer and I/O threads (slower time to first token)"),
    Patch("scheduler_output", "SchedulerOutput patch", None, None, None,
          "vLLM 0.32 carries connector metadata in SchedulerOutput.kv_connector_metadata"),
    Patch("kv_cache_manager", "KV cache manager patch", None, None, None,
          "prefix hits go through the connector API (get_num_new_matched_tokens, update_state_after_alloc)"),
    Patch("attention", "Attention patch", "vllm.model_executor.layers.attention.attention", "Attention",
          _patch_attention, "BlendConnector's selective recompute: check layer, attention for the selected tokens",
          "BlendConnector cannot blend (it falls back to prefix caching); UCMConnector is unaffected"),
    Patch("decoder_layer", "Decoder layer patch (Llama family)", "vllm.model_executor.models.llama",
          "LlamaDecoderLayer", _patch_llama_decoder_layer,
          "BlendConnector: layers after the check layer run on the recomputed tokens only",
          "BlendConnector cannot blend (it falls back to prefix caching); UCMConnector is unaffected"),
)
