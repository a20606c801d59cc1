#!/usr/bin/env bash
# Issue 4's H100 table on the lent GPU machine. Its image has torch, numpy, pyarrow, pyyaml,
# matplotlib, pillow, typer, rich, tqdm, but not pydantic: carry wheels/ with the cp312 wheels
# of pydantic, pydantic-core, annotated-types and typing-inspection (`pip download` them
# here, see the README), and data/raw/fashion-mnist (the four idx .gz files, 30 MB).
#   bash bench/gpu_verify.sh [--set k=v ...]        results under $OUT
# One call has 600 s: split a long table, e.g. `--set verify.online=[]` first, then the
# online methods with `--set select=[] --set verify.random_baseline=false`.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps wheels/*.whl
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 bench/verify_fmnist.py --src data/raw/fashion-mnist "$@" 2>&1 | tee "$OUT/verify_fmnist.txt"
run=$(python3 -c "import sys,yaml; print(yaml.safe_load(open('configs/fmnist-verify.yaml'))['run'])")
for a in "$@"; do case $a in run=*) run=${a#run=};; esac; done
cp "$run"/report/report.* "$run"/report/*.png "$OUT"/
