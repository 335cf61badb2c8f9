#!/usr/bin/env bash
# The generalist's recipe (issue 13): one network for four Panda tasks and the xArm6's two, the task selected by a
# demonstration prompt or an instruction pinned at the start of the context for the whole episode.
# Observations: those of the shipped stacking policy (joints + the privileged task_state), so the seeing policy's
# question (issue 10) stays apart from this one.
# The model keeps the shipped policy's one-timestep reach (42 tokens) over the episode's own tokens and sees the
# pinned prefix from anywhere (--pinned-span 48: positions 0..47 hold the prompt or instruction), so a window with
# no prefix is exactly what the shipped policy was trained on and its weights are a sound start.
# Stages, each a gato-ros subcommand: expert demos per (arm, task) -> fine-tune from the shipped stacking policy
# (its weights recovered from models/stack_int8.onnx) on all of them -> DAgger rounds, the policy told the task by
# its instruction -> export (plain attention: the runtime pins the prefix).
# The held-out task (place_blue_at_marker) is left out for the few-shot study.
# Usage: scripts/train_generalist.sh [WORKDIR] [ROUNDS] [STEPS] [EPISODES]
#        (defaults: runs/generalist, 2 DAgger rounds, 3000 steps per fine-tune (the first 4000), 100 episodes
#        per pair and round (the first round 40); ~50 min on 2 quiet CPU cores)
# Environment: PAIRS (arm:task ...; default the six below), BETA (the expert's share of DAgger steps, 0.1),
#        FIRST_EPISODES (per pair in round 1, 40), INSTRUCTION_PROB (share of windows with the instruction, 0.5;
#        a quarter have a prompt, the rest nothing), TRAIN_PAIRS (the pairs whose episodes in WORKDIR/data every
#        fine-tune trains on; default PAIRS, which are the pairs demonstrated and collected: with PAIRS a subset,
#        the rounds collect only where the policy is weakest while it keeps training on the others' episodes)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/generalist}
ROUNDS=${2:-2}
STEPS=${3:-3000}
EPISODES=${4:-100}
G=.venv/bin/gato-ros
PY=.venv/bin/python
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
mkdir -p "$W/data"
PAIRS=${PAIRS:-"panda:stack_red_on_blue panda:stack_blue_on_red panda:lift_red panda:lift_blue xarm6:lift_red xarm6:lift_blue"}
BETA=${BETA:-0.1}
FIRST_EPISODES=${FIRST_EPISODES:-40}
INSTRUCTION_PROB=${INSTRUCTION_PROB:-0.5}
TRAIN_PAIRS=${TRAIN_PAIRS:-$PAIRS}

# 1. Expert demonstrations, 200 per (arm, task) (400 for stack_blue_on_red, the task the start knows least),
#    half noise-injected (clean labels); successes only.
seed=500
for pair in $PAIRS; do
    arm=${pair%%:*} task=${pair##*:} seed=$((seed + 1))
    out="$W/data/bc-$arm-$task"
    [ -f "$out/dataset.json" ] || $G collect --episodes 200 --task "$task" --arm "$arm" --workers 2 \
        --seed $((seed * 1000)) --out "$out"
done
case " $PAIRS " in *" panda:stack_blue_on_red "*)
    [ -f "$W/data/bc2-panda-stack_blue_on_red/dataset.json" ] || $G collect --episodes 200 \
        --task stack_blue_on_red --arm panda --workers 2 --seed 611000 --out "$W/data/bc2-panda-stack_blue_on_red";;
esac

# 2. Start from the shipped stacking policy's weights (the xArm6's spec is new to it: a fine-tune may add a body).
[ -f "$W/init/model.safetensors" ] || $PY scripts/recover_checkpoint.py models/stack_int8.onnx "$W/init"

# 3. Train on 168-token windows: a quarter start with a one-timestep demonstration of the same task (half from
#    episode ends), half with the task's instruction, a quarter with nothing. The runtime's cache holds the
#    pinned prefix and the reach: 96 tokens.
data() { for pair in $TRAIN_PAIRS; do arm=${pair%%:*} task=${pair##*:}; ls -d "$W"/data/*-"$arm-$task"; done | tr '\n' ' '; }
TRAIN=(--seq-len 168 --context-window 42 --pinned-span 48 --step-local-attention --prompt-prob 0.25 --prompt-steps 1
       --instruction-prob "$INSTRUCTION_PROB" --stride-steps 2 --batch-size 32 --warmup 100 --eval-every 500 --val-batches 5
       --threads 2 --no-progress)
EXPORT=(--attention plain --context-tokens 96 --trained-capacities 96)
stage() {  # stage NAME INIT LR SEED STEPS
    [ -f "$W/$1.int8.onnx" ] && return
    local resume=() && [ -f "$W/$1/train_state.json" ] && resume=(--resume)
    # shellcheck disable=SC2046
    $G train --data $(data) --init "$2" --out "$W/$1" --steps "$5" --lr "$3" --seed "$4" "${TRAIN[@]}" \
        "${resume[@]}"
    $G export --checkpoint "$W/$1" --out "$W/$1.onnx" --variants fp32,int8 "${EXPORT[@]}"
}
dagger() {  # dagger POLICY ROUND BETA: EPISODES per (arm, task) (40 in round 1), the policy told the task by its
    local seed=$((7000 + $2 * 100)) episodes=$EPISODES  # instruction
    [ "$2" = 1 ] && episodes=$FIRST_EPISODES
    for pair in $PAIRS; do
        arm=${pair%%:*} task=${pair##*:} seed=$((seed + 1))
        out="$W/data/dagger-$2-$arm-$task"
        [ -f "$out/dataset.json" ] || $G collect --episodes "$episodes" --task "$task" --arm "$arm" --workers 2 \
            --seed "$seed" --policy "$1" --beta "$3" --out "$out"
    done
}
stage ft1 "$W/init" 5e-4 1 $((STEPS + STEPS / 3))
prev=ft1
for r in $(seq 1 "$ROUNDS"); do
    dagger "$W/$prev.int8.onnx" "$r" "$BETA"
    stage "ft$((r + 1))" "$W/$prev" 3e-4 $((r + 1)) "$STEPS"
    prev=ft$((r + 1))
done
cp "$W/$prev.int8.onnx" "$W/generalist_int8.onnx"
echo "generalist: $W/generalist_int8.onnx"
