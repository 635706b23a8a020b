"""Helpers shared by the worker-pool tests: watching processes die, fake machines."""

from __future__ import annotations

import time

import psutil

from mp_executors.machine import Machine, detect_machine


def identity(pid: int) -> tuple[int, float] | None:
    """(pid, create_time): a process identity that survives pid reuse; None if gone."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def is_gone(pid: int, create_time: float | None = None, *, zombie_is_gone: bool = True) -> bool:
    """True when `pid` no longer runs (gone, reused by another process, or a zombie)."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return True  # the pid now belongs to someone else
        return zombie_is_gone and proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(
    procs: dict[int, float | None], timeout: float, *, zombie_is_gone: bool = True
) -> dict[int, str]:
    """Polls until every pid is gone; returns {pid: description} of those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {
            pid: ct for pid, ct in procs.items() if not is_gone(pid, ct, zombie_is_gone=zombie_is_gone)
        }
        if not alive or time.monotonic() > deadline:
            return {pid: describe(pid) for pid in alive}
        time.sleep(0.1)


def describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        return f"status={p.status()} ppid={p.ppid()} cmdline={' '.join(p.cmdline())[:160]!r}"
    except psutil.Error as e:
        return f"<{type(e).__name__}>"


def children_count() -> int:
    return len(psutil.Process().children(recursive=True))


def fake_gpu_machine(gpus: tuple[str, ...]) -> Machine:
    """This machine's real CPUs and memory, plus made-up GPU ids."""
    real = detect_machine()
    return Machine(
        usable_cpus=real.usable_cpus,
        logical_cpus=real.logical_cpus,
        physical_cores=real.physical_cores,
        total_memory=real.total_memory,
        available_memory=real.available_memory,
        gpus=gpus,
    )
