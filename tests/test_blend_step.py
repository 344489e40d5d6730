"""BlendStep's selection, query runs and capture, without vLLM (its attention is covered end to end by
test_blend_vllm_steps.py, where recomputing every token reproduces full prefill)."""

import torch

from ucm.integration.vllm.blend.attention import for_backend
from ucm.integration.vllm.blend.chunk_kv import layer_groups, writes_due
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


def test_each_request_keeps_its_own_share_whatever_else_is_in_the_batch():
    """Two requests, four reused tokens each, ratio 1/4: the second's keys all deviate more than any of
    the first's, yet each recomputes its own most deviating token; alone, the first recomputes the same."""
    g = torch.Generator().manual_seed(1)
    cached = torch.randn(8, 2, 4, generator=g)
    fresh = torch.zeros(10, 2, 4)
    fresh[:8] = cached
    fresh[2] += 1.0  # request 0 (batch rows 0-3, positions 100-103): its most deviating token
    fresh[4:8] += 5.0
    fresh[6] += 1.0
    req = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    step = BlendStep(1, 0.25, 1, torch.arange(8), cached, reused_req=req,
                     reused_pos=torch.tensor([100, 101, 102, 103, 40, 41, 42, 43]), always=[8, 9])
    step.select(fresh)
    assert step.sel.tolist() == [2, 6, 8, 9] and step.recomputed == 2
    alone = BlendStep(1, 0.25, 1, torch.arange(4), cached[:4], always=[4])
    alone.select(torch.cat([fresh[:4], torch.zeros(1, 2, 4)]))
    assert alone.sel.tolist() == [2, 4]


def test_spans_follow_token_positions_not_batch_positions():
    """The same request at another batch offset selects the same tokens: spans are aligned on its
    token positions."""
    picks = []
    for offset in (0, 3):
        g = torch.Generator().manual_seed(2)
        cached = torch.randn(6, 2, 4, generator=g)
        fresh = torch.zeros(offset + 7, 2, 4)
        fresh[offset:offset + 6] = cached
        fresh[offset + 1] += 5.0  # position 33: its span is positions 32-33
        idx = torch.arange(offset, offset + 6)
        step = BlendStep(1, 2 / 6, 2, idx, cached, reused_req=torch.zeros(6, dtype=torch.int64),
                         reused_pos=torch.arange(32, 38), always=[offset + 6])
        step.select(fresh)
        picks.append([int(i) - offset for i in step.sel if i < offset + 6 and i >= offset])
    assert picks[0] == picks[1] == [0, 1]


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
    step.sel = step.sel_cpu = torch.tensor([0, 1, 2, 5, 6, 9, 10, 11])
    step.sel_positions = torch.tensor([0, 1, 2, 5, 6, 0, 1, 7])  # two requests: batch rows 0-8 and 9-11
    qsl, seq_lens, req = step._query_runs(torch.tensor([0, 9, 12]))
    assert qsl.tolist() == [0, 3, 5, 7, 8] and seq_lens.tolist() == [3, 7, 2, 8] and req.tolist() == [0, 0, 1, 1]


def test_capture_maps_saved_tokens_into_the_subset():
    step, _ = _step(ratio=0.0)
    step.capture_idx = torch.tensor([0, 1])
    step.sel = step.sel_cpu = torch.tensor([0, 1, 8, 9])
    key = torch.arange(4 * 2 * 4, dtype=torch.float32).view(4, 2, 4)  # rows of the subset
    step.capture(5, key, -key, subset=True)
    assert torch.equal(step.captured[5][0], key[:2])
    full = torch.arange(12 * 8, dtype=torch.float32).view(12, 2, 4)
    step.capture(1, full, full, subset=False)
    assert torch.equal(step.captured[1][0], full[:2])


def test_layer_index():
    assert layer_index("model.layers.12.self_attn.attn") == 12


def test_copy_groups_start_with_the_check_layer_alone():
    """The check layer's keys come first (the selection needs them), then the later layers 8 at a time;
    the layers before the check layer are never read."""
    assert layer_groups(32, 3) == [(3, 4), (4, 12), (12, 20), (20, 28), (28, 32)]
    assert layer_groups(30, 29) == [(29, 30)] and layer_groups(30, 40) == [(29, 30)]


def test_the_later_groups_writes_are_spread_over_the_layers_before_the_check_layer():
    """The host enqueues the later groups' writes while the device runs the first layers: an even share
    after each, none left for the check layer (whose selection waits); none before it, none to spread."""
    def schedule(pending, check):
        out = []
        for layer in range(check):
            due = writes_due(pending, layer, check)
            out.append(due)
            pending -= due
        return out, pending

    assert schedule(4, 3) == ([2, 1, 1], 0)
    assert schedule(4, 1) == ([4], 0)
    assert schedule(2, 5) == ([1, 1, 0, 0, 0], 0)
    assert schedule(4, 0) == ([], 4)  # check layer 0: `settle` enqueues them all
    assert writes_due(3, 3, 3) == 0 and writes_due(0, 0, 3) == 0


def test_blending_runs_on_the_backends_it_knows():
    """The adapter is chosen by the attention implementation's class name (vLLM's own classes on the
    real paths; stand-ins here); context parallelism splits the KV across ranks and is declined."""
    FlashAttentionImpl = type("FlashAttentionImpl", (), {"dcp_world_size": 1})
    CPUAttentionBackendImpl = type("CPUAttentionBackendImpl", (), {})
    assert for_backend(FlashAttentionImpl()).name == "flash_attn"
    assert for_backend(CPUAttentionBackendImpl()).name == "cpu"
    assert for_backend(type("TritonAttentionImpl", (), {})()) is None
    split = FlashAttentionImpl()
    split.dcp_world_size = 2
    assert for_backend(split) is None
