"""The connector's scheduler side (one per engine): what to load and what to save, per request and step.

* `get_num_new_matched_tokens`: hashes the request's full blocks, looks them up beyond what vLLM's own
  prefix cache has (every TP rank's shard must be stored), and answers how many tokens ucm can load.
  Side-effect free, as vLLM requires (it may ask again for the same request): nothing is counted or
  journaled here.
* `update_state_after_alloc`: vLLM accepted (some of) those tokens: the load is fixed, counted and
  written to the journal.
* `build_connector_meta`: per step, the blocks to load (once) and the blocks that became full and are
  not stored yet, to save. When a request's computed tokens go back (vLLM recomputes after a load error,
  or resumes a preempted request), saving resumes from there, so a block whose stored copy failed to
  load is stored again by the request that recomputed it: the cache heals.
* Loads are synchronous (in the step that computes the request) or asynchronous (`load_async`: vLLM keeps
  the request in WAITING_FOR_REMOTE_KVS until the worker reports the load done; the next step's metadata
  carries it, and a failed block is recomputed before the request runs). A blended request loads no
  prefix: its chunks are blended in the steps that compute it.
* The load planner (planner.py, `transfer.load_planner`) loads only the leading hits that make the first
  token come sooner than recomputing them, from the tier bandwidths and the forward-pass time the
  worker measures (`step_tokens` in each step's metadata); what it skipped is journaled and counted per tier.
  A request whose load measures an unknown slow tier (its plan's `probe`) holds that tier for itself
  from `update_state_after_alloc` to `request_finished`.
* A blend planner (BlendConnector) may replace a prefix load by a blend and limits the exact-prefix saves.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from ucm.config import UCMConfig
from ucm.integration.vllm.connector.metadata import Lookup, RequestMeta, RequestState, UCMConnectorMetadata
from ucm.integration.vllm.connector.planner import ASYNC_DELAY_S, LoadPlanner
from ucm.integration.vllm.identity import BlockIdentity, request_salt
from ucm.integration.vllm.connector.store_access import StoreAccess
from ucm.logger import get_logger
from ucm.tiers import TieredStore

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = get_logger("Connector")


class SchedulerSide:
    def __init__(self, config: UCMConfig, identity: BlockIdentity, page_size: int, blend=None,
                 load_async: bool = False, loads: bool = True, saves: bool = True, overlap: str = "none",
                 step_tokens: int | None = None):
        """`blend`: a blend.plan.BlendPlanner (BlendConnector), or None; `load_async`: see the module;
        `loads`/`saves`: vLLM's kv_role (kv_consumer: loads only, kv_producer: saves only, kv_both);
        `overlap`: how loads overlap the forward pass (planner.OVERLAPS); `step_tokens`: the most tokens
        vLLM computes in a step (max_num_batched_tokens; the planner prices a longer prompt by its chunks)."""
        self.config, self.identity, self.page_size = config, identity, page_size
        self.load_async, self.loads, self.saves = load_async, loads, saves
        self._async_loads: list[str] = []  # requests allocated for an async load, not sent to the worker yet
        self.block_size = identity.seed.block_size
        self.blend = blend
        self._access = StoreAccess(config, page_size, identity.seed, "scheduler")
        self.reqs: dict[str, RequestState] = {}
        self.lookups = {"requests": 0, "blocks": 0, "ucm_hit_blocks": 0, "vllm_hit_blocks": 0, "loaded_tokens": 0,
                        "skipped_blocks": {}}  # tier -> hit blocks the planner did not load
        self.overlap, self.step_tokens = overlap, step_tokens
        self._planner: LoadPlanner | None = None

    def _planning(self) -> LoadPlanner:
        """The load planner (created with the store; the worker measures what it works from)."""
        if self._planner is None:
            self._planner = LoadPlanner(self._access.rates, self.page_size, self.block_size, self.overlap,
                                        self.config.transfer.load_planner, step_tokens=self.step_tokens,
                                        async_delay_s=ASYNC_DELAY_S if self.load_async else 0.0)
        return self._planner

    @property
    def store(self) -> TieredStore:
        return self._access.store

    @property
    def journal(self):
        return self._access.journal

    # ---- lookup -----------------------------------------------------------------------------------
    def _state(self, request: "Request") -> RequestState:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = RequestState(request)
        return st

    def _ids(self, st: RequestState, n_blocks: int) -> list[bytes]:
        st.ids = self.identity.extend(st.request, st.ids, n_blocks)
        return st.ids[:n_blocks]

    def hit_blocks(self, ids: list[bytes]) -> int:
        """Leading blocks stored for every rank that holds a shard of them."""
        return min(self.store.lookup_prefix(self.identity.for_rank(ids, r)) for r in self.identity.ranks())

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        t0 = time.perf_counter()
        st = self._state(request)
        bs, n_tokens = self.block_size, request.num_tokens
        ids = self._ids(st, n_tokens // bs)
        hits = self.hit_blocks(ids) if self.loads else 0
        hit_tokens = min(hits * bs, n_tokens - 1)  # vLLM must compute the last token itself
        first = num_computed_tokens // bs
        plan, tiers = None, []
        if hit_tokens > num_computed_tokens:
            # local tiers only: a hit that is in neither is the remote tier's (lookup_prefix asked it)
            where = self.store.where(self.identity.for_rank(ids[first:-(-hit_tokens // bs)], 0), remote=False)
            tiers = ["remote" if w == "none" else w for w in where]
            plan = self._planning().decide(tiers, n_tokens - num_computed_tokens, request.request_id)
            hit_tokens = min(hit_tokens, (first + plan.load_blocks) * bs)
        external = max(0, hit_tokens - num_computed_tokens)
        st.lookup = Lookup(len(ids), hits, num_computed_tokens // bs,
                           (first, -(-hit_tokens // bs)) if external else None, hit_tokens // bs - first, plan)
        st.save_limit = None
        if self.blend is not None:
            external, st.save_limit = self.blend.plan(request, num_computed_tokens, external)
            if not external:
                st.lookup.load_range = None
        st.load_async = bool(external) and self.load_async
        if log.isEnabledFor(logging.DEBUG):  # the tier summary costs a pass over the hit: not on every lookup
            log.debug("req %s: %d tokens, %d full blocks, %d in ucm (%s), %d computed by vLLM -> load %d tokens%s "
                      "(lookup %.2f ms)", request.request_id, n_tokens, len(ids), hits,
                      ", ".join(f"{n} {t}" for t, n in Counter(tiers).items()) or "none past vLLM's",
                      num_computed_tokens, external, " async" if st.load_async else "",
                      1e3 * (time.perf_counter() - t0))
        return external, st.load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(blocks.get_block_ids()[0])
        lk = st.lookup
        self._record(request, st, num_external_tokens)
        if num_external_tokens == 0 or lk.load_range is None:
            return
        a, b = lk.load_range
        st.load = (st.ids[a:b], st.block_ids[a:b])
        st.load_whole_blocks = lk.whole_blocks
        if lk.plan.probe:  # this load measures a slow tier: requests arriving meanwhile do not load from it
            self._planning().probe_started(lk.plan.probe, request.request_id)
        loaded = lk.plan.loaded_by_tier()  # the tiers the lookup found, for the blocks it loads
        bs = self.block_size
        host = min(loaded.get("host", 0) * bs, num_external_tokens)
        ssd = min(loaded.get("ssd", 0) * bs, num_external_tokens - host)
        st.load_sources = {"host": host, "ssd": ssd, "remote": num_external_tokens - host - ssd}
        st.saved_upto = max(st.saved_upto, b)
        lk.load_range = None
        if st.load_async:
            self._async_loads.append(request.request_id)
            # vLLM counts the loaded tokens as computed; it truncates them if the load fails, and the
            # first step then computes from below this, which resumes saving there (the cache heals)
            st.computed_upto = lk.vllm_hits * bs + num_external_tokens

    def _record(self, request: "Request", st: RequestState, loaded: int) -> None:
        """Counters and a journal line for a lookup vLLM acted on."""
        lk, c = st.lookup, self.lookups
        c["requests"] += 1
        c["blocks"] += lk.blocks
        c["ucm_hit_blocks"] += lk.ucm_hits
        c["vllm_hit_blocks"] += lk.vllm_hits
        c["loaded_tokens"] += loaded
        extra = {}
        if lk.plan is not None and lk.plan.skipped_blocks:
            for tier, n in lk.plan.skipped_by_tier().items():
                c["skipped_blocks"][tier] = c["skipped_blocks"].get(tier, 0) + n
            ms = lambda s: None if s is None else round(1e3 * s, 2)  # noqa: E731
            extra["plan"] = {"load_blocks": lk.plan.load_blocks, "hit_blocks": lk.plan.hit_blocks,
                             "reason": lk.plan.reason, "load_ms": ms(lk.plan.load_s), "ttft_ms": ms(lk.plan.ttft_s),
                             "recompute_ms": ms(lk.plan.recompute_s), "why": lk.plan.sentence()}
            log.info("req %s: %s", request.request_id, lk.plan.sentence())
        self.journal.lookup({"t": round(time.time(), 3), "req": request.request_id, "tokens": request.num_tokens,
                             "blocks": lk.blocks, "first": st.ids[0].hex() if st.ids else "",
                             "seed": self.identity.hasher.root().hex()[:16],
                             "salted": request_salt(request) is not None, "ucm": lk.ucm_hits, "vllm": lk.vllm_hits,
                             "load_tokens": loaded, **extra})
        self.journal.counters({"lookups": c})

    def load_sources(self, request_id: str) -> dict[str, int]:
        """Tokens of the request's external hit per tier: 'host', 'ssd', 'remote'."""
        st = self.reqs.get(request_id)
        return dict(st.load_sources) if st is not None else {}

    # ---- steps ------------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> UCMConnectorMetadata:
        meta = UCMConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()),
                                    step_tokens=scheduler_output.total_num_scheduled_tokens)
        for req_id in self._async_loads:
            st = self.reqs.get(req_id)
            if st is not None and st.load is not None:
                meta.requests.append(RequestMeta(req_id, load_block_ids=st.load, load_async=True))
                st.load = None
        self._async_loads = []
        sched = scheduler_output.num_scheduled_tokens
        steps: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                steps.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_ids is not None:
                st.block_ids = list(new_ids[0])  # a resumed request gets its whole block list again
            elif new_ids is not None:
                st.block_ids += new_ids[0]
            steps.append((req_id, cached.num_computed_tokens[i]))
        new_full: list[tuple[RequestState, RequestMeta, list[bytes], int]] = []  # blocks that became full
        for req_id, computed in steps:
            st = self.reqs[req_id]
            after = computed + sched.get(req_id, 0)
            rm = RequestMeta(req_id)
            log.debug("step: req %s computes tokens [%d, %d)", req_id, computed, after)
            if computed < st.computed_upto:  # recomputing (a load error, or resumed): save from there
                st.saved_upto = min(st.saved_upto, computed // self.block_size)
            st.computed_upto = after
            if st.load is not None:
                rm.load_block_ids, st.load = st.load, None
                rm.load_whole_blocks = st.load_whole_blocks
            full = min(after, st.request.num_tokens) // self.block_size if self.saves else 0
            full = min(full, len(st.block_ids), len(st.block_ids) if st.save_limit is None else st.save_limit)
            if full > st.saved_upto:
                new_full.append((st, rm, self._ids(st, full)[st.saved_upto:full], st.saved_upto))
                st.saved_upto = full
            meta.requests.append(rm)
            if self.blend is not None:
                brm = self.blend.step(req_id, computed, after, st.block_ids)
                if brm is not None:
                    meta.blend.append(brm)
                    scheduler_output.has_sync_kv_loads = True  # blending is armed before the forward pass
        if new_full:  # one lookup for the whole step: which of the new full blocks are not stored yet
            present = iter(self.store.lookup(self.identity.for_rank([i for _, _, ids, _ in new_full for i in ids], 0),
                                             remote=False))
            for st, rm, ids, first in new_full:
                todo = [k for k in range(len(ids)) if not next(present)]
                if todo:
                    rm.dump_block_ids = ([ids[k] for k in todo], [st.block_ids[first + k] for k in todo])
                    st.dumps_scheduled = True
        meta.requests = [rm for rm in meta.requests if rm.load_block_ids[0] or rm.dump_block_ids[0]]
        for req_id in meta.preempted:
            st = self.reqs.get(req_id)
            if st is not None:
                st.block_ids = []
        return meta

    def request_finished(self, request: "Request") -> bool:
        """True if the request's blocks must wait for saves in flight (the worker reports them done)."""
        st = self.reqs.pop(request.request_id, None)
        log.debug("req %s finished", request.request_id)
        if self._planner is not None:
            self._planner.request_done(request.request_id)
        if self.blend is not None:
            self.blend.finished(request.request_id)
        return st is not None and st.dumps_scheduled

    def shutdown(self) -> None:
        if self._access.opened:
            self.journal.counters({"lookups": self.lookups}, force=True)
            self._access.rates.write()
            self._access.close_journal()
            self.store.flush(timeout=60)
