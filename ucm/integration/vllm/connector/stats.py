"""The connector's counters, as vLLM's KV connector stats: aggregated across workers, logged by vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

STAT_KEYS = ("hit_tokens", "host_hit_blocks", "ssd_hit_blocks", "remote_hit_blocks", "loaded_blocks", "load_errors",
             "load_bytes", "load_seconds", "saved_blocks", "save_bytes", "save_seconds", "save_failures",
             "saves_dropped", "blend_reused_tokens", "blend_recomputed_tokens")
# levels, not counts: the latest value wins (the tiers are shared, so ranks see the same store)
GAUGE_KEYS = ("host_used_bytes", "host_capacity_bytes", "ssd_used_bytes", "ssd_capacity_bytes")


@dataclass
class UCMConnectorStats(KVConnectorStats):
    """Counters since the last report; vLLM aggregates them across workers and logs `reduce()`."""

    def __post_init__(self):
        for k in STAT_KEYS:
            self.data.setdefault(k, 0)

    def reset(self):
        self.data = {k: 0 for k in STAT_KEYS}

    def add(self, **counts: float) -> None:
        for k, v in counts.items():
            self.data[k] = self.data.get(k, 0) + v

    def aggregate(self, other: KVConnectorStats) -> "UCMConnectorStats":
        for k, v in other.data.items():
            self.data[k] = max(self.data.get(k, 0), v) if k in GAUGE_KEYS else self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        gbps = lambda b, s: round(b / s / 1e9, 3) if s else 0.0  # noqa: E731
        return {"ucm_hit_tokens": d["hit_tokens"], "ucm_host_hit_blocks": d["host_hit_blocks"],
                "ucm_ssd_hit_blocks": d["ssd_hit_blocks"], "ucm_remote_hit_blocks": d.get("remote_hit_blocks", 0),
                "ucm_loaded_blocks": d["loaded_blocks"],
                "ucm_load_errors": d["load_errors"], "ucm_load_GBps": gbps(d["load_bytes"], d["load_seconds"]),
                "ucm_saved_blocks": d["saved_blocks"], "ucm_save_GBps": gbps(d["save_bytes"], d["save_seconds"]),
                "ucm_save_failures": d["save_failures"], "ucm_saves_dropped": d.get("saves_dropped", 0),
                "ucm_blend_reused_tokens": d.get("blend_reused_tokens", 0),
                "ucm_blend_recomputed_tokens": d.get("blend_recomputed_tokens", 0),
                **{f"ucm_{k}": d[k] for k in GAUGE_KEYS if k in d}}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in STAT_KEYS + GAUGE_KEYS)
