#!/usr/bin/env bash
# One-command set-up: creates .venv and installs handsynth with its test tools.
#   ./setup.sh                  CPU build of PyTorch unless an NVIDIA GPU is visible
#   HANDSYNTH_TORCH=cuda ./setup.sh   force the CUDA build (PyPI's default Linux wheel)
#   HANDSYNTH_TORCH=skip ./setup.sh   keep whatever torch the venv already has
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${HANDSYNTH_VENV:-.venv}
TORCH_VERSION=2.13.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel

mode=${HANDSYNTH_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  case "$mode" in
    cpu)  echo "setup: installing the CPU build of torch $TORCH_VERSION (no GPU found)"
          # --no-deps: only torch comes from PyTorch's CPU index; its dependencies come from PyPI below
          pip install -q --no-deps "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu ;;
    cuda) echo "setup: installing the CUDA build of torch $TORCH_VERSION"
          pip install -q "torch==$TORCH_VERSION" ;;
    skip) ;;
    *) echo "setup: HANDSYNTH_TORCH must be auto, cpu, cuda or skip (got '$mode')" >&2; exit 2 ;;
  esac
fi
pip install -q -e '.[dev]'
pip check
"$VENV/bin/handsynth" --version
echo "setup: done. Activate with: source $VENV/bin/activate"
