#!/usr/bin/env bash
# The one prepared GPU check (the device tool's METHOD.md: one short script answers everything).
#
#   bash benchmarks/gpu_check.sh            # on the lent H200: <= 8 minutes including the install
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere, no GPU: every stage runs tiny on the CPU or says
#                                           # why it skips, and the summary prints (CI runs this)
#
# Before a device call, here (with network): `bash benchmarks/prepare_gpu_site.sh` puts bitsandbytes and
# liger-kernel wheels' contents and the commit id into .gpu_site/; the call then names it in carry:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_site"], timeout_s=540)
# Afterwards: `python -m benchmarks.run --ingest <fetched rows.jsonl>` records the rows, and the stage
# logs say what failed. Nothing here needs the network.
#
# Stages, each time-boxed (seconds; T_<STAGE> overrides; the whole run also stops starting stages when
# GPU_CHECK_BUDGET runs out), in order of what matters most:
#   env        installs fastft from this tree without dependencies or the C++ extension; versions;
#              notes missing optional packages (bitsandbytes, liger-kernel, flash-attn)
#   step_8b    end-to-end QLoRA step, Llama-3.1-8B shape, seq 2048, batch 2 (benchmarks/bench_step.py)
#   step_1b    end-to-end LoRA step, Llama-3.2-1B shape, seq 8192
#   tests      the CUDA tests: every test file that takes the `device` fixture (tests/test_*.py), so new
#              kernel tests join by themselves; the CUDA default path (test_lean) first. -v streams each
#              result, -rA and a JUnit XML name every failure; SIGINT at the box so pytest still writes both
#   unvalidated  configs that never ran on a GPU (FASTFT_UNVALIDATED_CONFIGS=1), in their own process
#   profile    per-kernel CUDA time of the fused paths (benchmarks/profile_gpu.py)
#   bench      quick kernel benchmarks (FASTFT_BENCH_QUICK=1): quant matmul / decode / pack, attention (+ decode), lora,
#              lora_fused (fused q/k/v and gate/up+SwiGLU blocks vs the per-projection default), the row ops
#              (rms_norm + add_rms_norm, rope, silu_mul; vs torch and Liger when it imports), cross-entropy
#              rows, layer_norm, gelu, ceilings
# Everything lands in one folder ($OUT on the device, else /tmp/fastft_gpu_check[_dry]): rows.jsonl
# (every benchmark row, streamed), step_*.jsonl, tests.log, junit.xml, failures.txt, <stage>.log,
# summary.txt; the summary table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $a (use --dry-run)"; exit 2 ;;
    esac
done
if [ $DRY = 1 ]; then O=${OUT:-/tmp/fastft_gpu_check_dry}; else O=${OUT:-/tmp/fastft_gpu_check}; fi
mkdir -p "$O"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONUNBUFFERED=1 FASTFT_BUILD_EXT=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FASTFT_BENCH_STREAM="$O/rows.jsonl"
[ -d .gpu_site ] && export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
[ -f .gpu_site/COMMIT ] && export FASTFT_COMMIT="$(cat .gpu_site/COMMIT)"
: > "$O/summary.tsv"
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
[ $DRY = 1 ] && BUDGET=${GPU_CHECK_BUDGET:-300}
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$O/summary.tsv"; }

# run_stage NAME LIMIT CMD...: runs CMD under `timeout -s INT` (pytest and python clean up on SIGINT),
# killed 15 s later if still alive; output to $O/NAME.log. Sets RC.
run_stage() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt 20 ]; then
        record "$name" "skipped" 0 "the run's budget (${BUDGET}s) is used up"; RC=125; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "stage $name (box ${limit}s)"
    local s=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@" > "$O/$name.log" 2>&1
    RC=$?
    STAGE_S=$(( $(date +%s) - s ))
    if [ $RC = 124 ] || [ $RC = 137 ]; then STATUS="timeout (${limit}s box)"; elif [ $RC = 0 ]; then STATUS=ok; else STATUS="failed rc=$RC"; fi
}
skip() { record "$1" "skipped" 0 "$2"; say "stage $1 skipped: $2"; }

# ---------------------------------------------------------------------------------------------- env
if [ $DRY = 1 ]; then
    env_cmd=("$PY" -c "import fastft, os; print('dry run: using the installed fastft at', os.path.dirname(fastft.__file__))")
else
    env_cmd=("$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .)
fi
run_stage install "${T_INSTALL:-60}" "${env_cmd[@]}"
record install "$STATUS" "$STAGE_S" "$(tail -1 "$O/install.log" | cut -c1-150)"
if [ $RC != 0 ]; then cat "$O/install.log"; fi
DRY=$DRY "$PY" - > "$O/env.log" 2>&1 <<'PY'
import importlib.metadata as md, importlib.util, json, os
import torch
dry = os.environ.get("DRY") == "1"
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": os.environ.get("FASTFT_COMMIT"),
        "fastft_at": os.path.dirname(importlib.util.find_spec("fastft").origin)}
have_cuda = torch.cuda.is_available()
if have_cuda:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sms=p.multi_processor_count, gpu_gib=p.total_memory >> 30,
                capability=".".join(map(str, torch.cuda.get_device_capability(0))))
for pkg, dist in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                  ("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel"), ("flash_attn", "flash-attn"),
                  ("xdist", "pytest-xdist")):
    if importlib.util.find_spec(pkg) is None:
        info[pkg] = None
        continue
    try:
        info[pkg] = md.version(dist)
    except md.PackageNotFoundError:  # unpacked wheel contents on PYTHONPATH (.gpu_site) keep their dist-info
        info[pkg] = "present"
    if not dry and pkg in ("bitsandbytes", "liger_kernel", "flash_attn"):
        try:  # present but broken (e.g. built for another torch)?
            __import__(pkg)
        except Exception as e:
            info[pkg] = f"import fails: {type(e).__name__}: {str(e)[:120]}"
print(json.dumps(info))
missing = [p for p in ("bitsandbytes", "liger_kernel", "flash_attn") if not info[p] or str(info[p]).startswith("import fails")]
print("optional baselines missing (their rows are skipped with a note):", ", ".join(missing) or "none")
print("HAVE_CUDA=%d" % have_cuda)
PY
cat "$O/env.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader | tee -a "$O/env.log"
record env "ok" 0 "$(grep -o 'optional baselines missing.*' "$O/env.log" | cut -c1-150)"
HAVE_CUDA=$(grep -o "^HAVE_CUDA=[01]" "$O/env.log" | cut -d= -f2)
if [ $DRY = 0 ] && [ "$HAVE_CUDA" != 1 ]; then
    echo "gpu_check: no CUDA device here; use --dry-run on a machine without a GPU"; exit 2
fi

# ---------------------------------------------------------------------------- end-to-end step rows
step_stage() {  # NAME LIMIT CASE [extra bench_step args]
    local name=$1 limit=$2 case=$3; shift 3
    run_stage "$name" "$limit" "$PY" -m benchmarks.bench_step --case "$case" --budget $(( limit - 10 )) \
        --json "$O/$name.jsonl" --check "$@"
    local detail
    detail=$("$PY" -m benchmarks.bench_step --brief "$O/$name.jsonl" 2>/dev/null | cut -c1-400)
    [ $RC = 1 ] && STATUS="failed: a variant errored or disagrees (see $name.log)"
    record "$name" "$STATUS" "$STAGE_S" "$detail"
}
if [ $DRY = 1 ]; then  # both tiny cases in one process (one import of torch / transformers / PEFT)
    step_stage step_8b "${T_STEP_8B:-150}" tiny-qlora --case tiny-lora --spawn fork --threads 1
    skip step_1b "dry run: its tiny LoRA case ran in step_8b's process (rows in step_8b.jsonl)"
else
    step_stage step_8b "${T_STEP_8B:-160}" gpu-8b-qlora
    step_stage step_1b "${T_STEP_1B:-80}" gpu-1b-lora
fi

# -------------------------------------------------------------------------------------- CUDA tests
# Every test file that takes the `device` fixture runs on CUDA with --device cuda; the CUDA default
# path (test_lean) and the step kernels first, then the rest by name.
mapfile -t ALL < <(grep -lE "^def test_[A-Za-z0-9_]+\(([^)]*[ ,])?device\b" tests/test_*.py | sort)
FIRST=(); REST=()
for f in "${ALL[@]}"; do
    case "$f" in
        tests/test_lean*|tests/test_*rms*|tests/test_*rope*|tests/test_*swiglu*|tests/test_*silu*|tests/test_*cross_entropy*|tests/test_*layer_norm*|tests/test_*gelu*|tests/test_*step_kernels*) FIRST+=("$f") ;;
        *) REST+=("$f") ;;
    esac
done
TEST_FILES=("${FIRST[@]}" "${REST[@]}")
printf '%s\n' "${TEST_FILES[@]}" > "$O/test_files.txt"
if [ ${#TEST_FILES[@]} = 0 ]; then
    record tests "failed" 0 "no test file takes the device fixture (selection broken)"
elif [ $DRY = 1 ]; then
    run_stage tests "${T_TESTS:-90}" "$PY" -m pytest --collect-only -q -p no:cacheprovider "${TEST_FILES[@]}"
    n=$(grep -cE "::" "$O/tests.log")
    record tests "$STATUS" "$STAGE_S" "dry run: collected $n tests in ${#TEST_FILES[@]} files (a GPU runs them with --device cuda)"
else
    xdist=""
    "$PY" -c "import xdist" 2>/dev/null && xdist="-n ${GPU_CHECK_WORKERS:-16}"
    # CUDA_LAUNCH_BLOCKING: a fault is reported at its own launch; tests/conftest.py restarts an xdist
    # worker whose CUDA context a fault poisoned, so one broken kernel does not fail the rest.
    # Autotuning bounded to the first 2 candidates / 5 s per kernel and key (correctness, not speed,
    # is checked here); configs never run on a GPU wait for the next stage.
    run_stage tests "${T_TESTS:-130}" env CUDA_LAUNCH_BLOCKING=1 FASTFT_AUTOTUNE_MAX=2 FASTFT_AUTOTUNE_BUDGET=5 \
        FASTFT_UNVALIDATED_CONFIGS=0 "$PY" -m pytest -v -rA $xdist --device cuda -m "not unvalidated" \
        -p no:cacheprovider -p no:randomly -o addopts="" --junitxml="$O/junit.xml" "${TEST_FILES[@]}"
    # Named from the streamed lines (a run cut by the box has no summary), and from the -rA summary.
    grep -E "(FAILED|ERROR) tests/|^(FAILED|ERROR) |\[conftest\]" "$O/tests.log" \
        | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //; s/^(FAILED|ERROR) (tests\/[^ ]+).*/\1 \2/' | sort -u > "$O/failures.txt"
    np=$(grep -cE "PASSED tests/|tests/.* PASSED" "$O/tests.log"); nf=$(grep -cE "^FAILED " "$O/failures.txt")
    ne=$(grep -cE "^ERROR " "$O/failures.txt")
    record tests "$STATUS" "$STAGE_S" "$np passed, $nf failed, $ne errors (failures.txt names each; junit.xml)"
fi

# ------------------------------------------------- configs never run on a GPU, in their own process
if [ $DRY = 1 ] && [ ! -f tests/test_autotune_policy.py ]; then
    skip unvalidated "dry run: no tests/test_autotune_policy.py in this tree"
elif [ $DRY = 1 ]; then
    run_stage unvalidated "${T_UNVALIDATED:-60}" "$PY" -m pytest -q -p no:cacheprovider tests/test_autotune_policy.py
    record unvalidated "$STATUS" "$STAGE_S" "dry run: the switch and cache logic under the interpreter (the configs need a GPU)"
else
    # The tests that pin those configs, and the bf16 attention tests with every config the autotuner
    # has (TMA and software-pipelined variants included) -- in this process only.
    # (-k also matches marker names.)
    UNVAL_FILES=()
    for f in "${TEST_FILES[@]}"; do case "$f" in tests/test_attention*|tests/test_lora*) UNVAL_FILES+=("$f") ;; esac; done
    run_stage unvalidated "${T_UNVALIDATED:-45}" \
        env FASTFT_UNVALIDATED_CONFIGS=1 FASTFT_AUTOTUNE_MAX=0 FASTFT_AUTOTUNE_BUDGET=0 CUDA_LAUNCH_BLOCKING=1 \
        "$PY" -m pytest -v -rA ${xdist:-} --device cuda -p no:cacheprovider -o addopts="" \
        --junitxml="$O/junit_unvalidated.xml" -k "unvalidated or bfloat16" "${UNVAL_FILES[@]}"

    nf=$(grep -cE "^(FAILED|ERROR) " "$O/unvalidated.log")
    record unvalidated "$STATUS" "$STAGE_S" "FASTFT_UNVALIDATED_CONFIGS=1, all autotune configs; $nf failed (names in unvalidated.log)"
fi

# ------------------------------------------------------------------------- quick kernel benchmarks
BENCH_LIST=${BENCHES:-quant_matmul quant_decode quant_pack attention attention_decode lora lora_fused rms_norm rope silu_mul cross_entropy layer_norm gelu ceilings}
if [ $DRY = 1 ]; then
    run_stage bench_imports 60 "$PY" -c "
import importlib, sys
for b in sys.argv[1:]:
    assert callable(importlib.import_module('benchmarks.bench_' + b).run), b
print('imports', *sys.argv[1:])" $BENCH_LIST
fi
for b in $BENCH_LIST; do
    var="T_BENCH_${b^^}"
    if [ $DRY = 1 ]; then
        record "bench_$b" "skipped" 0 "dry run: no CUDA device (the module imports: $STATUS)"
    else
        run_stage "bench_$b" "${!var:-30}" env FASTFT_BENCH_QUICK=1 "$PY" -m benchmarks.run --suite gpu --only "$b" --no-record
        record "bench_$b" "$STATUS" "$STAGE_S" "$(grep -c "\"bench\": \"$b\"" "$O/rows.jsonl" 2>/dev/null) rows streamed"
    fi
done

# ------------------------------------------------------------------- per-kernel profile (torch.profiler)
if [ $DRY = 1 ]; then
    record profile "skipped" 0 "dry run: no CUDA device"
else
    run_stage profile "${T_PROFILE:-45}" "$PY" -m benchmarks.profile_gpu
    record profile "$STATUS" "$STAGE_S" "per-kernel CUDA time of the fused paths (profile.log)"
fi

# ------------------------------------------------------------------------------------------ summary
{
    echo
    echo "== gpu_check summary ($([ $DRY = 1 ] && echo 'DRY RUN, CPU' || echo GPU)), $(elapsed) s, results in $O"
    grep -m1 '^{' "$O/env.log" | cut -c1-400
    printf '%-14s %-40s %6s  %s\n' stage status seconds detail
    while IFS=$'\t' read -r st status secs detail; do
        printf '%-14s %-40s %6s  %s\n' "$st" "${status:0:40}" "$secs" "$detail"
    done < "$O/summary.tsv"
    for f in "$O"/step_8b.log "$O"/step_1b.log; do
        [ -f "$f" ] && { echo; echo "-- $(basename "$f" .log):"; grep -E "^\| |^DISAGREES" "$f"; }
    done
    if [ -s "$O/failures.txt" ]; then echo; echo "-- failing tests (first 60):"; head -60 "$O/failures.txt"; fi
} | tee "$O/summary.txt"
bad=$(cut -f2 "$O/summary.tsv" | grep -cvE "^(ok|skipped)$")
exit $(( bad > 0 ))
