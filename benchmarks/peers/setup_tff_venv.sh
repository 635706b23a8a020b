#!/usr/bin/env bash
# Creates the separate virtual environment holding the peer, TensorFlow Federated 0.87.0
# (its native C++ runtime), exactly as ../../shared/FACTS.md describes.
#
#     bash benchmarks/peers/setup_tff_venv.sh [VENV_DIR]
#
# VENV_DIR defaults to $MP_EXECUTORS_TFF_VENV, else ~/.cache/mp_executors/tff-venv (the place
# `mp-executors bench` and tests/test_tff_venv.py look). TFF is never a dependency of
# mp_executors: it lives only here.
#
# It also installs this checkout into the venv (`pip install --no-deps -e .`, TF 2.14 and
# numpy 1.25 stay as TFF needs them) with our own dependencies and the test tools, so that
# `mp_executors.tff` (running TFF's computations on our executors) and tests/tff run there.
# Re-running it on a ready venv only refreshes that install (seconds).
#
# Why the two steps: every TFF release that supports Python 3.11 (0.64-0.87) pins
# jaxlib==0.4.14, which PyPI no longer has. So TFF is installed without its dependencies,
# then its declared requirements are installed with jax/jaxlib 0.4.13. (~2 min, ~2.5 GB.)
set -euo pipefail

VENV="${1:-${MP_EXECUTORS_TFF_VENV:-$HOME/.cache/mp_executors/tff-venv}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"TFF 0.87 needs Python 3.11 here, this is {sys.version.split()[0]}; set PYTHON=python3.11")
PY

REPO="$(cd "$(dirname "$0")/../.." && pwd)"

install_project() {
    # pytest 7.4: newer pytest needs packaging>=24, tensorflow-privacy pins packaging~=22.0.
    "$VENV/bin/python" -m pip install -q "loky>=3.4" "cloudpickle>=2.0" "psutil>=5.9" \
        "pytest==7.4.*" "pytest-timeout>=2.1"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
    "$VENV/bin/python" -c "import mp_executors.tff" 2>/dev/null
    echo "mp_executors installed into $VENV (from $REPO)"
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import tensorflow_federated" 2>/dev/null; then
    echo "TFF venv already ready: $VENV"
    install_project
    exit 0
fi

echo "creating the TFF 0.87.0 venv in $VENV (~2 min, ~2.5 GB) ..."
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --no-deps tensorflow-federated==0.87.0
"$VENV/bin/python" -m pip install -q \
    "absl-py==1.*" "attrs~=23.1" "cachetools~=5.3" "dm-tree==0.1.8" "dp-accounting==0.4.3" \
    "google-vizier==0.1.11" "grpcio~=1.46" "jax==0.4.13" "jaxlib==0.4.13" "ml-dtypes==0.2.*" \
    "numpy~=1.25" "portpicker~=1.6" "scipy~=1.9.3" "tensorflow-model-optimization==0.7.5" \
    "tensorflow-privacy==0.9.0" "tensorflow==2.14.*" "tqdm~=4.64" "typing-extensions==4.5.*" \
    "googleapis-common-protos==1.61.0" psutil

"$VENV/bin/python" - <<'PY'
import tensorflow_federated as tff
print("TFF", tff.__version__, "ready")
PY
install_project
echo "peer venv ready: $VENV"
