#!/usr/bin/env bash
# Pretrain the three small presets side by side on one GPU (the run behind EXPERIMENTS.md).
#
#   bash experiments/pretrain_gpu.sh DATA_DIR OUT_DIR [STEPS] [BATCH]
#
# Each preset trains in its own process (the models are too small to fill the GPU alone), with
# bf16 compute, bf16 saved weights and L_train = 512. Each finished run is packed as
# OUT_DIR/<preset>.tar (model folder, loss.jsonl, loss.png, run.json; no optimiser checkpoints)
# next to its log OUT_DIR/<preset>.log.
set -euo pipefail
data=${1:?DATA_DIR}; out=${2:?OUT_DIR}; steps=${3:-1500}; batch=${4:-32}
mkdir -p "$out" runs/gpu
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for preset in llama-small gptj-small mpt-small; do
  (
    python3 -m experiments.train --data "$data" --preset "$preset" --steps "$steps" --batch "$batch" \
      --seq-len 512 --dtype bf16 --save-dtype bf16 --eval-every 100 --checkpoint-every 500 \
      --out "runs/gpu/$preset" --quiet > "$out/$preset.log" 2>&1
    tar -C runs/gpu -cf "$out/$preset.tar" --exclude checkpoints "$preset"
  ) &
done
wait
