"""`ucm doctor` names the cause of misses that were planted on purpose (real vLLM objects and runs)."""

import os
import subprocess
import sys

import pytest
import torch

from vllm_harness import BLOCK, prompt_tokens, run_vllm, ucm_connector
from ucm.config import from_dict
from ucm.integration.vllm.debug import debug_connector, debug_request
from ucm.integration.vllm.doctor import diagnose, report
from ucm.integration.vllm.model_export import ensure_model
from ucm.integration.vllm.ucm_connector import RequestMeta, UCMConnectorMetadata

pytestmark = pytest.mark.vllm
A = prompt_tokens(300, 1000)  # 9 full blocks of 32


def _cfg(root) -> dict:
    return {"host": {"capacity": "64MiB", "path": os.path.join(root, "host")},
            "ssd": {"path": os.path.join(root, "ssd"), "capacity": "256MiB"}}


def _save(root, tokens, salt=None, block_size=BLOCK):
    """Save a prompt's full blocks through a real worker connector, as a cold vLLM run would."""
    sched = debug_connector(ensure_model(), "scheduler", _cfg(root), block_size=block_size)
    worker = debug_connector(ensure_model(), "worker", _cfg(root), block_size=block_size)
    req = debug_request("cold", tokens, cache_salt=salt)
    sched.get_num_new_matched_tokens(req, 0)  # the journal records the lookup (and the chain's seed)
    ids = sched.request_hasher.generate_block_hashes(tokens, salt=salt)
    for t in worker.kv_caches.values():
        t[:len(ids)].copy_(torch.randn_like(t[:len(ids)]))
    worker.bind_connector_metadata(UCMConnectorMetadata(requests=[
        RequestMeta("cold", dump_block_ids=(ids, list(range(len(ids)))))]))
    worker.wait_for_save()
    worker.clear_connector_metadata()
    worker.store.flush()
    worker.shutdown()
    return ids


def _diag(root, tokens, **kw):
    d = diagnose(from_dict(_cfg(root), source="test"), tokens, **kw)
    return d, report(d)


def test_store_empty(tmp_path):
    d, text = _diag(tmp_path, A)
    assert any(r.startswith("store empty") for r in d.reasons), text


def test_all_stored_and_the_grid(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A)
    root, where = d.best()
    assert where == ["host"] * 9, text
    assert "H H H H H H H H H" in text
    assert d.reasons == [f"all 9 full blocks are stored: the next request with this prompt loads {9 * BLOCK} tokens "
                         "from ucm"], text


def test_prompt_shorter_than_a_block(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A[:20])
    assert any(r.startswith("prompt shorter than a block: 20 tokens < block_size 32") for r in d.reasons), text


def test_different_root_seed_names_the_field(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A, block_size=16, dtype="bfloat16")
    assert any("different root seed" in r and "block_size: store has 32, you run 16" in r for r in d.reasons), text
    d, text = _diag(tmp_path, A, dtype="float16")
    assert any("dtype: store has bfloat16/auto, you run float16" in r for r in d.reasons), text
    d, text = _diag(tmp_path, A, model=ensure_model(), dtype="bfloat16", block_size=32)
    assert not any("different root seed" in r for r in d.reasons), text


def test_cache_salt(tmp_path):
    _save(tmp_path, A, salt="tenant-a")
    d, text = _diag(tmp_path, A)
    assert any(r.startswith("cache_salt: 1 of the 1 recorded requests used a cache_salt") for r in d.reasons), text
    d, text = _diag(tmp_path, A, salt="tenant-a")
    assert d.best()[1] == ["host"] * 9, text


def test_prompt_diverges(tmp_path):
    _save(tmp_path, A)
    other = A[:100] + prompt_tokens(200, 5000)  # block 3 (tokens 96..127) differs
    d, text = _diag(tmp_path, other)
    assert any(r.startswith("prompt diverges: blocks 0..2 are stored, block 3 is not") for r in d.reasons), text


def test_vllms_own_prefix_cache_took_the_hit(tmp_path):
    """A real vLLM with its prefix cache on serves the repeat itself; the journal shows it."""
    r = run_vllm([[A], [A]], connector=ucm_connector(str(tmp_path), module_path=True), prefix_caching=True)
    assert r["phase_metrics"][1].get("vllm:prompt_tokens_by_source{source=local_cache_hit}") == 9 * BLOCK
    conn = ucm_connector(str(tmp_path))["extra"]
    d = diagnose(from_dict(conn, source="test"), A)
    assert any(x.startswith("vLLM's own prefix cache took the hit: the last lookup of this prompt found 9 blocks")
               for x in d.reasons), report(d)


def test_patches_disabled_is_named_and_cli_runs(tmp_path):
    _save(tmp_path, A)
    cfg = tmp_path / "ucm.yaml"
    cfg.write_text(f"host: {{capacity: 64MiB, path: {tmp_path}/host}}\nssd: {{path: {tmp_path}/ssd, capacity: 256MiB}}\n")
    p = subprocess.run([sys.executable, "-m", "ucm.cli", "--config", str(cfg), "doctor", "--tokens",
                        ",".join(map(str, A[:100]))], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, UCM_DISABLE_PATCHES="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "=== UCM Doctor ===" in p.stdout and "host 3, ssd 0, remote 0, missing 0" in p.stdout, p.stdout
    assert "- patches disabled (UCM_DISABLE_PATCHES=1): on vLLM 0.32 this does not cause misses" in p.stdout
