"""No worker process outlives its pool: on close(), on a normal exit, on SIGKILL.

The exit scenarios run a small Python script in a subprocess (the script is
the workers' parent); the test reads the worker pids the script prints and
watches them with psutil. A pid counts as gone when it no longer exists, now
belongs to another process (checked by start time), or is a zombie (an
orphaned worker that exited but that no one has reaped yet has stopped
running).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from _pool_helpers import describe, identity, wait_gone

import mp_executors as mpx

CLIENTS_F32 = mpx.FederatedType(mpx.TensorType(np.float32), mpx.CLIENTS)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import psutil

    import mp_executors as mpx

    @mpx.federated_computation(mpx.FederatedType(mpx.TensorType(np.float32), mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(xs)

    factory = mpx.mp_executor_factory(num_workers=2)
    with mpx.execution_context(factory):
        result = total([float(i) for i in range(16)])
    assert result == 120.0, result
    assert factory.pool.size == 2, factory.pool.size
    workers = factory.pool.pids()
    others = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in workers]
    times = {str(p): psutil.Process(p).create_time() for p in workers + others}
    print(json.dumps({"workers": workers, "others": others, "create_times": times}), flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(600)
    # "exit": leave without closing the factory.
    """
)


def _script_env():
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # The script must import the package the same way the tests do.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _parse(line: str):
    info = json.loads(line)
    times = {int(k): v for k, v in info["create_times"].items()}
    workers = {pid: times[pid] for pid in info["workers"]}
    others = {pid: times[pid] for pid in info["others"]}
    return workers, others


def _report(alive: dict[int, str]) -> str:
    return "; ".join(f"pid {pid}: {what}" for pid, what in alive.items())


class Scripts:
    """Both scenarios' scripts, started together so that their start-ups overlap.

    The sleeping one is SIGKILLed as soon as it has printed its pids, so that the
    15 s allowed to its workers runs while the other tests run.
    """

    def __init__(self, directory):
        script = directory / "call_then_exit_or_sleep.py"
        script.write_text(SCRIPT)
        common = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_script_env())
        self.sleeper = subprocess.Popen([sys.executable, str(script), "sleep"], **common)
        self.exiter = subprocess.Popen([sys.executable, str(script), "exit"], **common)
        self.reported: dict[int, float] = {}

    def kill_sleeper(self):
        proc = self.sleeper
        workers, others = _parse(_read_line(proc, 180.0))
        self.reported.update({**workers, **others})
        for pid in workers:
            assert psutil.Process(pid).ppid() == proc.pid, describe(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return workers, others, time.monotonic()

    def close(self) -> None:
        # Never leave the orphans of a failed run behind: kill the pids the scripts
        # reported (and only those, checked by start time). First: they hold the
        # scripts' stdout/stderr pipes open.
        for proc in (self.sleeper, self.exiter):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid, ct in self.reported.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ct) < 0.01:
                    p.kill()
            except psutil.Error:
                pass
        for proc in (self.sleeper, self.exiter):
            for stream in (proc.stdout, proc.stderr):
                stream.close()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    s = Scripts(tmp_path_factory.mktemp("cleanup"))
    try:
        s.killed = s.kill_sleeper()
        yield s
    finally:
        s.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"the script exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    raise AssertionError("the script printed no pids in time")


def _stdout_lines(proc: subprocess.Popen, timeout: float) -> list[str]:
    """The script's output once it has exited (not waiting for EOF: orphans may hold the pipe)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the script did not exit within {timeout} s (hung at exit?)") from None
    lines = []
    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return lines


# ---------------------------------------------------------------- tests


def test_normal_exit_without_close_leaves_no_process(scripts):
    proc = scripts.exiter
    lines = _stdout_lines(proc, 180.0)
    exited = time.monotonic()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    workers, others = _parse(lines[-1])
    scripts.reported.update({**workers, **others})
    assert len(workers) == 2
    alive = wait_gone(workers, max(0.0, 10.0 - (time.monotonic() - exited)))
    assert alive == {}, f"workers alive 10 s after their parent exited: {_report(alive)}"
    alive = wait_gone(others, 1.0)
    assert alive == {}, f"helper processes alive after their parent exited: {_report(alive)}"


@mpx.federated_computation(CLIENTS_F32)
def total16(xs):
    return mpx.federated_sum(xs)


def test_close_stops_every_worker():
    factory = mpx.mp_executor_factory(num_workers=2)
    try:
        with mpx.execution_context(factory):
            assert total16(list(range(16))) == 120.0
        workers = dict(identity(pid) for pid in factory.pool.pids())
        assert len(workers) == 2
    finally:
        factory.close()
    assert factory.pool.size == 0
    # Our own children: close() must also reap them (no zombie left behind).
    alive = wait_gone(workers, 10.0, zombie_is_gone=False)
    assert alive == {}, f"workers still there 10 s after close(): {_report(alive)}"


def test_sigkilled_parent_workers_exit(scripts):
    workers, _, killed_at = scripts.killed
    alive = wait_gone(workers, max(0.0, 15.0 - (time.monotonic() - killed_at)))
    assert alive == {}, f"workers alive 15 s after their parent was SIGKILLed: {_report(alive)}"


def test_sigkilled_parent_helper_processes_exit(scripts):
    _, others, killed_at = scripts.killed
    assert others, "expected the script's resource tracker(s) among its children"
    alive = wait_gone(others, max(1.0, 15.0 - (time.monotonic() - killed_at)))
    assert alive == {}, f"helper processes alive 15 s after their parent was SIGKILLed: {_report(alive)}"
