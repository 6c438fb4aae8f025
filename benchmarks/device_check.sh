#!/usr/bin/env bash
# The prepared GPU check (issue #11, item 7), one command, under 10 minutes on one NVIDIA GPU:
#   bash benchmarks/device_check.sh [OUT_DIR]
# 1. a jax that sees the GPU: the machine's own, else the CUDA 12 build installed into .venv-gpu;
# 2. the accelerator-path checks on the GPU (benchmarks/device_checks.py: bf16 vs float32 step, cuDNN vs
#    XLA attention, logits parity with the book's torch model);
# 3. bench_train.py for gpt2-small at T=1024 in bfloat16 against the book's torch model in the same run
#    (eager, torch.compile, and the book's fast setup: SDPA flash attention + fused AdamW + compile).
# JSON and logs go to OUT_DIR (default: $OUT if set, else benchmarks/results/device).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/device}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "no GPU jax in $py: installing gptjax[cuda12,torch] into .venv-gpu"
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -c constraints.txt -e ".[cuda12,torch]" pytest transformers \
    || { echo "could not install the CUDA build"; exit 1; }
  py=.venv-gpu/bin/python
fi
"$py" - <<'PY' | tee "$out/machine.txt"
import jax, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "devices", jax.devices())
try:
    import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch: not installed")
PY
status=0
timeout 240 "$py" -m pytest -q -s -p no:cacheprovider benchmarks/device_checks.py 2>&1 | tee "$out/device_checks.log" || status=1
timeout 300 "$py" benchmarks/bench_train.py --cases gpt2-1024 --dtypes bfloat16 --large-batch 16 --steps 5 \
  --torch eager compile fast --out "$out/train_gpu.json" 2>&1 | tee "$out/bench_train.log" || status=1
exit $status
