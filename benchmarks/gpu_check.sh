#!/usr/bin/env bash
# The one prepared GPU check for a lent device (see the device tool's METHOD.md): install fastft
# without dependencies (the device machine has torch, triton, transformers, peft, safetensors and
# no network), run the Triton kernel tests on CUDA, then the gpu benchmark suite. Meant to finish in
# under 8 minutes; results land in benchmarks/results/gpu.* and are copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export FASTFT_BUILD_EXT=0 PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python -m pytest -q -x --device cuda -p no:cacheprovider \
    tests/test_attention.py tests/test_lora_triton.py tests/test_quant_triton.py 2>&1 | tail -25
rc_tests=${PIPESTATUS[0]}
timeout 220 python -m benchmarks.run --suite gpu
rc_bench=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.* "$OUT"/ 2>/dev/null || true; fi
echo "gpu_check: tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests != 0 || rc_bench != 0 ))
