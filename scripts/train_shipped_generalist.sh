#!/usr/bin/env bash
# How models/generalist_int8.onnx was made (issue 13): a chain of scripts/train_generalist.sh runs, each started from
# the last one's file and training on its own episodes and the earlier runs' (linked into its data folder).
#   1. runs/gen3   six pairs at once (weak: the conditioning is not read); its demonstrations and DAgger episodes
#                  are reused, and a third round of its Panda episodes is collected without training on it
#   2. runs/pair   the two stacking tasks alone, from the shipped stacking policy's weights: the conditioning is read
#   3. runs/quad   the four Panda tasks, from the two-task file; one round, then a second round's
#                  stack_red_on_blue episodes only
#   4. runs/six    all six pairs (the xArm6 added), from the four-task file; two rounds
#   5. runs/six-x  two rounds that collect on the xArm6 only (its tasks were 4–6 % in the policy's rounds), training
#                  on the xArm6's episodes and the Panda's episodes of runs/six's rounds
#   6. runs/six-all a fine-tune on every episode of runs/six and runs/six-x, then one round on all six pairs:
#                  the shipped file
# About 4.7 h on 2 CPU cores. Every step skips what is already there, so a stopped run resumes.
# Usage: scripts/train_shipped_generalist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=scripts/train_generalist.sh
G=.venv/bin/gato-ros
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
ALL="panda:stack_red_on_blue panda:stack_blue_on_red panda:lift_red panda:lift_blue xarm6:lift_red xarm6:lift_blue"
PANDA="panda:stack_red_on_blue panda:stack_blue_on_red panda:lift_red panda:lift_blue"
STACKS="panda:stack_red_on_blue panda:stack_blue_on_red"
link() {  # link SOURCE_DIR WORKDIR NAME: SOURCE_DIR as WORKDIR/data/NAME
    mkdir -p "$2/data" && [ -e "$2/data/$3" ] || ln -s "$(readlink -f "$1")" "$2/data/$3"
}
link_episodes() {  # link_episodes RUN WORKDIR DIR...: each DIR by its name, a run's own dagger-N-* as RUNdaggerN-*
    local run=$1 workdir=$2 d name && shift 2
    for d in "$@"; do
        name=$(basename "$d") && case $name in dagger-*) name=$run${name/dagger-/dagger};; esac
        link "$d" "$workdir" "$name"
    done
}
start_from() {  # start_from CHECKPOINT WORKDIR
    mkdir -p "$2" && [ -e "$2/init" ] || ln -s "$(readlink -f "$1")" "$2/init"
}
demos() {  # demos WORKDIR PAIRS: the six-pair run's demonstrations (the seeds the recipe would draw)
    for pair in $2; do link "runs/gen3/data/bc-${pair%%:*}-${pair##*:}" "$1" "bc-${pair%%:*}-${pair##*:}"; done
    case " $2 " in *" panda:stack_blue_on_red "*) link runs/gen3/data/bc2-panda-stack_blue_on_red "$1" \
        bc2-panda-stack_blue_on_red;; esac
}
collect_round() {  # collect_round POLICY ROUND BETA WORKDIR PAIR SEED: one round's DAgger episodes of one pair
    local arm=${5%%:*} task=${5##*:} out="$4/data/dagger-$2-${5%%:*}-${5##*:}"
    [ -f "$out/dataset.json" ] || $G collect --episodes 100 --task "$task" --arm "$arm" --workers 2 --seed "$6" \
        --policy "$1" --beta "$3" --out "$out"
}

# 1. Six pairs at once, then its third round's Panda episodes (seeds as the recipe's round 3 draws them).
$T runs/gen3 2 3000 100
seed=7300
for pair in $ALL; do
    seed=$((seed + 1))
    if [ "${pair%%:*}" = panda ]; then collect_round runs/gen3/ft3.int8.onnx 3 0.1 runs/gen3 "$pair" $seed; fi
done

# 2. The two stacking tasks.
demos runs/pair "$STACKS"
for r in 1 2 3; do for pair in $STACKS; do
    link "runs/gen3/data/dagger-$r-${pair/:/-}" runs/pair "gen3dagger$r-${pair/:/-}"; done; done
PAIRS=$STACKS BETA=0.2 FIRST_EPISODES=100 INSTRUCTION_PROB=0.75 $T runs/pair 6 2000 100

# 3. Four Panda tasks.
start_from runs/pair/ft7 runs/quad
demos runs/quad "$PANDA"
for pair in $PANDA; do for r in 1 2 3; do
    link "runs/gen3/data/dagger-$r-${pair/:/-}" runs/quad "gen3dagger$r-${pair/:/-}"; done; done
for pair in $STACKS; do for r in 1 2 3 4 5 6; do
    link "runs/pair/data/dagger-$r-${pair/:/-}" runs/quad "pairdagger$r-${pair/:/-}"; done; done
PAIRS=$PANDA BETA=0.2 FIRST_EPISODES=100 INSTRUCTION_PROB=0.75 $T runs/quad 1 2000 100
collect_round runs/quad/ft2.int8.onnx 2 0.2 runs/quad panda:stack_red_on_blue 7201

# 4. Six pairs from the four-task file.
start_from runs/quad/ft2 runs/six
demos runs/six "$ALL"
link_episodes quad runs/six runs/quad/data/*
for pair in xarm6:lift_red xarm6:lift_blue; do for r in 1 2; do
    link "runs/gen3/data/dagger-$r-${pair/:/-}" runs/six "gen3dagger$r-${pair/:/-}"; done; done
PAIRS=$ALL BETA=0.2 FIRST_EPISODES=100 INSTRUCTION_PROB=0.75 $T runs/six 2 2000 100

# 5. The xArm6's rounds: collect on it only; train on its episodes and the Panda's of runs/six's rounds.
start_from runs/six/ft3 runs/six-x
link_episodes six runs/six-x runs/six/data/*xarm6* runs/six/data/dagger-*-panda-*
PAIRS="xarm6:lift_red xarm6:lift_blue" TRAIN_PAIRS=$ALL BETA=0.2 FIRST_EPISODES=150 INSTRUCTION_PROB=0.75 \
    $T runs/six-x 2 3000 150

# 6. A fine-tune on every episode of runs/six and runs/six-x (the Panda had lost ground in 5), then a round on all six.
start_from runs/six-x/ft3 runs/six-all
link_episodes six runs/six-all runs/six/data/*
link_episodes sixx runs/six-all runs/six-x/data/dagger-*
BETA=0.2 FIRST_EPISODES=100 INSTRUCTION_PROB=0.75 $T runs/six-all 1 1500 100
cp runs/six-all/generalist_int8.onnx models/generalist_int8.onnx
echo "shipped: models/generalist_int8.onnx"
