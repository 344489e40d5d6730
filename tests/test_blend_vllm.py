"""BlendConnector end to end on the real vLLM CPU build and SmolLM2-135M: documents cached one by one,
then prompts that place them in new orders after a new preamble; chunk boundaries by separator token
and by kv_transfer_params; the fallbacks to prefix caching (the prompts: blendkit.py; across forward
passes: test_blend_vllm_steps.py)."""

import re

import pytest

from blendkit import (DOCS, PRE_A, PRE_B, QUESTION, RAG, REUSED, SEP, _text, agreement, blend, full_prefill,
                      reused_tokens)
from vllm_harness import BLOCK, EXT, assert_identical, run_vllm, ucm_connector

pytestmark = pytest.mark.vllm


def test_documents_cached_alone_are_reused_in_new_orders_after_a_new_preamble(tmp_path):
    r = run_vllm([[d + [SEP]] for d in DOCS] + [[p] for p in RAG], connector=blend(str(tmp_path)), max_tokens=8)
    assert reused_tokens(r["log"]) == REUSED, r["log"][-3000:]
    for k in range(3, 5):
        assert r["phase_metrics"][k].get(EXT, 0) == 0, "blended tokens are not prefix hits"
    ref = full_prefill()["phases"]
    for k in range(2):
        got = r["phases"][3 + k][0]
        # coherent: the first token is full prefill's, and the model is as sure of its continuation as of
        # real text (broken KV gives tokens of very low probability); quality in bench/results/blend.md
        assert agreement(got, ref[k][0]) >= 1, (got["tokens"], ref[k][0]["tokens"])
        assert sum(got["logprobs"]) / len(got["logprobs"]) > -3.0, got["logprobs"]
    assert "recomputed" in r["log"]


def test_documents_first_seen_inside_a_prompt_are_saved_where_they_stand(tmp_path):
    """A prompt's chunks are stored from its own forward pass (keys rotated back to position 0). The same
    prompt after a preamble that differs in one token (no prefix hit), blended with nothing recomputed
    after the check layer, reads back KV computed at those very positions: in float32 its first token
    is full prefill's, and the second prompt reuses the documents in another order."""
    other = [PRE_B[0] + 1] + RAG[0][1:]
    r = run_vllm([[RAG[0]], [other], [RAG[1]]], connector=blend(str(tmp_path), recompute_ratio=0.0),
                 max_tokens=8, dtype="float32")
    assert reused_tokens(r["log"]) == REUSED, r["log"][-3000:]
    ref = run_vllm([[other], [RAG[1]]], max_tokens=8, dtype="float32")["phases"]
    for got, want in zip(r["phases"][1:], ref):
        assert got[0]["tokens"][0] == want[0]["tokens"][0], (got[0]["tokens"], want[0]["tokens"])
        assert sum(got[0]["logprobs"]) / 8 > -3.0, got[0]["logprobs"]


def test_a_repeated_prompt_is_an_exact_prefix_hit_not_a_blend(tmp_path):
    r = run_vllm([[RAG[0]], [RAG[0]]], connector=blend(str(tmp_path / "a")), max_tokens=8)
    assert reused_tokens(r["log"]) == []
    assert r["phase_metrics"][1].get(EXT, 0) == (len(RAG[0]) // BLOCK) * BLOCK
    # a blended prompt's KV is approximate after its first reused token: no prefix pages are saved past
    # it, so the same prompt again is blended again, never served that KV as an exact prefix hit
    r = run_vllm([[d + [SEP]] for d in DOCS] + [[RAG[0]], [RAG[0]]], connector=blend(str(tmp_path / "b")),
                 max_tokens=8)
    assert reused_tokens(r["log"]) == REUSED[:1] * 2
    assert r["phase_metrics"][4].get(EXT, 0) == 0


@pytest.mark.parametrize("mp", [False, True], ids=["single-process", "multiprocessing"])
def test_blended_kv_is_never_a_prefix_hit_with_vllms_prefix_cache_on(tmp_path, mp):
    """vLLM's prefix caching on (its default): the blended prompt sent again, and a new question after
    the same preamble and documents, find in vLLM's cache only the block before the first reused token
    (exact) and are blended again; nothing past that block reaches ucm's prefix pages either (a fresh
    process without the blend patches, a prefix cache then, finds that block only). recompute_ratio 1.0 keeps every blended pass at full prefill's
    tokens, so the check also sees that the first pass's blocks did not change what the later ones get."""
    other = RAG[0][:-len(QUESTION)] + _text(20, 3600)
    exact = (len(PRE_B) + 1) // BLOCK * BLOCK  # the full blocks before the first reused token
    root = str(tmp_path)
    r = run_vllm([[d + [SEP]] for d in DOCS] + [[RAG[0]], [RAG[0]], [other]],
                 connector=blend(root, recompute_ratio=1.0), prefix_caching=True, multiprocessing=mp, max_tokens=8)
    assert reused_tokens(r["log"]) == REUSED[:1] * 3, r["log"][-3000:]
    assert [r["phases"][k][0]["num_cached_tokens"] for k in (4, 5)] == [exact, exact]
    want = full_prefill()["phases"][0][0]["tokens"]
    assert r["phases"][3][0]["tokens"] == want and r["phases"][4][0]["tokens"] == want
    if not mp:
        fresh = run_vllm([[other]], connector=blend(root), prefix_caching=True, max_tokens=8,
                         env={"UCM_DISABLE_PATCHES": "1"})
        assert fresh["phase_metrics"][0].get(EXT, 0) == exact


def test_a_request_blends_the_same_alone_and_in_a_batch(tmp_path):
    """What a request recomputes is chosen among its own reused tokens: the same prompt alone and first
    in a batch of 8 blended prompts (documents in other orders, other preambles) gets the same KV, so
    the same tokens and logprobs (float32; the control shows full prefill itself is batch-independent
    here)."""
    orders = [(2, 0, 1), (1, 2), (0, 1, 2), (1, 0), (2, 1, 0), (0, 2), (2, 1)]
    others = [_text(30 + 5 * k, 4000 + 100 * k) + [t for d in o for t in [SEP] + DOCS[d]] + [SEP] + QUESTION
              for k, o in enumerate(orders)]
    docs = [[d + [SEP]] for d in DOCS]
    common = dict(max_tokens=8, dtype="float32", max_num_batched_tokens=8192)
    r = run_vllm(docs + [[RAG[0]], [RAG[0]] + others], connector=blend(str(tmp_path)), **common)
    assert len(reused_tokens(r["log"])) == 2 and reused_tokens(r["log"])[1] > REUSED[0], r["log"][-3000:]
    assert_identical([r["phases"][4][0]], r["phases"][3], tol=1e-4)
    ref = run_vllm([[RAG[0]], [RAG[0]] + others], **common)["phases"]
    assert_identical([ref[1][0]], ref[0], tol=1e-4)


def chunk_sources(log: str) -> list[tuple[int, int]]:
    """(chunks reused from pages computed alone, from pages computed in context) per blended step."""
    return [(int(a), int(b)) for a, b in re.findall(r"chunk pages computed alone (\d+), in context (\d+)", log)]


def test_pages_computed_alone_win_over_pages_computed_in_context_whatever_came_first(tmp_path):
    """A document first computed behind a preamble is stored as computed in context and reused so; sent
    alone afterwards it is stored again as computed alone (before, the first stored won: the alone
    pages were never written), and later prompts reuse those."""
    doc = DOCS[0]
    probe = PRE_B + [SEP] + doc + [SEP] + QUESTION
    again = [PRE_B[0] + 1] + probe[1:]  # no prefix hit on the first probe's pages
    r = run_vllm([[PRE_A + [SEP] + doc + [SEP]], [probe], [doc + [SEP]], [again]],
                 connector=blend(str(tmp_path)), max_tokens=4)
    assert chunk_sources(r["log"]) == [(0, 1), (1, 0)], r["log"][-3000:]
    assert reused_tokens(r["log"]) == [len(doc) // BLOCK * BLOCK] * 2


def test_chunk_boundaries_from_kv_transfer_params(tmp_path):
    docs = [{"tokens": d, "chunks": [[0, len(d)]]} for d in DOCS[:2]]
    prompt = PRE_A + DOCS[1] + DOCS[0] + QUESTION
    a, b = len(PRE_A), len(PRE_A) + len(DOCS[1])
    rag = {"tokens": prompt, "chunks": [[a, b], [b, b + len(DOCS[0])]]}
    c = ucm_connector(str(tmp_path), name="BlendConnector", blend={"separator": None})
    r = run_vllm([[d] for d in docs] + [[rag]], connector=c, max_tokens=4)
    assert reused_tokens(r["log"]) == [len(DOCS[1]) // BLOCK * BLOCK + len(DOCS[0]) // BLOCK * BLOCK]


def test_without_patches_it_is_a_prefix_cache(tmp_path):
    r = run_vllm([[RAG[0]], [RAG[0]]], connector=blend(str(tmp_path)), max_tokens=8,
                 env={"UCM_DISABLE_PATCHES": "1"})
    assert "blending disabled, prefix caching only" in r["log"]
    assert r["phase_metrics"][1].get(EXT, 0) == (len(RAG[0]) // BLOCK) * BLOCK
