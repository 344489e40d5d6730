"""UCMDirectConnector: vLLM's KV connector V1 on the tiered store (configured as "UCMConnector").

A thin front, as vLLM's OffloadingConnector is: the scheduler role delegates to a `SchedulerSide`
(connector/scheduler.py: lookups, loads to make, blocks to save), the worker role to a `WorkerSide`
(connector/worker.py: loads before and during the forward pass, saves after it). Block identity (root
seed, TP shards, salts) is identity.py's. `BlendConnector` (blend_connector.py) is the same front with a
blend component on each side.

Configuration (kv_connector_extra_config): {"UCM_CONFIG_FILE": path}, or the YAML keys inline, or
nothing (the embedded default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ucm.integration.vllm.connector.config import CONFIG_FILE_KEY, connector_config
from ucm.integration.vllm.connector.metadata import RequestMeta, RequestState, UCMConnectorMetadata
from ucm.integration.vllm.connector.scheduler import SchedulerSide
from ucm.integration.vllm.connector.stats import UCMConnectorStats
from ucm.integration.vllm.connector.worker import WorkerSide
from ucm.integration.vllm import versions
from ucm.integration.vllm.identity import BlockIdentity, page_size_of
from ucm.logger import get_logger
from ucm.tiers import TieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["CONFIG_FILE_KEY", "RequestMeta", "RequestState", "UCMConnector", "UCMConnectorMetadata",
           "UCMConnectorStats", "UCMDirectConnector"]
log = get_logger("Connector")
_HIT_SOURCES = versions.hit_sources()  # None where vLLM has no per-tier hit sources (versions.py)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError):
        return 0


def _load_mode(mode: str, vllm_config: "VllmConfig") -> tuple[bool, str]:
    """(loads are asynchronous, why) for transfer.load_mode."""
    if mode != "auto":
        return mode == "async", f"transfer.load_mode: {mode}"
    unsafe = versions.load_error_recovery(vllm_config)
    if unsafe:
        return True, f"{unsafe}: vLLM would not recompute correctly after a load error in the step"
    return False, "vLLM recomputes correctly after a load error in the step"


def _overlap(config, load_async: bool, layerwise: bool) -> str:
    """How a request's loads overlap its forward pass, for the load planner (planner.OVERLAPS): the
    worker loads layer by layer only when synchronous, on a GPU every hit, on a CPU the SSD hits."""
    if load_async or not layerwise or not config.transfer.layerwise_load:
        return "none"
    from vllm.platforms import current_platform

    return "ssd" if current_platform.is_cpu() else "all"


class UCMDirectConnector(KVConnectorBase_V1):
    _with_blend = False  # BlendConnector: a blend component on each side

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.config = connector_config(ktc.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.page_size = page_size_of(kv_cache_config)
        self.identity = BlockIdentity.from_vllm(vllm_config, kv_cache_config)
        self.request_hasher = self.identity.hasher
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self.blend_worker = None
        blend = None
        if self._with_blend:
            from ucm.integration.vllm.blend import BlendComponent

            blend = BlendComponent(self.config, self.identity, vllm_config, role == KVConnectorRole.SCHEDULER)
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy == "fail":
                ktc.kv_load_failure_policy = "recompute"  # a cache failure must cost a recompute, never a request
            load_async, why = _load_mode(self.config.transfer.load_mode, vllm_config)
            self.scheduler = SchedulerSide(self.config, self.identity, self.page_size,
                                           blend.planner(lambda: self.scheduler.store) if blend else None,
                                           load_async=load_async, loads=ktc.is_kv_consumer, saves=ktc.is_kv_producer,
                                           overlap=_overlap(self.config, load_async, blend is None),
                                           step_tokens=vllm_config.scheduler_config.max_num_batched_tokens)
            log.info("scheduler connector: block %d tokens, page %d B, config %s, kv_role %s; loads %s (%s)",
                     self.block_size, self.page_size, self.config.source, ktc.kv_role,
                     "asynchronous" if load_async else "synchronous", why)
        else:
            self.rank = _tp_rank()
            self.worker = WorkerSide(self.config, self.identity, self.page_size, kv_cache_config, self.rank,
                                     layerwise=blend is None, saves=ktc.is_kv_producer)
            self.blend_worker = blend.worker(self.worker) if blend else None

    @property
    def store(self) -> TieredStore:
        return (self.scheduler or self.worker).store

    # ---- scheduler side ---------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int) -> dict:
        """vLLM 0.32+: the external hit's tokens per tier (host, disk; remote as unspecified)."""
        sources = self.scheduler.load_sources(request.request_id) if num_external_tokens else {}
        if not sources:
            return {_HIT_SOURCES["host"]: num_external_tokens} if num_external_tokens else {}
        return {_HIT_SOURCES[k]: v for k, v in sources.items() if v}

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        """vLLM 0.33: no. The worker holds the KV cache's addresses and the host tier's CUDA registration;
        a remap under sleep mode would leave them stale."""
        return False

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.scheduler.request_finished(request), None

    # ---- worker side ------------------------------------------------------------------------------
    @property
    def kv_layout(self):
        return self.worker.layout

    @property
    def _request_metas(self) -> dict[str, RequestMeta]:
        """The last step's RequestMeta of each running request (docs/debugging.md)."""
        return self.worker.request_metas

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker.register_kv_caches(kv_caches)
        if self.blend_worker is not None:
            self.blend_worker.register(kv_caches)

    def _meta(self) -> UCMConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, UCMConnectorMetadata)
        return meta

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, UCMConnectorMetadata):
            self.worker.forward_begins(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._meta()
        self.worker.start_load_kv(meta)
        if self.blend_worker is not None:
            self.blend_worker.start_step(forward_context, meta)
            if meta.blend:
                self.worker.untimed_forward()  # a blended pass computes only part of its tokens

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (all layers) are saved after the forward pass, in wait_for_save

    def wait_for_save(self):
        meta = self._meta()
        if self.blend_worker is not None:
            self.blend_worker.end_step(meta)
        self.worker.wait_for_save(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        if isinstance(kv_connector_metadata, UCMConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.blend_worker is not None:
            self.blend_worker.finished(finished_req_ids)
        saved, loaded = self.worker.get_finished(finished_req_ids)
        return saved or None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> UCMConnectorStats | None:
        return self.worker.take_stats() if self.worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> UCMConnectorStats:
        return UCMConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        """ucm's counters in vLLM's Prometheus registry (connector/prom.py names them)."""
        from ucm.integration.vllm.connector.prom import UCMPromMetrics

        return UCMPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        (self.scheduler or self.worker).shutdown()


class UCMConnector(UCMDirectConnector):
    """The name users configure: kv_connector="UCMConnector"."""
