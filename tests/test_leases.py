"""Leases: a running call's executor and worker slots are never closed under it.

Real worker processes, real threads, real TensorFlow. A long call is made
long, deterministically, by a *gate*: a TensorFlow computation whose gated
clients write a line to `started` (tf.print to a file) and then loop until the
file `release` exists (tf.io.matching_files). The test knows when the long
request is running, does what it wants meanwhile, and then opens the gate.

With 16 clients and 2 workers, clients 0..7 live in worker slot 0 and 8..15 in
slot 1 (blocks of 8); only clients >= 100 wait at the gate, so `gated_values()`
keeps slot 1 busy while slot 0 is free for other calls.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import numpy as np
import pytest
from _pool_helpers import identity, is_gone, wait_gone

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.factories.local import LocalExecutorFactory
from mp_executors.machine import detect_machine

F32 = mpx.TensorType(np.float32)
CLIENTS_F32 = mpx.FederatedType(F32, mpx.CLIENTS)
SERVER_F32 = mpx.FederatedType(F32, mpx.SERVER)

#: Generous bounds for waiting on another thread on a loaded 2-core machine (not timing assertions).
WAIT = 180.0


@mpx.tf_computation(F32)
def add_one(x):
    return x + 1.0


@mpx.federated_computation(CLIENTS_F32)
def sum_plus_one(xs):
    return mpx.federated_sum(mpx.federated_map(add_one, xs))


@mpx.tf_computation(F32, F32)
def scale(x, s):
    return x * s


@mpx.federated_computation(CLIENTS_F32, SERVER_F32)
def broadcast_scale_mean(xs, s):
    return mpx.federated_mean(mpx.federated_map(scale, mpx.federated_zip((xs, mpx.federated_broadcast(s)))))


class Gate:
    """A computation `total(xs) = sum(2 x)` whose clients with x >= 100 wait until `open()`."""

    def __init__(self, directory):
        self.started = os.path.join(str(directory), "started")
        self.release = os.path.join(str(directory), "release")
        started, release = self.started, self.release

        @mpx.tf_computation(F32)
        def gated_double(x):
            def wait():
                note = tf.print("started", output_stream="file://" + started)
                with tf.control_dependencies([note]):
                    # The pattern depends on the loop variable (an empty suffix) so that
                    # the file check is not hoisted out of the loop as a constant.
                    (i,) = tf.while_loop(
                        lambda i: tf.equal(tf.size(tf.io.matching_files(
                            release + tf.strings.substr(tf.strings.as_string(i), 0, 0))), 0),
                        lambda i: (i + 1,),
                        (tf.constant(0),),
                    )
                return x * 2.0 + tf.cast(tf.minimum(i, 0), tf.float32)

            return tf.cond(x >= 100.0, wait, lambda: x * 2.0)

        @mpx.federated_computation(CLIENTS_F32)
        def total(xs):
            return mpx.federated_sum(mpx.federated_map(gated_double, xs))

        self.total = total

    def wait_started(self) -> None:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(self.started):
            assert time.monotonic() < deadline, "the gated request never started"
            time.sleep(0.05)

    def open(self) -> None:
        open(self.release, "w").close()


def gated_values() -> list[np.float32]:
    """16 clients: 0..7 (worker slot 0) pass the gate, 8..15 (slot 1) wait at it."""
    return [np.float32(i + 1) for i in range(8)] + [np.float32(100 + i) for i in range(8)]


def expected_total(xs) -> np.float32:
    return np.float32(sum(2.0 * float(x) for x in xs))


def _call(factory, comp, *args):
    with mpx.execution_context(factory):
        return comp(*args)


def _floats(n, seed=0):
    return list(np.random.default_rng(seed).random(n, dtype=np.float32) * np.float32(10.0))


def _check_sum_plus_one(factory, n, seed=0):
    xs = _floats(n, seed)
    np.testing.assert_allclose(_call(factory, sum_plus_one, xs), np.sum(np.array(xs, np.float64) + 1.0), rtol=1e-5)


@pytest.fixture
def in_thread():
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="test-leases")
    yield pool.submit
    pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- the cache (in-process, no workers)


class RecordingLocalFactory(LocalExecutorFactory):
    """The local factory, recording which of its executors were closed."""

    def __init__(self):
        super().__init__()
        self.closed_executors: list = []

    def _build(self, num_clients):
        executor = super()._build(num_clients)
        close = executor.close

        def recording_close():
            self.closed_executors.append(executor)
            close()

        executor.close = recording_close
        return executor


def test_lru_eviction_skips_a_leased_executor_and_clean_up_retires_it():
    factory = RecordingLocalFactory()
    c1 = {mpx.CLIENTS: 1}
    with factory.lease(c1) as held:
        for n in range(2, 2 + factory.cache_size + 2):  # more client counts than the cache holds
            with factory.lease({mpx.CLIENTS: n}):
                pass
        assert held not in factory.closed_executors
        assert factory.create_executor(c1) is held  # still the cached one
        factory.clean_up_executor(c1)  # retired: out of the cache, but its call goes on
        assert held not in factory.closed_executors
        fresh = factory.create_executor(c1)
        assert fresh is not held
    assert factory.closed_executors.count(held) == 1  # closed when its lease ended, once
    factory.close()
    assert fresh in factory.closed_executors


def test_a_lease_is_exclusive_and_the_extra_executor_is_closed_after_its_call():
    factory = RecordingLocalFactory()
    c3 = {mpx.CLIENTS: 3}
    with factory.lease(c3) as first, factory.lease(c3) as second:
        assert first is not second
    assert second in factory.closed_executors and first not in factory.closed_executors
    with factory.lease(c3) as again:
        assert again is first  # the cached one, free again
    factory.close()


def test_close_waits_for_a_call_running_in_another_thread(in_thread):
    factory = RecordingLocalFactory()
    leased, release = threading.Event(), threading.Event()

    def call():
        with factory.lease({mpx.CLIENTS: 2}) as executor:
            leased.set()
            release.wait(WAIT)
            return executor

    running = in_thread(call)
    assert leased.wait(WAIT)
    closing = in_thread(factory.close)
    deadline = time.monotonic() + WAIT
    while not factory.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="closed"):
        with factory.lease({mpx.CLIENTS: 2}):
            pass
    assert not closing.done() and factory.closed_executors == []  # waiting for the running call
    release.set()
    executor = running.result(WAIT)
    closing.result(WAIT)
    assert executor in factory.closed_executors


def test_close_from_the_thread_holding_a_lease_does_not_wait_for_itself():
    factory = RecordingLocalFactory()
    with factory.lease({mpx.CLIENTS: 2}) as executor:
        factory.close()  # would dead-lock if it waited for this thread's own lease
        assert executor in factory.closed_executors


# ---------------------------------------------------------------- worker pools (real processes)


def test_calls_at_other_client_counts_never_close_a_running_calls_executor(tmp_path, in_thread):
    """Issue 9, case 4: before leases, the other calls evicted the running call's
    executor and closed its shards: the running call failed with `KeyError: 1`."""
    gate = Gate(tmp_path)
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=0)
    try:
        xs = gated_values()
        long_call = in_thread(_call, factory, gate.total, xs)
        gate.wait_started()
        # 2..8 clients: one shard, in worker slot 0, which is free. More client counts
        # than the executor cache holds, so the running call's executor is the LRU one.
        for n in range(2, 9):
            _check_sum_plus_one(factory, n, seed=n)
        assert not long_call.done()
        gate.open()
        assert long_call.result(WAIT) == expected_total(xs)
        _check_sum_plus_one(factory, 9)  # and both workers serve the next calls
    finally:
        factory.close()


@pytest.mark.skipif(len(detect_machine().usable_cpus) < 2, reason="needs 2 CPUs for an auto-sized 2-worker pool")
def test_idle_shrink_never_stops_a_worker_busy_with_a_long_request(tmp_path, in_thread):
    """Issue 9, case 5: idle time counted from when a request was SENT let a 1-client
    call stop the worker still running a long map (reported as killed by SIGKILL)."""
    gate = Gate(tmp_path)
    factory = mpx.mp_executor_factory(max_retries=0)  # auto-sized: 2 workers for 16 clients, 1 for 1
    factory.pool.idle_shrink_seconds = 0.5
    try:
        xs = gated_values()
        long_call = in_thread(_call, factory, gate.total, xs)
        gate.wait_started()
        assert factory.pool.size == 2
        busy_worker = identity(factory.pool.pids()[1])
        time.sleep(1.0)  # the long request was sent longer ago than idle_shrink_seconds
        assert _call(factory, sum_plus_one, [np.float32(2.5)]) == np.float32(3.5)  # needs 1 worker
        assert not is_gone(*busy_worker), "idle shrink stopped the worker running the long request"
        opened = time.monotonic()
        gate.open()
        assert long_call.result(WAIT) == expected_total(xs)
        assert identity(factory.pool.pids()[1]) == busy_worker
        # Its idle clock starts when its last request finished, not when it was sent.
        assert factory.pool.slots[1].last_used >= opened
        # Once it has been idle long enough, a 1-client call does let it go.
        time.sleep(1.0)
        assert _call(factory, sum_plus_one, [np.float32(-1.0)]) == np.float32(0.0)
        assert factory.pool.size == 1
        assert wait_gone(dict([busy_worker]), 30.0) == {}
    finally:
        factory.close()


#: More client counts than the executor cache holds (3), and threads at the same count at once.
CLIENT_COUNTS = (3, 9, 12, 17, 20)


def test_eight_threads_with_different_data_and_client_counts_on_one_factory(in_thread):
    factory = mpx.mp_executor_factory(num_workers=2)
    try:
        _check_sum_plus_one(factory, 12)  # start both workers before the threads race

        def thread(t):
            rng = np.random.default_rng(100 + t)
            for j in range(20):
                n = CLIENT_COUNTS[(t + j) % len(CLIENT_COUNTS)]
                xs = list(rng.random(n, dtype=np.float32) * np.float32(10.0))
                if j % 2:
                    s = np.float32(rng.random())
                    got = _call(factory, broadcast_scale_mean, xs, s)
                    want = np.mean(np.array(xs, np.float64) * float(s))
                else:
                    got = _call(factory, sum_plus_one, xs)
                    want = np.sum(np.array(xs, np.float64) + 1.0)
                np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"thread {t} call {j}: {n} clients")
            return t

        futures = [in_thread(thread, t) for t in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as more:
            futures += [more.submit(thread, t) for t in range(4, 8)]
            assert sorted(f.result(WAIT) for f in futures) == list(range(8))
    finally:
        factory.close()


def test_close_racing_a_running_call_lets_it_finish(tmp_path, in_thread):
    gate = Gate(tmp_path)
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=0)
    xs = gated_values()
    long_call = in_thread(_call, factory, gate.total, xs)
    gate.wait_started()
    workers = dict(identity(pid) for pid in factory.pool.pids())
    closing = in_thread(factory.close)
    deadline = time.monotonic() + WAIT
    while not factory.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not closing.done()  # waiting for the running call
    gate.open()
    assert long_call.result(WAIT) == expected_total(xs)
    closing.result(WAIT)
    assert factory.pool.size == 0
    assert wait_gone(workers, 30.0) == {}
    with pytest.raises(RuntimeError, match="closed"):
        _call(factory, sum_plus_one, [np.float32(1.0)])


def test_interrupting_one_call_leaves_another_threads_call_running(tmp_path, in_thread):
    gate = Gate(tmp_path)
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=0)
    try:
        xs = gated_values()
        long_call = in_thread(_call, factory, gate.total, xs)
        gate.wait_started()
        workers = [identity(pid) for pid in factory.pool.pids()]
        # This thread's call (3 clients, in worker slot 0, which the long call holds too) is
        # interrupted, as the context does after Ctrl-C: nothing the long call uses is stopped.
        with factory.lease({mpx.CLIENTS: 3}) as mine:
            factory.interrupt(mine)
        with factory.lease({mpx.CLIENTS: 3}) as next_one:
            assert next_one is not mine  # the interrupted executor is never handed out again
        assert [identity(pid) for pid in factory.pool.pids()] == workers
        gate.open()
        assert long_call.result(WAIT) == expected_total(xs)
        _check_sum_plus_one(factory, 3)
    finally:
        factory.close()
