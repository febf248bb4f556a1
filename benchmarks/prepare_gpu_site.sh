#!/usr/bin/env bash
# Run here (with network to the package registries), before a device run: put bitsandbytes (the
# baseline of bench_quant / the NF4 byte checks) into .gpu_site/, which benchmarks/gpu_check.sh adds
# to PYTHONPATH on the device. Only the CUDA 13.0 library is kept (the device's torch is cu130), so
# the folder stays ~5 MB of the 64 MiB a device call may carry. Name it in the call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${BNB_VERSION:-0.50.2}
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp" "bitsandbytes==$ver"
rm -rf .gpu_site && mkdir -p .gpu_site
(cd .gpu_site && unzip -q "$tmp"/bitsandbytes-*.whl)
find .gpu_site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
rm -rf "$tmp"
du -sh .gpu_site
