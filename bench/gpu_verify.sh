#!/usr/bin/env bash
# Issue 4's H100 table on the lent GPU machine (bare: no pydantic, yaml, matplotlib, no data).
# Carry: wheels/ (pure or cp312 wheels: pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions, pyyaml, matplotlib and its deps; `pip download`
# them here, see the README) and data/raw/fashion-mnist (the four idx .gz files).
#   run: bash bench/gpu_verify.sh [--set k=v ...]   (results under $OUT)
set -euo pipefail
pip install -q --no-index --no-deps wheels/*.whl
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python bench/verify_fmnist.py --src data/raw/fashion-mnist "$@" 2>&1 | tee "$OUT/verify_fmnist.txt"
cp runs/fmnist-verify/verify/report.* runs/fmnist-verify/verify/*.png "$OUT"/
