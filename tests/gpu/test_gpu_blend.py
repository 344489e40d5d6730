"""BlendConnector inside vLLM's GPU build (0.26, FlashAttention 3 on the H200; tests/gpu/README.md).

The small Llama with seeded random weights of gpu_harness.py, block 16, bf16, eager. Documents are cached
alone, then prompts place them after a new preamble, chunk boundaries given per request
(`kv_transfer_params["ucm_blend_chunks"]`). recompute_ratio 1.0 recomputes every reused token after the
check layer, so the blended pass must give full prefill's tokens: that checks the subset pass on
FlashAttention (patched layers, runs of selected tokens, their metadata, their KV writes) without
approximation. Skipped where CUDA is absent (CI); the CPU build's tests are tests/test_blend_vllm*.py."""

import re

import pytest
import torch

from gpu_harness import BLOCK, EXT, assert_identical, connector, run, tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DOCS = [tokens(200, 10 + k) for k in range(3)]
PRE_A, PRE_B, QUESTION = tokens(30, 20), tokens(40, 21), tokens(20, 22)


def rag(pre: list[int], order, question=QUESTION) -> dict:
    """pre + the documents in `order` + question, each document a chunk."""
    toks, chunks = list(pre), []
    for d in order:
        chunks.append([len(toks), len(toks) + len(DOCS[d])])
        toks += DOCS[d]
    return {"tokens": toks + question, "chunks": chunks}


RAG = [rag(PRE_B, (2, 0, 1)), rag(PRE_A, (1, 2))]
REUSED = [sum(len(DOCS[k]) // BLOCK * BLOCK for k in (2, 0, 1)), sum(len(DOCS[k]) // BLOCK * BLOCK for k in (1, 2))]
CACHE_DOCS = [[{"tokens": d, "chunks": [[0, len(d)]]}] for d in DOCS]


def blend(root: str, **kw) -> dict:
    c = connector(root, blend={"separator": None, **kw})
    c["kv_connector"] = "BlendConnector"
    return c


def reused_tokens(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"\[UCM\.Blend\] blend: (\d+) tokens of \d+ requests reused", log)]


def plain(phases, **kw) -> dict:
    """No connector: full prefill of the same prompts (chunk boundaries dropped)."""
    return run([[p["tokens"] for p in ph] for ph in phases], **kw)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["prefix-cache-off", "prefix-cache-on"])
@pytest.mark.parametrize("mp", [False, True], ids=["single-process", "multiprocessing"])
def test_full_recompute_reproduces_full_prefill(tmp_path, mp, prefix_caching):
    r = run(CACHE_DOCS + [[RAG[0]], [RAG[1]]], connector=blend(str(tmp_path), recompute_ratio=1.0),
            multiprocessing=mp, prefix_caching=prefix_caching)
    assert "blend worker: attention backend flash_attn" in r["log"], r["log"][-3000:]
    assert reused_tokens(r["log"]) == REUSED, r["log"][-3000:]
    assert all(r["phase_metrics"][k].get(EXT, 0) == 0 for k in (3, 4)), "blended tokens are not prefix hits"
    ref = plain([[RAG[0]], [RAG[1]]], prefix_caching=prefix_caching)
    for k in range(2):
        assert r["phases"][3 + k][0]["tokens"] == ref["phases"][k][0]["tokens"]
        assert_identical(r["phases"][3 + k], ref["phases"][k], tol=2 ** -5)


def test_blended_kv_is_never_a_prefix_hit_with_prefix_caching_on(tmp_path):
    """The blended prompt again, and a new question after the same preamble and documents: vLLM's cache
    serves only the full blocks before the first reused token, both are blended again, and (ratio 1.0)
    both give full prefill's tokens."""
    other = rag(PRE_B, (2, 0, 1), tokens(20, 23))
    exact = len(PRE_B) // BLOCK * BLOCK
    r = run(CACHE_DOCS + [[RAG[0]], [RAG[0]], [other]], connector=blend(str(tmp_path), recompute_ratio=1.0),
            prefix_caching=True)
    assert reused_tokens(r["log"]) == REUSED[:1] * 3, r["log"][-3000:]
    assert [r["phases"][k][0]["num_cached_tokens"] for k in (4, 5)] == [exact, exact]
    ref = plain([[RAG[0]], [other]], prefix_caching=True)["phases"]
    assert r["phases"][3][0]["tokens"] == r["phases"][4][0]["tokens"] == ref[0][0]["tokens"]
    assert r["phases"][5][0]["tokens"] == ref[1][0]["tokens"]


def test_chunked_prefill_blends_step_by_step(tmp_path):
    """A 460-token prompt prefilled 128 tokens a step: each step blends the reused tokens it holds, and
    with ratio 1.0 the tokens are full prefill's under the same steps."""
    r = run(CACHE_DOCS + [[RAG[1]]], connector=blend(str(tmp_path), recompute_ratio=1.0),
            max_num_batched_tokens=128)
    steps = reused_tokens(r["log"])
    assert len(steps) > 1 and sum(steps) == REUSED[1], (steps, r["log"][-3000:])
    ref = plain([[RAG[1]]], max_num_batched_tokens=128)["phases"][0][0]
    assert r["phases"][3][0]["tokens"] == ref["tokens"]


def test_default_ratio_loads_beside_the_pass_as_if_loaded_before(tmp_path):
    """At the default ratio (15%) the documents' KV is reused and a share of it recomputed. It reaches the
    cache on a stream of its own while the first layers run, each later layer waiting for its group:
    the outputs must equal those of the same blend with the KV in the cache before the pass starts
    (exactly: the same kernels on the same data), also when that stream runs late (it sleeps before
    its copies and its writes). On vLLM 0.26 this does not prove the pass's own waits: the forward runs
    on CUDA's legacy default stream, which orders the KV stream's work before the later layers anyway (a
    copy of the code without those waits passed; bench/results/blend-gpu-speed.md). The negative control: with
    the keys left unrotated,
    the outputs differ from both (the comparison sees the reused KV; a random-weight model's blended
    output is not compared with full prefill's, which only trained weights approximate)."""
    phases = CACHE_DOCS + [[RAG[0]], [RAG[1]]]
    runs = {f: run(phases, connector=blend(str(tmp_path / f)), fault=f or None)
            for f in ("", "blend_sync_loads", "blend_unrotated", "blend_slow_stream")}
    for f, r in runs.items():
        assert reused_tokens(r["log"]) == REUSED, (f, r["log"][-3000:])
        recomputed = [int(m) for m in re.findall(r"blend: recomputed (\d+) of \d+ reused tokens", r["log"])]
        assert len(recomputed) == 2 and all(0 < n < m for n, m in zip(recomputed, REUSED)), (f, recomputed)
    assert "on a stream beside the forward pass" in runs[""]["log"]
    for k in (3, 4):
        assert_identical(runs[""]["phases"][k], runs["blend_sync_loads"]["phases"][k], tol=0.0)
        assert_identical(runs["blend_slow_stream"]["phases"][k], runs["blend_sync_loads"]["phases"][k], tol=0.0)
    with pytest.raises(AssertionError):
        for k in (3, 4):
            assert_identical(runs["blend_unrotated"]["phases"][k], runs[""]["phases"][k], tol=1e-3)


def test_a_request_blends_the_same_alone_and_in_a_batch(tmp_path):
    """The same prompt first in a batch of four blended prompts gets the same tokens as alone, whenever
    full prefill does (bf16 GEMMs may round differently with the batch's shape: the control)."""
    others = [rag(tokens(30 + 5 * k, 30 + k), o) for k, o in enumerate([(1, 0), (0, 2, 1), (2, 1)])]
    r = run(CACHE_DOCS + [[RAG[0]], [RAG[0]] + others], connector=blend(str(tmp_path)))
    assert len(reused_tokens(r["log"])) == 2, r["log"][-3000:]
    ref = plain([[RAG[0]], [RAG[0]] + others])["phases"]
    if ref[1][0]["tokens"] != ref[0][0]["tokens"]:
        pytest.skip("full prefill itself gives this prompt other tokens in the batch")
    assert r["phases"][4][0]["tokens"] == r["phases"][3][0]["tokens"]
