"""RoPE re-rotation (ucm/kernels/rope.py): the Triton kernel against the torch reference (bit for bit;
on CPU through TRITON_INTERPRET=1, on a GPU through the device tool), against Hugging Face's RoPE, and
composition."""

import pytest
import torch

from ucm.kernels.rope import RopeSpec, RopeUnsupported, rerotate_torch, rerotate_triton

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def keys(tokens=37, heads=3, head_dim=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, heads, head_dim, generator=g).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_triton_matches_the_reference_bit_for_bit(dtype, style, rotary_dim):
    spec = RopeSpec(64, rotary_dim, 10000.0, style)
    k = keys(dtype=dtype)
    deltas = torch.tensor([0, 1, -1, 5, 4095, -3000, 131071] * 5 + [77, 77], device=DEV)
    ref, got = k.clone(), k.clone()
    rerotate_torch(ref, deltas, spec)
    rerotate_triton(got, deltas, spec)
    assert torch.equal(ref.cpu(), got.cpu()), (ref.float() - got.float()).abs().max()
    assert not torch.equal(ref, k), "nothing was rotated"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_delta_for_every_token_equals_the_per_token_form(dtype):
    spec = RopeSpec(64, 64, 10000.0)
    k = keys(dtype=dtype)
    per_token, shared, ref = k.clone(), k.clone(), k.clone()
    rerotate_triton(per_token, torch.full((k.shape[0],), -2500, device=DEV), spec)
    rerotate_triton(shared, -2500, spec)
    rerotate_torch(ref, -2500, spec)
    assert torch.equal(per_token.cpu(), shared.cpu()) and torch.equal(shared.cpu(), ref.cpu())


def test_strided_keys_inside_a_kv_block():
    """Keys as vLLM's CPU cache holds them: K and V of a block interleaved in one tensor."""
    spec = RopeSpec(64, 64, 10000.0)
    block = keys(tokens=32, heads=2 * 3).view(32, 2, 3, 64)  # [tokens, K/V, heads, dim]
    k_view = block[:, 0]
    assert not k_view.is_contiguous()
    deltas = 300
    ref = block.clone()
    rerotate_torch(ref[:, 0], deltas, spec)
    rerotate_triton(k_view, deltas, spec)
    assert torch.equal(block.cpu(), ref.cpu())
    assert torch.equal(block[:, 1].cpu(), ref[:, 1].cpu()), "values must not move"


def _hf_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Hugging Face's rotate_half RoPE (neox style), float64, for an independent check."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inv = 1.0 / (spec.base ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
    freqs = positions.double()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    q = x.double().transpose(0, 1)[None]  # [1, heads, tokens, dim]
    out, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    return out[0].transpose(0, 1)


def test_rerotated_keys_equal_keys_computed_at_the_new_positions():
    spec = RopeSpec(64, 64, 100000.0)
    raw = keys(tokens=50, dtype=torch.float32).cpu()
    pos = torch.arange(50)
    at_p = _hf_rope(raw, pos, spec).float()
    delta = 1234
    moved = at_p.clone()
    rerotate_torch(moved, torch.full((50,), delta), spec)
    fresh = _hf_rope(raw, pos + delta, spec).float()
    assert torch.allclose(moved, fresh, atol=2e-5, rtol=1e-5), (moved - fresh).abs().max()


@pytest.mark.parametrize("style", ["neox", "interleaved"])
def test_rotating_by_a_then_b_equals_a_plus_b_within_bf16(style):
    spec = RopeSpec(64, 64, 500000.0, style)
    k = keys(tokens=64, dtype=torch.bfloat16)
    a, b = torch.randint(-4000, 4000, (64,)), torch.randint(-4000, 4000, (64,))
    twice, once = k.clone(), k.clone()
    rerotate_triton(twice, a.to(DEV), spec)
    rerotate_triton(twice, b.to(DEV), spec)
    rerotate_triton(once, (a + b).to(DEV), spec)
    # a rotation mixes the two values of a pair, so its rounding error scales with the pair's length:
    # two bf16 roundings against one stay within a few units of bf16 roundoff (2^-8) of that length
    half = torch.arange(32)
    ia, ib = (half, half + 32) if style == "neox" else (2 * half, 2 * half + 1)
    length = torch.sqrt(once.float()[..., ia] ** 2 + once.float()[..., ib] ** 2)
    for ix in (ia, ib):
        err = (twice.float()[..., ix] - once.float()[..., ix]).abs()
        assert (err <= 4 * 2 ** -8 * length).all(), (err / length).max()


def test_config_parsing_and_refusals():
    smol = {"hidden_size": 576, "num_attention_heads": 9, "rope_theta": 100000.0, "model_type": "llama"}
    s = RopeSpec.from_hf_config(smol)
    assert (s.head_dim, s.rotary_dim, s.base, s.style, s.scaling) == (64, 64, 100000.0, "neox", ())
    linear = RopeSpec.from_hf_config({**smol, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert torch.allclose(linear.inv_freq(), s.inv_freq() / 4)
    partial = RopeSpec.from_hf_config({**smol, "partial_rotary_factor": 0.5})
    assert partial.rotary_dim == 32
    for kind in ("yarn", "dynamic", "longrope", "mrope"):
        with pytest.raises(RopeUnsupported, match=kind):
            RopeSpec.from_hf_config({**smol, "rope_scaling": {"rope_type": kind, "factor": 2.0}})


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=rs)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = RopeSpec.from_hf_config(cfg).inv_freq()
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-6)
