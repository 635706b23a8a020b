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


@mpx.federated_computation(CLIENTS_F32)
def total16(xs):
    return mpx.federated_sum(xs)


def test_normal_exit_without_close_leaves_no_process(tmp_path):
    script = tmp_path / "exit_without_close.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "exit"], capture_output=True, text=True, timeout=120, env=_script_env()
    )
    exited = time.monotonic()
    assert done.returncode == 0, done.stderr[-3000:]
    workers, others = _parse(done.stdout.strip().splitlines()[-1])
    assert len(workers) == 2
    alive = wait_gone(workers, max(0.0, 10.0 - (time.monotonic() - exited)))
    assert alive == {}, f"workers alive 10 s after their parent exited: {_report(alive)}"
    alive = wait_gone(others, 1.0)
    assert alive == {}, f"helper processes alive after their parent exited: {_report(alive)}"


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


def test_sigkilled_parent_leaves_no_process(tmp_path):
    script = tmp_path / "sleep_after_call.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "sleep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_script_env(),
    )
    workers: dict[int, float] = {}
    others: dict[int, float] = {}
    try:
        workers, others = _parse(_read_line(proc, 120.0))
        assert len(workers) == 2
        for pid in workers:
            assert psutil.Process(pid).ppid() == proc.pid, describe(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        alive = wait_gone(workers, 15.0)
        assert alive == {}, f"workers alive 15 s after their parent was SIGKILLed: {_report(alive)}"
        alive = wait_gone(others, max(1.0, 15.0 - (time.monotonic() - killed)))
        assert alive == {}, f"helper processes alive 15 s after their parent was SIGKILLed: {_report(alive)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        # Never leave the orphans of a failed run behind (only the pids the script reported).
        for pid, ct in {**workers, **others}.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ct) < 0.01:
                    p.kill()
            except psutil.Error:
                pass
