"""BlendStep's selection, query runs and capture, without vLLM (its attention is covered end to end by
test_blend_vllm.py, where recomputing every token reproduces full prefill)."""

import torch

from ucm.integration.vllm.blend.step import BlendStep, layer_index


def _step(ratio, n_batch=12, reused=(2, 3, 4, 5, 6, 7), last=(11,), span=1):
    g = torch.Generator().manual_seed(0)
    cached = torch.randn(len(reused), 2, 4, generator=g)
    fresh = torch.zeros(n_batch, 2, 4)
    fresh[list(reused)] = cached
    return BlendStep(1, ratio, span, torch.tensor(reused), cached, always=list(last)), fresh


def test_selection_keeps_the_most_deviating_reused_tokens_and_everything_else():
    step, fresh = _step(ratio=2 / 6)
    fresh[4] += 5.0  # the context changed these two tokens' keys the most
    fresh[6] += 3.0
    fresh[3] += 0.1
    step.select(fresh)
    assert step.sel.tolist() == [0, 1, 4, 6, 8, 9, 10, 11] and step.recomputed == 2


def test_spans_are_selected_whole_by_their_most_deviating_token():
    step, fresh = _step(ratio=2 / 6, span=2)  # spans of batch positions {2,3} {4,5} {6,7}
    fresh[7] += 5.0
    fresh[2] += 0.1
    step.select(fresh)
    assert step.sel.tolist() == [0, 1, 6, 7, 8, 9, 10, 11] and step.recomputed == 2
    step, fresh = _step(ratio=3 / 6, span=2)  # a budget of 3 takes two spans
    fresh[7] += 5.0
    fresh[2] += 1.0
    step.select(fresh)
    assert step.sel.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11] and step.recomputed == 4


def test_ratio_zero_and_one():
    step, fresh = _step(ratio=0.0)
    step.select(fresh + 1)
    assert step.sel.tolist() == [0, 1, 8, 9, 10, 11] and step.recomputed == 0
    step, fresh = _step(ratio=1.0)
    step.select(fresh)
    assert step.sel.tolist() == list(range(12))


def test_the_last_token_is_always_computed():
    step, fresh = _step(ratio=0.0, reused=(8, 9, 10, 11), last=(11,))
    step.select(fresh)
    assert 11 in step.sel.tolist() and 10 not in step.sel.tolist()


def test_a_step_of_reused_tokens_only_selects_nothing():
    step, fresh = _step(ratio=0.0, n_batch=4, reused=(0, 1, 2, 3), last=())
    step.select(fresh + 1)
    assert step.sel.tolist() == [] and step.recomputed == 0


def test_nothing_reused_means_no_subset():
    step = BlendStep(1, 0.15, 1, torch.empty(0, dtype=torch.int64), torch.empty(0, 2, 4))
    step.select(torch.zeros(5, 2, 4))
    assert step.sel is None


def test_query_runs_are_consecutive_positions_of_one_request():
    step, _ = _step(ratio=0.0)
    step.sel = torch.tensor([0, 1, 2, 5, 6, 9, 10, 11])
    step.sel_positions = torch.tensor([0, 1, 2, 5, 6, 0, 1, 7])  # two requests: batch rows 0-8 and 9-11
    qsl, seq_lens, req = step._query_runs(torch.tensor([0, 9, 12]))
    assert qsl.tolist() == [0, 3, 5, 7, 8] and seq_lens.tolist() == [3, 7, 2, 8] and req.tolist() == [0, 0, 1, 1]


def test_capture_maps_saved_tokens_into_the_subset():
    step, _ = _step(ratio=0.0)
    step.capture_idx = torch.tensor([0, 1])
    step.sel = torch.tensor([0, 1, 8, 9])
    key = torch.arange(4 * 2 * 4, dtype=torch.float32).view(4, 2, 4)  # rows of the subset
    step.capture(5, key, -key, subset=True)
    assert torch.equal(step.captured[5][0], key[:2])
    full = torch.arange(12 * 8, dtype=torch.float32).view(12, 2, 4)
    step.capture(1, full, full, subset=False)
    assert torch.equal(step.captured[1][0], full[:2])


def test_layer_index():
    assert layer_index("model.layers.12.self_attn.attn") == 12
