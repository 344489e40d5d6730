"""Layer-wise SSD loads through a worker connector built from real vLLM objects (debug_connector)."""

import os

import pytest
import torch

from ucm.config import TransferConfig
from ucm.tools.debug import debug_connector
from ucm.tools.model_export import ensure_model
from ucm.integration.vllm.ucm_connector import RequestMeta, UCMConnectorMetadata
from ucm.tiers.store import close_shared

pytestmark = pytest.mark.vllm
BLOCKS = 4


def _cfg(root, host):
    return {"host": {"capacity": "64MiB", "path": os.path.join(root, host)},
            "ssd": {"path": os.path.join(root, "ssd"), "capacity": "256MiB"}}


def _save_blocks(root):
    """A worker that saved BLOCKS random blocks to host tier "host-a"; (worker, ids, their bytes)."""
    w = debug_connector(ensure_model(), "worker", _cfg(root, "host-a"))
    ids = [os.urandom(16) for _ in range(BLOCKS)]
    for kv in w.kv_caches.values():
        kv[:BLOCKS].copy_(torch.randn_like(kv[:BLOCKS]))
    pages = {name: kv[:BLOCKS].clone() for name, kv in w.kv_caches.items()}
    w.bind_connector_metadata(UCMConnectorMetadata(requests=[RequestMeta("r", dump_block_ids=(ids, list(range(BLOCKS))))]))
    w.wait_for_save()
    w.clear_connector_metadata()
    return w, ids, pages


@pytest.fixture
def stored(tmp_path):
    """BLOCKS blocks saved by one worker and flushed to the SSD; returns (root, ids, their bytes)."""
    w, ids, pages = _save_blocks(tmp_path)
    w.shutdown()
    close_shared()
    return tmp_path, ids, pages


def _load(root, ids, host, wait_layers, whole=BLOCKS):
    w = debug_connector(ensure_model(), "worker", _cfg(root, host))
    assert w.worker._layer_plan is not None and len(w.worker._layer_plan.groups) > 2
    dst = list(range(10, 10 + BLOCKS))
    w.bind_connector_metadata(UCMConnectorMetadata(requests=[
        RequestMeta("r2", load_block_ids=(ids, dst), load_whole_blocks=whole)]))
    w.start_load_kv(None)
    layered = w.worker._layered is not None
    for name in list(w.kv_caches)[:wait_layers]:
        w.wait_for_layer_load(name)
    errors = w.get_block_ids_with_load_errors()
    w.clear_connector_metadata()
    return w, dst, errors, layered


def test_every_layer_awaited_loads_exact_bytes(stored):
    root, ids, pages = stored
    w, dst, errors, layered = _load(root, ids, "host-b", wait_layers=10**6)
    assert layered and errors == set()
    for name, kv in w.kv_caches.items():
        assert torch.equal(kv[dst], pages[name]), name
    assert w.worker._totals["ssd_hit_blocks"] == 0 and w.worker.stats.data["ssd_hit_blocks"] == BLOCKS


def test_a_partly_covered_last_block_loads_whole_before_the_forward_pass(stored):
    root, ids, pages = stored
    w, dst, errors, _ = _load(root, ids, "host-c", wait_layers=10**6, whole=BLOCKS - 1)
    assert errors == set()
    for name, kv in w.kv_caches.items():
        assert torch.equal(kv[dst], pages[name]), name


def test_layers_not_awaited_fail_the_blocks_and_turn_layerwise_off(stored):
    """If a model's attention never calls wait_for_layer_load, the step's output must not be used."""
    root, ids, _ = stored
    w, dst, errors, layered = _load(root, ids, "host-d", wait_layers=3)
    assert layered and errors == set(dst)
    assert w.worker._layer_plan is None, "later loads are whole, before the forward pass"


# ---- a GPU KV cache's path: host pages copied layer by layer (HostTransfer.from_host_groups) ------------
def _host_layers_load(root, ids, wait_layers, break_copy=False, group_bytes=0):
    """Load `ids` from the host tier they were saved to, through the GPU's layer-by-layer copy path
    (run here on the CPU cache: its copies are done on return, the bookkeeping is the GPU's), in layer
    groups of `group_bytes` of a page (0: one layer per group)."""
    from ucm.integration.vllm.connector.layers import layer_plan

    w = debug_connector(ensure_model(), "worker", _cfg(root, "host-a"))
    wk = w.worker
    wk._gpu_layers, wk._layer_plan = True, layer_plan(wk.layout, group_bytes)
    if group_bytes == 0:
        assert len(wk._layer_plan.groups) == len(w.kv_caches), "one layer per group"
    if break_copy:
        def fail(*a, **k):
            raise RuntimeError("copy engine fault (injected)")
        wk.xfer.from_host_groups = fail
    dst = list(range(10, 10 + BLOCKS))
    w.bind_connector_metadata(UCMConnectorMetadata(requests=[RequestMeta("r2", load_block_ids=(ids, dst))]))
    for kv in w.kv_caches.values():
        kv[dst] = 0
    w.start_load_kv(None)
    w.host_layers = wk._layered[0] if wk._layered is not None else None  # the HostLayers of this load
    for name in list(w.kv_caches)[:wait_layers]:
        w.wait_for_layer_load(name)
    errors = w.get_block_ids_with_load_errors()
    w.clear_connector_metadata()
    return w, dst, errors


@pytest.fixture
def in_host(tmp_path):
    """BLOCKS blocks saved to a host tier that stays open (its worker closes after the test), their SSD
    write-through done (it pins the pages while it writes them: the tests count pins)."""
    w, ids, pages = _save_blocks(tmp_path)
    w.worker.store.flush(timeout=60)
    yield tmp_path, ids, pages
    w.shutdown()
    close_shared()


@pytest.mark.parametrize("group_bytes", [0, "default"])
def test_host_hits_copied_layer_by_layer_are_exact_and_counted(in_host, group_bytes):
    """One layer per group, and the groups a GPU worker uses by default (transfer.layer_read_size): the
    forward pass's stream waits once per group, not once per layer (a device wait costs the host as much
    as a layer's launch on the H200)."""
    root, ids, pages = in_host
    if group_bytes == "default":
        group_bytes = TransferConfig().layer_read_bytes
    w, dst, errors = _host_layers_load(root, ids, wait_layers=10**6, group_bytes=group_bytes)
    groups = len(w.worker._layer_plan.groups)
    assert (groups == len(w.kv_caches)) == (group_bytes == 0) and groups > 2
    assert w.host_layers.device_waits == groups
    assert errors == set()
    for name, kv in w.kv_caches.items():
        assert torch.equal(kv[dst], pages[name]), name
    assert w.worker.stats.data["host_hit_blocks"] == BLOCKS and w.worker.stats.data["loaded_blocks"] == BLOCKS
    assert not w.worker.store.host.pins, "the pages are released after the step"


def test_host_layers_not_awaited_fail_the_blocks_and_turn_layerwise_off(in_host):
    root, ids, _ = in_host
    w, dst, errors = _host_layers_load(root, ids, wait_layers=2)
    assert errors == set(dst)
    assert w.worker._layer_plan is None and not w.worker.store.host.pins


def test_a_failed_layer_copy_is_a_load_error_and_loads_go_whole(in_host):
    root, ids, _ = in_host
    w, dst, errors = _host_layers_load(root, ids, wait_layers=10**6, break_copy=True)
    assert errors == set(dst)
    assert w.worker._layer_plan is None and not w.worker.store.host.pins
    assert w.worker.stats.data["load_errors"] == BLOCKS
