#!/usr/bin/env bash
# The GPU measurements behind the README's "Speed on a GPU", in one command on a CUDA machine:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      (PYTHON=python3 to choose the interpreter)
# 1. benchmarks/gpu.py: img/s, peak memory, attention kernels and parity against the original
#    forward, with the compiled variant last (a time limit keeps what was measured before it);
# 2. the trainer end to end on the original recipe (sdetr, multi-scale 480..800 / 1333, batch 4),
#    one short epoch on the synthetic set, data loading included;
# 3. the quickstart (python train.py) on the GPU.
# Each step has a time limit, so one slow step cannot take the others' time.
set -u
out=${1:-outputs/gpu}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SDETR_CACHE=${SDETR_CACHE:-$out/cache}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
"$py" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"
timeout "${GPU_BENCH_S:-240}" "$py" benchmarks/gpu.py --rounds 4 --compile --output "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
progress() { tr '\r' '\n' | grep -v -e 'it/s' -e 's/it' ; }
start=$(date +%s)
timeout "${GPU_RECIPE_S:-100}" "$py" train.py --recipe original --epochs 1 --max_train_images 512 --synthetic_val 64 \
    --device cuda --num_workers 12 --output_dir "$out/original_recipe" --overwrite 2>&1 | progress | tail -n 8
echo "original recipe: $(( $(date +%s) - start )) s wall"
start=$(date +%s)
timeout "${GPU_QUICKSTART_S:-120}" "$py" train.py --device cuda --output_dir "$out/quickstart" --overwrite 2>&1 \
    | progress | grep -e "^epoch" -e "^ *0\." -e "AP" | tail -n 30
echo "quickstart: $(( $(date +%s) - start )) s wall"
for run in original_recipe quickstart; do
    [ -f "$out/$run/log.txt" ] && "$py" -c "
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(sys.argv[2], 'epoch', row['epoch'], 'time_s', round(row['epoch_time_s'], 1), 'AP/AP50', [round(v, 3) for v in row.get('test_coco_eval_bbox', [])[:2]])
" "$out/$run/log.txt" "$run"
done
