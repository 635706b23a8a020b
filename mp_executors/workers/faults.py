"""Fault injection for the tests: a worker that dies (or stalls) at a chosen moment.

Its own module because both sides of the worker call it: the importable entry
points (`worker`, before TensorFlow is imported) and the `Worker` object
(`service`, after).
"""

from __future__ import annotations

import os
import signal
import time

FAULT_FILE_VARIABLE = "MP_EXECUTORS_TEST_FAULT_FILE"


def maybe_inject_fault(phase: str, slot_index: int) -> None:
    """Test hook: dies (or stalls) as a fault file asks, exactly once.

    When the environment variable MP_EXECUTORS_TEST_FAULT_FILE names a file
    containing "<phase> <slot> <how>" (how: sigkill | segv | exit | sleep:<s>),
    the worker of that slot claims the file (an atomic rename, so only one
    worker fires, once) when it reaches that phase. The fault-injection tests
    use it to kill real workers at a chosen moment; it costs one getenv.
    """
    path = os.environ.get(FAULT_FILE_VARIABLE)
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            want_phase, want_slot, how = f.read().split()
    except (OSError, ValueError):
        return
    if want_phase != phase or int(want_slot) != slot_index:
        return
    try:
        os.rename(path, f"{path}.fired")
    except OSError:
        return  # another worker claimed it
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "exit":
        os._exit(7)
    elif how.startswith("sleep:"):
        time.sleep(float(how.split(":", 1)[1]))
