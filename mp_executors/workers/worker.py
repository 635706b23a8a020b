"""The worker service's entry points: what loky (or a Ray actor) calls in a worker process.

A worker process hosts one `service.Worker` object, which owns the process's
state (its `ClientShard`s by shard id, the compiled functions it was sent, the
shared-memory segments it has mapped, its ClientData cache) for the lifetime
of the process. `initialize(slot)` creates it, after pinning the process to
its CPUs and applying its thread and GPU settings BEFORE TensorFlow
initialises: TensorFlow sizes its thread pools from the affinity mask and
reads its thread counts and CUDA_VISIBLE_DEVICES when it initialises. A worker
forked from `workers.fork_server` has TensorFlow imported already but not
initialised (`report()["start"]` says so); a spawned one imports it here,
after pinning.

The other functions here (`open_shard`, `close_shard`, `handle_batch`, `report`)
only forward to that object: loky and Ray need importable module-level
functions to send to a worker.

Nothing here imports TensorFlow at module level: loky unpickles this module's
functions in a fresh worker before `initialize` has pinned it.

This module is transport-agnostic: the loky pool (`workers.pool`) calls these
functions; so does an actor of a distributed engine (`workers.ray_pool`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from mp_executors.workers import fork_server
from mp_executors.workers.faults import maybe_inject_fault

if TYPE_CHECKING:  # imports TensorFlow: only after pinning (see initialize)
    from mp_executors.workers.service import Worker

#: This process's Worker: created by `initialize`, lives as long as the process.
_worker: Worker | None = None


#: How often a worker checks that the parent that started it is still alive.
PARENT_POLL_SECONDS = 1.0


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie (a SIGKILLed parent may stay a zombie until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no procfs (macOS): existence is all we can see
        return True


def _exit_when_orphaned(parent_pid: int) -> None:
    """Ends this worker soon after the pool's owner dies, however it died.

    loky workers block on their call pipe with no time limit and do not
    notice a SIGKILLed parent, so each worker watches for itself: it exits
    at once when the pool's owner (`parent_pid`) no longer runs. The owner is
    this process's parent (loky's own start methods: then being re-parented
    is the sign) or its grandparent (through `workers.fork_server`: if the
    fork server alone dies, loky sees it as this worker's death and replaces
    the worker).
    """
    started_by_owner = os.getppid() == parent_pid

    def orphaned() -> bool:
        return (started_by_owner and os.getppid() != parent_pid) or not _running(parent_pid)

    if orphaned():
        os._exit(3)

    def watch():
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if orphaned():
                os._exit(3)

    threading.Thread(target=watch, name="mp_executors-parent-watch", daemon=True).start()


def initialize(slot_index: int, cpus: tuple[int, ...], env: dict[str, str], parent_pid: int | None = None) -> None:
    """Pins this process, applies the slot's environment, imports TensorFlow, creates the Worker."""
    global _worker
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what an interrupt means (it cancels and, if needed, replaces workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_when_orphaned(parent_pid)
    fork_server.disable()  # a worker that imports TensorFlow below is no fork server's source
    maybe_inject_fault("start", slot_index)
    os.environ.update(env)
    global _started
    _started = _start_state()
    if "LOKY_MAX_MEMORY_LEAK_SIZE" in env and "loky.process_executor" in sys.modules:
        # A forked worker has loky imported already (by the fork server), with the
        # server's environment: its "memory leak" restart limit must be raised here.
        sys.modules["loky.process_executor"]._MAX_MEMORY_LEAK_SIZE = int(float(env["LOKY_MAX_MEMORY_LEAK_SIZE"]))
    if cpus:
        try:
            import psutil  # noqa: PLC0415 - only a pinned worker needs it, before TensorFlow

            psutil.Process().cpu_affinity(list(cpus))
        except (AttributeError, OSError, ValueError):  # macOS has no affinity; a CPU may be gone
            pass
    from mp_executors._tf import import_tensorflow  # noqa: PLC0415 - after pinning, on purpose

    tf = import_tensorflow()
    # Explicitly too: the env variables are not reflected by tf.config's getters.
    intra = int(env.get("TF_NUM_INTRAOP_THREADS", "0") or 0)
    inter = int(env.get("TF_NUM_INTEROP_THREADS", "0") or 0)
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    if env.get("CUDA_VISIBLE_DEVICES"):
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    from mp_executors.workers.service import Worker  # noqa: PLC0415 - imports TensorFlow: after pinning

    _worker = Worker(slot_index)


#: How this worker started (`report()["start"]`): set by `initialize` before it touches TensorFlow.
_started: dict[str, Any] = {}


def _start_state() -> dict[str, Any]:
    """Whether TensorFlow was imported already (a forked worker) and, if so, still uninitialised."""
    imported = "tensorflow" in sys.modules
    return {"tensorflow_preimported": imported, "pristine": (not imported) or fork_server.tensorflow_is_pristine()}


def current() -> Worker:
    """This process's Worker (a RuntimeError in a process that is not a worker)."""
    if _worker is None:
        raise RuntimeError("this process is not an mp_executors worker: worker.initialize() has not run in it.")
    return _worker


def open_shard(shard_id: int, start: int, stop: int, device: str | None = None) -> None:
    current().open_shard(shard_id, start, stop, device)


def close_shard(shard_id: int) -> None:
    current().close_shard(shard_id)


def handle_batch(items: list[tuple], progress: tuple[str, int] | None = None) -> list[tuple[bool, Any]]:
    """Runs the requests of one message in order (see `service.Worker.handle_batch`)."""
    return current().handle_batch(items, progress)


def report() -> dict[str, Any]:
    """Where and how this worker runs, and what it holds (see `service.Worker.report`)."""
    return {**current().report(), "start": dict(_started)}
