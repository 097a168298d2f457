#!/usr/bin/env bash
# Install the heavy optional extras (Cellpose with PyTorch, StarDist with TensorFlow) into the
# active virtual environment, after the core package and its test extra.
#
#   PIP="python -m pip" bash .ci/install-extras.sh      # PIP defaults to the venv's python -m pip
#
# PyTorch is pinned to the builds that lie on this machine's disk: without the pins pip would
# download a multi-GB CUDA build of the newest release. Cellpose and StarDist share one
# environment (NumPy 2, Keras 3). Cellpose 4 is what the extra installs; Cellpose 3 is installed
# beside it, without dependencies, into an overlay directory, so that the Cellpose tests can run
# a second time against Cellpose 3:
#
#   PYTHONPATH="$VIRTUAL_ENV/cellpose3-overlay" python -m pytest tests/test_cellpose_plugin.py
#
# BLOCKBUSTER_CELLPOSE3=0 skips the overlay.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-python -m pip}
start=$(date +%s)
step() { echo "install-extras: $* ($(( $(date +%s) - start )) s)"; }

case "$(uname -m)" in
  x86_64) torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
  aarch64 | arm64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
  *) echo "install-extras: no PyTorch pins for $(uname -m)" >&2; exit 1 ;;
esac

step "PyTorch ${torch_pins[*]}"
$PIP install --quiet "${torch_pins[@]}"

step "blockbuster[cellpose,stardist]"
# The torch pins again, so that the resolver keeps the build installed above.
$PIP install --quiet -e ".[cellpose,stardist]" "${torch_pins[@]}"

if [ "${BLOCKBUSTER_CELLPOSE3:-1}" != "0" ]; then
  site=$(python -c 'import sys; print(sys.prefix)')
  overlay="$site/cellpose3-overlay"
  step "Cellpose 3 overlay in $overlay"
  rm -rf "$overlay"
  # --no-deps: it runs on the environment's torch and NumPy (Cellpose 3 declares numpy<2.1 but
  # its tests pass on NumPy 2.4 here).
  $PIP install --quiet --no-deps --target "$overlay" "cellpose>=3.1,<4"
fi

python - <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "cellpose", "stardist", "csbdeep", "tensorflow", "keras",
             "numpy"):
    try:
        print(f"install-extras: {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"install-extras: {name} MISSING")
EOF
python -c "import torch, cellpose.models, tensorflow, stardist.models" 2>/dev/null \
  || { echo "install-extras: the extras do not import" >&2; exit 1; }
step "done"
