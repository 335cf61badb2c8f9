#!/bin/bash
# The seeing policy's recipe on a leased GPU machine (16 cores, one GPU, its own Python with torch, no PyBullet):
# the simulator stages run from a carried site folder (scripts/build_sim_site.sh), the data collected before on
# another box travels as --seed-data, and what a short lease can bring back is packed into $OUT (at most 8 files of
# 16 MiB): the newest int8 file even when the clock cut the run short, the behaviour-cloning pair of the window
# ablation, the logs and the last checkpoint's weights, then each round's int8 file and the DAgger datasets, newest
# first, while they fit.
#
#   SITE=.sim312/site.tar.xz SEED_DATA="runs/see2/statepol runs/see2/expert384" BUDGET=8.9 \
#       OUT=/tmp/out bash scripts/device_seeing_run.sh
#
# Both cameras (CAMERAS="scene wrist") make ~9x the data per episode, too much to carry: collect there instead,
# e.g. SEED_DATA= EXPERT=600 CAMERAS="scene wrist". INIT=CHECKPOINT continues a run trained elsewhere (no behaviour
# cloning: DAgger rounds from it); AUX is the aux target's weight (the CPU runs used 5); BETAS the expert's share of
# steps per DAgger round; EVAL_SECONDS=0 leaves the 100-seed evaluation to another machine; RANDOMIZE="1 1 0.2"
# collects with the cameras moved up to 1 cm, turned up to 1° and the light changed up to ±20 % per episode;
# DISCRETE_WEIGHT weighs the gripper token's loss (gato-ros train --discrete-weight).
export PYTHONUNBUFFERED=1 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-7} OMP_NUM_THREADS=1
T0=$(date +%s)
WORK=${WORK:-runs/see3}
mkdir -p /tmp/sim-site "$OUT" && tar -xJf "${SITE:-.sim312/site.tar.xz}" -C /tmp/sim-site || exit 3
export PYTHONPATH=/tmp/sim-site:$PWD
python3 -c "import pybullet, gymnasium, sim.env, gato_ros.runtime, torch; print('torch', torch.__version__, torch.cuda.is_available())" || exit 4
CORES=${WORKERS:-$(getconf _NPROCESSORS_ONLN)}  # not nproc: it answers OMP_NUM_THREADS
echo "$CORES cores"; nvidia-smi -L
BUDGET=${BUDGET:-8.9}
# shellcheck disable=SC2086  # SEED_DATA and CAMERAS are lists
timeout "$(python3 -c "print(int(60 * $BUDGET + 25))")" python3 scripts/train_seeing_policy.py --work "$WORK" \
  --workers "$CORES" --loader-workers 4 --budget-minutes "$BUDGET" --seed-data $SEED_DATA \
  --expert-episodes "${EXPERT:-0}" --cameras ${CAMERAS:-scene} ${INIT:+--init "$INIT"} \
  --prime-policy models/stack_int8.onnx --prime-episodes "${PRIME:-300}" --bc-minutes "${BC:-2.5}" \
  --round-minutes 0.9 --dagger-episodes "${DAGGER:-200}" --steps-per-minute "${SPM:-800}" --batch-size 256 \
  --final-minutes 1.0 --aux-weight "${AUX:-0.5}" --eval-seconds "${EVAL_SECONDS:-60}" ${BETAS:+--betas $BETAS} \
  ${RANDOMIZE:+--randomize $RANDOMIZE} ${DISCRETE_WEIGHT:+--discrete-weight $DISCRETE_WEIGHT} > "$OUT/log.txt" 2>&1
echo "recipe rc=$? after $(( $(date +%s) - T0 )) s"
cd "$WORK" || exit 5
cp latest.int8.onnx see.int8.onnx bc.int8.onnx ablation-w1.int8.onnx "$OUT/" 2>/dev/null
last=$(ls -td ft-final ft[0-9]* bc 2>/dev/null | head -1)
tar -czf "$OUT/ckpt.tgz" "$last"/*.json "$last"/model.safetensors ./*.json recipe.jsonl ./*/log.jsonl \
  ./*/episodes.jsonl ./*/dataset.json 2>/dev/null
python3 - <<'PY'
import glob, os, subprocess
out = os.environ["OUT"]
used = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
# Each round's int8 file (a later fine-tune can drive worse than an earlier one: keep them all), newest first, then
# the DAgger datasets, newest first, while they fit.
rounds = sorted(glob.glob("round*.int8.onnx") + glob.glob("start.int8.onnx"), key=os.path.getmtime, reverse=True)
datasets = sorted(glob.glob("dagger*") + glob.glob("primed"), key=os.path.getmtime, reverse=True)
for d in rounds + datasets:
    if len(os.listdir(out)) >= 8:
        break
    tar = os.path.join(out, d + ".tar")
    subprocess.run(["tar", "-cf", tar, d], check=False)
    if os.path.getsize(tar) > 16 * 2**20 or used + os.path.getsize(tar) > 62 * 2**20:
        os.remove(tar)
        continue
    used += os.path.getsize(tar)
print("packed", sorted(os.listdir(out)), f"{used / 2**20:.1f} MiB")
PY
echo "total $(( $(date +%s) - T0 )) s"
