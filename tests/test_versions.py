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
    assert all(p.module is None for p in patches_for("0.26.0")), "nothing to patch on 0.26 (GPU only)"
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
