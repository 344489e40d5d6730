"""pack/unpack: bit-exact against the per-block reference for every layout and dtype.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest); on a GPU the same tests run
the compiled kernel (device tool: `python -m pytest tests/test_kernels.py`).
"""

import pytest
import torch

from ucm.kernels import KVLayout, UnsupportedLayout, pack, unpack

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
NB = 12  # blocks in the cache


def rand_like_bytes(shape, dtype, device=DEV):
    t = torch.empty(shape, dtype=dtype, device=device)
    t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, device=device))
    return t


def make_layout(kind, dtype, layers=3, bs=16, h=2, d=8):
    """(tensors registered with vLLM, block_dim) for each supported layout."""
    if kind == "gpu":  # [2, num_blocks, block_size, kv_heads, head_dim] per layer
        return [rand_like_bytes((2, NB, bs, h, d), dtype) for _ in range(layers)]
    if kind == "gpu_hnd":  # same logical shape, heads-major storage
        return [rand_like_bytes((2, NB, h, bs, d), dtype).permute(0, 1, 3, 2, 4) for _ in range(layers)]
    if kind == "flashinfer":  # [num_blocks, 2, block_size, kv_heads, head_dim]
        return [rand_like_bytes((NB, 2, bs, h, d), dtype) for _ in range(layers)]
    if kind == "cpu":  # vLLM CPU: [num_blocks, kv_heads, block_size, 2*head_dim], layers in one allocation
        big = rand_like_bytes((layers, NB, h, bs, 2 * d), dtype)
        return [big[i] for i in range(layers)]
    if kind == "mla":  # [num_blocks, block_size, head_dim]
        return [rand_like_bytes((NB, bs, d * 9), dtype) for _ in range(layers)]
    if kind == "cross_layer":  # one allocation, block-major across all layers
        return [rand_like_bytes((NB, layers, 2, bs, h, d), dtype)]
    if kind == "odd":  # head_dim 3: 6-byte rows in fp16 force a narrow copy word
        return [rand_like_bytes((2, NB, 5, 1, 3), dtype) for _ in range(layers)]
    raise ValueError(kind)


LAYOUTS = ["gpu", "gpu_hnd", "flashinfer", "cpu", "mla", "cross_layer", "odd"]
ID_SETS = {"random": [7, 2, 11, 5], "first": [0], "last": [NB - 1], "unsorted_all": list(range(NB))[::-1]}
BACKENDS = ["triton", "torch"] if DEV == "cpu" else ["triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_pack_matches_reference_and_unpack_round_trips(kind, dtype, backend):
    kv = make_layout(kind, dtype)
    lay = KVLayout.from_tensors(kv, NB)
    for name, ids in ID_SETS.items():
        idx = torch.tensor(ids, device=DEV)
        n = len(ids)
        ref = torch.full((n, lay.page_size), 0xA5, dtype=torch.uint8, device=DEV)
        pack(lay, idx, ref, backend="reference")
        got = torch.full((n, lay.page_size), 0x5A, dtype=torch.uint8, device=DEV)  # poisoned differently
        pack(lay, idx, got, backend=backend)
        assert torch.equal(got, ref), f"{kind}/{name}: pack differs from the reference"
        # round trip into other block slots of a poisoned cache with the same layout
        kv2 = [torch.full_like(t.contiguous(), 0).view(torch.uint8).fill_(0xEE).view(t.dtype) for t in kv]
        if kind == "gpu_hnd":
            kv2 = [t.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4) for t in kv2]
        if kind == "cpu":
            big = torch.empty((len(kv),) + tuple(kv[0].shape), dtype=dtype, device=DEV)
            big.view(torch.uint8).fill_(0xEE)
            kv2 = [big[i] for i in range(len(kv))]
        lay2 = KVLayout.from_tensors(kv2, NB)
        targets = torch.tensor([(b * 5 + 3) % NB for b in ids], device=DEV)
        if len(set(targets.tolist())) != n:
            targets = torch.tensor(ids[::-1], device=DEV)
        unpack(lay2, targets, got, backend=backend)
        back = torch.full_like(ref, 0x11)
        pack(lay2, targets, back, backend="reference")
        assert torch.equal(back, ref), f"{kind}/{name}: unpack did not restore the blocks"
        untouched = [b for b in range(NB) if b not in set(targets.tolist())]
        if untouched:
            rest = torch.empty((len(untouched), lay2.page_size), dtype=torch.uint8, device=DEV)
            pack(lay2, torch.tensor(untouched, device=DEV), rest, backend="reference")
            assert bool((rest == 0xEE).all()), f"{kind}/{name}: unpack wrote outside its blocks"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_with_stride_and_slot_index(backend):
    """Pack straight into slots of a larger page buffer (the host tier's layout: 4 KiB-aligned slots)."""
    kv = make_layout("gpu", torch.bfloat16)
    lay = KVLayout.from_tensors(kv, NB)
    slot = (lay.page_size + 4095) // 4096 * 4096
    slots = torch.full((9, slot), 0x77, dtype=torch.uint8, device=DEV)
    ids, where = torch.tensor([3, 9, 1], device=DEV), torch.tensor([8, 0, 4], device=DEV)
    pack(lay, ids, slots, where, backend=backend)
    ref = torch.empty((3, lay.page_size), dtype=torch.uint8, device=DEV)
    pack(lay, ids, ref, backend="reference")
    assert torch.equal(slots[where][:, :lay.page_size], ref)
    assert bool((slots[[1, 2, 3, 5, 6, 7]] == 0x77).all()) and bool((slots[where][:, lay.page_size:] == 0x77).all())
    kv2 = [torch.zeros_like(t) for t in kv]
    lay2 = KVLayout.from_tensors(kv2, NB)
    unpack(lay2, ids, slots, where, backend=backend)
    for a, b in zip(kv, kv2):
        assert torch.equal(a[:, ids].contiguous().view(torch.uint8), b[:, ids].contiguous().view(torch.uint8))


@pytest.mark.parametrize("num_programs", [1, 3, 8])
def test_persistent_grid_covers_every_tile(num_programs):
    kv = make_layout("gpu", torch.float16, layers=4)
    lay = KVLayout.from_tensors(kv, NB)
    ids = torch.randperm(NB, device=DEV)[:7]
    ref = torch.empty((7, lay.page_size), dtype=torch.uint8, device=DEV)
    pack(lay, ids, ref, backend="reference")
    got = torch.full_like(ref, 0x3C)
    pack(lay, ids, got, backend="triton", num_programs=num_programs, block_words=16)
    assert torch.equal(got, ref)


def test_layout_descriptor_segments():
    gpu = KVLayout.from_tensors(make_layout("gpu", torch.bfloat16, layers=2), NB)
    assert len(gpu.segments) == 4 and gpu.word_bytes == 16  # K and V of each layer
    cpu = KVLayout.from_tensors(make_layout("cpu", torch.bfloat16, layers=2), NB)
    assert len(cpu.segments) == 2 and cpu.page_size == 2 * 2 * 16 * 16 * 2
    cross = KVLayout.from_tensors(make_layout("cross_layer", torch.bfloat16), NB)
    assert len(cross.segments) == 1, "a block-major allocation is one segment for all layers"
    assert KVLayout.from_tensors(make_layout("odd", torch.float16), NB).word_bytes == 2


def test_unsupported_layouts_name_shape_and_strides():
    with pytest.raises(UnsupportedLayout, match=r"shape \(2, 12, 16, 2, 8\).*cannot tell"):
        KVLayout.from_tensors([torch.zeros(2, NB, 16, 2, 8)], 2)  # 2 == num_blocks is ambiguous... and absent
    inter = torch.zeros(100).as_strided((NB, 8), (4, 1))  # consecutive blocks overlap by half
    with pytest.raises(UnsupportedLayout, match="interleave"):
        KVLayout.from_tensors([inter], NB)
    with pytest.raises(UnsupportedLayout, match="12 blocks"):
        KVLayout.from_tensors([torch.zeros(3, 5)], NB)
