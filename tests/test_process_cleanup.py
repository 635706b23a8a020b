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

    if sys.argv[2] == "spawned":
        # TensorFlow imported (before mp_executors) and initialised here: the fork
        # server cannot be forked from this process, it is spawned and imports
        # TensorFlow itself.
        import tensorflow as tf
        assert float(tf.constant(1.0) + 1.0) == 2.0
    import mp_executors as mpx
    from mp_executors.workers import fork_server

    factory = mpx.mp_executor_factory(num_workers=2)

    @mpx.federated_computation(mpx.FederatedType(mpx.TensorType(np.float32), mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(xs)

    with mpx.execution_context(factory):
        result = total([float(i) for i in range(16)])
    assert result == 120.0, result
    assert factory.pool.size == 2, factory.pool.size
    workers = factory.pool.pids()
    others = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in workers]
    times = {str(p): psutil.Process(p).create_time() for p in workers + others}
    server = fork_server.server()
    keys = ("slot", "pid", "cpu_affinity", "intra_op_threads", "inter_op_threads", "cuda_visible_devices", "start")
    print(json.dumps({
        "workers": workers, "others": others, "create_times": times,
        "server": {"pid": server.pid, "mode": server.mode},
        "reports": [{k: r[k] for k in keys} for r in factory.pool.reports()],
        "slots": [s.to_dict() for s in factory.pool.plan.slots],
    }), flush=True)
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
    return workers, others, info


def _report(alive: dict[int, str]) -> str:
    return "; ".join(f"pid {pid}: {what}" for pid, what in alive.items())


class Scripts:
    """The scenarios' scripts, started together so that their start-ups overlap.

    - "sleeper": workers forked from a fork server forked from the script
      (the default path); SIGKILLed as soon as it has printed its pids, so
      that the 15 s allowed to its workers runs while the other tests run.
    - "spawned": the same, but the script has run TensorFlow before creating
      the factory, so its fork server is spawned; SIGKILLed too.
    - "exiter": the default path; exits normally without closing the factory.
    """

    ARGS = {"sleeper": ("sleep", "forked"), "spawned": ("sleep", "spawned"), "exiter": ("exit", "forked")}

    def __init__(self, directory):
        script = directory / "call_then_exit_or_sleep.py"
        script.write_text(SCRIPT)
        common = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_script_env())
        self.procs = {name: subprocess.Popen([sys.executable, str(script), *args], **common)
                      for name, args in self.ARGS.items()}
        self.exiter = self.procs["exiter"]
        self.reported: dict[int, float] = {}
        self.killed: dict[str, tuple] = {}

    def kill(self, name: str):
        """Waits for the script's report, checks the process tree, SIGKILLs the script."""
        proc = self.procs[name]
        workers, others, info = _parse(_read_line(proc, 240.0))
        self.reported.update({**workers, **others})
        server = info["server"]
        assert server["mode"] == self.ARGS[name][1], info
        assert server["pid"] in others, info  # the fork server is the script's child...
        for pid in workers:  # ...and the workers' parent
            assert psutil.Process(pid).ppid() == server["pid"], describe(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.killed[name] = (workers, others, time.monotonic(), info)

    def close(self) -> None:
        # Never leave the orphans of a failed run behind: kill the pids the scripts
        # reported (and only those, checked by start time). First: they hold the
        # scripts' stdout/stderr pipes open.
        for proc in self.procs.values():
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
        for proc in self.procs.values():
            for stream in (proc.stdout, proc.stderr):
                stream.close()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    s = Scripts(tmp_path_factory.mktemp("cleanup"))
    try:
        s.kill("sleeper")
        s.kill("spawned")
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
    workers, others, _ = _parse(lines[-1])
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


@pytest.mark.parametrize("name", ["sleeper", "spawned"], ids=["forked-server", "spawned-server"])
def test_sigkilled_parent_workers_exit(scripts, name):
    workers, _, killed_at, _ = scripts.killed[name]
    alive = wait_gone(workers, max(0.0, 15.0 - (time.monotonic() - killed_at)))
    assert alive == {}, f"workers alive 15 s after their parent was SIGKILLed: {_report(alive)}"


@pytest.mark.parametrize("name", ["sleeper", "spawned"], ids=["forked-server", "spawned-server"])
def test_sigkilled_parent_helper_processes_exit(scripts, name):
    """The fork server (and the resource tracker) go too."""
    _, others, killed_at, info = scripts.killed[name]
    assert info["server"]["pid"] in others
    alive = wait_gone(others, max(1.0, 15.0 - (time.monotonic() - killed_at)))
    assert alive == {}, f"helper processes alive 15 s after their parent was SIGKILLed: {_report(alive)}"


def test_spawned_server_workers_have_their_slots_settings(scripts):
    """A spawned fork server imported TensorFlow without initialising it: each forked
    worker still gets its own slot's CPUs, thread counts and CUDA_VISIBLE_DEVICES."""
    _, _, _, info = scripts.killed["spawned"]
    reports, slots = info["reports"], info["slots"]
    assert len(reports) == len(slots) == 2
    for report, slot in zip(reports, slots):
        assert report["slot"] == slot["index"]
        assert sorted(report["cpu_affinity"]) == sorted(slot["cpus"])
        assert report["intra_op_threads"] == slot["intra_op_threads"]
        assert report["inter_op_threads"] == slot["inter_op_threads"]
        assert report["cuda_visible_devices"] == ""
        # Forked with TensorFlow imported, and nothing had initialised it.
        assert report["start"] == {"tensorflow_preimported": True, "pristine": True}
