#!/usr/bin/env bash
# Run here (with network to the package registries) before a device run. It fills .gpu_site/, which
# benchmarks/gpu_check.sh puts on PYTHONPATH on the device (no network there; its image has torch
# 2.11, triton 3.6, transformers, peft, python 3.12 but not these):
#   * bitsandbytes (the QLoRA baseline of bench_step / bench_quant, the NF4 byte checks), only its
#     CUDA 13.0 library kept (the device's torch is cu130) so the folder stays small;
#   * liger-kernel (the "+ Liger" baseline of bench_step), pure Python + Triton;
#   * COMMIT: this tree's commit (+ "-dirty"), since the copy sent to the device has no .git.
# The folder is git-ignored (.git/info/exclude); name it in the call's carry list:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_site"], timeout_s=540)
# Versions: BNB_VERSION, LIGER_VERSION. flash-attn is not shipped (no wheel for the device's torch
# 2.11 / CUDA 13 on the registry; building it takes far longer than a lease): its rows skip with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
bnb=${BNB_VERSION:-0.50.2}
liger=${LIGER_VERSION:-0.8.5}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dl() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$tmp" "$1"
}
dl "bitsandbytes==$bnb"
dl "liger-kernel==$liger"
rm -rf .gpu_site && mkdir -p .gpu_site
for w in "$tmp"/*.whl; do (cd .gpu_site && unzip -q -o "$w"); done
find .gpu_site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
# The device's image already has torch / triton / transformers: nothing else may shadow them.
for d in .gpu_site/*; do
    case "$(basename "$d")" in
        bitsandbytes|bitsandbytes-*.dist-info|liger_kernel|liger_kernel-*.dist-info|COMMIT) ;;
        *) rm -rf "$d" ;;
    esac
done
rev=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain 2>/dev/null)" ] && rev="$rev-dirty"
echo "$rev" > .gpu_site/COMMIT
ex=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$ex")"
grep -qx '/.gpu_site/' "$ex" 2>/dev/null || echo '/.gpu_site/' >> "$ex"
echo "commit $rev"
du -sh .gpu_site
size=$(du -sm .gpu_site | cut -f1)
if [ "$size" -gt 40 ]; then
    echo "prepare_gpu_site: .gpu_site is ${size} MiB; with the tree it must stay under the 64 MiB carry limit" >&2
    exit 1
fi
