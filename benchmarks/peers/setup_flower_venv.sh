#!/usr/bin/env bash
# Creates the separate virtual environment holding the second peer, Flower's simulation
# engine (flwr[simulation], which brings Ray), for benchmarks/peers/flower_bench.py.
#
#     bash benchmarks/peers/setup_flower_venv.sh [VENV_DIR]
#
# VENV_DIR defaults to $MP_EXECUTORS_FLOWER_VENV, else ~/.cache/mp_executors/flower-venv (the
# place `mp-executors bench --flower auto` looks). Flower and Ray are never dependencies of
# mp_executors and never go into its environment: they live only here. flower_bench.py
# imports nothing from mp_executors, so the project is not installed into this venv.
#
# Its FedAvg client is numpy (the workload's math in float32), so TensorFlow is not needed
# here either: ~40 s and ~0.5 GB. FLWR_VERSION pins the release (default 1.42.0, the one
# measured in README.md). Re-running it on a ready venv changes nothing (a second).
set -euo pipefail

VENV="${1:-${MP_EXECUTORS_FLOWER_VENV:-$HOME/.cache/mp_executors/flower-venv}}"
FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] < (3, 10):
    sys.exit(f"Flower {__import__('os').environ.get('FLWR_VERSION', '')} needs Python >= 3.10, "
             f"this is {sys.version.split()[0]}; set PYTHON=python3.11")
PY

ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$FLWR_VERSION" 2>/dev/null <<'PY'
import sys
import flwr, ray, psutil, numpy  # noqa: F401  (everything flower_bench.py imports)
sys.exit(0 if flwr.__version__ == sys.argv[1] else 1)
PY
}

if ready; then
    echo "Flower venv already ready: $VENV ($("$VENV/bin/python" -c 'import flwr; print("flwr", flwr.__version__)'))"
    exit 0
fi

echo "creating the Flower $FLWR_VERSION venv in $VENV (~40 s, ~0.5 GB) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "flwr[simulation]==$FLWR_VERSION" "psutil>=5.9"
ready || { echo "Flower venv at $VENV is not usable after installing (see pip's output above)" >&2; exit 1; }
"$VENV/bin/python" -c 'import flwr, ray; print("flwr", flwr.__version__, "ray", ray.__version__, "ready")'
echo "peer venv ready: $VENV"
