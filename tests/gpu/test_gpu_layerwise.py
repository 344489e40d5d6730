"""Synchronous loads on the GPU, copied in layer groups while the forward pass runs (worker.py
`_start_host_layers`): SSD hits are read into host memory first, then every hit is copied group by group
on a stream of its own, the forward pass's stream waiting for each group.

The engine runs without async scheduling and with vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0): the
configuration in which vLLM 0.26 recomputes after a failed synchronous load, so `transfer.load_mode: auto`
loads synchronously there (versions.load_error_recovery); every test checks that the connector chose so.
The references run on the same engine. "Identical" is DESIGN.md's exact test against vLLM's prefix cache
at the same split; where a split is not at a prompt the tests store, the reference's blocks come from a
prefill of the same length sharing those tokens (a prefill's KV of token i does not depend on the tokens
after i). Skipped where CUDA is absent (CI)."""

import os
import re
import shutil

import pytest
import torch

from gpu_harness import BLOCK, DROP_CACHES, EXT, PAGE, SSD_CAPACITY, assert_identical, connector, run, tokens
from storekit import forget_on_ssd, perturb, slot_place, ssd_slot, stored_ids, tier_dir, worker_counters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENGINE = {"async_scheduling": False}
ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0", "UNIFIED_CACHE_LOG_LEVEL": "DEBUG"}  # DEBUG: each load's log line
LOCAL = "vllm:prompt_tokens_by_source{source=local_cache_hit}"
LAYERED = "layer by layer, finished"  # worker.finish_layered's debug line, one per step with a layer-group load

A = tokens(600, 1)  # 37 full blocks of 16 + 8 tokens
B = A[:320] + tokens(280, 2)  # shares A's first 20 blocks
C = A + tokens(204, 3)  # A's 37 blocks first
NA, NB = len(A) // BLOCK, 320 // BLOCK
HOLE = 28  # the block of A evicted from the SSD (holes test)
BAD = 10  # the block of A damaged on the SSD (corruption test)


def vrun(phases, **kw) -> dict:
    kw["engine"] = {**ENGINE, **kw.pop("engine", {})}
    kw["env"] = {**ENV, **kw.pop("env", {})}
    r = run(phases, **kw)
    print("\n".join(l for l in r["log"].splitlines() if "ucm" in l.lower())[-12000:])  # shown if the test fails
    if kw.get("connector"):
        assert "loads synchronous" in r["log"], "transfer.load_mode auto must load synchronously on this engine"
    return r


def sharing(n_blocks: int, seed: int) -> list[int]:
    """A 600-token prompt sharing A's first n_blocks blocks (the reference's prefill at that split)."""
    return A[:n_blocks * BLOCK] + tokens(len(A) - n_blocks * BLOCK, seed)


def worker_totals(root: str) -> dict:
    """The counters of the one worker under root that loaded anything."""
    (t,) = [t for t in worker_counters(os.path.join(root, "ssd")) if t.get("loaded_blocks") or t.get("load_errors")]
    return t


@pytest.fixture(scope="module")
def ref():
    """vLLM's prefix cache, no connector: A cold; A over A's 37 blocks; B over 20 of them; C over 37."""
    r = vrun([[A], [A], [B], [C]], prefix_caching=True)
    assert [m.get(LOCAL, 0) for m in r["phase_metrics"]] == [0, NA * BLOCK, NB * BLOCK, NA * BLOCK]
    return r


@pytest.fixture(scope="module")
def stored(ref, tmp_path_factory):
    """A stored by a cold process (its output unchanged by the connector); tests load from copies of its
    SSD tier, each through a host tier of its own."""
    root = str(tmp_path_factory.mktemp("stored"))
    r = vrun([[A]], connector=connector(root))
    assert_identical(r["phases"][0], ref["phases"][0])
    return root


def ssd_copy(stored: str, tmp_path) -> str:
    shutil.copytree(os.path.join(stored, "ssd"), os.path.join(tmp_path, "ssd"))
    return str(tmp_path)


@pytest.mark.parametrize("mp", [False, True], ids=["one-process", "multiprocess"])
def test_layer_group_loads_from_the_ssd_and_the_host_tier_are_exact(ref, stored, tmp_path, mp):
    """A fresh process, page cache dropped: A from the SSD (read into host memory, then copied in layer
    groups), A again from the host tier, then C over A's 37 blocks; in vLLM's single-process and
    multiprocess modes."""
    root = ssd_copy(stored, tmp_path)
    r = vrun([[A], [A], [C]], connector=connector(root, host_dir="host-2"), multiprocessing=mp,
             hooks={0: {"before": DROP_CACHES}})
    assert [m.get(EXT, 0) for m in r["phase_metrics"]] == [NA * BLOCK] * 3
    assert r["log"].count(LAYERED) == 3
    for k, want in enumerate((1, 1, 3)):
        assert_identical(r["phases"][k], ref["phases"][want])
    t = worker_totals(root)
    assert (t["ssd_hit_blocks"], t["host_hit_blocks"], t["load_errors"]) == (NA, 2 * NA, 0), t


def test_a_hit_across_tiers_loads_up_to_its_first_hole(ref, stored, tmp_path):
    """A's block 28 evicted from the SSD. B loads A's first 20 blocks from the SSD (they are promoted to
    the host tier); C then finds blocks 0-19 in the host tier, 20-27 on the SSD only and 28 nowhere: it
    loads 28 blocks from both tiers in one layer-group copy and computes the rest, exactly as vLLM's
    prefix cache over 28 blocks does."""
    want = vrun([[sharing(HOLE, 4)], [C]], prefix_caching=True)
    assert want["phase_metrics"][1][LOCAL] == HOLE * BLOCK
    root = ssd_copy(stored, tmp_path)
    ids = stored_ids(os.path.join(root, "ssd"), A)
    assert len(ids) == NA
    forget_on_ssd(os.path.join(root, "ssd"), SSD_CAPACITY, [ids[HOLE]])
    r = vrun([[B], [C]], connector=connector(root, host_dir="host-2"), hooks={0: {"before": DROP_CACHES}})
    assert [m.get(EXT, 0) for m in r["phase_metrics"]] == [NB * BLOCK, HOLE * BLOCK]
    assert r["log"].count(LAYERED) == 2
    assert_identical(r["phases"][0], ref["phases"][2])
    assert_identical(r["phases"][1], want["phases"][1])
    t = worker_totals(root)
    assert (t["ssd_hit_blocks"], t["host_hit_blocks"], t["load_errors"]) == (HOLE, NB, 0), t  # SSD: B's 20, then C's 20-27


def test_a_damaged_page_inside_a_layer_group_load_is_recomputed_exactly_and_healed(stored, tmp_path):
    """A's block 10 damaged on the SSD: A's load reads its 37 pages into host memory, block 10 fails its
    checksum and the others are copied in layer groups; vLLM recomputes from block 10 (the 26 blocks after
    it were copied but are not used), exactly as its prefix cache over 10 blocks does. The recomputed block
    is stored: D, sharing A's first 11 blocks, then loads blocks 0-9 as stored cold and block 10 as
    recomputed, exactly as vLLM's prefix cache gives D the same blocks. (A itself would load blocks 11-36
    as the cold prefill computed them, at another split than vLLM's recompute did: no reference holds that
    mix.)"""
    d = A[:(BAD + 1) * BLOCK] + tokens(len(A) - (BAD + 1) * BLOCK, 6)
    want = vrun([[sharing(BAD, 5)], [A], [d]], prefix_caching=True)
    assert [m.get(LOCAL, 0) for m in want["phase_metrics"]] == [0, BAD * BLOCK, (BAD + 1) * BLOCK]
    root = ssd_copy(stored, tmp_path)
    ssd = os.path.join(root, "ssd")
    bad = stored_ids(ssd, A)[BAD]
    perturb(*slot_place(tier_dir(ssd), ssd_slot(ssd, SSD_CAPACITY, bad)), PAGE, seed=1)
    r = vrun([[A], [d]], connector=connector(root, host_dir="host-2"),
             hooks={0: {"before": DROP_CACHES}, 1: {"before": "sleep 1"}})
    assert "1 of 37 blocks failed to load" in r["log"]
    assert_identical(r["phases"][0], want["phases"][1])
    assert r["phase_metrics"][1].get(EXT) == (BAD + 1) * BLOCK
    assert_identical(r["phases"][1], want["phases"][2])
    assert r["log"].count(LAYERED) == 2
    t = worker_totals(root)
    assert (t["load_errors"], t["loaded_blocks"]) == (1, NA - 1 + BAD + 1), t


def test_a_copy_fault_half_way_through_the_groups_is_recomputed_exactly(ref, stored, tmp_path):
    """The copy engine fails after half of a load's layer groups were enqueued (vllm_runner's injected
    fault; single-process mode): every block of that load is reported failed, vLLM recomputes A exactly
    as a cold prefill, later loads go whole before the forward pass, and A then hits exactly."""
    root = ssd_copy(stored, tmp_path)
    r = vrun([[A], [A]], connector=connector(root, host_dir="host-2"), fault="layer_copy_fails",
             hooks={0: {"before": DROP_CACHES}, 1: {"before": "sleep 1"}})
    groups = int(re.search(r"layer by layer from host memory \((\d+) groups\)", r["log"]).group(1))
    assert groups >= 3 and f"copy engine fault (injected) after {groups // 2} of {groups} groups" in r["log"]
    assert "loads are whole from now on" in r["log"] and r["log"].count(LAYERED) == 0
    assert_identical(r["phases"][0], ref["phases"][0])
    assert r["phase_metrics"][1].get(EXT) == NA * BLOCK
    assert_identical(r["phases"][1], ref["phases"][1])
    t = worker_totals(root)
    assert (t["load_errors"], t["loaded_blocks"]) == (NA, NA), t
