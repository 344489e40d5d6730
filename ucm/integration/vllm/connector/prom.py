"""ucm's counters in vLLM's Prometheus registry (`/metrics` of `vllm serve`, `LLM.get_metrics()`).

vLLM hands each step's connector stats (stats.py, summed over the workers) to `observe`; every series is
a counter, so rates come from Prometheus (`rate(vllm:ucm_loaded_bytes_total[1m]) /
rate(vllm:ucm_load_seconds_total[1m])` is the load bandwidth). Names are stable (docs/debugging.md):

  vllm:ucm_loaded_tokens      tokens loaded from ucm (vLLM's external hits that ucm served)
  vllm:ucm_hit_blocks{tier}   blocks loaded, by the tier they came from: host, ssd, remote
  vllm:ucm_loaded_bytes, vllm:ucm_load_seconds     bytes loaded and the time the loads took
  vllm:ucm_saved_blocks, vllm:ucm_saved_bytes, vllm:ucm_save_seconds
  vllm:ucm_load_errors        blocks that failed to load (vLLM recomputed them)
  vllm:ucm_save_failures      blocks that could not be saved
  vllm:ucm_saves_dropped      blocks not saved because their step's loads failed
  vllm:ucm_blend_reused_tokens, vllm:ucm_blend_recomputed_tokens    BlendConnector
  vllm:ucm_tier_used_bytes{tier}, vllm:ucm_tier_capacity_bytes{tier}   gauges: host, ssd occupancy (all
                              processes on the store), as of this server's last report (about once a second)
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

# metric name -> (stat key, documentation)
COUNTERS = {
    "vllm:ucm_loaded_tokens": ("hit_tokens", "Tokens loaded from the ucm KV cache"),
    "vllm:ucm_loaded_bytes": ("load_bytes", "Bytes of KV blocks loaded from ucm"),
    "vllm:ucm_load_seconds": ("load_seconds", "Seconds spent loading KV blocks from ucm"),
    "vllm:ucm_saved_blocks": ("saved_blocks", "KV blocks saved to ucm"),
    "vllm:ucm_saved_bytes": ("save_bytes", "Bytes of KV blocks saved to ucm"),
    "vllm:ucm_save_seconds": ("save_seconds", "Seconds spent saving KV blocks to ucm"),
    "vllm:ucm_load_errors": ("load_errors", "KV blocks that failed to load from ucm (vLLM recomputed them)"),
    "vllm:ucm_save_failures": ("save_failures", "KV blocks ucm could not save"),
    "vllm:ucm_saves_dropped": ("saves_dropped", "KV blocks not saved because their step's loads failed"),
    "vllm:ucm_blend_reused_tokens": ("blend_reused_tokens", "Tokens whose KV BlendConnector reused"),
    "vllm:ucm_blend_recomputed_tokens": ("blend_recomputed_tokens", "Reused tokens BlendConnector recomputed"),
}
TIERS = {"host": "host_hit_blocks", "ssd": "ssd_hit_blocks", "remote": "remote_hit_blocks"}
OCCUPANCY = {"vllm:ucm_tier_used_bytes": ("used_bytes", "Bytes of KV blocks held by a ucm tier (every process)"),
             "vllm:ucm_tier_capacity_bytes": ("capacity_bytes", "Capacity of a ucm tier in bytes")}


class UCMPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, (key, doc) in COUNTERS.items():
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            self._counters[key] = {e: metric.labels(*v) for e, v in per_engine_labelvalues.items()}
        hits = self._counter_cls(name="vllm:ucm_hit_blocks", documentation="KV blocks loaded from ucm, by tier",
                                 labelnames=[*labelnames, "tier"])
        self._hits = {tier: {e: hits.labels(*v, tier) for e, v in per_engine_labelvalues.items()} for tier in TIERS}
        self._levels: dict[str, dict[int, Any]] = {}  # stat key (e.g. host_used_bytes) -> per engine gauge
        for name, (suffix, doc) in OCCUPANCY.items():
            gauge = self._gauge_cls(name=name, documentation=doc, multiprocess_mode="mostrecent",
                                    labelnames=[*labelnames, "tier"])
            for tier in ("host", "ssd"):
                self._levels[f"{tier}_{suffix}"] = {e: gauge.labels(*v, tier) for e, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Add one step's connector stats (stats.UCMConnectorStats.data) to the counters."""
        for key, per_engine in self._counters.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                per_engine[engine_idx].inc(value)
        for tier, key in TIERS.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                self._hits[tier][engine_idx].inc(value)
        for key, per_engine in self._levels.items():
            if key in transfer_stats_data:
                per_engine[engine_idx].set(transfer_stats_data[key])
