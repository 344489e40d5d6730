"""The connector's worker side (one per rank): loads before and during the forward pass, saves after it.

`register_kv_caches` is where the KV cache's device becomes known, so every CPU/GPU choice is made there,
once: the transfer engine, whether the host tier is registered with CUDA, how saves run (saves.py) and
which loads go layer by layer (layers.py).

Loads, layer by layer while the forward pass runs (`wait_for_layer_load` waits for a layer's group):
on a GPU, every hit is copied from host pages one layer at a time on a stream of its own (SSD hits are
first read into host memory), the forward pass waiting on the device; on a CPU, SSD hits holding only
cached tokens are read from the SSD layer group by layer group into the KV cache. Every other hit is
copied whole before the forward pass. A block that fails to load is reported to vLLM
(`get_block_ids_with_load_errors`), which recomputes from there; the request's saves of that step are dropped (its new KV attended to the
missing blocks), and the scheduler side saves the recomputed blocks again.

Async loads (`RequestMeta.load_async`: the request is not in the step) run whole on a load thread (a CUDA
stream of their own on a GPU) while steps go on; `get_finished` reports each one once it is done and
verified, with its failed blocks among the load errors of that same step, so vLLM recomputes them
before the request runs.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ucm.config import UCMConfig
from ucm.integration.vllm.connector.layers import HostLayers, LayerPlan, layer_plan
from ucm.integration.vllm.connector.metadata import RequestMeta, UCMConnectorMetadata
from ucm.integration.vllm.connector.planner import ClockMarks, CudaMarks, ForwardTimer, StepTimes
from ucm.integration.vllm.connector.saves import Saves
from ucm.integration.vllm.connector.stats import GAUGE_KEYS, STAT_KEYS, UCMConnectorStats
from ucm.integration.vllm.connector.steptrace import StepTrace, trace_enabled
from ucm.integration.vllm.identity import BlockIdentity
from ucm.integration.vllm.connector.store_access import StoreAccess
from ucm.kernels.layout import KVLayout
from ucm.kernels.transfer import HostTransfer
from ucm.logger import get_logger
from ucm.tiers import TieredStore
from ucm.tiers.ranged import DIRECT_ALIGN, RangedLoad

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = get_logger("Connector")
log_load = get_logger("Load")
log_save = get_logger("Save")


@dataclass
class LoadResult:
    """One whole load: blocks asked, failures (vLLM block id -> why), the tier each hit came from."""

    blocks: int
    errors: dict[int, str] = field(default_factory=dict)
    host: int = 0
    ssd: int = 0
    remote: int = 0
    seconds: float = 0.0
    split: tuple[float, int, float, float] | None = None  # a whole load's pin s, host copies, copy s, verify s

    def where_time_went(self) -> str:
        """For the debug log: how a whole load's time split."""
        if self.split is None:
            return "no split"
        pin, copies, copy, verify = self.split
        return (f"pin {1e3 * pin:.1f} ms, {copies} host copies and wait {1e3 * copy:.1f} ms, "
                f"verify {1e3 * verify:.1f} ms")


@dataclass
class AsyncLoad:
    """A request's async load on the load thread (its LoadResult), and how many steps found it running."""

    future: Future
    polls: int = 0


class WorkerSide:
    def __init__(self, config: UCMConfig, identity: BlockIdentity, page_size: int, kv_cache_config: "KVCacheConfig",
                 rank: int, layerwise: bool = True, saves: bool = True):
        """`layerwise`: SSD hits may be read layer by layer (BlendConnector: no, its later layers skip
        vLLM's per-layer connector calls). `saves`: this worker saves (kv_role is not kv_consumer)."""
        self.config, self.identity, self.page_size, self.rank = config, identity, page_size, rank
        self.block_size = identity.seed.block_size
        self._saves = saves and identity.saves_on(rank)
        self._kv_cache_config = kv_cache_config
        self._layerwise = layerwise and config.transfer.layerwise_load
        self._access = StoreAccess(config, page_size, identity.seed, f"worker{rank}")
        self.stats = UCMConnectorStats()
        self._totals = {k: 0 for k in STAT_KEYS}  # since start (self.stats: since the last report)
        self.layout: KVLayout | None = None
        self.xfer: HostTransfer | None = None
        self.saves: Saves | None = None
        self.request_metas: dict[str, RequestMeta] = {}  # last step's metadata of each request (debugging)
        self._load_errors: set[int] = set()  # vLLM block ids, until vLLM asks
        self._step_loads: dict[str, set[int]] = {}  # this step: request -> vLLM blocks it loads
        self._step_failed: set[int] = set()  # this step's failed vLLM blocks
        self._layer_plan: LayerPlan | None = None
        self._gpu_layers = False  # _layer_plan copies host pages to a GPU (else: reads SSD pages on a CPU)
        self._layer_stream = None  # a GPU's stream for layer-wise copies
        # this step's layer-wise load: (RangedLoad or HostLayers, vLLM blocks, start, (host, ssd, remote) hits
        # counted when it started, or None: all from the SSD)
        self._layered: tuple[RangedLoad | HostLayers, list[int], float, tuple[int, int, int] | None] | None = None
        self._layers_waited: set[int] = set()
        self._layer_pool = ThreadPoolExecutor(2 * config.io_threads, thread_name_prefix="ucm-layers")
        self._async: dict[str, AsyncLoad] = {}  # request -> its async load, until reported
        self._async_pool = ThreadPoolExecutor(1, thread_name_prefix="ucm-load")
        self._load_stream = None  # a GPU's stream for async loads (register_kv_caches)
        self._idle_step = False  # this step computes no token (no forward pass: vLLM only polls the connector)
        self._forward_timer: ForwardTimer | None = None  # times forward passes for the load planner
        self._trace: StepTrace | None = None  # UNIFIED_CACHE_STEP_TRACE: a timeline of the steps (steptrace.py)
        self._occupancy_at = float("-inf")  # when take_stats last read the tiers' occupancy

    @property
    def store(self) -> TieredStore:
        return self._access.store

    @property
    def journal(self):
        return self._access.journal

    def set_rank(self, rank: int) -> None:
        """The TP rank this worker serves (set before the first save or load)."""
        self.rank = rank
        self._access.role = f"worker{rank}"

    # ---- registration: the CPU/GPU decisions ------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        kcc = self._kv_cache_config
        stride = kcc.kv_cache_tensors[0].block_stride if kcc.kv_cache_tensors else None
        self.layout = KVLayout.from_tensors(kv_caches, kcc.num_blocks, block_stride_bytes=stride)
        if self.layout.page_size != self.page_size:
            raise ValueError(f"ucm: registered KV tensors give {self.layout.page_size} B per block, the KV cache "
                             f"config {self.page_size} B ({self.layout.describe()})")
        gpu = self.layout.device.type == "cuda"
        tc = self.config.transfer
        self.xfer = HostTransfer(self.layout, tc.gpu_mode, tc.direct_programs)
        self.saves = Saves(gpu)
        if tc.load_planner:  # the load planner's step time: with the planner off, no one needs it
            self._forward_timer = ForwardTimer(StepTimes(self._access.rates), CudaMarks() if gpu else ClockMarks())
        self._trace = StepTrace(gpu) if trace_enabled() else None
        self._load_stream = torch.cuda.Stream() if gpu else None
        self._layer_stream = torch.cuda.Stream() if gpu else None
        host = self.store.host
        if gpu:
            if not host.slots.on_tmpfs:
                log.warning("host tier %s is not on tmpfs, which CUDA cannot pin; put host.path on tmpfs (e.g. "
                            "/dev/shm) for direct GPU transfers (staged copies are used instead)", host.dir)
            elif self.xfer.register_host(host.slots.tensor):
                host.on_close(self.xfer.unregister_host)
            else:
                log.warning("cudaHostRegister of the host tier failed; GPU copies will be slower")
        if self._saves:
            self.store.start_writer()  # a helper process starts while vLLM profiles and warms up
        self._layer_plan, self._gpu_layers = None, gpu
        if self._layerwise and (gpu or self.store.ssd is not None):
            self._layer_plan = layer_plan(self.layout, tc.layer_read_bytes)
        how = "hits load whole, before the forward pass"
        if self._layer_plan and gpu:
            how = f"hits load layer by layer from host memory ({len(self._layer_plan.groups)} groups) when synchronous"
        elif self._layer_plan:
            aligned = all(s.addr % DIRECT_ALIGN == 0 and s.block_stride % DIRECT_ALIGN == 0 for s in self.layout.segments)
            how = (f"SSD hits load layer by layer in {len(self._layer_plan.groups)} groups, "
                   f"{'straight into the KV cache' if aligned else 'through a bounce buffer (KV cache not 4 KiB aligned)'}")
        log.info("worker rank %d: %s; store %s; %s", self.rank, self.layout.describe(), self.store.storage_path, how)

    # ---- loads ------------------------------------------------------------------------------------
    def forward_begins(self, meta: UCMConnectorMetadata) -> None:
        """vLLM bound this step's metadata: its forward pass, if it computes any token, comes next (timed for
        the load planner)."""
        self._idle_step = meta.step_tokens == 0
        if self._trace is not None:
            loads = sum(bool(r.load_block_ids[0]) for r in meta.requests)
            self._trace.begin(meta.step_tokens, len(meta.requests), loads)
        if self._forward_timer is not None:
            self._forward_timer.begin(meta.step_tokens)

    def untimed_forward(self) -> None:
        """This step's forward pass says nothing of the engine's prefill time: not timed."""
        if self._forward_timer is not None:
            self._forward_timer.exclude()

    def start_load_kv(self, meta: UCMConnectorMetadata) -> None:
        """Load this step's hits (see the module docstring). A forward pass that waits for a synchronous
        load is not timed for the planner."""
        if self._start_loads(meta):
            self.untimed_forward()
        if self._trace is not None:
            self._trace.mark("start_load_kv returned")

    def _start_loads(self, meta: UCMConnectorMetadata) -> bool:
        """Do or start this step's synchronous loads and submit its async ones; True if there was a
        synchronous load."""
        self.request_metas.update((rm.req_id, rm) for rm in meta.requests)
        self._step_loads, self._step_failed = {}, set()
        ids: list[bytes] = []
        vids: list[int] = []
        whole: list[bool] = []
        for rm in meta.requests:
            n = len(rm.load_block_ids[0])
            if n and rm.load_async:
                store_ids = self.identity.for_rank(rm.load_block_ids[0], self.rank)
                job = self._async_pool.submit(self._load_async, store_ids, list(rm.load_block_ids[1]))
                self._async[rm.req_id] = AsyncLoad(job)
                continue
            if n:
                self._step_loads[rm.req_id] = set(rm.load_block_ids[1])
            ids += rm.load_block_ids[0]
            vids += rm.load_block_ids[1]
            whole += [k < rm.load_whole_blocks for k in range(n)]
        if not ids:
            return False
        t0 = time.perf_counter()
        store_ids = self.identity.for_rank(ids, self.rank)
        if self._layer_plan is not None and self._gpu_layers:
            self._start_host_layers(store_ids, vids, t0)
            return True
        layered: list[int] = []
        if self._layer_plan is not None:
            where = self.store.where(store_ids, remote=False)
            layered = [k for k, w in enumerate(where) if w == "ssd" and whole[k]]
        if layered:
            plan = self._layer_plan
            lids, lvids = [store_ids[k] for k in layered], [vids[k] for k in layered]
            try:
                load = self.store.load_layers(lids, plan.groups, lambda i, r: plan.address(lvids[i], r),
                                              self._layer_pool)
                self._layered = (load, lvids, t0, None)
            except Exception as e:  # noqa: BLE001 - fall back to whole loads, never fail the step
                log_load.error("layer-wise load could not start (%s: %s); loading whole", type(e).__name__, e)
                layered = []
        if layered:
            skip = set(layered)
            rest = [k for k in range(len(ids)) if k not in skip]
            store_ids, vids = [store_ids[k] for k in rest], [vids[k] for k in rest]
        if store_ids:
            self._load_whole(store_ids, vids, t0)
        return True

    def _start_host_layers(self, store_ids: list[bytes], vids: list[int], t0: float) -> None:
        """Start copying a step's hits into vLLM blocks `vids` layer by layer on the layer stream (after
        reading SSD hits into host memory); `finish_layered` verifies them after the forward pass."""
        st = self.store.stats
        before = (st.host_hits, st.ssd_hits, st.remote_hits)
        task = self.store.prepare_load(store_ids)
        batches = [([vids[i] for i in which], pages, slots) for pages, slots, which in task.ready()]
        hits = (st.host_hits - before[0], st.ssd_hits - before[1], st.remote_hits - before[2])
        if self._trace is not None:
            self._trace.mark(f"{len(vids)} blocks found in {len(batches)} page batches")
        stream = self._layer_stream  # None on a CPU (tests): the copies are done on return
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # the blocks' previous users are done with them
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                copies = self.xfer.from_host_groups(batches, self._layer_plan.spans)
        except Exception as e:  # noqa: BLE001 - a failed copy is recomputed by vLLM, never a crash
            if stream is not None:
                stream.synchronize()
            log_load.error("layer-wise copy of %d blocks failed (%s: %s); they are recomputed and loads are "
                           "whole from now on", len(vids), type(e).__name__, e)
            self._layer_plan = None
            for i in range(len(vids)):
                task.fail(i, f"layer-wise copy failed: {type(e).__name__}: {e}")
            self.store.wait(task)
            self._count_load(LoadResult(len(vids), {vids[i]: why for i, why in task.errors.items()},
                                        seconds=time.perf_counter() - t0))
            return
        self._layered = (HostLayers(self.store, task, copies, self._layer_plan), vids, t0, hits)
        if self._trace is not None:
            self._trace.mark(f"{len(self._layer_plan.spans)} layer groups' copies enqueued")

    def _copy_in(self, store_ids: list[bytes], vids: list[int]) -> LoadResult:
        """Load blocks whole into vLLM blocks `vids` (on the current stream, synchronized) and verify them."""
        t0 = time.perf_counter()
        st = self.store.stats
        before = (st.host_hits, st.ssd_hits, st.remote_hits)  # loads run one at a time: the deltas are ours
        copies = self.xfer.host_copies
        task = self.store.prepare_load(store_ids)
        t1 = time.perf_counter()
        self.xfer.restore(task, vids)
        t2 = time.perf_counter()
        self.store.wait(task)
        t3 = time.perf_counter()
        return LoadResult(len(store_ids), {vids[i]: why for i, why in task.errors.items()}, st.host_hits - before[0],
                          st.ssd_hits - before[1], st.remote_hits - before[2], t3 - t0,
                          (t1 - t0, self.xfer.host_copies - copies, t2 - t1, t3 - t2))

    def _load_whole(self, store_ids: list[bytes], vids: list[int], t0: float) -> None:
        r = self._copy_in(store_ids, vids)
        r.seconds = time.perf_counter() - t0
        self._count_load(r)
        ok = r.blocks - len(r.errors)
        log_load.debug("loaded %d blocks (%d MiB) before the forward pass in %.1f ms (%s)", ok,
                       ok * self.page_size >> 20, 1e3 * (time.perf_counter() - t0), r.where_time_went())

    def _load_async(self, store_ids: list[bytes], vids: list[int]) -> LoadResult:
        """An async load on the load thread; never raises (a failure fails its blocks)."""
        t0 = time.perf_counter()
        try:
            with torch.cuda.stream(self._load_stream) if self._load_stream else contextlib.nullcontext():
                return self._copy_in(store_ids, vids)
        except Exception as e:  # noqa: BLE001 - a failed load is recomputed by vLLM, never a crash
            log_load.error("async load of %d blocks failed: %s: %s", len(vids), type(e).__name__, e)
            return LoadResult(len(vids), {v: f"{type(e).__name__}: {e}" for v in vids},
                              seconds=time.perf_counter() - t0)

    IDLE_WAIT_S = 0.02

    def _finished_loads(self) -> set[str]:
        """Requests whose async loads are done; their failed blocks join this step's load errors.
        In a step that computes no token (nothing could run) it first waits up to IDLE_WAIT_S for one
        to finish: the engine would otherwise spin through empty steps, holding the GIL the load
        thread needs, and notice a finished load a step later. Whether a step is idle comes from its
        metadata (`step_tokens`), not from which connector calls vLLM makes: 0.32 calls `wait_for_save`
        in idle steps too, 0.26 does not."""
        if self._async and self._idle_step:
            wait([a.future for a in self._async.values()], timeout=self.IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = set()
        for req_id, a in self._async.items():
            if a.future.done():
                done.add(req_id)
            else:
                a.polls += 1
        for req_id in done:
            a = self._async.pop(req_id)
            r = a.future.result()
            self._count_load(r, in_step=False)
            ok = r.blocks - len(r.errors)
            log_load.debug("req %s: async load of %d blocks (%d MiB) done in %.1f ms (%s; %d steps polled it "
                           "running)", req_id, ok, ok * self.page_size >> 20, 1e3 * r.seconds, r.where_time_went(),
                           a.polls)
        return done

    def _count_load(self, r: LoadResult, in_step: bool = True, whole: bool = True) -> None:
        """Stats and load errors of a load. `in_step`: its blocks were used by this step's forward pass
        (their requests' saves of the step are dropped). `whole`: it loaded before (not during) the
        forward pass, so its time measures the bandwidth of the tier that served it, for the planner."""
        n, errors = r.blocks, r.errors
        tiers = [t for t, k in (("host", r.host), ("ssd", r.ssd), ("remote", r.remote)) if k]
        if whole and not errors and len(tiers) == 1:
            self._access.rates.record_load(tiers[0], n * self.page_size, r.seconds)
        self.stats.add(host_hit_blocks=r.host, ssd_hit_blocks=r.ssd, remote_hit_blocks=r.remote)
        if errors:
            self._load_errors |= set(errors)
            if in_step:
                self._step_failed |= set(errors)
            first = min(errors)
            log_load.warning("%d of %d blocks failed to load (vLLM recomputes them); first: vLLM block %d: %s",
                             len(errors), n, first, errors[first])
        ok = n - len(errors)
        self.stats.add(loaded_blocks=ok, load_errors=len(errors), hit_tokens=ok * self.block_size,
                       load_bytes=ok * self.page_size, load_seconds=r.seconds)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layered is None:
            return
        load = self._layered[0]
        g = self._layer_plan.group_of.get(layer_name)
        for gg in range(len(load.groups)) if g is None else (g,):  # an unknown layer waits for everything
            load.wait_group(gg)
            self._layers_waited.add(gg)

    def finish_layered(self) -> None:
        """Wait for the layer-wise reads and verify them; failed blocks become load errors."""
        if self._layered is None:
            return
        load, lvids, t0, hits = self._layered
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
        failed = {lvids[i]: why for i, why in errors.items()}
        host, ssd, remote = hits if hits is not None else (0, len(lvids) - len(errors), 0)
        self._count_load(LoadResult(len(lvids), failed, host, ssd, remote, time.perf_counter() - t0), whole=False)
        log_load.debug("loaded %d blocks (%d MiB) layer by layer, finished %.1f ms after the step began",
                       len(lvids) - len(errors), (len(lvids) - len(errors)) * self.page_size >> 20,
                       1e3 * (time.perf_counter() - t0))

    def get_block_ids_with_load_errors(self) -> set[int]:
        self.finish_layered()
        bad, self._load_errors = self._load_errors, set()
        return bad

    # ---- saves ------------------------------------------------------------------------------------
    def wait_for_save(self, meta: UCMConnectorMetadata) -> None:
        """Hand this step's newly full blocks to the saver (saves.py), all requests in one save: one
        reservation, one copy and one commit per step, not per request (every save costs Python time on
        the GIL the engine's kernel launches need). A request whose loads failed in this step saves
        nothing of it: its new KV attended to blocks that were not there."""
        if self._forward_timer is not None:
            self._forward_timer.end()
        if self._trace is not None:
            self._trace.launched()
        self.finish_layered()
        jobs: list[tuple[str, list[bytes], list[int]]] = []
        for rm in meta.requests:
            ids, vids = rm.dump_block_ids
            if not ids:
                continue
            if self._step_failed & self._step_loads.get(rm.req_id, set()):
                log_save.info("req %s: %d blocks not saved: the step's loads failed and vLLM recomputes it",
                              rm.req_id, len(ids))
                self.stats.add(saves_dropped=len(ids))
                continue
            jobs.append((rm.req_id, list(ids), list(vids)))
        if jobs and self.saves is not None:
            event = self.saves.step_event()
            self.saves.submit([r for r, _, _ in jobs], lambda stream, j=jobs: self._save(j), event)

    def _save(self, jobs: list[tuple[str, list[bytes], list[int]]]) -> None:
        """Copy the step's new blocks ((request, ids, vLLM blocks) each) into the host tier and commit
        them; never raises."""
        n = sum(len(ids) for _, ids, _ in jobs)
        try:
            t0 = time.perf_counter()
            if not self.identity.saves_on(self.rank):
                return
            store_ids = self.identity.for_rank([i for _, ids, _ in jobs for i in ids], self.rank)
            vids = [v for _, _, vs in jobs for v in vs]
            task = self.store.prepare_dump(store_ids)
            self.xfer.save(task, vids)
            self.store.commit(store_ids, [i not in task.errors for i in range(len(store_ids))])
            ok = len(store_ids) - len(task.errors)
            self.stats.add(saved_blocks=ok, save_failures=len(task.errors), save_bytes=ok * self.page_size,
                           save_seconds=time.perf_counter() - t0)
            log_save.debug("saved %d blocks of %d requests in %.1f ms", ok, len(jobs), 1e3 * (time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - a failed save is a future miss, never a crash
            log_save.error("save of %d blocks of %d requests (first %s) failed: %s: %s", n, len(jobs), jobs[0][0],
                           type(e).__name__, e)
            self.stats.add(save_failures=n)

    def handle_preemptions(self, meta: UCMConnectorMetadata) -> None:
        if meta.preempted and self.saves is not None:
            self.saves.fence(meta.preempted)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests whose saves are all done, requests whose async loads are done)."""
        for r in finished_req_ids:
            self.request_metas.pop(r, None)  # every finished request, with or without saves
        saved = self.saves.finished(finished_req_ids) if self.saves is not None else set()
        loaded = self._finished_loads()
        if self._trace is not None:
            self._trace.end(loaded)
        return saved, loaded

    # ---- stats and shutdown -----------------------------------------------------------------------
    OCCUPANCY_EVERY_S = 1.0

    def take_stats(self) -> UCMConnectorStats | None:
        """This worker's counters since the last call, with the tiers' occupancy at most once a second
        (None when there is nothing to report)."""
        now = time.monotonic()
        if now - self._occupancy_at >= self.OCCUPANCY_EVERY_S and self._access.opened:
            self._occupancy_at = now
            for tier, u in self.store.usage(remote=False).items():
                self.stats.data[f"{tier}_used_bytes"] = u["bytes"]
                self.stats.data[f"{tier}_capacity_bytes"] = u["capacity"]
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, UCMConnectorStats()
        self._add_to_totals(out)
        self._write_counters()
        return out

    def _add_to_totals(self, stats: UCMConnectorStats) -> None:
        for k, v in stats.data.items():
            self._totals[k] = v if k in GAUGE_KEYS else self._totals.get(k, 0) + v

    def _write_counters(self, force: bool = False) -> None:
        st = self.store.stats
        store = {k: v for k, v in vars(st).items() if k != "recent_errors"}
        errors = [{"time": t, "op": op, "why": why} for t, op, why in list(st.recent_errors)]
        rec = {"connector": self._totals, "store": store, "recent_errors": errors}
        if self.store.remote is not None:
            rec["remote"] = {**vars(self.store.remote.stats), "up": self.store.remote.up,
                             "server": self.store.remote.where}
        self.journal.counters(rec, force)

    def shutdown(self) -> None:
        self._async_pool.shutdown(wait=True)
        if self.saves is not None:
            self.saves.close()
        if self._access.opened:
            self.store.flush(timeout=60)
            self._add_to_totals(self.stats)
            self.stats.reset()
            self._write_counters(force=True)
            self._access.rates.write()
            self._access.close_journal()
