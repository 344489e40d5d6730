#!/usr/bin/env bash
# Run tests/gpu on a machine with a CUDA GPU and vLLM's GPU build on the path (tests/gpu/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu-test.log"
python3 -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU'; print('vllm', vllm.__version__, '|', torch.cuda.get_device_name())" || exit 2
PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
