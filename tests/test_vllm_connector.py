"""UCMConnector end to end: the real vLLM CPU build, the real SmolLM2-135M model.

"Identical" is DESIGN.md's exact test: greedy tokens equal and chosen-token logprobs within 1e-5 of
vLLM's own prefix-cache reuse at the same split (bf16), or of the no-cache baseline (float32).
"""

import functools
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from storekit import flip_bits, forget_on_ssd, perturb, slot_place, slots_in_put_order, stored_ids
from vllm_harness import BLOCK, EXT, assert_identical, prompt_tokens, run_vllm, ucm_connector

from ucm.integration.vllm.connector.config import connector_config
from ucm.integration.vllm.journal import read_lookups
from ucm.tiers.rates import Rates
from ucm.tools.doctor import diagnose

pytestmark = pytest.mark.vllm
DISK = "vllm:prompt_tokens_cached_by_source{source=disk}"
HOST = "vllm:prompt_tokens_cached_by_source{source=host}"

A = prompt_tokens(300, 1000)  # 9 full blocks of 32 + 12 tokens
B = A[:160] + prompt_tokens(140, 2000)  # shares exactly 5 full blocks with A
C = A + prompt_tokens(100, 2500)  # A extended: shares A's 9 full blocks
A_BLOCKS = 300 // BLOCK


@functools.lru_cache(maxsize=None)
def reference(mp: bool) -> dict:
    """vLLM's own prefix cache, no connector, in the same process mode (the two modes differ in
    rounding): phase 1 reuses A's 9 blocks, phase 2 reuses 5 (B), phase 3 reuses 9 (C)."""
    r = run_vllm([[A], [A], [B], [C]], prefix_caching=True, multiprocessing=mp)
    assert r["phase_metrics"][1]["vllm:prompt_tokens_by_source{source=local_cache_hit}"] == A_BLOCKS * BLOCK
    return r


@pytest.fixture(scope="module")
def ref():
    return reference(False)


@pytest.fixture(scope="module", params=[False, True], ids=["single-process", "multiprocessing"])
def stored_a(request, tmp_path_factory):
    """A store holding prompt A, written by a cold run in its own process."""
    mp = request.param
    root = str(tmp_path_factory.mktemp("mp" if mp else "sp"))
    # single-process mode names the module path; multiprocessing relies on the plugin registration alone
    cold = run_vllm([[A]], connector=ucm_connector(root, module_path=not mp), multiprocessing=mp)
    assert cold["phase_metrics"][0].get(EXT, 0) == 0, "a cold store has nothing to hit"
    return root, mp, cold


def warm_connector(root, tag, mp, **kw):
    """Same SSD, a new host tier: every hit must come from the SSD."""
    c = ucm_connector(root, module_path=not mp, **kw)
    c["extra"]["host"]["path"] = os.path.join(root, f"host-{tag}")
    return c


def test_cold_then_warm_in_a_fresh_process_is_identical(stored_a):
    root, mp, cold = stored_a
    ref = reference(mp)
    assert cold["phases"][0][0]["tokens"] == ref["phases"][0][0]["tokens"], "the connector changed a cold run"
    warm = run_vllm([[A]], connector=warm_connector(root, "warm", mp), multiprocessing=mp)
    m = warm["phase_metrics"][0]
    assert m.get(EXT) == A_BLOCKS * BLOCK, f"vLLM counted {m.get(EXT)} external tokens"
    assert m.get(DISK) == A_BLOCKS * BLOCK, "the hits must come from the SSD tier"
    assert warm["phases"][0][0]["num_cached_tokens"] == A_BLOCKS * BLOCK
    # ucm's own series in vLLM's Prometheus registry (connector/prom.py)
    assert cold["phase_metrics"][0].get("vllm:ucm_saved_blocks") == A_BLOCKS
    assert cold["phase_metrics"][0].get("vllm:ucm_saved_bytes", 0) > 0
    assert m.get("vllm:ucm_loaded_tokens") == A_BLOCKS * BLOCK and m.get("vllm:ucm_load_errors", 0) == 0
    assert m.get("vllm:ucm_hit_blocks{tier=ssd}") == A_BLOCKS and m.get("vllm:ucm_hit_blocks{tier=host}", 0) == 0
    assert "SSD hits load layer by layer in" in warm["log"] and "straight into the KV cache" in warm["log"], \
        "the KV cache allocation patch makes SSD reads land in the KV cache"
    assert_identical(warm["phases"][0], ref["phases"][1])


def test_without_patches_ssd_reads_go_through_a_bounce_buffer_identically(stored_a):
    """UCM_DISABLE_PATCHES=1: vLLM's KV cache is not 4 KiB aligned, so O_DIRECT reads take a bounce
    buffer on I/O threads; the outputs must not change."""
    root, mp, _ = stored_a
    warm = run_vllm([[A]], connector=warm_connector(root, "nopatch", mp), multiprocessing=mp,
                    env={"UCM_DISABLE_PATCHES": "1"})
    assert "through a bounce buffer (KV cache not 4 KiB aligned)" in warm["log"]
    assert warm["phase_metrics"][0].get(DISK) == A_BLOCKS * BLOCK
    assert_identical(warm["phases"][0], reference(mp)["phases"][1])


def test_whole_request_loads_when_layerwise_loading_is_off(stored_a):
    """The same SSD hits through the other load path: copied whole before the forward pass."""
    root, mp, _ = stored_a
    warm = run_vllm([[A]], connector=warm_connector(root, "whole", mp, transfer={"layerwise_load": False}),
                    multiprocessing=mp)
    assert warm["phase_metrics"][0].get(DISK) == A_BLOCKS * BLOCK
    assert_identical(warm["phases"][0], reference(mp)["phases"][1])


def test_partial_prefix_and_extended_prompt(stored_a):
    root, mp, _ = stored_a
    ref = reference(mp)
    r = run_vllm([[B], [C]], connector=warm_connector(root, "partial", mp), multiprocessing=mp)
    assert r["phase_metrics"][0].get(EXT) == 5 * BLOCK, "B shares 5 full blocks with A"
    assert r["phase_metrics"][1].get(EXT) == A_BLOCKS * BLOCK, "C extends A: all of A's full blocks hit"
    assert_identical(r["phases"][0], ref["phases"][2])
    assert_identical(r["phases"][1], ref["phases"][3])


def test_a_hole_in_a_stored_chain_ends_the_hit_there_and_doctor_names_it(stored_a, tmp_path):
    """Block 7 of A evicted from the SSD (as its LRU would, blocks 8 on still stored): A loads blocks 0-6
    and computes the rest, exactly as vLLM's prefix cache over 7 blocks computed by a prefill of A's
    length; `ucm doctor` names the broken chain."""
    root, mp, _ = stored_a
    if mp:
        pytest.skip("holes are checked in single-process mode")
    want = run_vllm([[A[:7 * BLOCK] + prompt_tokens(len(A) - 7 * BLOCK, 2100)], [A]], prefix_caching=True)
    assert want["phase_metrics"][1]["vllm:prompt_tokens_by_source{source=local_cache_hit}"] == 7 * BLOCK
    ssd = os.path.join(str(tmp_path), "ssd")
    shutil.copytree(os.path.join(root, "ssd"), ssd)
    forget_on_ssd(ssd, 1 << 30, [stored_ids(ssd, A)[7]])
    c = warm_connector(str(tmp_path), "hole", False)
    why = " ".join(diagnose(connector_config(c["extra"]), A).reasons)
    assert "chain broken: blocks 0..6 are stored, block 7 is not, and 1 later blocks are" in why, why
    r = run_vllm([[A]], connector=c)
    assert r["phase_metrics"][0].get(DISK) == 7 * BLOCK
    assert_identical(r["phases"][0], want["phases"][1])


def test_host_tier_only_hits_within_one_process(ref, tmp_path):
    r = run_vllm([[A], [A]], connector=ucm_connector(str(tmp_path), ssd=None))
    assert r["phase_metrics"][0].get(EXT, 0) == 0
    assert r["phase_metrics"][1].get(EXT) == A_BLOCKS * BLOCK
    assert r["phase_metrics"][1].get(HOST) == A_BLOCKS * BLOCK
    assert_identical(r["phases"][1], ref["phases"][1])


def test_chunked_prefill_and_batched_requests(tmp_path):
    """Prefill in chunks of 64 tokens (smaller than every prompt), three requests in one batch."""
    chunk = 64
    ref = run_vllm([[A], [A, C, B]], prefix_caching=True, max_num_batched_tokens=chunk)
    root = str(tmp_path)
    run_vllm([[A]], connector=ucm_connector(root), max_num_batched_tokens=chunk)
    c = ucm_connector(root)
    c["extra"]["host"]["path"] = os.path.join(root, "host-b")
    r = run_vllm([[A, C, B]], connector=c, max_num_batched_tokens=chunk)
    assert r["phase_metrics"][0].get(EXT) == (A_BLOCKS + A_BLOCKS + 5) * BLOCK
    assert_identical(r["phases"][0], ref["phases"][1])


def _damaged_copy(root, work):
    """A copy of the stored SSD tier in `work`; (tier directory, slots in put order) to damage."""
    shutil.copytree(os.path.join(root, "ssd"), os.path.join(work, "ssd"))
    tier, slots = slots_in_put_order(os.path.join(work, "ssd"))
    assert len(slots) >= A_BLOCKS
    return tier, slots


@pytest.fixture(scope="module")
def ref_split4():
    """vLLM's prefix cache reusing exactly A's first 4 blocks, computed (like the stored ones) by a
    300-token prefill: on the CPU backend a block's bytes depend on the length of the prefill that
    computed it, so the reference must reuse blocks computed the same way. Phase 2 is A again: all 9
    blocks reused, 0-3 from the 300-token prefill and 4-8 from phase 1's, as in a store healed after a
    failed block 4."""
    x = A[:4 * BLOCK] + prompt_tokens(len(A) - 4 * BLOCK, 2000)
    r = run_vllm([[x], [A], [A]], prefix_caching=True)
    hits = [m["vllm:prompt_tokens_by_source{source=local_cache_hit}"] for m in r["phase_metrics"][1:]]
    assert hits == [4 * BLOCK, A_BLOCKS * BLOCK], hits
    return r


@pytest.mark.parametrize("damage", ["flip-first-block", "truncate-at-block-4"])
def test_corrupted_store_reports_load_errors_and_recomputes(ref, ref_split4, stored_a, tmp_path, damage):
    root, mp, _ = stored_a
    if mp:
        pytest.skip("corruption is checked in single-process mode")
    work = str(tmp_path)
    tier, slots = _damaged_copy(root, work)
    if damage == "flip-first-block":
        path, off = slot_place(tier, slots[0])
        flip_bits(path, off + 1000, 0xFF)
        expected = ref["phases"][0]  # nothing survives: the no-cache result
    else:
        path, off = slot_place(tier, slots[4])
        os.truncate(path, off + 512)
        expected = ref_split4["phases"][1]  # blocks 0-3 survive: vLLM recomputes from block 4
    r = run_vllm([[A]], connector=ucm_connector(work))
    assert "failed to load" in r["log"], "the load error must be logged"
    assert_identical(r["phases"][0], expected)


def test_a_corrupted_store_heals_in_the_request_that_found_the_damage(ref, stored_a, tmp_path):
    """Every stored page corrupted: the next process gets load errors, recomputes (exactly), and stores
    the blocks it recomputed, so a third fresh process hits all of them from the SSD."""
    root, mp, _ = stored_a
    if mp:
        pytest.skip("corruption is checked in single-process mode")
    work = str(tmp_path)
    tier, slots = _damaged_copy(root, work)
    for slot in slots:
        path, off = slot_place(tier, slot)
        flip_bits(path, off + 1000, 0xFF)
    r = run_vllm([[A]], connector=ucm_connector(work))
    assert "failed to load" in r["log"], "the load errors must be logged"
    assert_identical(r["phases"][0], ref["phases"][0])
    third = run_vllm([[A]], connector=warm_connector(work, "third", False))
    m = third["phase_metrics"][0]
    assert m.get(EXT) == A_BLOCKS * BLOCK, f"the healed store must hit every block: {m.get(EXT)} tokens"
    assert m.get(DISK) == A_BLOCKS * BLOCK
    assert_identical(third["phases"][0], ref["phases"][1])


@pytest.fixture(scope="module")
def stored_a_alone(tmp_path_factory):
    """A store holding prompt A and nothing else (other tests add C's blocks to stored_a's)."""
    root = str(tmp_path_factory.mktemp("a-alone"))
    run_vllm([[A]], connector=ucm_connector(root))
    return root


def test_async_loads_hit_exactly_recompute_failed_blocks_and_heal(ref, ref_split4, stored_a_alone, tmp_path):
    """transfer.load_mode: async (the GPU build's default under async scheduling): vLLM holds each request
    until its load is done. SSD hits, then host-tier hits of a prompt extending A, are identical to vLLM's
    own reuse; with block 4 truncated, blocks 0-3 load, vLLM recomputes from block 4 before the request
    runs (identical to reusing 4 blocks), the recomputed blocks are stored, and a third process hits all."""
    root = stored_a_alone
    warm_root = str(tmp_path / "warm")  # a copy: C's blocks saved here stay out of stored_a_alone
    shutil.copytree(os.path.join(root, "ssd"), os.path.join(warm_root, "ssd"))
    warm = run_vllm([[A], [C]], connector=warm_connector(warm_root, "async", False, transfer={"load_mode": "async"}),
                    env={"UNIFIED_CACHE_LOG_LEVEL": "DEBUG", "UNIFIED_CACHE_STEP_TRACE": "1"})
    assert "loads asynchronous (transfer.load_mode: async)" in warm["log"]
    # the step trace: each load is reported by a step that computes nothing, and the next step runs it
    trace = re.findall(r"\[UCM\.Step\] step (\d+) (begins: (\d+) tokens|ends at .*reported done: \[(.*)\])", warm["log"])
    begins = {int(s): int(t) for s, _, t, _ in trace if t}
    reported = [int(s) for s, _, t, r in trace if not t]
    assert len(reported) == 2 and all(begins[s] == 0 and begins.get(s + 1, 0) > 0 for s in reported), trace
    # while a request waits for its load, vLLM runs steps that compute nothing; each waits for the load
    # (up to 20 ms, the GIL free) instead of spinning: a load polls a handful of steps, not thousands (before
    # the idle step came from the metadata, vLLM 0.32's idle steps spun ~9,400 times a load on this machine)
    polls = [int(x) for x in re.findall(r"; (\d+) steps polled it running\)", warm["log"])]
    assert len(polls) == 2 and max(polls) <= 50, polls
    assert [m.get(EXT) for m in warm["phase_metrics"]] == [A_BLOCKS * BLOCK] * 2
    assert warm["phase_metrics"][0].get(DISK) == A_BLOCKS * BLOCK
    assert warm["phase_metrics"][1].get(HOST) == A_BLOCKS * BLOCK
    assert_identical(warm["phases"][0], ref["phases"][1])
    assert_identical(warm["phases"][1], ref["phases"][3])
    work = str(tmp_path / "damaged")
    tier, slots = _damaged_copy(root, work)
    path, off = slot_place(tier, slots[4])
    os.truncate(path, off + 512)
    r = run_vllm([[A]], connector=ucm_connector(work, transfer={"load_mode": "async"}))
    assert "failed to load" in r["log"], "the load error must be logged"
    assert_identical(r["phases"][0], ref_split4["phases"][1])
    third = run_vllm([[A]], connector=warm_connector(work, "third", False))
    assert third["phase_metrics"][0].get(EXT) == A_BLOCKS * BLOCK, "the recomputed blocks must be stored again"
    # blocks 0-3 from the first 300-token prefill, 4-8 from the recompute after 4 reused blocks
    assert_identical(third["phases"][0], ref_split4["phases"][2])


BAD_CONFIG = """
from vllm import LLM
from vllm.config import KVTransferConfig
try:
    LLM(model=MODEL, max_model_len=512, kv_transfer_config=KVTransferConfig(kv_connector="UCMConnector",
        kv_role="kv_both", kv_connector_extra_config={"host": {"capacity": "64MiB", "colour": "blue"}}))
except Exception as e:
    print("RAISED", type(e).__name__, str(e).splitlines()[0])
"""


def test_a_wrong_key_fails_before_the_engine_starts():
    """The plugin checks ucm's configuration when vLLM builds the engine config: one ConfigError
    naming the layer, key and value, before any engine process or model load."""
    from vllm_harness import model_path

    p = subprocess.run([sys.executable, "-c", BAD_CONFIG.replace("MODEL", repr(model_path()))],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert "RAISED ConfigError kv_connector_extra_config: key 'host.colour': unknown key" in out, out[-3000:]
    assert "Starting to load model" not in out and "EngineCore" not in out, out[-3000:]


def test_kv_role_consumer_only_loads_and_producer_only_saves(ref, stored_a_alone, tmp_path):
    """kv_role kv_consumer: C hits A's stored blocks and stores none of its own; kv_producer: A is
    computed cold (no lookup hits) although the store has it."""
    root = stored_a_alone
    work = str(tmp_path)
    tier, slots = _damaged_copy(root, work)  # an undamaged copy
    consumer = {**warm_connector(work, "consumer", False), "kv_role": "kv_consumer"}
    r = run_vllm([[C]], connector=consumer)
    assert r["phase_metrics"][0].get(EXT) == A_BLOCKS * BLOCK
    assert_identical(r["phases"][0], ref["phases"][3])
    assert len(slots_in_put_order(os.path.join(work, "ssd"))[1]) == len(slots), "a consumer must not save"
    producer = {**warm_connector(work, "producer", False), "kv_role": "kv_producer"}
    p = run_vllm([[A]], connector=producer)
    assert p["phase_metrics"][0].get(EXT, 0) == 0, "a producer must not load"
    assert_identical(p["phases"][0], ref["phases"][0])


def test_blocks_computed_over_a_failed_load_are_not_stored_as_they_are(tmp_path):
    """C extends A: A's 9 stored blocks load and C's 3 new full blocks are computed in the same step.
    Every stored page is damaged, so those 3 blocks were computed over KV that was not there: they must
    not be stored from that step (vLLM recomputes the request, and they are stored from the recompute).
    A third process then loads all 12 blocks with outputs identical to vLLM's own reuse of them."""
    c_blocks = len(C) // BLOCK
    ref = run_vllm([[C], [C]], prefix_caching=True)
    assert ref["phase_metrics"][1]["vllm:prompt_tokens_by_source{source=local_cache_hit}"] == c_blocks * BLOCK
    work = str(tmp_path)
    run_vllm([[A]], connector=ucm_connector(work))  # a store of A's 9 blocks alone
    tier, slots = slots_in_put_order(os.path.join(work, "ssd"))
    assert len(slots) == A_BLOCKS
    page = int(os.path.basename(tier)[1:])
    for slot in slots:
        path, off = slot_place(tier, slot)
        perturb(path, off, page, seed=slot)
    r = run_vllm([[C]], connector=warm_connector(work, "damaged", False))
    assert "failed to load" in r["log"] and "not saved: the step's loads failed" in r["log"], r["log"][-3000:]
    assert_identical(r["phases"][0], ref["phases"][0])
    third = run_vllm([[C]], connector=warm_connector(work, "third", False))
    assert third["phase_metrics"][0].get(EXT) == c_blocks * BLOCK
    assert_identical(third["phases"][0], ref["phases"][1])


def test_working_set_larger_than_the_tiers(tmp_path):
    """float32: outputs match the no-cache baseline while blocks are evicted from both tiers.

    The host tier holds 4 blocks (a request has 9: the rest of its saves are refused while the host
    tier is full of blocks not yet on SSD), the SSD 12; four prompts, then the same four in reverse
    order: the most recent ones hit, the oldest were evicted."""
    prompts = [prompt_tokens(300, 200 + 400 * k) for k in range(4)]
    base = run_vllm([[p] for p in prompts], dtype="float32")
    page = 30 * 2 * BLOCK * 3 * 64 * 4  # SmolLM2, float32: bytes per block
    c = ucm_connector(str(tmp_path), host=f"{4 * page}B", ssd=f"{12 * page}B")
    order = [0, 1, 2, 3, 3, 2, 1, 0]
    r = run_vllm([[prompts[k]] for k in order], connector=c, dtype="float32")
    ext = [m.get(EXT, 0) for m in r["phase_metrics"]]
    assert sum(ext[:4]) == 0, f"external tokens per phase: {ext}"
    assert ext[4] > 0, f"the most recent prompt must hit: {ext}"
    assert ext[7] == 0, f"the oldest prompt must have been evicted: {ext}"
    for k, phase in zip(order, r["phases"]):
        assert_identical(phase, base["phases"][k], tol=1e-4)


def test_preemption_and_resumption(tmp_path):
    """A KV cache of 40 blocks for 6 requests growing from 9 to 11 blocks: vLLM preempts and resumes requests
    while their saves are in flight. float32: outputs match the no-cache baseline, the connector's
    in-flight saves are fenced (no corrupt block), and resumed requests may load what was saved."""
    prompts = [prompt_tokens(288, 100 + 350 * k) for k in range(6)]  # 9 blocks each, growing to 11
    kv_bytes = 40 * 30 * 2 * BLOCK * 3 * 64 * 4
    base = run_vllm([prompts], dtype="float32", max_tokens=64, kv_cache_bytes=kv_bytes, max_model_len=1024)
    assert base["phase_metrics"][0].get("vllm:num_preemptions", 0) > 0, "the setup must preempt"
    r = run_vllm([prompts, prompts], connector=ucm_connector(str(tmp_path)), dtype="float32", max_tokens=64,
                 kv_cache_bytes=kv_bytes, max_model_len=1024)
    assert r["phase_metrics"][0].get("vllm:num_preemptions", 0) > 0
    assert r["phase_metrics"][1].get(EXT, 0) > 0, "the second pass must hit what the first saved"
    for phase in r["phases"]:
        assert_identical(phase, base["phases"][0], tol=1e-4)


def _storage_dir(root: str) -> str:
    """The SSD tier's directory for SmolLM2's page size (where the journal and the rates live)."""
    found = [os.path.dirname(d) for d in glob.glob(os.path.join(root, "ssd", "*", "journal"))]
    assert len(found) == 1, found
    return found[0]


def test_the_load_planner_recomputes_hits_slower_to_load_and_says_why(tmp_path):
    """A store whose SSD measured 1 MB/s (seeded as a previous process would have left it, with a step
    time of 10 ms + 0.1 ms per token): loading A's 9 SSD blocks (6.6 MB) is predicted at ~6.6 s against
    ~40 ms of recompute, so a fresh process recomputes them (exact as no cache), the journal, the log,
    `ucm doctor` and `ucm stats` say so; with the planner off the same store loads them, and that whole
    load measures the disk again (its running mean rises above the seeded figure)."""
    root = str(tmp_path)
    run_vllm([[A]], connector=ucm_connector(root, planner=True))
    storage = _storage_dir(root)
    seeded = Rates(storage)
    seeded.record_load("ssd", 1 << 30, (1 << 30) / 1e6)
    seeded.record_prefill([(1, 0.0101), (8192, 0.01 + 1e-4 * 8192)])
    seeded.write()
    warm = run_vllm([[A]], connector=warm_connector(root, "planned", False, planner=True,
                                                     transfer={"layerwise_load": False}))
    assert warm["phase_metrics"][0].get(EXT, 0) == 0, "the planner must recompute the slow hits"
    assert_identical(warm["phases"][0], reference(False)["phases"][0])
    assert "skipped 9 of 9 hit blocks: ssd 0.001 GB/s" in warm["log"], warm["log"][-3000:]
    plans = [x["plan"] for x in read_lookups(storage) if "plan" in x]
    assert plans and plans[-1]["load_blocks"] == 0 and plans[-1]["hit_blocks"] == A_BLOCKS
    cfg = connector_config(warm_connector(root, "planned", False)["extra"])
    why = " ".join(diagnose(cfg, A).reasons)
    assert "not worth loading: the last lookup of this prompt skipped 9 of 9 hit blocks" in why, why
    stats = subprocess.run([sys.executable, "-m", "ucm", "--config", _yaml(tmp_path, cfg), "stats"],
                           capture_output=True, text=True, timeout=120)
    assert "measured for the load planner: ssd 0.001 GB/s" in stats.stdout, stats.stdout + stats.stderr
    assert "9 ssd hit blocks" in stats.stdout, stats.stdout
    off = run_vllm([[A]], connector=warm_connector(root, "unplanned", False, planner=False,
                                                    transfer={"layerwise_load": False}))
    assert off["phase_metrics"][0].get(EXT, 0) == A_BLOCKS * BLOCK
    assert Rates(storage).bandwidth("ssd") > 1.2e6, "the whole SSD load was not measured"


def test_one_request_measures_an_unknown_disk_while_the_others_recompute(tmp_path):
    """Async loads (no overlap with the forward pass), the SSD's bandwidth unknown, the step time known:
    of A and D arriving in one batch, A loads its 9 SSD blocks and measures the disk (the probe), D
    recomputes its own (the log and the journal say why); D alone afterwards is decided by the measured
    figure, no longer held back."""
    root = str(tmp_path)
    d = prompt_tokens(300, 4000)  # shares no block with A
    run_vllm([[A], [d]], connector=ucm_connector(root))
    storage = _storage_dir(root)
    seeded = Rates(storage)
    seeded.record_prefill([(1, 0.0101), (8192, 0.01 + 1e-4 * 8192)])  # a step time as a previous process would have left it; no disk figure
    seeded.write()
    assert seeded.bandwidth("ssd") is None
    c = warm_connector(root, "probe", False, planner=True, transfer={"load_mode": "async"})
    r = run_vllm([[A, d], [d]], connector=c)
    assert [m.get(EXT, 0) for m in r["phase_metrics"]][0] == A_BLOCKS * BLOCK, r["log"][-3000:]
    assert r["log"].count("ssd being measured by another request") == 1, r["log"][-3000:]
    plans = [x["plan"] for x in read_lookups(storage) if "plan" in x]
    assert [p["reason"] for p in plans][:1] == ["being measured: ssd"], plans
    assert Rates(storage).bandwidth("ssd") is not None, "the probe's load measured the disk"


@pytest.mark.parametrize("mp", [False, True], ids=["sp", "mp"])
def test_the_worker_times_its_forward_passes_for_the_planner(tmp_path, mp):
    """Six prompts of 300 tokens, one at a time (max_tokens 1): the worker times each forward pass and
    fits the step time (the first two passes warm the engine up), written to <storage>/rates/ (from the
    worker's process in multiprocess mode). The fit's time for a 300-token prompt lies inside the wall
    time of generating it, and not far below."""
    root = str(tmp_path)
    prompts = [prompt_tokens(300, 3000 + 300 * k) for k in range(6)]
    out = run_vllm([[p] for p in prompts], connector=ucm_connector(root, planner=True, module_path=not mp),
                   multiprocessing=mp, max_tokens=1)
    predicted = Rates(_storage_dir(root)).prefill_seconds(300)
    assert predicted is not None, "no forward pass was timed"
    wall = statistics.median(out["seconds"])
    assert 0.3 * wall < predicted < wall, (predicted, out["seconds"])


def _yaml(tmp_path, cfg) -> str:
    """A config file naming the same tiers as `cfg`, for the CLI."""
    path = tmp_path / "ucm.yaml"
    path.write_text(f"host:\n  capacity: {cfg.host.capacity}B\n  path: {cfg.host.path}\n"
                    f"ssd:\n  capacity: {cfg.ssd.capacity}B\n  path: {cfg.ssd.path}\n")
    return str(path)
