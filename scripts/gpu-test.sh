#!/usr/bin/env bash
# Run the GPU tests on a machine with a CUDA GPU and vLLM's GPU build on the path (tests/gpu/README.md).
#
#   scripts/gpu-test.sh            every GPU test, in eleven groups run side by side (one pytest each)
#   scripts/gpu-test.sh ARGS...    one pytest over tests/gpu with ARGS (e.g. -k "chunked")
#
# Logs: $OUT/gpu-test.log (or /tmp), one section per group. Exit status: 0 only if every group passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
python3 -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU'; print('vllm', vllm.__version__, '|', torch.cuda.get_device_name())" || exit 2
export PYTHONUNBUFFERED=1
if [ "$#" -gt 0 ]; then
  python3 -m pytest -q -rpxXfEs -p no:cacheprovider -m gpu tests/gpu "$@" 2>&1 | tee "$out/gpu-test.log"
  exit "${PIPESTATUS[0]}"
fi
# Groups of about equal length (each starts 4-7 vLLM processes of a small model: the GPU has room for all);
# each has its own pytest base directory, and the model file is written once before they start.
python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); import gpu_harness; print('model', gpu_harness.model_dir())" || exit 2
mkdir -p /tmp/ucm-gpu-tests && rm -rf /tmp/ucm-gpu-tests/g*
n=0
group() {  # one pytest in the background: its log and exit status under /tmp, named by its number
  local i=$n
  echo "$*" >"/tmp/ucm-gpu-test-g$i.args"
  ( python3 -m pytest -q -rpxXfEs -p no:cacheprovider --basetemp="/tmp/ucm-gpu-tests/g$i" "$@" \
      >"/tmp/ucm-gpu-test-g$i.log" 2>&1; echo $? >"/tmp/ucm-gpu-test-g$i.rc" ) &
  n=$((n + 1))
}
c=tests/gpu/test_gpu_connector.py l=tests/gpu/test_gpu_layerwise.py b=tests/gpu/test_gpu_blend.py
group -m gpu "$c" -k "warm_fresh or wrong_load or direct_transfer"
group -m gpu "$c" -k corrupted
group -m gpu "$c" -k chunked
group -m gpu "$c" -k "working_set or preemption"
group -m gpu "$l" -k layer_group_loads
group -m gpu "$l" -k "first_hole or copy_fault"
group -m gpu "$l" -k damaged_page
group -m gpu "$b" -k "full_recompute"
group -m gpu "$b" -k "never_a_prefix or chunked"
group -m gpu "$b" -k "default_ratio or alone_and_in_a_batch"
group tests/test_kernels.py tests/test_transfer_store.py tests/test_rope.py
wait
rc=0
: >"$out/gpu-test.log"
for ((i = 0; i < n; i++)); do
  r=$(cat "/tmp/ucm-gpu-test-g$i.rc")
  [ "$r" = 0 ] || rc=1
  { echo "=== group $i (exit $r): $(cat "/tmp/ucm-gpu-test-g$i.args")"; cat "/tmp/ucm-gpu-test-g$i.log"; } >>"$out/gpu-test.log"
  echo "group $i (exit $r): $(tail -n 1 "/tmp/ucm-gpu-test-g$i.log")"
done
exit "$rc"
