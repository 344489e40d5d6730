"""The supported vLLM range, decided in one place (ucm/integration/vllm/versions.py)."""

import os
import tomllib

from ucm.integration.vllm import versions
from ucm.integration.vllm.patch.apply_patch import patches_for, supported_versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_supported_version_has_a_patch_set_and_features():
    assert sorted(versions.SUPPORTED) == supported_versions() == ["0.26", "0.32", "0.33"]
    for v in versions.SUPPORTED:
        assert patches_for(f"{v}.0") is not None
    assert patches_for("0.33.0") == patches_for("0.32.0"), "0.33 keeps 0.32's patch points"
    needed = {p.name for p in patches_for("0.26.0") if p.module is not None}
    assert needed == {"attention", "decoder_layer"}, "on 0.26 (GPU only) blending's patches alone"
    assert versions.features("0.31.0") is None and patches_for("0.31.0") is None


def test_what_each_version_lacks_is_named():
    assert versions.missing("0.32.0") == [] and versions.missing("0.33.1") == []
    (why,) = versions.missing("0.26.0")
    assert why.startswith("per-tier hit sources")
    assert versions.missing("0.25.0")[0].startswith("vLLM 0.25.0 is not a supported version")


def test_the_installed_cpu_build_has_per_tier_hit_sources():
    f = versions.features()
    assert f is not None and f.minor == "0.32" and f.hit_sources
    assert set(versions.hit_sources()) == {"host", "ssd", "remote"}


def test_pyproject_states_the_range():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert meta["project"]["optional-dependencies"]["vllm"] == [f"vllm{versions.RANGE}"]


def test_sync_load_recovery_is_trusted_only_without_async_scheduling_on_the_cpu_build():
    """load_error_recovery names why vLLM would not recompute correctly after a sync load error; the
    connector then loads asynchronously (transfer.load_mode: auto)."""
    from types import SimpleNamespace as NS

    from ucm.integration.vllm.ucm_connector import _load_mode

    asynchronous = NS(scheduler_config=NS(async_scheduling=True), use_v2_model_runner=False)
    synchronous = NS(scheduler_config=NS(async_scheduling=False), use_v2_model_runner=True)  # CPU build: V2 ok
    assert versions.load_error_recovery(asynchronous) == "async scheduling is on"
    assert versions.load_error_recovery(synchronous) is None
    assert _load_mode("auto", asynchronous)[0] is True and _load_mode("auto", synchronous)[0] is False
    assert _load_mode("sync", asynchronous) == (False, "transfer.load_mode: sync")
    assert _load_mode("async", synchronous) == (True, "transfer.load_mode: async")
