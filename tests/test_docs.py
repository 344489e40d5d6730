"""Every python and bash block of the debugging guides runs against the real vLLM CPU build."""

import os
import subprocess
import sys

import pytest

from docs_runner import blocks

pytestmark = pytest.mark.vllm
HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
GUIDES = ["debugging.md", "debugging.zh.md"]


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_blocks_run(guide, tmp_path):
    path = os.path.join(DOCS, guide)
    kinds = [lang for lang, _ in blocks(path)]
    assert kinds.count("python") >= 8 and kinds.count("bash") >= 3, f"{guide}: {kinds}"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    env.pop("UCM_DISABLE_PATCHES", None)
    p = subprocess.run([sys.executable, os.path.join(HERE, "docs_runner.py"), path], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "DOCS-OK" in p.stdout, f"{guide}:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"


def test_serving_guide_runs(tmp_path):
    """docs/serving.md's bash block, as written: a server, a prompt, a restart, the SSD hit on /metrics."""
    from serving import free_port
    from ucm.tools.model_export import ensure_model
    from vllm_harness import omp_core

    path = os.path.join(DOCS, "serving.md")
    assert [lang for lang, _ in blocks(path)].count("bash") == 1
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               UCM_DOCS_MODEL=ensure_model(), PORT=str(free_port()), VLLM_CPU_OMP_THREADS_BIND=omp_core(),
               VLLM_LOGGING_LEVEL="WARNING")
    env.pop("UCM_CONFIG_FILE", None)
    p = subprocess.run([sys.executable, os.path.join(HERE, "docs_runner.py"), path], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "DOCS-OK" in p.stdout, out[-6000:]
    assert 'tier="ssd"' in out and "from SSD" in out, out[-6000:]


def test_both_guides_have_the_same_code():
    """The Chinese guide runs the same snippets as the English one (prose differs, code does not)."""
    en, zh = (blocks(os.path.join(DOCS, g)) for g in GUIDES)
    assert [(l, c) for l, c in en if l in ("python", "bash")] == [(l, c) for l, c in zh if l in ("python", "bash")]
