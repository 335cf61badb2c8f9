#!/usr/bin/env bash
# The shipped stacking policy's whole recipe: expert demos -> behaviour cloning -> two DAgger rounds
# -> fine-tune -> export (fp32 + int8) -> closed-loop evaluation. Every step is a gato-ros subcommand.
# On 2 CPU cores it takes about 2 hours (collection ~10 min, training ~75 min, DAgger ~20 min).
# Usage: scripts/train_stacking_policy.sh [WORKDIR]   (default: runs/recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/recipe}
G=.venv/bin/gato-ros
mkdir -p "$W"
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}

# 1. Scripted-expert demonstrations: half clean, half with torque noise (clean labels); successes only.
$G collect --episodes 700 --workers 2 --seed 0 --out "$W/stack-700"

# 2. Behaviour cloning: tiny preset, a one-timestep window (42 tokens) slid over 4-timestep sequences
#    so training sees exactly the runtime's sliding window. The schedule is set for 25 passes; the
#    run pauses at steps 2100 and 2700 for DAgger data and stops at 3900.
TRAIN=(--data "$W/stack-700" --out "$W/bc" --preset tiny --context-window 42 --seq-len 168 --stride-steps 4
       --epochs 25 --batch-size 64 --lr 1e-3 --warmup 200 --eval-every 300 --threads 1 --seed 0 --no-progress)
$G train "${TRAIN[@]}" --stop-at 2100
$G export --checkpoint "$W/bc" --out "$W/bc-2100.onnx" --variants fp32
# 3. DAgger (Ross et al. 2011): the policy drives (the expert with probability beta per step), the
#    expert labels every visited state.
$G collect --episodes 200 --workers 1 --seed 11 --policy "$W/bc-2100.onnx" --beta 0.3 --out "$W/dagger-a"
$G train "${TRAIN[@]}" --resume --stop-at 2700
$G export --checkpoint "$W/bc" --out "$W/bc-2700.onnx" --variants fp32
$G collect --episodes 200 --workers 1 --seed 12 --policy "$W/bc-2700.onnx" --beta 0.2 --out "$W/dagger-b"
$G train "${TRAIN[@]}" --resume --stop-at 3900

# 4. Fine-tune on demonstrations + DAgger data from the step-3900 weights, fresh cosine schedule.
$G train --data "$W/stack-700" "$W/dagger-a" "$W/dagger-b" --init "$W/bc" --out "$W/ft" \
    --seq-len 168 --stride-steps 4 --steps FT_STEPS --batch-size 64 --lr 5e-4 --warmup 100 \
    --eval-every 300 --threads 1 --seed 1 --no-progress

# 5. Export (fp32 parity-checked against torch, int8) and evaluate on 100 seeds never used in training.
$G export --checkpoint "$W/ft" --out "$W/stack.onnx" --variants fp32,int8
$G eval --policy "$W/stack.onnx" --episodes 100 --seed 100000 --workers 2 --json "$W/eval-fp32.json"
$G eval --policy "$W/stack.int8.onnx" --episodes 100 --seed 100000 --workers 2 --json "$W/eval-int8.json"
$G eval --policy "$W/stack.int8.onnx" --episodes 100 --seed 100000 --over-ros --json "$W/eval-int8-ros.json"
