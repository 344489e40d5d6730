"""Layer-wise loads: how a page splits into layer groups, and where each group lives in the KV cache.

A hit read from the SSD layer group by layer group while the forward pass runs: layer l computes while
layer l+1's bytes are still in flight (`wait_for_layer_load` waits for its group).
"""

from __future__ import annotations

from dataclasses import dataclass

from ucm.kernels.layout import KVLayout, Segment
from ucm.tiers.ranged import PageRange


@dataclass(frozen=True)
class LayerPlan:
    """How a page splits into layer groups, and where each part lives in the KV cache."""

    groups: tuple[tuple[PageRange, ...], ...]  # page ranges of each group, groups in layer order
    group_of: dict[str, int]  # registered layer name -> its group
    segment_at: dict[int, Segment]  # page offset -> the segment starting there

    def address(self, vllm_block: int, r: PageRange) -> int:
        """Byte address in the KV cache of page range r (one whole segment) of a vLLM block."""
        seg = self.segment_at[r.page_offset]
        return seg.addr + vllm_block * seg.block_stride


def layer_plan(layout: KVLayout, tc) -> LayerPlan | None:
    """A plan when layer-wise loading applies: enabled, a CPU KV cache (reads land in it directly; a
    GPU cache loads whole requests from the pinned host tier), and one tensor per layer."""
    if not tc.layerwise_load or layout.device.type != "cpu" or len(layout.names) < 2:
        return None
    seg_of: dict[int, list[Segment]] = {}
    for seg in layout.segments:
        seg_of.setdefault(seg.tensor_index, []).append(seg)
    groups: list[list[int]] = [[0]]  # layer indices; the first group is one layer, so layer 0 starts early
    for ti in range(1, len(layout.names)):
        g = groups[-1]
        nbytes = sum(s.length for t in g for s in seg_of.get(t, ()))
        if len(groups) == 1 or nbytes >= tc.layer_read_bytes or len(g) >= 2 * len(groups[-2]):
            groups.append([ti])  # groups grow at most 2x per step up to the read size
        else:
            g.append(ti)
    group_of = {name: gi for gi, g in enumerate(groups) for name in (layout.names[t] for t in g)}
    ranges = tuple(tuple(PageRange(s.page_offset, s.length) for t in g for s in seg_of.get(t, ())) for g in groups)
    if not all(ranges):
        return None  # segments merged across layers: no per-layer order to follow
    return LayerPlan(ranges, group_of, {s.page_offset: s for s in layout.segments})
