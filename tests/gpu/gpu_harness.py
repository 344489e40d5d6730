"""GPU test helpers: a small Llama with seeded random weights of a realistic scale, token prompts, and
run_vllm with the GPU build's arguments (no tokenizer, safetensors weights, block 16)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: vllm_harness

from vllm_harness import assert_identical, run_vllm  # noqa: E402,F401

BLOCK = 16
EXT = "vllm:prompt_tokens_by_source{source=external_kv_transfer}"
# SmolLM2-135M's shape (30 layers, 9 heads, 3 KV heads, head_dim 64): its bf16 KV is 368,640 B per block
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
          "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
          "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True, "bos_token_id": 1,
          "eos_token_id": 2, "hidden_act": "silu"}
PAGE = 30 * 2 * BLOCK * 3 * 64 * 2
SSD_CAPACITY = 4 << 30  # connector()'s default SSD tier, bytes


def model_dir(root: str = "/tmp/ucm-gpu-model") -> str:
    """config.json and model.safetensors with weights drawn from N(0, 0.02) (norms 1.0), seed 0: logits
    far from flat, so a wrong KV block changes the outputs (dummy weights, uniform in ±1e-3, barely do)."""
    if os.path.exists(os.path.join(root, "model.safetensors")):
        return root
    import torch
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=os.path.dirname(root))  # renamed when whole
    c = CONFIG
    g = torch.Generator().manual_seed(0)
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(c["num_attention_heads"] * c["head_dim"], h),
                  p + "self_attn.k_proj.weight": w(kv, h), p + "self_attn.v_proj.weight": w(kv, h),
                  p + "self_attn.o_proj.weight": w(h, c["num_attention_heads"] * c["head_dim"]),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter),
                  p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_file(t, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(c, f)
    try:
        os.rename(tmp, root)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(root, "model.safetensors")):
            raise
    return root


def tokens(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(100, CONFIG["vocab_size"]) for _ in range(n)]


# gpu_memory_utilization only gates vLLM's start-up check of free memory here (kv_cache_memory_bytes sizes the
# cache): low, so that the test groups of scripts/gpu-test.sh can run side by side on one GPU
ENGINE = {"load_format": "safetensors", "skip_tokenizer_init": True, "block_size": BLOCK,
          "gpu_memory_utilization": 0.15}


def run(phases, **kw) -> dict:
    kw.setdefault("kv_cache_bytes", 1 << 30)
    return run_vllm(phases, model=model_dir(), engine={**ENGINE, **kw.pop("engine", {})}, **kw)


def connector(root: str, *, host: str = "1GiB", ssd: str | None = f"{SSD_CAPACITY}B", host_dir: str = "host",
              module_path: bool = False, planner: bool = False, **extra) -> dict:
    """`planner`: transfer.load_planner, off unless a test is about it (the tests count exact hits; the
    planner would rightly skip hits from this machine's 1.1 GB/s disk)."""
    cfg = {"host": {"capacity": host, "path": os.path.join(root, host_dir)}}
    cfg["ssd"] = {"path": os.path.join(root, "ssd"), "capacity": ssd} if ssd else None  # null: no SSD tier
    cfg["transfer"] = {"load_planner": planner, **(extra.pop("transfer", None) or {})}
    cfg.update(extra)
    c = {"kv_connector": "UCMConnector", "extra": cfg}
    if module_path:
        c["kv_connector_module_path"] = "ucm.integration.vllm.ucm_connector"
    return c


DROP_CACHES = "sync && echo 3 > /proc/sys/vm/drop_caches"
