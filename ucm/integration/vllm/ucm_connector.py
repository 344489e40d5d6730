"""UCMDirectConnector: vLLM's KV connector V1 on the tiered store (configured as "UCMConnector").

Scheduler side (one per engine): hashes each request's full blocks with `RequestHasher`, looks them up
in the store beyond what vLLM's own prefix cache has, and sends the worker, per step, the blocks to load
and the blocks to save, as (ucm ids, vLLM block ids) pairs: `load_block_ids` and `dump_block_ids`.

Worker side (one per rank): detects the KV layout from the registered tensors; loads in `start_load_kv`,
before the forward pass, except SSD hits on a CPU KV cache, which are read layer group by layer group
while it runs (`wait_for_layer_load`); saves newly full blocks after the forward pass (GPU: on a
background thread and stream; CPU: inline in `wait_for_save`). A request whose saves are in flight keeps its blocks
(`request_finished` returns True until the worker reports it done); a preempted request's saves are
fenced before its blocks can be reused. A block that fails to load is reported through
`get_block_ids_with_load_errors`, and vLLM recomputes from there.

Configuration (kv_connector_extra_config): {"UCM_CONFIG_FILE": path}, or the YAML keys inline, or
nothing (the embedded default).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ucm.config import UCMConfig, from_dict, load_config
from ucm.hashing import HashSeed, RequestHasher
from ucm.integration.vllm.journal import Journal
from ucm.kernels.layout import KVLayout, Segment
from ucm.kernels.transfer import HostTransfer
from ucm.logger import get_logger
from ucm.tiers import TieredStore
from ucm.tiers.ranged import DIRECT_ALIGN, PageRange, RangedLoad
from ucm.tiers.store import background_priority, shared_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = get_logger("Connector")
log_load = get_logger("Load")
log_save = get_logger("Save")
CONFIG_FILE_KEY = "UCM_CONFIG_FILE"


# ---- configuration and identity -----------------------------------------------------------------
def connector_config(extra: dict[str, Any] | None) -> UCMConfig:
    """UCMConfig from kv_connector_extra_config: a file, inline YAML keys, or the embedded default."""
    extra = dict(extra or {})
    path = extra.pop(CONFIG_FILE_KEY, None)
    if path and extra:
        raise ValueError(f"kv_connector_extra_config: give either {CONFIG_FILE_KEY} or inline keys, "
                         f"not both (inline keys: {sorted(extra)})")
    if path:
        return load_config(path)
    if extra:
        return from_dict(extra, source="kv_connector_extra_config")
    return load_config()


def _attention_groups(kv_cache_config: "KVCacheConfig"):
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"ucm supports models with one KV cache group; this model has {len(groups)} "
                         f"({[type(g.kv_cache_spec).__name__ for g in groups]})")
    return groups[0]


def page_size_of(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes of one block across all layers of this rank."""
    g = _attention_groups(kv_cache_config)
    return g.kv_cache_spec.page_size_bytes * len(g.layer_names)


def hash_seed(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> HashSeed:
    """Everything that changes the bytes of a block: model, dtype, layout, block size, TP size."""
    from vllm.platforms import current_platform

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    spec = _attention_groups(kv_cache_config).kv_cache_spec
    dtype = str(spec.dtype).replace("torch.", "")
    layout = (f"{current_platform.device_type}/{type(spec).__name__}/"
              f"{getattr(spec, 'num_kv_heads', 0)}x{getattr(spec, 'head_size', 0)}/"
              f"{len(_attention_groups(kv_cache_config).layer_names)}L")
    return HashSeed(model=f"{mc.model}@{mc.revision or ''}", dtype=f"{dtype}/{cc.cache_dtype}", kv_layout=layout,
                    block_size=cc.block_size, tp_size=pc.tensor_parallel_size, tp_rank=0,
                    extra=f"pp{pc.pipeline_parallel_size}")


def shard_ids(ids: list[bytes], rank: int, tp_size: int, mla: bool) -> list[bytes]:
    """The ids a TP rank stores: the rank enters the id (MLA KV is identical on every rank: rank 0's)."""
    if tp_size == 1 or mla:
        return ids
    tag = b"rank" + rank.to_bytes(4, "little")
    return [xxhash.xxh3_128_digest(i + tag) for i in ids]


def request_salt(request: "Request") -> str | None:
    """Per-request inputs that change KV bytes: tenant salt and LoRA adapter."""
    parts = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt={salt}")
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={lora.lora_name}:{getattr(lora, 'lora_int_id', '')}")
    return "|".join(parts) or None


# ---- layer-wise loading ---------------------------------------------------------------------------
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


# ---- metadata -------------------------------------------------------------------------------------
@dataclass
class RequestMeta:
    """One request's transfers in one step: (ucm block ids, vLLM block ids) pairs."""

    req_id: str
    load_block_ids: tuple[list[bytes], list[int]] = field(default_factory=lambda: ([], []))
    dump_block_ids: tuple[list[bytes], list[int]] = field(default_factory=lambda: ([], []))
    # leading load blocks holding only cached tokens: this step's forward pass writes none of their
    # slots, so they may be filled layer by layer while it runs (a full hit's last block is not)
    load_whole_blocks: int = 0


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    requests: list[RequestMeta] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


@dataclass
class RequestState:
    """Scheduler-side state of one request."""

    request: "Request"
    ids: list[bytes] = field(default_factory=list)  # chain ids of the full blocks hashed so far
    block_ids: list[int] = field(default_factory=list)  # vLLM blocks of the request, in order
    load_range: tuple[int, int] | None = None  # blocks [a, b) to load, decided at lookup
    load: tuple[list[bytes], list[int]] | None = None  # set after allocation, sent once
    load_whole_blocks: int = 0
    load_sources: dict = field(default_factory=dict)
    saved_upto: int = 0  # blocks [0, saved_upto) are stored, loaded, or scheduled for saving
    save_limit: int | None = None  # blocks at and after this are never saved (their KV is not exact)
    dumps_scheduled: bool = False


# ---- stats ----------------------------------------------------------------------------------------
_STAT_KEYS = ("hit_tokens", "host_hit_blocks", "ssd_hit_blocks", "remote_hit_blocks", "loaded_blocks", "load_errors", "load_bytes",
              "load_seconds", "saved_blocks", "save_bytes", "save_seconds", "save_failures",
              "blend_reused_tokens", "blend_recomputed_tokens")


@dataclass
class UCMConnectorStats(KVConnectorStats):
    """Counters since the last report; vLLM aggregates them across workers and logs `reduce()`."""

    def __post_init__(self):
        for k in _STAT_KEYS:
            self.data.setdefault(k, 0)

    def reset(self):
        self.data = {k: 0 for k in _STAT_KEYS}

    def aggregate(self, other: KVConnectorStats) -> "UCMConnectorStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        gbps = lambda b, s: round(b / s / 1e9, 3) if s else 0.0
        return {"ucm_hit_tokens": d["hit_tokens"], "ucm_host_hit_blocks": d["host_hit_blocks"],
                "ucm_ssd_hit_blocks": d["ssd_hit_blocks"], "ucm_remote_hit_blocks": d.get("remote_hit_blocks", 0),
                "ucm_loaded_blocks": d["loaded_blocks"],
                "ucm_load_errors": d["load_errors"], "ucm_load_GBps": gbps(d["load_bytes"], d["load_seconds"]),
                "ucm_saved_blocks": d["saved_blocks"], "ucm_save_GBps": gbps(d["save_bytes"], d["save_seconds"]),
                "ucm_save_failures": d["save_failures"], "ucm_blend_reused_tokens": d.get("blend_reused_tokens", 0),
                "ucm_blend_recomputed_tokens": d.get("blend_recomputed_tokens", 0)}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _STAT_KEYS)


# ---- the connector --------------------------------------------------------------------------------
class UCMDirectConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.config = connector_config(ktc.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.page_size = page_size_of(kv_cache_config)
        pc = vllm_config.parallel_config
        self.tp_size, self.rank = pc.tensor_parallel_size, 0
        spec = _attention_groups(kv_cache_config).kv_cache_spec
        self.mla = "MLA" in type(spec).__name__
        self.request_hasher = RequestHasher(hash_seed(vllm_config, kv_cache_config))
        self._store: TieredStore | None = None
        self._journal: Journal | None = None
        self._stats = UCMConnectorStats()
        self._totals = {k: 0 for k in _STAT_KEYS}  # since start (self._stats: since the last report)
        self._lookups = {"requests": 0, "blocks": 0, "ucm_hit_blocks": 0, "vllm_hit_blocks": 0, "loaded_tokens": 0}
        if role == KVConnectorRole.SCHEDULER:
            self._reqs: dict[str, RequestState] = {}
            if ktc.kv_load_failure_policy == "fail":
                ktc.kv_load_failure_policy = "recompute"  # a cache failure must cost a recompute, never a request
            log.info("scheduler connector: block %d tokens, page %d B, config %s", self.block_size,
                     self.page_size, self.config.source)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            try:
                self.rank = get_tensor_model_parallel_rank()
            except (AssertionError, RuntimeError):
                self.rank = 0
            self.layout: KVLayout | None = None
            self.xfer: HostTransfer | None = None
            self._load_errors: set[int] = set()
            self._saves: queue.Queue = queue.Queue()
            self._pending: dict[str, int] = {}  # req id -> saves not yet finished
            self._had_saves: set[str] = set()
            self._finished: set[str] = set()
            self._cv = threading.Condition()
            self._save_stream = None
            self._saver = threading.Thread(target=self._save_loop, name="ucm-save", daemon=True)
            self._saver.start()
            self._request_metas: dict[str, RequestMeta] = {}  # last step's metadata (debugging)
            self._layer_plan: LayerPlan | None = None
            self._layered: tuple[RangedLoad, list[int], float] | None = None  # this step's layer-wise load
            self._layers_waited: set[int] = set()
            self._layer_pool = ThreadPoolExecutor(2 * self.config.io_threads, thread_name_prefix="ucm-layers")

    # ---- shared -----------------------------------------------------------------------------------
    @property
    def store(self) -> TieredStore:
        if self._store is None:
            self._store = shared_store(self.config, self.page_size)
        return self._store

    @property
    def journal(self) -> Journal:
        """Lookups and counters left next to the store for `ucm doctor` and `ucm stats`."""
        if self._journal is None:
            role = "scheduler" if self.role == KVConnectorRole.SCHEDULER else f"worker{self.rank}"
            self._journal = Journal(self.store.storage_path, role)
            self._journal.seed(self.request_hasher.seed)
        return self._journal

    def _write_counters(self, force: bool = False) -> None:
        if self.role == KVConnectorRole.SCHEDULER:
            self.journal.counters({"lookups": self._lookups}, force)
        else:
            st = self.store.stats
            store = {k: v for k, v in vars(st).items() if k != "recent_errors"}
            errors = [{"time": t, "op": op, "why": why} for t, op, why in list(st.recent_errors)]
            rec = {"connector": self._totals, "store": store, "recent_errors": errors}
            if self.store.remote is not None:
                rec["remote"] = {**vars(self.store.remote.stats), "up": self.store.remote.up,
                                 "server": self.store.remote.where}
            self.journal.counters(rec, force)

    def _ids_for_rank(self, ids: list[bytes], rank: int) -> list[bytes]:
        return shard_ids(ids, rank, self.tp_size, self.mla)

    # ---- scheduler side ---------------------------------------------------------------------------
    def _state(self, request: "Request") -> RequestState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = RequestState(request)
        return st

    def _hash_upto(self, st: RequestState, n_blocks: int) -> list[bytes]:
        """Extend the request's chain ids to its first n_blocks full blocks (incrementally)."""
        have = len(st.ids)
        if n_blocks > have:
            toks = st.request.all_token_ids[have * self.block_size:n_blocks * self.block_size]
            parent = st.ids[-1] if st.ids else None
            st.ids += self.request_hasher.generate_block_hashes(
                toks, self.block_size, salt=request_salt(st.request) if parent is None else None, parent=parent)
        return st.ids[:n_blocks]

    def _hit_blocks(self, ids: list[bytes]) -> int:
        ranks = 1 if self.mla else self.tp_size
        return min(self.store.lookup_prefix(self._ids_for_rank(ids, r)) for r in range(ranks))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        t0 = time.perf_counter()
        st = self._state(request)
        n_tokens = request.num_tokens
        ids = self._hash_upto(st, n_tokens // self.block_size)
        hits = self._hit_blocks(ids)
        hit_tokens = min(hits * self.block_size, n_tokens - 1)  # vLLM must compute the last token itself
        external = max(0, hit_tokens - num_computed_tokens)
        first = num_computed_tokens // self.block_size
        st.load_range = (first, -(-hit_tokens // self.block_size)) if external else None
        st.load_whole_blocks = hit_tokens // self.block_size - first
        log.debug("req %s: %d tokens, %d full blocks, %d in ucm, %d computed by vLLM -> load %d tokens "
                  "(lookup %.2f ms)", request.request_id, n_tokens, len(ids), hits, num_computed_tokens,
                  external, 1e3 * (time.perf_counter() - t0))
        c = self._lookups
        c["requests"] += 1
        c["blocks"] += len(ids)
        c["ucm_hit_blocks"] += hits
        c["vllm_hit_blocks"] += num_computed_tokens // self.block_size
        c["loaded_tokens"] += external
        self.journal.lookup({"t": round(time.time(), 3), "req": request.request_id, "tokens": n_tokens,
                             "blocks": len(ids), "first": ids[0].hex() if ids else "",
                             "seed": self.request_hasher.root().hex()[:16], "salted": request_salt(request) is not None,
                             "ucm": hits, "vllm": num_computed_tokens // self.block_size, "load_tokens": external})
        self._write_counters()
        return external, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens == 0 or st.load_range is None:
            st.load_range = None
            return
        a, b = st.load_range
        st.load = (st.ids[a:b], st.block_ids[a:b])
        where = self.store.where(self._ids_for_rank(st.ids[a:b], 0), remote=False)
        tokens = {w: min(sum(x == w for x in where) * self.block_size, num_external_tokens) for w in ("host", "ssd")}
        tokens["ssd"] = min(tokens["ssd"], num_external_tokens - tokens["host"])
        st.load_sources = {CacheHitSource.HOST: tokens["host"], CacheHitSource.DISK: tokens["ssd"],
                           CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens - tokens["host"] - tokens["ssd"]}
        st.saved_upto = max(st.saved_upto, b)
        st.load_range = None

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int) -> dict:
        st = self._reqs.get(request.request_id)
        if not num_external_tokens or st is None or not st.load_sources:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        return {k: v for k, v in st.load_sources.items() if v}

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = UCMConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        sched = scheduler_output.num_scheduled_tokens
        steps: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                steps.append((new.req_id, new.num_computed_tokens + sched.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_ids is not None:
                st.block_ids = list(new_ids[0])  # a resumed request gets its whole block list again
            elif new_ids is not None:
                st.block_ids += new_ids[0]
            steps.append((req_id, cached.num_computed_tokens[i] + sched.get(req_id, 0)))
        for req_id, computed_after in steps:
            st = self._reqs[req_id]
            rm = RequestMeta(req_id)
            log.debug("step: req %s computes up to token %d (%d scheduled)", req_id, computed_after, sched.get(req_id, 0))
            if st.load is not None:
                rm.load_block_ids, st.load = st.load, None
                rm.load_whole_blocks = st.load_whole_blocks
            full = min(computed_after, st.request.num_tokens) // self.block_size
            full = min(full, len(st.block_ids), len(st.block_ids) if st.save_limit is None else st.save_limit)
            if full > st.saved_upto:
                ids = self._hash_upto(st, full)[st.saved_upto:full]
                present = self.store.lookup(self._ids_for_rank(ids, 0), remote=False)
                todo = [k for k, p in enumerate(present) if not p]
                if todo:
                    rm.dump_block_ids = ([ids[k] for k in todo], [st.block_ids[st.saved_upto + k] for k in todo])
                    st.dumps_scheduled = True
                st.saved_upto = full
            if rm.load_block_ids[0] or rm.dump_block_ids[0]:
                meta.requests.append(rm)
        for req_id in meta.preempted:
            st = self._reqs.get(req_id)
            if st is not None:
                st.block_ids = []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        st = self._reqs.pop(request.request_id, None)
        return (st is not None and st.dumps_scheduled), None

    # ---- worker side ------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        kcc = self._kv_cache_config
        stride = kcc.kv_cache_tensors[0].block_stride if kcc.kv_cache_tensors else None
        self.layout = KVLayout.from_tensors(kv_caches, kcc.num_blocks, block_stride_bytes=stride)
        if self.layout.page_size != self.page_size:
            raise ValueError(f"ucm: registered KV tensors give {self.layout.page_size} B per block, the KV cache "
                             f"config {self.page_size} B ({self.layout.describe()})")
        tc = self.config.transfer
        self.xfer = HostTransfer(self.layout, tc.gpu_mode, tc.direct_programs)
        self._layer_plan = layer_plan(self.layout, tc) if self.store.ssd is not None else None
        how = "whole, before the forward pass"
        if self._layer_plan:
            aligned = all(s.addr % DIRECT_ALIGN == 0 and s.block_stride % DIRECT_ALIGN == 0 for s in self.layout.segments)
            how = (f"layer by layer in {len(self._layer_plan.groups)} groups, "
                   f"{'straight into the KV cache' if aligned else 'through a bounce buffer (KV cache not 4 KiB aligned)'}")
        log.info("worker rank %d: %s; store %s; SSD hits load %s", self.rank, self.layout.describe(),
                 self.store.storage_path, how)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Load this step's hits. Blocks in host memory, and all blocks when layer-wise loading is off,
        are copied before the forward pass; SSD blocks that hold only cached tokens are read layer group
        by layer group straight into the KV cache while it runs (`wait_for_layer_load`)."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, UCMConnectorMetadata)
        self._request_metas.update((rm.req_id, rm) for rm in meta.requests)
        ids: list[bytes] = []
        vids: list[int] = []
        whole: list[bool] = []
        for rm in meta.requests:
            n = len(rm.load_block_ids[0])
            ids += rm.load_block_ids[0]
            vids += rm.load_block_ids[1]
            whole += [k < rm.load_whole_blocks for k in range(n)]
        if not ids:
            return
        t0 = time.perf_counter()
        store_ids = self._ids_for_rank(ids, self.rank)
        layered: list[int] = []
        if self._layer_plan is not None:
            where = self.store.where(store_ids, remote=False)
            layered = [k for k, w in enumerate(where) if w == "ssd" and whole[k]]
        if layered:
            plan = self._layer_plan
            lids, lvids = [store_ids[k] for k in layered], [vids[k] for k in layered]
            try:
                self._layered = (RangedLoad(self.store.ssd, lids, plan.groups, lambda i, r: plan.address(lvids[i], r),
                                            self.page_size, self._layer_pool), lvids, t0)
            except Exception as e:  # noqa: BLE001 - fall back to whole loads, never fail the step
                log_load.error("layer-wise load could not start (%s: %s); loading whole", type(e).__name__, e)
                layered = []
        if layered:
            skip = set(layered)
            rest = [k for k in range(len(ids)) if k not in skip]
            store_ids, vids = [store_ids[k] for k in rest], [vids[k] for k in rest]
        if store_ids:
            self._load_whole(store_ids, vids, t0)

    def _load_whole(self, store_ids: list[bytes], vids: list[int], t0: float) -> None:
        st = self.store.stats
        before = (st.host_hits, st.ssd_hits, st.remote_hits)
        gpu = self.layout.device.type == "cuda"
        fill_s = [0.0]

        def fill(pages, slots, which):
            t = time.perf_counter()
            self.xfer.from_host([vids[i] for i in which], pages, slots)
            fill_s[0] += time.perf_counter() - t
        task = self.store.load_into(store_ids, fill, cuda=gpu)
        failed = self.store.wait(task)
        self._count_load(len(store_ids), {vids[i]: why for i, why in task.errors.items()}, time.perf_counter() - t0)
        s = self._stats.data
        s["host_hit_blocks"] += st.host_hits - before[0]
        s["ssd_hit_blocks"] += st.ssd_hits - before[1]
        s["remote_hit_blocks"] += st.remote_hits - before[2]
        log_load.debug("loaded %d blocks (%d MiB) before the forward pass in %.1f ms (copies into the KV cache "
                       "%.1f ms)", len(store_ids) - failed, (len(store_ids) - failed) * self.page_size >> 20,
                       1e3 * (time.perf_counter() - t0), 1e3 * fill_s[0])

    def _count_load(self, n: int, errors: dict[int, str], seconds: float) -> None:
        """Stats and load errors of n blocks; errors: vLLM block id -> why."""
        if errors:
            self._load_errors |= set(errors)
            first = min(errors)
            log_load.warning("%d of %d blocks failed to load (vLLM recomputes them); first: vLLM block %d: %s",
                             len(errors), n, first, errors[first])
        ok = n - len(errors)
        s = self._stats.data
        s["loaded_blocks"] += ok
        s["load_errors"] += len(errors)
        s["hit_tokens"] += ok * self.block_size
        s["load_bytes"] += ok * self.page_size
        s["load_seconds"] += seconds

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layered is None:
            return
        load = self._layered[0]
        g = self._layer_plan.group_of.get(layer_name)
        for gg in range(len(load.groups)) if g is None else (g,):  # an unknown layer waits for everything
            load.wait_group(gg)
            self._layers_waited.add(gg)

    def _finish_layered(self) -> None:
        """Wait for the layer-wise reads and verify them; failed blocks become load errors."""
        if self._layered is None:
            return
        load, lvids, t0 = self._layered
        self._layered = None
        errors = load.finish()
        unwaited = set(range(len(load.groups))) - self._layers_waited
        self._layers_waited = set()
        if unwaited:  # the forward pass read layers without waiting for them: its output is not to be used
            log_load.warning("vLLM did not call wait_for_layer_load for %d of %d layer groups; the step's %d "
                             "loaded blocks are reported failed (recomputed) and loads are whole from now on",
                             len(unwaited), len(load.groups), len(lvids))
            errors = {i: "layer not awaited by the forward pass" for i in range(len(lvids))}
            self._layer_plan = None
        if errors:
            self.store.stats.recent_errors.append((time.time(), "load", errors[min(errors)]))
        self._count_load(len(lvids), {lvids[i]: why for i, why in errors.items()}, time.perf_counter() - t0)
        self._stats.data["ssd_hit_blocks"] += len(lvids) - len(errors)
        self.store.stats.ssd_hits += len(lvids) - len(errors)
        log_load.debug("read %d blocks (%d MiB) from SSD layer by layer, finished %.1f ms after the step began",
                       len(lvids) - len(errors), (len(lvids) - len(errors)) * self.page_size >> 20,
                       1e3 * (time.perf_counter() - t0))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (all layers) are saved after the forward pass, in wait_for_save

    def wait_for_save(self):
        """Hand this step's newly full blocks to the saver.

        On a GPU the copies run on a background thread and a high-priority stream, after an event that
        marks the end of the forward pass. On a CPU there is no copy engine: a copy thread competes with
        the forward pass's OpenMP threads (a descheduled thread stalls every barrier), so the copy into
        the host tier runs here, between steps, and only the SSD write-through stays in the background.
        """
        self._finish_layered()
        meta = self._get_connector_metadata()
        assert isinstance(meta, UCMConnectorMetadata)
        gpu = self.layout is not None and self.layout.device.type == "cuda"
        event = None
        if gpu:
            event = torch.cuda.Event()
            event.record()  # the save kernels wait for this step's forward pass
        for rm in meta.requests:
            ids, vids = rm.dump_block_ids
            if not ids:
                continue
            with self._cv:
                self._pending[rm.req_id] = self._pending.get(rm.req_id, 0) + 1
                self._had_saves.add(rm.req_id)
            if gpu:
                self._saves.put((rm.req_id, ids, vids, event))
            else:
                self._save(rm.req_id, ids, vids, None)

    def _save_loop(self) -> None:
        background_priority()
        while True:
            item = self._saves.get()
            if item is None:
                return
            self._save(*item)

    def _save(self, req_id: str, ids: list[bytes], vids: list[int], event: "torch.cuda.Event | None") -> None:
        """Copy one request's new blocks into the host tier and commit them; never raises."""
        try:
            t0 = time.perf_counter()
            store_ids = self._ids_for_rank(ids, self.rank)
            if self.mla and self.rank != 0:
                store_ids = []  # MLA: identical KV on every rank; rank 0 saves it
            if store_ids:
                ctx = contextlib.nullcontext()
                if event is not None:
                    if self._save_stream is None:
                        self._save_stream = torch.cuda.Stream(priority=-1)
                    ctx = torch.cuda.stream(self._save_stream)
                with ctx:
                    if event is not None:
                        self._save_stream.wait_event(event)
                    task = self.store.dump_into(store_ids, lambda pages, slots, which: self.xfer.to_host(
                        [vids[i] for i in which], pages, slots), cuda=event is not None)
                    self.store.wait(task)
                self.store.commit(store_ids, [i not in task.errors for i in range(len(store_ids))])
                s = self._stats.data
                s["saved_blocks"] += len(store_ids) - len(task.errors)
                s["save_failures"] += len(task.errors)
                s["save_bytes"] += (len(store_ids) - len(task.errors)) * self.page_size
                s["save_seconds"] += time.perf_counter() - t0
                log_save.debug("req %s: saved %d blocks in %.1f ms", req_id, len(store_ids) - len(task.errors),
                               1e3 * (time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - a failed save is a future miss, never a crash
            log_save.error("req %s: save of %d blocks failed: %s: %s", req_id, len(ids), type(e).__name__, e)
            self._stats.data["save_failures"] += len(ids)
        finally:
            with self._cv:
                self._pending[req_id] -= 1
                self._cv.notify_all()

    def _fence(self, req_ids) -> None:
        """Wait until the saves of these requests finished (their blocks may be reused next)."""
        with self._cv:
            self._cv.wait_for(lambda: all(self._pending.get(r, 0) == 0 for r in req_ids))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        if isinstance(kv_connector_metadata, UCMConnectorMetadata) and kv_connector_metadata.preempted:
            self._fence(kv_connector_metadata.preempted)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for r in finished_req_ids:
            self._request_metas.pop(r, None)  # every finished request, with or without saves
        with self._cv:
            self._finished |= {r for r in finished_req_ids if r in self._had_saves}
            done = {r for r in self._finished if self._pending.get(r, 0) == 0}
            self._finished -= done
            for r in done:
                self._had_saves.discard(r)
                self._pending.pop(r, None)
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_layered()
        bad, self._load_errors = self._load_errors, set()
        return bad

    def get_kv_connector_stats(self) -> UCMConnectorStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, UCMConnectorStats()
        for k, v in out.data.items():
            self._totals[k] = self._totals.get(k, 0) + v
        self._write_counters()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> UCMConnectorStats:
        return UCMConnectorStats(data=dict(data or {}))

    def shutdown(self):
        if self.role == KVConnectorRole.WORKER:
            self._saves.put(None)
            self._saver.join(timeout=60)
        if self._store is not None:
            self._store.flush(timeout=60)
            for k, v in self._stats.data.items():
                self._totals[k] = self._totals.get(k, 0) + v
            self._stats.reset()
            self._write_counters(force=True)
            self.journal.close()


class UCMConnector(UCMDirectConnector):
    """The name users configure: kv_connector="UCMConnector"."""
