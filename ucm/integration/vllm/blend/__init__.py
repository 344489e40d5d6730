"""Blending (CacheBlend) as a component of the connector: a planner on the scheduler side (plan.py),
a worker part around the forward pass (worker.py), the forward pass's state that the vLLM patches
consult (step.py), and the attention backend adapters (attention.py). `BlendComponent` decides once, per
engine, whether blending can run at all: vLLM's CPU build, or a CUDA GPU in eager mode with
FlashAttention (the worker checks the backend where it registers the KV cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ucm.config import BlendConfig, UCMConfig
from ucm.integration.vllm.blend.plan import BlendPlanner
from ucm.integration.vllm.blend.worker import BlendWorker
from ucm.integration.vllm.identity import BlockIdentity
from ucm.kernels.rope import RopeSpec, RopeUnsupported
from ucm.logger import get_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from ucm.integration.vllm.connector.worker import WorkerSide
    from ucm.tiers import TieredStore

log = get_logger("Blend")


class BlendComponent:
    """The blend configuration, the chunk id space and the RoPE of one engine; why blending cannot run."""

    def __init__(self, config: UCMConfig, identity: BlockIdentity, vllm_config: "VllmConfig", scheduler: bool):
        self.blend = config.blend or BlendConfig()
        # chunk pages: ids from the root seed, in spaces of their own (computed alone / in a prompt's context)
        self.chunk_identity = identity.with_extra("blend")
        self.context_identity = identity.with_extra("blend-in-context")
        self.rope: RopeSpec | None = None
        self.why_not = ""
        try:
            self.rope = RopeSpec.from_hf_config(vllm_config.model_config.hf_config)
        except (RopeUnsupported, TypeError, AttributeError) as e:
            self.why_not = f"RoPE cannot be re-rotated ({e})"
        from vllm.platforms import current_platform

        from ucm.integration.vllm.patch.apply_patch import patch_report

        if not self.why_not:
            self.why_not = _platform_why_not(current_platform, vllm_config)
        report = patch_report()
        for name in ("attention", "decoder_layer"):
            state = report.get(name, "missing")
            if state != "APPLIED" and not state.startswith("PENDING"):
                self.why_not = self.why_not or f"patch {name} is {state}"
        if self.why_not:
            log.warning("blending disabled, prefix caching only: %s", self.why_not)
        self._compilation = vllm_config.compilation_config  # its static_forward_context: the attention layers
        b = self.blend
        log.info("blend connector (%s): separator %s, recompute %.0f%%, check layer %d, chunks >= %d tokens",
                 "scheduler" if scheduler else "worker", b.separator, 100 * b.recompute_ratio, b.check_layer,
                 b.min_chunk_tokens)

    def planner(self, store: Callable[[], "TieredStore"]) -> BlendPlanner:
        return BlendPlanner(self.blend, self.chunk_identity, self.context_identity, store, self.why_not)

    def worker(self, worker: "WorkerSide") -> BlendWorker:
        return BlendWorker(self.blend, self.rope, worker, self.why_not,
                           lambda: getattr(self._compilation, "static_forward_context", None) or {})


def _platform_why_not(platform, vllm_config: "VllmConfig") -> str:
    """Why this platform and engine configuration cannot blend ("" if they can). Both sides ask, from the
    configuration alone: the scheduler never sees the attention backend, and without this it would plan
    blends that the worker then declines (those requests would lose their prefix hits too). The worker
    checks the backend itself when it registers the KV cache (blend/worker.py)."""
    if platform.is_cpu():
        return ""
    if not platform.is_cuda():
        return f"blending runs on vLLM's CPU backend and on CUDA GPUs (platform: {platform.device_type})"
    if not vllm_config.model_config.enforce_eager:
        # a compiled model bakes the decoder layers' Python into its graphs and replays CUDA graphs: the
        # patched layers could not run a step on the selected tokens only
        return "blending on a GPU needs enforce_eager=True (vLLM compiles the model and captures CUDA graphs)"
    return ""
