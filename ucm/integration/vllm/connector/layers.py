"""Layer-wise loads: how a page splits into layer groups, and where each group lives in the KV cache.

A hit arrives layer group by layer group while the forward pass runs: layer l computes while layer
l+1's bytes are still in flight (`wait_for_layer_load` waits for its group). A CPU KV cache reads SSD
pages this way (ranged.RangedLoad, threads); a GPU KV cache copies host pages this way (`HostLayers`,
on a stream of its own, the forward pass waiting for each group on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

from ucm.kernels.layout import KVLayout, Segment
from ucm.kernels.transfer import GroupCopies
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

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(page offset, bytes) of each group: its layers are consecutive, so its bytes are one span."""
        return [(g[0].page_offset, sum(r.length for r in g)) for g in self.groups]


def layer_plan(layout: KVLayout, group_bytes: int) -> LayerPlan | None:
    """Layer groups of a page: the first group is one layer, so layer 0 starts early; later groups grow
    at most 2x per step until they hold `group_bytes` per block (0: one layer per group). None when
    there is one tensor, or segments are merged across layers (no per-layer order to follow)."""
    if len(layout.names) < 2:
        return None
    seg_of: dict[int, list[Segment]] = {}
    for seg in layout.segments:
        seg_of.setdefault(seg.tensor_index, []).append(seg)
    groups: list[list[int]] = [[0]]  # layer indices
    for ti in range(1, len(layout.names)):
        g = groups[-1]
        nbytes = sum(s.length for t in g for s in seg_of.get(t, ()))
        if len(groups) == 1 or nbytes >= group_bytes or len(g) >= 2 * len(groups[-2]):
            groups.append([ti])
        else:
            g.append(ti)
    group_of = {name: gi for gi, g in enumerate(groups) for name in (layout.names[t] for t in g)}
    ranges = tuple(tuple(PageRange(s.page_offset, s.length) for t in g for s in seg_of.get(t, ())) for g in groups)
    if not all(ranges) or any(a.page_offset + a.length != b.page_offset for g in ranges for a, b in zip(g, g[1:])):
        return None
    return LayerPlan(ranges, group_of, {s.page_offset: s for s in layout.segments})


class HostLayers:
    """A load copied from host pages to a GPU layer group by layer group (`HostTransfer.from_host_groups`
    on a stream of its own), with ranged.RangedLoad's interface: `groups`, `wait_group`, `finish`.
    The store's task keeps the host pages pinned until `finish`, which verifies them."""

    def __init__(self, store, task, copies: GroupCopies, plan: LayerPlan):
        self.store, self.task, self.copies, self.groups = store, task, copies, plan.groups
        self.device_waits = 0  # groups the forward pass's stream was made to wait for
        self._waited: set[int] = set()

    def wait_group(self, group: int) -> None:
        """The forward pass's stream waits for the group on the device; the host goes on. The later
        layers of a group find their stream already waiting: one wait per group, not per layer."""
        if group not in self._waited:
            self._waited.add(group)
            self.device_waits += 1
            self.copies.wait(group)

    def finish(self) -> dict[int, str]:
        """Wait for every copy, then release and verify the pages; failed blocks (index -> why)."""
        self.copies.synchronize()
        self.store.wait(self.task)
        return dict(self.task.errors)
