"""Paged KV -> host tier pages -> SSD -> fresh host tier -> paged KV, through the store's prepare/complete
primitives and the transfer layer."""

import pytest
import torch

from storekit import config
from test_kernels import DEV, make_layout
from ucm.hashing import HashSeed, RequestHasher
from ucm.kernels import KVLayout
from ucm.kernels.transfer import HostTransfer
from ucm.tiers import TieredStore

NB = 12


@pytest.fixture
def shm_dir():
    """Host tiers on tmpfs, the only memory CUDA can pin."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="ucm-test-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("host_on", ["tmpfs", "disk"])
@pytest.mark.parametrize("mode", ["staged", "direct"])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_kv_blocks_survive_the_tiers(tmp_path, shm_dir, kind, mode, host_on):
    kv = make_layout(kind, torch.bfloat16)
    lay = KVLayout.from_tensors(kv, NB)
    xfer = HostTransfer(lay, mode)
    ids = RequestHasher(HashSeed("m", "bf16", kind, 16)).generate_block_hashes(list(range(16 * 5)))
    blocks = [9, 2, 4, 11, 0]
    host_root = shm_dir if host_on == "tmpfs" else str(tmp_path)
    cfg = config(tmp_path, host="1MiB")
    cfg = cfg.replace(host=cfg.host.__class__(capacity=cfg.host.capacity, path=f"{host_root}/h1"))
    with TieredStore(cfg, lay.page_size) as s:
        if host_on == "tmpfs" and DEV == "cuda":
            assert xfer.register_host(s.host.slots.tensor), "host tier on tmpfs must be pinnable"
            s.host.on_close(xfer.unregister_host)
        t = s.prepare_dump(ids)
        xfer.save(t, blocks)
        assert s.wait(t) == 0
        s.commit(ids)
        s.flush()
    kv2 = [torch.zeros_like(x) for x in kv]
    if kind == "cpu":
        big = torch.zeros((len(kv),) + tuple(kv[0].shape), dtype=kv[0].dtype, device=DEV)
        kv2 = [big[i] for i in range(len(kv))]
    lay2 = KVLayout.from_tensors(kv2, NB)
    xfer2 = HostTransfer(lay2, mode)
    targets = [1, 3, 5, 7, 8]
    with TieredStore(cfg.replace(host=cfg.host.__class__(capacity=cfg.host.capacity, path=f"{host_root}/h2")),
                     lay.page_size) as s:
        assert s.where(ids) == ["ssd"] * 5
        t = s.prepare_load(ids)
        xfer2.restore(t, targets)
        assert s.wait(t) == 0
    bdim = 1 if kind == "gpu" else 0
    for a, b in zip(kv, kv2):
        src = a.index_select(bdim, torch.tensor(blocks, device=DEV)).contiguous().view(torch.uint8)
        dst = b.index_select(bdim, torch.tensor(targets, device=DEV)).contiguous().view(torch.uint8)
        assert torch.equal(src, dst)


@pytest.mark.parametrize("slots", ["runs", "scattered"])
@pytest.mark.parametrize("mode", ["staged", "direct"])
@pytest.mark.parametrize("kind", ["gpu", "gpu_hnd", "flashinfer", "mla"])
def test_layer_groups_land_the_same_bytes_as_whole_copies(kind, mode, slots, monkeypatch):
    """from_host_groups (the GPU's layer-by-layer loads) == from_host, span by span; through the ring
    (forced on a CPU, a ring of 3 pages: spans split in chunks) and straight from the pages."""
    import ucm.kernels.transfer as tr

    if slots == "scattered":
        monkeypatch.setattr(tr, "RUN_LIMIT", 1)  # pinned pages too scattered for DMAs: the kernel reads them
    kv = make_layout(kind, torch.bfloat16, layers=4)
    lay = KVLayout.from_tensors(kv, NB)
    stride = lay.page_size + 256
    host = torch.randint(0, 256, (20, stride), dtype=torch.uint8)
    host = host.pin_memory() if DEV == "cuda" else host
    page_slots = [3, 4, 5, 6, 7, 8, 9] if slots == "runs" else [17, 2, 9, 4, 0, 11, 6]
    blocks = [11, 0, 5, 3, 7, 2, 9]
    for x in kv:
        x.zero_()
    whole = HostTransfer(lay, mode, ring_bytes=3 * lay.page_size, staging=True)
    whole.from_host(blocks, host[:, :lay.page_size], page_slots)
    whole.synchronize()
    expect = [x.clone() for x in kv]
    for x in kv:
        x.zero_()
    groups = HostTransfer(lay, mode, ring_bytes=3 * lay.page_size, staging=True)
    per_layer = {}
    for s in lay.segments:
        off, n = per_layer.get(s.tensor_index, (s.page_offset, 0))
        per_layer[s.tensor_index] = (off, n + s.length)
    spans = [per_layer[0], (per_layer[1][0], per_layer[1][1] + per_layer[2][1] + per_layer[3][1])]
    half = len(blocks) // 2  # two batches, as a load with SSD promotions has
    copies = groups.from_host_groups([(blocks[:half], host, page_slots[:half]),
                                      (blocks[half:], host, page_slots[half:])], spans)
    assert len(copies.events) == (len(spans) if DEV == "cuda" else 0)
    copies.wait(0)
    copies.synchronize()
    for a, b in zip(expect, kv):  # as bytes: random bytes hold NaNs
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="not whole segments"):
        groups.span_layout(per_layer[0][0], per_layer[0][1] + 1)
