#!/usr/bin/env bash
# Issues 5 and 6's H100 figures on the lent GPU machine (bare, 600 s a call, 30 min a session).
# Carry wheels/ (cp312: pydantic, pydantic-core, annotated-types, typing-inspection; for `clip`
# also open_clip_torch, ftfy, wcwidth, regex) and data/raw/fashion-mnist (the idx .gz files).
#   bash bench/gpu_distill_clip.sh scale     clipcov / sas / clip-score selection time, 1M x 512 pairs
#   bash bench/gpu_distill_clip.sh distill   configs/distill/fashion-mnist.yaml; in 600 s pass e.g.
#                                            --set distill.experts.count=3 --set distill.experts.epochs=30
#                                            and fewer iterations (the syn_steps sweep runs at the end)
#   bash bench/gpu_distill_clip.sh clip      configs/clip-fmnist.yaml, 60k pairs (--set verify.seeds=1 to fit)
# Extra arguments go to the bench script; results (printed tables, reports) land under $OUT.
set -euo pipefail
what=${1:?scale | distill | clip}; shift
python3 -m pip install -q --no-index --no-deps wheels/*.whl
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case $what in
  scale) python3 bench/clipcov_scale.py --n 1000000 --d 512 "$@" 2>&1 | tee "$OUT/clipcov_scale.txt" ;;
  distill) python3 bench/distill_fmnist.py --src data/raw/fashion-mnist "$@" 2>&1 | tee "$OUT/distill_fmnist.txt"
           cp runs/fmnist-distill/report/report.* "$OUT"/ ;;
  clip) python3 bench/clip_fmnist.py --src data/raw/fashion-mnist --oracle "$@" 2>&1 | tee "$OUT/clip_fmnist.txt"
        cp runs/clip-fmnist/report/report.* "$OUT"/ ;;
  *) echo "unknown: $what (scale | distill | clip)"; exit 2 ;;
esac
