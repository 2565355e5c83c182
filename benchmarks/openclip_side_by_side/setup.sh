#!/usr/bin/env bash
# OpenCLIP's own environment for the side-by-side harness, OUTSIDE the project's venv (default /work/oc-venv).
# OpenCLIP needs torchvision, which must never enter vlmkit's environment.
# Usage: bash benchmarks/openclip_side_by_side/setup.sh [VENV]
#
# First try: the machine's CPU build of torch 2.13.0 plus torchvision 0.28.0 (its matching release). On PyPI
# torchvision's x86 wheel is linked against the CUDA build of torch (libtorch_cuda.so), so with the CPU build
# `import torchvision` fails ("operator torchvision::nms does not exist"). Then the script installs PyPI's
# torch 2.13.0 (the CUDA build, about 3 GB; it runs on the CPU) into this venv only, ignoring the machine's
# local wheel folder (pip --isolated).
set -euo pipefail
VENV="${1:-/work/oc-venv}"
TORCH="${TORCH_VERSION:-2.13.0}"
TV="${TORCHVISION_VERSION:-0.28.0}"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q "torch==$TORCH" "torchvision==$TV"
# open_clip_train (the trainer) ships inside the open_clip_torch wheel; pandas reads its CSV datasets.
# transformers: OpenCLIP's HF text towers (minilm-arch.json, the pretrained MiniLM read from a local folder).
"$PIP" install -q open_clip_torch "torch==$TORCH" "torchvision==$TV" pandas braceexpand webdataset transformers
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "torchvision does not load with this torch build; installing PyPI's torch $TORCH into $VENV" >&2
  "$PIP" --isolated install -q --cert /etc/ssl/certs/ca-certificates.crt --force-reinstall "torch==$TORCH" "torchvision==$TV"
fi
"$VENV/bin/python" -c "import torch, torchvision, open_clip, open_clip_train.main; print('openclip env ok:', torch.__version__, torchvision.__version__, open_clip.__version__)"
