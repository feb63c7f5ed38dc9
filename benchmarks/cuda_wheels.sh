#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (its Python is 3.12) into .whl/ for benchmarks/cuda_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  torchao==0.18.0 torch-pruning==1.6.1 diffusers==0.42.1 tomesd==0.1.3
ls -la .whl
