"""The vLLM versions ucm supports and what differs between them: the one place that knows.

| vLLM | where it runs here | per-tier hit sources | `has_sync_kv_loads` | sleep-mode hooks | patches |
|------|--------------------|----------------------|---------------------|------------------|---------|
| 0.26 | GPU (H200, tests/gpu) | no: hits count as external, one number | no: loads start before the forward pass anyway | no | v0_26: blending's two (0.32's functions) |
| 0.32 | CPU (CI), GPU build untested | yes (`vllm.v1.metrics.cache_hit_source`) | yes | no | v0_32 |
| 0.33 | source read from its wheel (needs torch 2.14) | yes | yes | yes: ucm declines sleep mode | v0_33 (= v0_32) |

* Per-tier hit sources: 0.32 added `get_external_cache_hit_sources` and the `CacheHitSource` enum, so
  vLLM's `prompt_tokens_cached_by_source{source=host|disk}` split external hits by tier. On 0.26 the
  connector answers nothing of it; ucm's own stats and journal still split hits by tier.
* `SchedulerOutput.has_sync_kv_loads`: 0.32 starts a step's loads after the forward pass unless it is set
  (BlendConnector sets it); 0.26 always calls `start_load_kv` before it.
* Recompute after a sync load error (every listed version): vLLM truncates the request's computed tokens
  after the step, but with async scheduling the next step was already scheduled on the token sampled over
  the missing KV, and the V2 GPU model runner keeps its device copy of the computed tokens (vLLM issues
  #45138, #49250; measured on 0.26: wrong tokens). `load_error_recovery` names the cause from the
  engine's config, and the connector then loads asynchronously (vLLM recomputes a failed block before the
  request ever runs).
* Sleep mode (0.33): vLLM may free and remap the KV cache; ucm's layout holds the registered addresses and
  the host tier's CUDA registration, so `supports_sleep_mode` is False and vLLM refuses sleep mode with
  the connector instead of remapping under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucm.integration.vllm.patch.apply_patch import vllm_version


@dataclass(frozen=True)
class VllmFeatures:
    minor: str  # e.g. "0.32"
    tested: str  # where this version is tested
    hit_sources: bool  # vllm.v1.metrics.cache_hit_source and get_external_cache_hit_sources
    sync_load_flag: bool  # SchedulerOutput.has_sync_kv_loads
    sleep_mode_hooks: bool  # KVConnectorBase_V1.supports_sleep_mode, unregister/restore_kv_caches


SUPPORTED = {
    "0.26": VllmFeatures("0.26", "GPU build on the GPU machine (tests/gpu)", False, False, False),
    "0.32": VllmFeatures("0.32", "CPU build in CI", True, True, False),
    "0.33": VllmFeatures("0.33", "connector API read from its source (needs torch 2.14)", True, True, True),
}
RANGE = ">=0.26,<0.34"


def minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def features(version: str | None = None) -> VllmFeatures | None:
    """What the installed (or given) vLLM version has; None when ucm does not support it."""
    return SUPPORTED.get(minor(version or vllm_version()))


def missing(version: str | None = None) -> list[str]:
    """Sentences naming what this vLLM version lacks that ucm would use (empty: nothing)."""
    f = features(version)
    if f is None:
        return [f"vLLM {version or vllm_version()} is not a supported version ({', '.join(SUPPORTED)})"]
    out = []
    if not f.hit_sources:
        out.append("per-tier hit sources: vLLM counts ucm's hits as external, not as host or disk "
                   "(ucm stats and the connector's stats still split them)")
    return out


def hit_sources() -> dict[str, object] | None:
    """ucm tier -> vLLM's CacheHitSource, where vLLM has them; None otherwise."""
    f = features()
    if f is None or not f.hit_sources:
        return None
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    return {"host": CacheHitSource.HOST, "ssd": CacheHitSource.DISK, "remote": CacheHitSource.EXTERNAL_UNSPECIFIED}


def load_error_recovery(vllm_config) -> str | None:
    """Why vLLM would not recompute a request correctly after a load error reported at the end of the
    step that used the blocks (a sync load), or None where it does (the CPU build: no async scheduling,
    the V1 runner's state). Decided from the engine's config, once, by the connector's scheduler side."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return "async scheduling is on"
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and getattr(vllm_config, "use_v2_model_runner", False):
        return "the V2 model runner keeps its device copy of the computed tokens"
    return None
