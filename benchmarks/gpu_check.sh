#!/usr/bin/env bash
# The one prepared GPU check for a lent device (see the device tool's METHOD.md), time-boxed to end
# inside a 10-minute call: install fastft without dependencies (the device has torch, triton,
# transformers, peft, safetensors and no network; bitsandbytes travels in .gpu_site/ when present,
# made by benchmarks/prepare_gpu_site.sh and named in the call's carry list),
# run the Triton kernel tests on CUDA, then the gpu benchmark modules one by one, each under its own
# timeout. Every benchmark row is streamed to $OUT/rows.jsonl as it is made, so a module cut off by
# its time box keeps what it measured; record them here with
#   python -m benchmarks.run --ingest <fetched rows.jsonl>
# Logs: $OUT/tests.log, $OUT/profile.log (per-kernel CUDA time of the fused paths,
# benchmarks/profile_gpu.py), $OUT/bench.log (with the autotuner's picks). Budgets (seconds) can be set:
# T_TESTS, T_PROFILE, T_CEILINGS, T_QUANT_PACK, T_QUANT_MATMUL, T_QUANT_DECODE, T_ATTENTION,
# T_ATTENTION_DECODE, T_LORA; BENCHES picks and orders the modules; FASTFT_AUTOTUNE_MAX caps autotune lists (3 here);
# FASTFT_BENCH_QUICK=1 runs only the shapes the targets name first (benchmarks/common.py quick()).
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/fastft_gpu}
mkdir -p "$O"
export FASTFT_BUILD_EXT=0 PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
export FASTFT_AUTOTUNE_MAX=${FASTFT_AUTOTUNE_MAX:-3} FASTFT_BENCH_STREAM="$O/rows.jsonl"
[ -d .gpu_site ] && export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

python -m pip install -q --no-deps --no-build-isolation -e . > "$O/install.log" 2>&1 || { cat "$O/install.log"; exit 1; }
python - <<'PY' || exit 1
import torch, triton, fastft.ops.triton_backend  # noqa: F401  (imports every kernel module)
p = torch.cuda.get_device_properties(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "|", p.name,
      p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
try:
    import bitsandbytes, peft, transformers
    print("bitsandbytes", bitsandbytes.__version__, "peft", peft.__version__, "transformers", transformers.__version__)
except Exception as e:
    print("baseline import failed:", e)
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
stamp "installed"

xdist=""
python -c "import xdist" 2>/dev/null && xdist="-n 16"
# CUDA_LAUNCH_BLOCKING: a kernel fault is reported at its own launch; tests/conftest.py restarts an
# xdist worker whose CUDA context a fault poisoned, so one broken kernel does not fail the rest.
# -v -rf: each result is named the moment it lands (a time-boxed run is cut before pytest's summary).
CUDA_LAUNCH_BLOCKING=1 timeout "${T_TESTS:-170}" python -m pytest -v -rf $xdist --device cuda -p no:cacheprovider \
    -p no:benchmark -o addopts="" \
    tests/test_attention.py tests/test_attention_decode.py tests/test_lora.py tests/test_lora_fused.py \
    tests/test_quant_pack.py tests/test_quant_matmul.py tests/test_quant_decode.py tests/test_quant_linear.py \
    > "$O/tests.log" 2>&1
rc_tests=$?
grep -E " (FAILED|ERROR) |^(FAILED|ERROR)|\[conftest\]|crashed" "$O/tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -40
echo "tests: $(grep -c ' PASSED ' "$O/tests.log") passed, $(grep -c ' FAILED ' "$O/tests.log") failed (as streamed)"
stamp "tests rc=$rc_tests"

timeout "${T_PROFILE:-60}" python -m benchmarks.profile_gpu > "$O/profile.log" 2>&1
stamp "profile rc=$?"
grep -E "^## " "$O/profile.log"

rc_bench=0
# default budgets: the former quant and attention modules' 120 s each, shared by their split files
declare -A T_DEFAULT=([quant_pack]=30 [quant_matmul]=60 [quant_decode]=30 [attention]=90 [attention_decode]=30)
for b in ${BENCHES:-ceilings quant_pack quant_matmul quant_decode attention attention_decode lora}; do
    var="T_${b^^}"
    timeout "${!var:-${T_DEFAULT[$b]:-120}}" python -m benchmarks.run --suite gpu --only "$b" >> "$O/bench.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && rc_bench=$rc
    stamp "bench $b rc=$rc, $(grep -c "\"bench\": \"$b\"" "$O/rows.jsonl" 2>/dev/null) rows"
done
grep -E "Error|error|Traceback" "$O/bench.log" | grep -v "^{" | head -10
echo "gpu_check: tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests != 0 || rc_bench != 0 ))
