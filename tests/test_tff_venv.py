"""The TFF drop-in (`mp_executors.tff`), from the main suite.

TensorFlow Federated 0.87 does not install next to this environment's
TensorFlow, so its tests (`tests/tff/`) run in TFF's own virtual environment:
this test runs them there, with this checkout on the path, and fails if they
fail. The venv is built by `bash benchmarks/peers/setup_tff_venv.sh` (CI does
it, cached in ~/.cache/mp_executors/tff-venv); where it does not exist the
test is skipped and says how to build it. `MP_EXECUTORS_TFF_VENV` points to
another venv.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("MP_EXECUTORS_TFF_VENV", Path.home() / ".cache" / "mp_executors" / "tff-venv"))
VENV_PYTHON = VENV / "bin" / "python"


def _venv_ready() -> str | None:
    """None if the venv can run the TFF tests, else why not."""
    if not VENV_PYTHON.exists():
        return f"no TFF venv at {VENV}"
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c", "import tensorflow_federated, loky, cloudpickle, psutil, pytest"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if probe.returncode:
        return f"the TFF venv at {VENV} lacks a package: {probe.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_federated") is not None,
                    reason="TFF is installed here: the ImportError path cannot be exercised")
def test_importing_mp_executors_tff_without_tff_says_how_to_install():
    with pytest.raises(ImportError, match="setup_tff_venv.sh"):
        import mp_executors.tff  # noqa: F401, PLC0415 - the import is what is tested


@pytest.mark.timeout(1800)
def test_tff_dropin_suite_in_the_tff_venv(tmp_path):
    why_not = _venv_ready()
    if why_not:
        pytest.skip(f"{why_not}; build it with `bash benchmarks/peers/setup_tff_venv.sh` (CI does)")
    log = tmp_path / "tff-tests.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MPX_TEST_FACTORIES", None)
    # Output goes to a file, not a pipe: TFF's native runtime starts a C++
    # worker that inherits the pipes (the tests stop it; a file cannot hang us).
    with open(log, "w") as out:
        result = subprocess.run(
            [str(VENV_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/tff"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1700,
        )
    text = log.read_text()
    print(text[-3000:])
    assert result.returncode == 0, f"tests/tff failed in {VENV}:\n{text[-6000:]}"
    assert " passed" in text and " skipped" not in text.splitlines()[-1], "the TFF tests did not run"
