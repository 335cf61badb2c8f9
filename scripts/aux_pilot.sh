#!/usr/bin/env bash
# Does the auxiliary task_state target help a seeing policy find the cube? Same demos, same steps, same seed:
# behaviour cloning with and without `--aux-key task_state`, then the closed-loop closest approach of the hand
# to the red cube on 10 held-out seeds (scripts/seeing_pilot.py reach). CPU, one thread per trainer.
# Usage: scripts/aux_pilot.sh [WORKDIR] [EPISODES] [STEPS]   (default: runs/aux-pilot 160 1500)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/aux-pilot}; EPISODES=${2:-160}; STEPS=${3:-1500}
G=.venv/bin/gato-ros
mkdir -p "$W"
$G collect --episodes "$EPISODES" --workers 2 --seed 700 --image-size 64 --cameras scene --no-task-state \
    --aux-keys task_state --out "$W/demos"
TRAIN=(--data "$W/demos" --preset tiny --context-window 164 --seq-len 328 --stride-steps 2 --steps "$STEPS"
       --batch-size 32 --lr 1e-3 --warmup 100 --eval-every 500 --threads 1 --seed 0 --no-progress)
$G train "${TRAIN[@]}" --out "$W/plain" > "$W/plain.log" 2>&1 &
$G train "${TRAIN[@]}" --out "$W/aux" --aux-key task_state --aux-weight 1 > "$W/aux.log" 2>&1
wait
for m in plain aux; do
    $G export --checkpoint "$W/$m" --out "$W/$m.onnx" --variants fp32
    .venv/bin/python scripts/seeing_pilot.py reach "$W/$m.onnx" --seeds 100000 --episodes 10 --json "$W/reach-$m.json"
done
