#!/bin/bash
# A carried site folder that lets another machine's Python run the simulator stages (collect, eval, DAgger):
# PyBullet publishes no wheel for every Python (none for 3.12), so build it from the sdist with an interpreter
# of the target's version, keep its extension (stripped: 108 MB -> 8 MB) and the pybullet_data files the sim
# loads (plane, table, Franka Panda, xArm6, checker texture), plus gymnasium. numpy and onnxruntime must be on the
# target already. Frames rendered with such a build are bit-identical to the PyPI wheel's (checked on 3.11 vs 3.12).
#
#   scripts/build_sim_site.sh /root/.pyenv/versions/3.12.1/bin/python .sim312/site.tar.xz
# PYBULLET_WHEEL=path.whl skips the build (about 10 minutes on 2 cores) with a wheel built before.
set -euo pipefail
PYTHON=${1:?python of the target version}
OUT=${2:?output .tar.xz}
WORK=$(mktemp -d)
"$PYTHON" -m venv "$WORK/venv"
mkdir -p "$WORK/wheels"
if [ -n "${PYBULLET_WHEEL:-}" ]; then
  cp "$PYBULLET_WHEEL" "$WORK/wheels/"
else
  "$WORK/venv/bin/pip" install -q numpy setuptools wheel  # numpy at build time: pybullet returns numpy arrays
  "$WORK/venv/bin/pip" download -q --no-deps --no-binary=:all: -d "$WORK" pybullet==3.2.7
  "$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK"/pybullet-3.2.7.tar.gz
fi
"$WORK/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$WORK/wheels" gymnasium farama-notifications
mkdir -p "$WORK/site" "$WORK/unpacked"
(cd "$WORK/unpacked" && for w in "$WORK"/wheels/*.whl; do unzip -q -o "$w"; done)
cp "$WORK"/unpacked/pybullet.cpython-*.so "$WORK/site/" && strip --strip-unneeded "$WORK"/site/pybullet.cpython-*.so
cp -r "$WORK/unpacked/gymnasium" "$WORK/unpacked/farama_notifications" "$WORK/site/"
mkdir -p "$WORK/site/pybullet_data"
(cd "$WORK/unpacked/pybullet_data" && cp -r __init__.py plane* checker_blue.png table franka_panda xarm "$WORK/site/pybullet_data/")
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$(dirname "$OUT")"
tar -cJf "$OUT" -C "$WORK/site" .
rm -rf "$WORK"
ls -la "$OUT"
