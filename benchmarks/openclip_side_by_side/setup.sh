#!/usr/bin/env bash
# OpenCLIP's own environment for the side-by-side harness, OUTSIDE the project's venv.
# OpenCLIP needs torchvision, which must never enter vlmkit's environment; a CPU torch build keeps it small.
# Usage: bash benchmarks/openclip_side_by_side/setup.sh [/work/oc-venv]
set -euo pipefail
VENV="${1:-/work/oc-venv}"
TORCH="${TORCH_VERSION:-2.13.0}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH"   # the local CPU wheel where pip's find-links has one, else PyPI's build
# torchvision matching that torch, without letting pip swap torch for another build.
TV="${TORCHVISION_VERSION:-0.28.0}"
"$VENV/bin/pip" install -q "torchvision==$TV" "torch==$TORCH"
"$VENV/bin/pip" install -q open_clip_torch "torch==$TORCH" "torchvision==$TV" pandas braceexpand webdataset   # open_clip_train ships inside open_clip_torch
"$VENV/bin/python" -c "import torch, torchvision, open_clip, open_clip_train; print('openclip env ok:', torch.__version__, torchvision.__version__, open_clip.__version__)"
