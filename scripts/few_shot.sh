#!/usr/bin/env bash
# Few-shot (issue 13, the analogue of Gato's figure 10): the held-out task place_blue_at_marker, learned from 10, 50
# and 200 expert demonstrations by fine-tuning the generalist, against the same architecture trained from scratch
# with the same steps. Each arm of the comparison is behaviour cloning on the demos alone (no DAgger, no
# conditioning: one task), then a closed-loop eval on held-out seeds.
# Usage: scripts/few_shot.sh GENERALIST_CHECKPOINT [WORKDIR] [STEPS] [EPISODES]
#        (defaults: runs/few-shot, 1000 steps, 30 eval episodes; about 35 min on 2 quiet CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
INIT=${1:?the generalist checkpoint directory (scripts/train_generalist.sh: WORKDIR/ftN)}
W=${2:-runs/few-shot}
STEPS=${3:-1000}
EPISODES=${4:-30}
G=.venv/bin/gato-ros
TASK=place_blue_at_marker
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
mkdir -p "$W"
COMMON=(--seq-len 168 --stride-steps 2 --batch-size 32 --steps "$STEPS" --warmup 50 --eval-every 500
        --val-batches 5 --threads 2 --seed 0 --no-progress)
for n in 10 50 200; do
    [ -f "$W/demos-$n/dataset.json" ] || $G collect --episodes "$n" --task $TASK --workers 2 --seed $((800000 + n * 1000)) \
        --out "$W/demos-$n"
    for start in generalist scratch; do
        run="$W/$start-$n"
        if [ ! -f "$run.int8.onnx" ]; then
            if [ $start = generalist ]; then
                $G train --data "$W/demos-$n" --init "$INIT" --out "$run" --lr 5e-4 "${COMMON[@]}"
            else  # the generalist's architecture: tiny, one-timestep reach, the same pinned span
                $G train --data "$W/demos-$n" --out "$run" --preset tiny --context-window 42 --pinned-span 48 \
                    --step-local-attention \
                    --lr 1e-3 "${COMMON[@]}"
            fi
            $G export --checkpoint "$run" --out "$run.onnx" --variants fp32,int8 --attention plain \
                --context-tokens 96 --trained-capacities 96
        fi
        [ -f "$run.eval.json" ] || $G eval --policy "$run.int8.onnx" --task $TASK --episodes "$EPISODES" \
            --seed 100000 --workers 2 --condition none --json "$run.eval.json"
    done
done
.venv/bin/python scripts/few_shot_plot.py "$W" --task $TASK
