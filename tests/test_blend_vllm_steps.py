"""BlendConnector on vLLM's CPU build, across forward passes: recomputing every reused token reproduces
full prefill, chunked prefill blends step by step, a preempted request resumes with the same KV, and a
chunk whose pages fail is recomputed (the prompts: blendkit.py)."""

import os

import pytest

from blendkit import DOCS, PRE_A, PRE_B, QUESTION, RAG, REUSED, SEP, _text, blend, full_prefill, reused_tokens
from storekit import perturb, slot_place, slots_in_put_order
from vllm_harness import BLOCK, assert_identical, run_vllm

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("mp", [False, True], ids=["single-process", "multiprocessing"])
def test_full_recompute_reproduces_full_prefill(tmp_path, mp):
    """recompute_ratio 1.0: every reused token is recomputed after the check layer, so the blended pass
    must give full prefill's tokens (the machinery of the subset pass, checked without approximation)."""
    r = run_vllm([[d + [SEP]] for d in DOCS] + [[RAG[0]]], connector=blend(str(tmp_path), recompute_ratio=1.0),
                 max_tokens=8, multiprocessing=mp)
    assert reused_tokens(r["log"]) == REUSED[:1]
    assert r["phases"][3][0]["tokens"] == full_prefill()["phases"][0][0]["tokens"]


def test_chunked_prefill_blends_step_by_step(tmp_path):
    """A 473-token prompt prefilled 128 tokens a step: every step blends the reused tokens it holds. With
    ratio 1.0 the tokens equal full prefill's under the same steps (the machinery across steps). With
    ratio 0 the reused KV is the same whatever the steps, so in float32 the output equals blending the
    prompt in one step (placement and rotation of partial loads)."""
    phases = [[d + [SEP]] for d in DOCS] + [[RAG[1]]]
    ref = run_vllm([[RAG[1]]], max_tokens=8, max_num_batched_tokens=128)["phases"][0][0]
    r = run_vllm(phases, connector=blend(str(tmp_path / "a"), recompute_ratio=1.0), max_tokens=8,
                 max_num_batched_tokens=128)
    steps = reused_tokens(r["log"])
    assert len(steps) > 1 and sum(steps) == REUSED[1], (steps, r["log"][-3000:])
    assert r["phases"][3][0]["tokens"] == ref["tokens"]
    one, chunked = (run_vllm(phases, connector=blend(str(tmp_path / str(n)), recompute_ratio=0.0), max_tokens=8,
                             max_num_batched_tokens=n, dtype="float32") for n in (4096, 128))
    assert len(reused_tokens(chunked["log"])) > 1 and reused_tokens(one["log"]) == [REUSED[1]]
    assert_identical(chunked["phases"][3], one["phases"][3])


def test_a_preempted_blended_request_resumes_with_the_same_kv(tmp_path):
    """A KV cache of 38 blocks for four blended prompts of 15-21 blocks that grow while they decode: vLLM
    preempts the second and resumes it. A resumed request computes its tokens again, in new blocks, and
    must be blended exactly as the first time: the same chunk loads, into its new slots, and not the
    document it computed and stored itself the first time (cached nowhere else, so the request alone
    computes it), so its KV and its output equal those of the same request run alone without
    preemption. recompute_ratio 0 makes the selection independent of the batch; float32 keeps the
    noise floor at ~1e-5."""
    new_doc = _text(200, 1800)
    rag = [RAG[0], PRE_A + [SEP] + DOCS[1] + [SEP] + new_doc + [SEP] + QUESTION,
           PRE_B + [SEP] + DOCS[1] + [SEP] + DOCS[0] + [SEP] + QUESTION,
           PRE_A + [SEP] + DOCS[0] + [SEP] + DOCS[2] + [SEP] + DOCS[1] + [SEP] + QUESTION]
    docs = [[d + [SEP]] for d in DOCS]
    page = 30 * 2 * BLOCK * 3 * 64 * 4  # SmolLM2, float32: bytes per block
    common = dict(max_tokens=40, dtype="float32", max_model_len=1024)  # 40: two preemptions, 96 took 3x longer
    alone = run_vllm(docs + [[p] for p in rag], connector=blend(str(tmp_path / "alone"), recompute_ratio=0.0),
                     **common)
    assert all(m.get("vllm:num_preemptions", 0) == 0 for m in alone["phase_metrics"])
    batch = run_vllm(docs + [rag], connector=blend(str(tmp_path / "batch"), recompute_ratio=0.0),
                     kv_cache_bytes=38 * page, **common)
    assert batch["phase_metrics"][3].get("vllm:num_preemptions", 0) > 0, "the setup must preempt"
    assert len(reused_tokens(batch["log"])) > 1 and sum(reused_tokens(alone["log"])) > 0
    assert_identical(batch["phases"][3], [alone["phases"][3 + k][0] for k in range(len(rag))], tol=1e-4)


def test_a_chunk_whose_pages_fail_is_recomputed(tmp_path):
    """The documents' pages on the SSD damaged after they were stored (1% of each page's bytes): a fresh
    process promotes them, the checksums fail, and every token of those chunks is recomputed like a token
    never reused (the layers up to the check layer computed them anyway), so even with nothing recomputed
    by choice (ratio 0) the prompt gets full prefill's tokens."""
    root = str(tmp_path)
    run_vllm([[d + [SEP]] for d in DOCS], connector=blend(root), max_tokens=1)
    d, slots = slots_in_put_order(os.path.join(root, "ssd"))
    assert slots, "the documents reached the SSD"
    page = int(os.path.basename(d)[1:])
    for k, slot in enumerate(slots):
        perturb(*slot_place(d, slot), page, seed=k)
    r = run_vllm([[RAG[0]]], connector=blend(root, recompute_ratio=0.0), max_tokens=8)
    assert reused_tokens(r["log"]) == REUSED[:1], r["log"][-3000:]
    assert r["log"].count("a chunk's pages failed") == 3, r["log"][-3000:]
    assert r["phases"][0][0]["tokens"] == full_prefill()["phases"][0][0]["tokens"]
