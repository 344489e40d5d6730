"""RoPE re-rotation: move cached keys to new positions (CacheBlend reuse of a document elsewhere).

RoPE rotates each pair of a key's rotary dimensions by `position x inv_freq[i]`. Rotations compose,
R(a) R(b) = R(a + b), so a key computed at position p becomes the key at p + delta by one more rotation
by delta; values carry no position and are left alone.

    rerotate(keys, deltas, rope, *, backend)  in place; keys [tokens, heads, head_dim] (any strides
                                              with a unit last stride); deltas: one int for every token
                                              (a chunk moves as a whole) or an int tensor [tokens]

`RopeSpec` says how the model rotates: `head_dim`, `rotary_dim` (partial rotary: the first rotary_dim
dims), `base`, `style` ("neox": pairs (i, i + rotary_dim/2), Llama/Qwen/Mistral; "interleaved": pairs
(2i, 2i+1), GPT-J) and the scaling of inv_freq. `RopeSpec.from_hf_config` refuses what a pure rotation
by a delta cannot express (yarn's magnitude scaling, dynamic NTK, longrope, multimodal rope).

Angles are computed in float64 on the host, once per distinct delta (a chunk shifts all its tokens by
the same delta), and passed as float32 cos/sin tables; the rotation itself is float32 math rounded to
the keys' dtype. Two implementations compute the same bits:
* `triton`: one program per 16 (token, head) rows; CUDA, and CPU tensors under TRITON_INTERPRET=1 (tests);
* `torch`: the reference, and the CPU path.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

STYLES = ("neox", "interleaved")
ROWS = 16  # (token, head) rows per Triton program


class RopeUnsupported(ValueError):
    """The model's RoPE cannot be re-rotated by a position delta; blending falls back to prefix caching."""


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    rotary_dim: int
    base: float
    style: str = "neox"
    scaling: tuple = ()  # ("linear", factor) | ("llama3", factor, low, high, original_max) | ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise RopeUnsupported(f"rope style {self.style!r}: supported {', '.join(STYLES)}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise RopeUnsupported(f"rotary_dim {self.rotary_dim} must be even and within head_dim {self.head_dim}")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any) -> "RopeSpec":
        """From a Hugging Face model config (dict or object). Raises RopeUnsupported naming the field."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or (get("hidden_size") // heads if heads else None)
        if not head_dim:
            raise RopeUnsupported("config has neither head_dim nor hidden_size/num_attention_heads")
        rotary_dim = int(head_dim * (get("partial_rotary_factor", 1.0) or 1.0))
        scaling = get("rope_parameters") or get("rope_scaling") or {}  # transformers >= 5: rope_parameters
        if not isinstance(scaling, Mapping):
            scaling = dict(scaling)
        base = float(get("rope_theta") or scaling.get("rope_theta") or 10000.0)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in ("default", None):
            sc: tuple = ()
        elif kind == "linear":
            sc = ("linear", float(scaling["factor"]))
        elif kind == "llama3":
            sc = ("llama3", float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
                  float(scaling.get("high_freq_factor", 4.0)), float(scaling["original_max_position_embeddings"]))
        else:
            raise RopeUnsupported(f"rope_scaling type {kind!r} is not a pure rotation by position (supported: none, "
                                  "linear, llama3); cached keys cannot be moved to new positions")
        style = "interleaved" if get("rope_interleaved", False) or get("model_type") in ("gptj",) else "neox"
        return cls(int(head_dim), rotary_dim, base, style, sc)

    def inv_freq(self) -> torch.Tensor:
        """float64 [rotary_dim / 2]: the angle per position of each rotary pair."""
        inv = 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim))
        if not self.scaling:
            return inv
        if self.scaling[0] == "linear":
            return inv / self.scaling[1]
        _, factor, low, high, original = self.scaling  # llama3: long wavelengths slowed, short ones kept
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen > low_wl, inv / factor, torch.where(wavelen < high_wl, inv, mid))

    def tables(self, deltas: int | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin) float32 [distinct deltas, rotary_dim / 2] on `device`, and each token's row in them
        (None for one delta shared by every token: row 0)."""
        if isinstance(deltas, int):
            cos, sin = _shared_table(self, deltas, str(device))
            return cos, sin, None
        uniq, row = torch.unique(deltas.to(torch.int64), return_inverse=True)  # on the deltas' device
        angles = uniq.cpu().to(torch.float64)[:, None] * self.inv_freq()[None, :]
        both = torch.stack([torch.cos(angles), torch.sin(angles)]).float().to(device)  # one transfer
        return both[0], both[1], row


@functools.lru_cache(maxsize=1024)
def _shared_table(spec: RopeSpec, delta: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, rotary_dim / 2] of one delta on a device (a chunk's delta recurs across its layers)."""
    angles = delta * spec.inv_freq()[None, :]
    both = torch.stack([torch.cos(angles), torch.sin(angles)]).float().to(device)
    return both[0], both[1]


def rerotate_torch(keys: torch.Tensor, deltas: int | torch.Tensor, spec: RopeSpec) -> None:
    """Reference: keys[t] <- R(deltas[t]) keys[t] in place (float32 math, rounded to keys.dtype)."""
    _check(keys, deltas, spec)
    cos, sin, row = spec.tables(deltas, keys.device)
    if row is not None:
        cos, sin = cos[row.to(keys.device)], sin[row.to(keys.device)]
    cos, sin = cos[:, None, :], sin[:, None, :]
    half, rot = spec.rotary_dim // 2, spec.rotary_dim
    a, b = (slice(0, half), slice(half, rot)) if spec.style == "neox" else (slice(0, rot, 2), slice(1, rot, 2))
    x1, x2 = keys[..., a].float(), keys[..., b].float()  # views of the pairs, no gather
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    keys[..., a] = r1.to(keys.dtype)
    keys[..., b] = r2.to(keys.dtype)


def _check(keys: torch.Tensor, deltas: int | torch.Tensor, spec: RopeSpec) -> None:
    if keys.dim() != 3 or keys.shape[-1] != spec.head_dim:
        raise ValueError(f"keys must be [tokens, heads, {spec.head_dim}], got {tuple(keys.shape)}")
    if keys.stride(-1) != 1:
        raise ValueError(f"keys need a unit stride in head_dim, got strides {keys.stride()}")
    if not isinstance(deltas, int) and deltas.shape != (keys.shape[0],):
        raise ValueError(f"deltas must be [{keys.shape[0]}], got {tuple(deltas.shape)}")


if triton is not None:

    @triton.jit
    def _rerotate_kernel(k_ptr, stride_t, stride_h, row_ptr, cos_ptr, sin_ptr, n_heads, n_rows,
                         HALF: tl.constexpr, HALF_P2: tl.constexpr, ROWS: tl.constexpr, PER_TOKEN: tl.constexpr,
                         NEOX: tl.constexpr, BF16: tl.constexpr):
        """Program p: rows [p*ROWS, +ROWS) of (token, head), each rotated by its token's angles."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        i = tl.arange(0, HALF_P2)
        live = (r < n_rows)[:, None] & (i < HALF)[None, :]
        t = r // n_heads
        h = r % n_heads
        if PER_TOKEN:
            row = tl.load(row_ptr + t, mask=r < n_rows, other=0)
            c = tl.load(cos_ptr + row[:, None] * HALF + i[None, :], mask=live, other=0.0)
            s = tl.load(sin_ptr + row[:, None] * HALF + i[None, :], mask=live, other=0.0)
        else:  # one delta for all: one row of angles, broadcast
            c = tl.load(cos_ptr + i, mask=i < HALF, other=0.0)[None, :]
            s = tl.load(sin_ptr + i, mask=i < HALF, other=0.0)[None, :]
        base = k_ptr + (t.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h)[:, None]
        if NEOX:
            pa = base + i[None, :]
            pb = base + (i + HALF)[None, :]
        else:
            pa = base + (2 * i)[None, :]
            pb = base + (2 * i + 1)[None, :]
        x1 = tl.load(pa, mask=live, other=0.0)
        x2 = tl.load(pb, mask=live, other=0.0)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        # the reference's roundings: products, then the sum (launched with enable_fp_fusion=False)
        r1 = (f1 * c) - (f2 * s)
        r2 = (f2 * c) + (f1 * s)
        if BF16:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates
            tl.store(pa, _to_bf16_rne(r1), mask=live)
            tl.store(pb, _to_bf16_rne(r2), mask=live)
        else:
            tl.store(pa, r1.to(x1.dtype), mask=live)
            tl.store(pb, r2.to(x2.dtype), mask=live)

    @triton.jit
    def _to_bf16_rne(x):
        """float32 -> bfloat16, round to nearest even (finite inputs), identical on GPU and interpreter."""
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


def rerotate_triton(keys: torch.Tensor, deltas: int | torch.Tensor, spec: RopeSpec) -> None:
    """keys[t] <- R(deltas[t]) keys[t] in place, ROWS (token, head) rows per program."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(keys, deltas, spec)
    if keys.numel() == 0:
        return
    cos, sin, row = spec.tables(deltas, keys.device)
    half = spec.rotary_dim // 2
    n_rows = keys.shape[0] * keys.shape[1]
    rows = cos if row is None else row.to(torch.int32)  # a placeholder pointer when every token shares row 0
    _rerotate_kernel[(triton.cdiv(n_rows, ROWS),)](
        keys, keys.stride(0), keys.stride(1), rows, cos, sin, keys.shape[1], n_rows,
        HALF=half, HALF_P2=triton.next_power_of_2(half), ROWS=ROWS, PER_TOKEN=row is not None,
        NEOX=spec.style == "neox", BF16=keys.dtype == torch.bfloat16, enable_fp_fusion=False)


def rerotate(keys: torch.Tensor, deltas: int | torch.Tensor, spec: RopeSpec, backend: str = "auto") -> None:
    """In place; backend "auto": Triton on CUDA (and in the interpreter), torch on CPU."""
    if backend == "auto":
        backend = "triton" if keys.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    (rerotate_triton if backend == "triton" else rerotate_torch)(keys, deltas, spec)
