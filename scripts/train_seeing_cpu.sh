#!/usr/bin/env bash
# The seeing policy from nothing on a 2-core CPU in about 2.3 hours: camera (scene + wrist, 64 px) and joints
# only, the privileged task_state kept beside the frames as an auxiliary training target and as the expert's
# input for labels. Every step is a gato-ros subcommand:
#   1. data: 250 episodes driven by the shipped state policy, the expert labelling every state, and 250 expert
#      demonstrations (half noise-injected);
#   2. behaviour cloning started from the shipped state policy's weights (recovered from its int8 file; the patch
#      network and the image tokens' local positions start untrained), a 4-timestep window (228 tokens);
#   3. DAgger rounds of 100 episodes (the newest int8 file drives, the expert on BETA of the steps and labelling
#      all), each followed by a fine-tune on everything so far; every round's int8 file is kept and checked for
#      reach on 20 held-out seeds, so the best one can be chosen (a later fine-tune can drive worse).
# Resumable: a stage whose output exists is skipped. Touch WORK/stop to end after the current round.
# Usage: scripts/train_seeing_cpu.sh [WORK]   (default runs/see-cpu; ROUNDS="991:0.3 1001:0.2" as SEED:BETA)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/see-cpu}
G=.venv/bin/gato-ros
PY=.venv/bin/python
mkdir -p "$W"
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-43}
step() { echo "[seeing $(date +%T)] $*"; }

CAMERAS=(--image-size 64 --cameras scene wrist --no-task-state --aux-keys task_state --workers 2)
[ -f "$W/statepol/dataset.json" ] || $G collect --episodes 250 --seed 901 "${CAMERAS[@]}" \
    --policy models/stack_int8.onnx --beta 0 --out "$W/statepol"
[ -f "$W/expert/dataset.json" ] || $G collect --episodes 250 --seed 801 "${CAMERAS[@]}" --out "$W/expert"

[ -f "$W/state-init/model.safetensors" ] || $PY scripts/recover_checkpoint.py models/stack_int8.onnx "$W/state-init"
# 57 tokens per timestep (2 x 16 patches, 8 + 8 joint values, separator, 8 actions): 4 timesteps in the window.
TRAIN=(--context-window 228 --seq-len 456 --stride-steps 2 --batch-size 32 --warmup 50 --aux-key task_state
       --aux-weight 5 --threads 2 --workers 1 --seed 0 --eval-every 400 --no-progress)
DATA=("$W/statepol" "$W/expert")
reach() { step "reach $1"; $PY scripts/seeing_pilot.py reach "$W/$1.int8.onnx" --seeds 100000 --episodes 20 \
    --json "$W/reach-$1.json" | tail -3; }

[ -f "$W/bc/model.safetensors" ] || $G train --init "$W/state-init" --data "${DATA[@]}" --out "$W/bc" "${TRAIN[@]}" \
    --steps 2600 --lr 5e-4 --max-minutes 40
[ -f "$W/bc.int8.onnx" ] || $G export --checkpoint "$W/bc" --out "$W/bc.onnx" --variants int8
reach bc

prev=bc
r=1
for seed_beta in ${ROUNDS:-991:0.3 1001:0.2}; do
    [ -f "$W/stop" ] && break
    seed=${seed_beta%%:*}
    beta=${seed_beta##*:}
    [ -f "$W/dagger$r/dataset.json" ] || $G collect --episodes 100 --seed "$seed" "${CAMERAS[@]}" \
        --policy "$W/$prev.int8.onnx" --beta "$beta" --out "$W/dagger$r"
    DATA+=("$W/dagger$r")
    [ -f "$W/ft$r/model.safetensors" ] || $G train --init "$W/$prev" --data "${DATA[@]}" --out "$W/ft$r" "${TRAIN[@]}" \
        --steps 1500 --lr 3e-4 --max-minutes 22
    [ -f "$W/ft$r.int8.onnx" ] || $G export --checkpoint "$W/ft$r" --out "$W/ft$r.onnx" --variants int8
    reach "ft$r"
    prev=ft$r
    r=$((r + 1))
done
step "done: evaluate the best file with gato-ros eval --policy FILE --episodes 100 --seed 100000 --workers 2"
