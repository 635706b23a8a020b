"""Shared memory between the parent and its workers: nothing leaks, whatever happens to a call.

Client columns of at least `transport.SHARED_MEMORY_THRESHOLD` bytes travel
through POSIX shared-memory segments that the slot's `SegmentPool` leases to a
request and takes back when the request is done. These tests use real
workers and real Ctrl-C (SIGINT delivered to this process while the parent is
in the middle of a call) and check, through the segment pools and through
what the processes actually map (/proc/<pid>/maps) and what is in /dev/shm:

- an interrupt at several points of a call (after the first shard's columns
  were copied into shared memory, after all of them, after the first request
  was sent) leaves no segment leased, and the next call is right and maps no
  more segments than before;
- the segments mapped by this process and its workers stay flat across 200 calls;
- they are gone from /dev/shm after `close()`, and after the parent is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

import mp_executors as mpx
from mp_executors.workers import pool as pool_module
from mp_executors.workers import transport

NUM_CLIENTS = 16  # two shards of 8 clients on two workers
# 8 clients x 256 KiB = 2 MiB per shard column: above the shared-memory threshold.
WIDTH = 65536
assert 8 * WIDTH * 4 >= transport.SHARED_MEMORY_THRESHOLD

ROW = mpx.TensorType(np.float32, [WIDTH])


@mpx.tf_computation(ROW)
def halve(x):
    return x * np.float32(0.5)


@mpx.federated_computation(mpx.FederatedType(ROW, mpx.CLIENTS))
def half_sum(xs):
    return mpx.federated_sum(mpx.federated_map(halve, xs))


def clients(seed: int, n: int = NUM_CLIENTS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 100, WIDTH).astype(np.float32) for _ in range(n)]


def expected(xs: list[np.ndarray]) -> np.ndarray:
    # Integers halved: exact in float32 whatever the order of the sum.
    return np.sum(np.stack(xs).astype(np.float64) * 0.5, axis=0).astype(np.float32)


def mapped_segments(pids: list[int]) -> set[tuple[int, str]]:
    """(pid, /dev/shm path) of every shared-memory segment those processes map."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    # Data segments only: loky's POSIX semaphores also live in /dev/shm ("sem.*").
                    if "/dev/shm/" in line and "/dev/shm/sem." not in line:
                        out.add((pid, line.split(None, 5)[-1].strip().removesuffix(" (deleted)")))
        except FileNotFoundError:
            continue
    return out


def leased(factory) -> int:
    # White box: the pool's slots and their segment pools (see workers.pool).
    return sum(slot.segments.leased for slot in factory.pool._slots if slot is not None)


def our_files(pid: int) -> list[str]:
    """The segments in /dev/shm that process `pid`'s segment pools created."""
    return glob.glob(f"/dev/shm/{transport.SEGMENT_PREFIX}_{pid}_*")


def pool_files(factory) -> set[str]:
    names = {name for slot in factory.pool._slots if slot is not None for name in slot.segments.names()}
    files = {f"/dev/shm/{name}" for name in names}
    assert files <= set(our_files(os.getpid()))
    return files


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def factory():
    f = mpx.mp_executor_factory(num_workers=2)
    yield f
    f.close()


# ---------------------------------------------------------------- Ctrl-C during a call


class Interrupt:
    """Interrupts the parent's call once, from inside it, at a chosen point.

    The hook runs on the thread that runs the call's coroutine, in the middle
    of preparing or sending the call's requests:

    - "ctrl-c": a real SIGINT to this process. The main thread, waiting for
      the call, gets KeyboardInterrupt (the runtime cancels the call and stops
      busy workers); the hook then waits until the main thread has seen it, so
      the rest of the call's code runs after the interrupt, as with a Ctrl-C
      that lands while the parent is still copying client data.
    - "cancel": the asyncio task running the call is cancelled (a caller
      cancelling its future, `asyncio.wait_for` timing out, ...).
    """

    def __init__(self, how: str, point: str):
        self.how, self.point = how, point
        self.armed = False
        self.fired = False
        self.caught = threading.Event()
        self.task = None  # the task running the call (seen by `prepare`)

    def fire(self) -> None:
        if not self.armed:
            return
        self.armed, self.fired = False, True
        if self.how == "cancel":
            # Requests leave from a loop callback (the slot's outbox), outside the call's task.
            (asyncio.current_task() or self.task).cancel()
            return
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt  # the call runs on this thread: Ctrl-C lands right here
        os.kill(os.getpid(), signal.SIGINT)
        assert self.caught.wait(30), "the main thread never saw the interrupt"


POINTS = ["after the first shard's copy", "after every shard's copy", "after the first request was sent"]


@pytest.fixture
def interrupt(monkeypatch, request):
    hook = Interrupt(*request.param)
    prepare = pool_module.RemoteShard.prepare
    submit = pool_module.WorkerSlotProcess.submit

    def prepare_then_maybe_interrupt(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        hook.task = asyncio.current_task()
        if (hook.point == POINTS[0] and self.start == 0) or (hook.point == POINTS[1] and self.stop == NUM_CLIENTS):
            hook.fire()
        return out

    def submit_then_maybe_interrupt(self, fn, *args):
        out = submit(self, fn, *args)
        if hook.point == POINTS[2] and fn.__name__ == "handle_batch":
            hook.fire()
        return out

    monkeypatch.setattr(pool_module.RemoteShard, "prepare", prepare_then_maybe_interrupt)
    monkeypatch.setattr(pool_module.WorkerSlotProcess, "submit", submit_then_maybe_interrupt)
    return hook


async def _run_cancellable(factory, comp, arg):
    """The call a context makes, on this thread's own event loop (so the hook can cancel its task)."""
    executor = factory.create_executor({mpx.CLIENTS: len(arg)})
    fn = await executor.create_value(comp.building_block, comp.type_signature)
    value = await executor.create_value(arg, comp.type_signature.parameter)
    return await (await executor.create_call(fn, value)).compute()


@pytest.mark.parametrize("interrupt", [(how, point) for how in ("ctrl-c", "cancel") for point in POINTS],
                         indirect=True, ids=lambda p: f"{p[0]} {p[1]}")
def test_interrupted_call_leaves_no_segment_leased(factory, interrupt):
    with mpx.execution_context(factory):
        warm = clients(0)
        np.testing.assert_array_equal(half_sum(warm), expected(warm))
        assert leased(factory) == 0
        pids = [os.getpid(), *factory.pool.pids()]
        before = len(mapped_segments(pids))

        interrupt.armed = True
        if interrupt.how == "ctrl-c":
            with pytest.raises(KeyboardInterrupt):
                try:
                    half_sum(clients(1))
                except KeyboardInterrupt:
                    interrupt.caught.set()
                    raise
        else:
            with pytest.raises(asyncio.CancelledError):
                asyncio.run(_run_cancellable(factory, half_sum, clients(1)))
        assert interrupt.fired
        # The abandoned call winds down (its sent requests finish in the workers,
        # or the workers are stopped); then nothing may stay leased.
        assert wait_until(lambda: leased(factory) == 0, 10.0), (
            f"{leased(factory)} shared-memory segment(s) still leased: {interrupt.how} {interrupt.point}"
        )

        # The next call is right, and maps no more segments than before the interrupt
        # (a leased segment cannot be reused: the call would have made new ones).
        xs = clients(2)
        np.testing.assert_array_equal(half_sum(xs), expected(xs))
        assert leased(factory) == 0
        after = len(mapped_segments([os.getpid(), *factory.pool.pids()]))
        assert after <= before, f"segments mapped: {before} before the interrupt, {after} after"


# ---------------------------------------------------------------- many calls, close, SIGKILL


def test_mapped_segments_stay_flat_across_200_calls_and_go_on_close():
    factory = mpx.mp_executor_factory(num_workers=2)
    small = [np.full(WIDTH // 2, i, np.float32) for i in range(NUM_CLIENTS)]  # 1 MiB per shard
    row = mpx.TensorType(np.float32, [WIDTH // 2])

    @mpx.federated_computation(mpx.FederatedType(row, mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(xs)

    want = np.full(WIDTH // 2, sum(range(NUM_CLIENTS)), np.float32)
    try:
        with mpx.execution_context(factory):
            for _ in range(5):
                np.testing.assert_array_equal(total(small), want)
            pids = [os.getpid(), *factory.pool.pids()]
            first = mapped_segments(pids)
            files = pool_files(factory)
            assert first and files, "the test must move data through shared memory to prove anything"
            for _ in range(200):
                total(small)
            np.testing.assert_array_equal(total(small), want)
            assert mapped_segments(pids) == first
            assert pool_files(factory) == files
            assert leased(factory) == 0
    finally:
        factory.close()
    # This process may map other factories' segments (another test's); the workers map only ours.
    ours = files | {path for pid, path in first if pid != os.getpid()}
    left = sorted(path for path in ours if os.path.exists(path))
    assert left == [], f"segments left in /dev/shm after close(): {left}"


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import mp_executors as mpx

    row = mpx.TensorType(np.float32, [65536])

    @mpx.federated_computation(mpx.FederatedType(row, mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(xs)

    factory = mpx.mp_executor_factory(num_workers=2)
    with mpx.execution_context(factory):
        total([np.ones(65536, np.float32)] * 16)
    print(json.dumps({"workers": factory.pool.pids()}), flush=True)
    time.sleep(600)
    """
)


def test_segments_are_gone_after_the_parent_is_sigkilled(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(SIGKILL_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    workers: list[tuple[int, float]] = []
    try:
        line = proc.stdout.readline()
        assert line, f"the script printed nothing: {proc.stderr.read()[-3000:]}"
        workers = [(pid, psutil.Process(pid).create_time()) for pid in json.loads(line)["workers"]]
        files = our_files(proc.pid)
        assert files, "the script's call must have used shared memory"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not our_files(proc.pid), 20.0), (
            f"segments left in /dev/shm 20 s after the parent was SIGKILLed: {our_files(proc.pid)}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, created in workers:  # never leave an orphan behind, even when the test fails
            try:
                worker = psutil.Process(pid)
                if abs(worker.create_time() - created) < 0.01:
                    worker.kill()
            except psutil.Error:
                pass
        proc.stdout.close()
        proc.stderr.close()
