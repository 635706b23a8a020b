"""The worker service: what runs inside each worker process.

A worker hosts `ClientShard`s (one per executor the parent has built, named
by a shard id) and answers one request per intrinsic with `handle()`. It is
started by `initialize(slot)`, which pins the process to its CPUs and applies
its thread and GPU settings BEFORE TensorFlow is imported: TensorFlow sizes
its thread pools from the affinity mask and reads CUDA_VISIBLE_DEVICES once.

Nothing here imports TensorFlow at module level: loky unpickles this module's
functions in a fresh worker before `initialize` has pinned it.

This module is transport-agnostic: the loky pool (`workers.pool`) calls these
functions; so could an actor of a distributed engine.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_shards: dict[int, Any] = {}
_slot_index: int | None = None


#: How often a worker checks that the parent that started it is still alive.
PARENT_POLL_SECONDS = 1.0


def _exit_when_orphaned(parent_pid: int) -> None:
    """Ends this worker soon after its parent dies, however the parent died.

    loky workers block on their call pipe with no time limit and do not
    notice a SIGKILLed parent, so each worker watches for itself: when its
    parent pid is gone (we have been re-parented), it exits at once.
    """
    import threading  # noqa: PLC0415

    def watch():
        import time  # noqa: PLC0415

        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="mp_executors-parent-watch", daemon=True).start()


def initialize(slot_index: int, cpus: tuple[int, ...], env: dict[str, str], parent_pid: int | None = None) -> None:
    """Pins this process, applies the slot's environment, imports TensorFlow."""
    global _slot_index
    _slot_index = slot_index
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what an interrupt means (it cancels and, if needed, replaces workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_when_orphaned(parent_pid)
    maybe_inject_fault("start")
    os.environ.update(env)
    if cpus:
        try:
            import psutil  # noqa: PLC0415

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
    from mp_executors.executors import client_shard  # noqa: F401, PLC0415 - warm the imports


def open_shard(shard_id: int, start: int, stop: int, device: str | None = None) -> None:
    from mp_executors.executors.client_shard import ClientShard  # noqa: PLC0415

    shard = ClientShard(start, stop, device)
    shard.location = f" in worker slot {_slot_index} (pid {os.getpid()})"
    _shards[shard_id] = shard


def close_shard(shard_id: int) -> None:
    _shards.pop(shard_id, None)


_functions: dict[str, Any] = {}


def handle(shard_id: int, releases: list[int], method: str, args: tuple, new_functions: list = ()) -> Any:
    """Runs one request on one shard: release stale handles, then `method(*args)`.

    `new_functions` are compiled computations this worker has not seen; `args`
    refer to every compiled computation by digest (`transport.FunctionRef`).
    """
    from mp_executors.workers import transport  # noqa: PLC0415

    for function in new_functions:
        _functions[function.digest] = function
    args = transport.resolve_functions(args, _functions)
    shard = _shards[shard_id]
    if releases:
        shard.release(releases)
    maybe_inject_fault("put" if method == "put_columns" else method)
    if method == "put_columns":
        return shard.put_columns(*_attach_columns(args))
    result = getattr(shard, method)(*args)
    return result


def _attach_columns(args: tuple) -> tuple:
    from mp_executors.workers import transport  # noqa: PLC0415

    handle_id, member_type, columns = args
    return handle_id, member_type, transport.decode_columns(columns)


FAULT_FILE_VARIABLE = "MP_EXECUTORS_TEST_FAULT_FILE"


def maybe_inject_fault(phase: str) -> None:
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
    if want_phase != phase or int(want_slot) != _slot_index:
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
        import time  # noqa: PLC0415

        time.sleep(float(how.split(":", 1)[1]))


def report() -> dict[str, Any]:
    """Where and how this worker runs (for tests, `mp-executors info`, logs)."""
    import psutil  # noqa: PLC0415

    tf = sys.modules.get("tensorflow")
    proc = psutil.Process()
    info = {
        "slot": _slot_index,
        "pid": os.getpid(),
        "cpu_affinity": proc.cpu_affinity() if hasattr(proc, "cpu_affinity") else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "rss": proc.memory_info().rss,
        "tensorflow_imported": tf is not None,
        "shards": sorted(_shards),
        "values_held": sum(len(shard.values) for shard in _shards.values()),
        "modules": len(sys.modules),
        "functions": sorted(_functions),
    }
    if tf is not None:
        info["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
        info["inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
    return info
