#!/usr/bin/env bash
# The shipped stacking policy's whole recipe: expert demos -> behaviour cloning -> six DAgger rounds
# interleaved with fine-tunes -> export (fp32 + int8) -> closed-loop evaluation. Every step is a gato-ros subcommand.
# On 2 CPU cores it takes about 2.5 hours (collection ~10 min, training ~95 min, DAgger ~25 min).
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
#    run pauses at steps 2100 and 2700 for DAgger data and stops at 3300.
BC=(--data "$W/stack-700" --out "$W/bc" --preset tiny --context-window 42 --seq-len 168 --stride-steps 4
    --epochs 25 --batch-size 64 --lr 1e-3 --warmup 200 --eval-every 300 --threads 1 --seed 0 --no-progress)
# 3. DAgger (Ross et al. 2011): the policy drives (the expert instead with probability beta per
#    step) and the expert labels every visited state, teaching recovery from the policy's own mistakes.
dagger() {  # dagger CHECKPOINT NAME SEED BETA WORKERS
    $G export --checkpoint "$1" --out "$W/$2.onnx" --variants fp32
    $G collect --episodes 200 --workers "$5" --seed "$3" --policy "$W/$2.onnx" --beta "$4" --out "$W/$2"
}
$G train "${BC[@]}" --stop-at 2100
dagger "$W/bc" dagger-a 11 0.3 1
$G train "${BC[@]}" --resume --stop-at 2700
dagger "$W/bc" dagger-b 12 0.2 1
$G train "${BC[@]}" --resume --stop-at 3300

# 4. Fine-tune from the step-3300 weights on demonstrations + DAgger data (fresh cosine schedule),
#    with two more DAgger rounds from the fine-tuned policy.
FT=(--init "$W/bc" --out "$W/ft" --seq-len 168 --stride-steps 4 --steps 2800 --batch-size 64 --lr 5e-4
    --warmup 100 --eval-every 300 --threads 1 --seed 1 --no-progress)
$G train --data "$W/stack-700" "$W/dagger-a" "$W/dagger-b" "${FT[@]}" --stop-at 1200
dagger "$W/ft" dagger-c 13 0.1 2
$G train --data "$W/stack-700" "$W/dagger-a" "$W/dagger-b" "$W/dagger-c" "${FT[@]}" --resume --stop-at 2100
dagger "$W/ft" dagger-d 14 0.1 2
$G train --data "$W/stack-700" "$W/dagger-a" "$W/dagger-b" "$W/dagger-c" "$W/dagger-d" "${FT[@]}" --resume

# 5. One more DAgger round from the fine-tuned policy, then a short low-rate fine-tune on everything.
dagger "$W/ft" dagger-e 15 0.1 2
$G train --data "$W/stack-700" "$W"/dagger-{a,b,c,d,e} --init "$W/ft" --out "$W/ft2" --seq-len 168 --stride-steps 4 \
    --steps 1200 --batch-size 64 --lr 2e-4 --warmup 50 --eval-every 300 --threads 1 --seed 2 --no-progress

# 6. A sixth DAgger round driven by the *int8* policy (the one shipped: its own mistakes are the states
#    worth labelling), 300 episodes, then the same short fine-tune on everything.
$G export --checkpoint "$W/ft2" --out "$W/ft2.onnx" --variants fp32,int8
$G collect --episodes 300 --workers 2 --seed 16 --policy "$W/ft2.int8.onnx" --beta 0.1 --out "$W/dagger-f"
$G train --data "$W/stack-700" "$W"/dagger-{a,b,c,d,e,f} --init "$W/ft2" --out "$W/ft3" --seq-len 168 --stride-steps 4 \
    --steps 1200 --batch-size 64 --lr 2e-4 --warmup 50 --eval-every 300 --threads 2 --seed 3 --no-progress

# 7. Export (fp32 parity-checked against torch; int8) and evaluate on 100 seeds never used in training.
$G export --checkpoint "$W/ft3" --out "$W/stack.onnx" --variants fp32,int8
$G eval --policy "$W/stack.onnx" --episodes 100 --seed 100000 --workers 2 --json "$W/eval-fp32.json"
$G eval --policy "$W/stack.int8.onnx" --episodes 100 --seed 100000 --workers 2 --json "$W/eval-int8.json"
$G eval --policy "$W/stack.onnx" --episodes 100 --seed 100000 --over-ros --json "$W/eval-fp32-ros.json"
$G eval --policy "$W/stack.int8.onnx" --episodes 100 --seed 100000 --over-ros --json "$W/eval-int8-ros.json"
# Ship: the int8 file, and the fp32 tokens on two expert episodes for tests/test_shipped_model.py.
cp "$W/stack.int8.onnx" models/stack_int8.onnx
.venv/bin/python scripts/write_fp32_reference.py "$W/stack.onnx" "$W/stack-700" models/stack_fp32_reference.npz
