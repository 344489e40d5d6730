"""The blend planner (scheduler side): for each request, which stored chunks it reuses, which chunks it
saves, and where its exact prefix pages stop.

A request's plan is made at its first lookup and kept until it finishes: a lookup asked again (vLLM may
ask repeatedly, and asks again when it resumes a preempted request) returns the same decision, and
each prefill step arms the loads and saves that fall in the tokens it computes, so a resumed request
(computing its tokens again, in new blocks) is blended exactly as it was the first time.

A chunk's pages live in one of two id spaces: computed alone (the chunk started its prompt, so nothing
preceded it: its KV is the document's own) or in context (it followed other tokens, whose attention
shaped its KV). A lookup prefers the pages computed alone, and takes those computed in context where
they reach further; a chunk is saved in the space its computation belongs to, so a document cached
behind a preamble and then alone is stored both ways and the alone pages win from then on, whatever
came first.

Blended KV is approximate from the block of the first reused token on, and must never be served as an
exact prefix: ucm saves no prefix pages past that block (the save limit), and `keep_out_of_prefix_cache`
gives those blocks vLLM block hashes no other request computes, so vLLM's own prefix cache (on by
default) never hands them to another request, whatever `enable_prefix_caching` says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ucm.chunks import Chunk, from_boundaries, split_by_separator
from ucm.config import BlendConfig
from ucm.integration.vllm.identity import BlockIdentity, request_salt
from ucm.logger import get_logger

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from ucm.tiers import TieredStore

log = get_logger("Blend")
CHUNKS_PARAM = "ucm_blend_chunks"


def keep_out_of_prefix_cache(request: "Request", first_block: int) -> int:
    """Give the request's vLLM block hashes from `first_block` on values only this request has, so the
    blocks vLLM caches for it there are never a prefix hit of another request; returns how many changed.

    vLLM hashes a request's full blocks when it is created (before any connector call) and chains the
    hashes of later blocks from the last one, so the hashes of the blocks still to come are private too.
    The request itself, resumed after a preemption, still finds its own blocks. vLLM hashes in units of
    its block size, which is the connector's block size here."""
    hashes = getattr(request, "block_hashes", None)
    if not hashes or first_block >= len(hashes):
        return 0
    tag = b"ucm-blend|" + os.urandom(16)
    for i in range(first_block, len(hashes)):
        h = hashes[i]
        hashes[i] = type(h)(hashlib.sha256(tag + bytes(h)).digest()[:len(h)])
    return len(hashes) - first_block


@dataclass
class ChunkLoad:
    ids: list[bytes]  # stored blocks of the chunk that hold the tokens below, in order
    start: int  # the first token placed, as a position in this prompt
    tokens: int  # tokens placed from `start` on
    origin: int  # the chunk's first token in this prompt: stored keys (chunk start at 0) rotate by this
    alone: bool = True  # the pages were computed with nothing before the chunk (else: in a prompt's context)

    def within(self, a: int, b: int, block_size: int) -> "ChunkLoad | None":
        """The part of this load that one prefill step computes (positions [a, b)), or None."""
        lo, hi = max(a, self.start), min(b, self.start + self.tokens)
        if lo >= hi:
            return None
        first = (self.start - self.origin) // block_size  # the chunk block that ids[0] is
        b0, b1 = (lo - self.origin) // block_size - first, -(-(hi - self.origin) // block_size) - first
        return ChunkLoad(self.ids[b0:b1], lo, hi - lo, self.origin, self.alone)


@dataclass
class ChunkSave:
    ids: list[bytes]  # the chunk's blocks to store, in order
    start: int  # first token of those blocks in this prompt
    end: int
    origin: int  # the chunk's first token in this prompt (stored keys are rotated back from here to 0)
    part: tuple[int, int] = (0, 0)  # tokens of the chunk this step computes (their K/V are captured)
    final: bool = False  # the chunk is complete after this step: save it


@dataclass
class BlendRequestMeta:
    """One blended request's work in one step (scheduler -> worker)."""

    req_id: str
    block_ids: list[int]
    loads: list[ChunkLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


@dataclass
class Plan:
    """What a request reuses and saves, for its whole life."""

    loads: list[ChunkLoad]
    saves: list[ChunkSave]  # chunks not saved yet
    save_limit: int | None  # exact prefix pages stop at this block (None: no limit)


class BlendPlanner:
    def __init__(self, blend: BlendConfig, chunk_identity: BlockIdentity, context_identity: BlockIdentity,
                 store: Callable[[], "TieredStore"], why_not: str):
        """`chunk_identity`/`context_identity`: the id spaces of chunk pages computed alone / in context;
        `store`: the scheduler side's store (opened lazily); `why_not`: set when blending cannot run."""
        self.blend, self._store, self.why_not = blend, store, why_not
        self.chunk_identity, self.context_identity = chunk_identity, context_identity
        self.block_size = chunk_identity.seed.block_size
        self._plans: dict[str, Plan] = {}

    def chunks(self, request: "Request") -> list[Chunk]:
        tokens = request.prompt_token_ids or []
        params = getattr(request, "kv_transfer_params", None) or {}
        if CHUNKS_PARAM in params:
            try:
                return from_boundaries(params[CHUNKS_PARAM], len(tokens), self.blend.min_chunk_tokens)
            except ValueError as e:
                log.warning("req %s: kv_transfer_params[%r] ignored: %s", request.request_id, CHUNKS_PARAM, e)
                return []
        if self.blend.separator is None:
            return []
        return split_by_separator(tokens, self.blend.separator, self.blend.min_chunk_tokens)

    def plan(self, request: "Request", num_computed_tokens: int, external: int) -> tuple[int, int | None]:
        """(external tokens to load, save limit): blend when stored chunks reach further than the exact
        prefix hit of `external` tokens, else take the prefix hit. Either way, plan saves of the chunk
        blocks this request computes."""
        if self.why_not:
            return external, None
        old = self._plans.get(request.request_id)
        if old is not None:  # asked again, or resumed: the same decision as the first time
            return (0 if old.loads else external), old.save_limit
        chunks = self.chunks(request)
        tokens = request.prompt_token_ids or []
        bs, salt, store = self.block_size, request_salt(request), self._store()
        found, loads = [], []
        for c in chunks:
            alone = self.chunk_identity.chain(tokens[c.start:c.end], salt)
            if not alone:
                continue
            # a chunk that starts its prompt is computed alone here: only pages computed alone may stand in
            in_context = self.context_identity.chain(tokens[c.start:c.end], salt) if c.start else None
            n_alone = store.lookup_prefix(alone)
            n_context = store.lookup_prefix(in_context) if in_context else 0
            ids, stored = (alone, n_alone) if n_alone >= n_context else (in_context, n_context)
            # saved in the space this prompt computes the chunk in; a chunk that continues pages of the
            # other space is not saved (its first blocks, reused here, would be missing from that chain)
            mine = in_context or alone
            found.append((c, mine, stored if ids is mine or not stored else len(mine)))
            reuse = min(stored * bs, len(tokens) - 1 - c.start)  # the last prompt token is always computed
            if reuse > 0 and c.start >= num_computed_tokens:
                loads.append(ChunkLoad(ids[:-(-reuse // bs)], c.start, reuse, c.start, ids is alone))
        if loads and num_computed_tokens + external >= max(x.start + x.tokens for x in loads):
            log.debug("req %s: the prefix hit (%d tokens) covers every stored chunk: not blended",
                      request.request_id, num_computed_tokens + external)
            loads = []
        computed = num_computed_tokens if loads else num_computed_tokens + external
        saves = []
        for c, ids, stored in found:  # blocks not stored yet are computed (never reused) here
            first = max(stored, -(-(computed - c.start) // bs))
            if first < len(ids):
                saves.append(ChunkSave(ids[first:], c.start + first * bs, c.start + len(ids) * bs, c.start))
        if not chunks:
            log.debug("req %s: no chunks (separator %s absent, or every chunk under %d tokens)",
                      request.request_id, self.blend.separator, self.blend.min_chunk_tokens)
        # blended KV is approximate from the first reused token on: no exact prefix pages past that block,
        # in ucm or in vLLM's prefix cache
        limit = min(x.start for x in loads) // bs if loads else None
        self._plans[request.request_id] = Plan(loads, saves, limit)
        if not loads:
            return external, None
        keep_out_of_prefix_cache(request, limit)
        log.debug("req %s: %d chunks, %d stored in part or whole (%d tokens)", request.request_id, len(chunks),
                  len(loads), sum(x.tokens for x in loads))
        return 0, limit  # vLLM computes the prompt; the worker blends the stored chunks into it

    def step(self, req_id: str, computed: int, after: int, block_ids: list[int]) -> BlendRequestMeta | None:
        """The loads and saves of the tokens [computed, after) one step computes, in `block_ids`."""
        plan = self._plans.get(req_id)
        if plan is None:
            return None
        rm = BlendRequestMeta(req_id, list(block_ids))
        # each prefill step blends the reused tokens it computes (chunked prefill: several steps)
        rm.loads = [p for p in (x.within(computed, after, self.block_size) for x in plan.loads) if p]
        rm.saves = [dataclasses.replace(s, part=(max(s.start, computed), min(s.end, after)), final=s.end <= after)
                    for s in plan.saves if computed < s.end and s.start < after]
        plan.saves = [s for s in plan.saves if s.end > after]
        return rm if rm.loads or rm.saves else None

    def finished(self, req_id: str) -> None:
        self._plans.pop(req_id, None)
