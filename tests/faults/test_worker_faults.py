"""Fault injection: real worker processes die at chosen moments.

The hook (`faults.maybe_inject_fault`) is armed by writing "<phase> <slot>
<how>" into the file named by MP_EXECUTORS_TEST_FAULT_FILE; the worker of
that slot kills itself the first time it reaches that phase. Every test
asserts the right answer (bitwise equal to an undisturbed run) or the right
error, prints how long recovery or failure took, and checks that no process
is left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import mp_executors as mpx
from mp_executors.workers.faults import FAULT_FILE_VARIABLE

NUM_CLIENTS = 20  # 3 blocks of 8: worker 0 holds clients 0..15, worker 1 holds 16..19
CLIENT_TYPE = mpx.FederatedType(np.float32, mpx.CLIENTS)


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("faults") / "fault")
    old = os.environ.get(FAULT_FILE_VARIABLE)
    os.environ[FAULT_FILE_VARIABLE] = path  # inherited by every worker started from now on
    yield path
    if old is None:
        os.environ.pop(FAULT_FILE_VARIABLE, None)
    else:
        os.environ[FAULT_FILE_VARIABLE] = old


def arm(path: str, phase: str, slot: int, how: str = "sigkill") -> None:
    with open(path, "w") as f:
        f.write(f"{phase} {slot} {how}")


def fired(path: str) -> bool:
    return os.path.exists(path + ".fired")


def reset(path: str) -> None:
    for p in (path, path + ".fired"):
        if os.path.exists(p):
            os.remove(p)


@mpx.tf_computation(np.float32)
def scale(x):
    return x * np.float32(1.000123) + np.float32(0.3)


@mpx.tf_computation(np.float32, np.float32)
def add(a, b):
    return a + b


@mpx.tf_computation(np.float32)
def identity(a):
    return a


@mpx.federated_computation(CLIENT_TYPE)
def pipeline(xs):
    scaled = mpx.federated_map(scale, xs)
    return (
        mpx.federated_sum(scaled),
        mpx.federated_aggregate(scaled, np.float32(0.0), add, add, identity),
        scaled,
    )


VALUES = list(np.random.default_rng(7).random(NUM_CLIENTS, dtype=np.float32) * 1000)


def run_pipeline(factory):
    with mpx.execution_context(factory):
        return pipeline(VALUES)


def same(a, b) -> bool:
    return (
        np.array_equal(a[0], b[0])
        and np.array_equal(a[1], b[1])
        and np.array_equal(np.asarray(a[2]), np.asarray(b[2]))
    )


@pytest.fixture(scope="module")
def expected():
    factory = mpx.local_executor_factory()
    try:
        return run_pipeline(factory)
    finally:
        factory.close()


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def assert_no_workers_left(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.1)
    assert not alive, f"worker processes left behind: {sorted(alive)}"


@pytest.fixture(scope="module")
def retrying(fault_file):
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=1)
    yield factory
    pids = set(factory.pool.pids())
    factory.close()
    assert_no_workers_left(pids)


@pytest.mark.parametrize(
    "phase, slot, how",
    [
        ("put", 1, "sigkill"),
        ("map", 0, "sigkill"),
        ("reduce", 1, "segv"),
        ("aggregate", 0, "exit"),
        ("get", 1, "sigkill"),
    ],
)
def test_worker_death_is_retried_and_gives_the_same_bits(retrying, fault_file, expected, phase, slot, how):
    run_pipeline(retrying)  # warm: the pool exists before the fault is armed
    reset(fault_file)
    arm(fault_file, phase, slot, how)
    start = time.perf_counter()
    result = run_pipeline(retrying)
    took = time.perf_counter() - start
    print(f"\n{phase}/{how} on slot {slot}: recovered in {took:.1f} s")
    assert fired(fault_file), "the fault did not fire: the test would prove nothing"
    assert same(result, expected)
    assert took < 60
    assert not retrying.pool.has_broken()


def test_without_retries_the_error_says_what_died(fault_file, expected):
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=0)
    try:
        run_pipeline(factory)
        reset(fault_file)
        arm(fault_file, "map", 1, "sigkill")
        start = time.perf_counter()
        with pytest.raises(mpx.WorkerCrashedError) as info:
            run_pipeline(factory)
        print(f"\nfailed in {time.perf_counter() - start:.2f} s: {info.value}")
        assert time.perf_counter() - start < 10
        error = info.value
        assert isinstance(error, RuntimeError)
        assert error.slot == 1 and error.clients == (16, 20) and error.phase == "map"
        message = str(error)
        for part in ("slot 1", "clients 16..19", "SIGKILL", "map", "Hint"):
            assert part in message
        # The pool recovers for the next call.
        assert same(run_pipeline(factory), expected)
    finally:
        pids = set(factory.pool.pids())
        factory.close()
        assert_no_workers_left(pids)


def test_worker_dying_at_start_is_started_again(fault_file, expected):
    reset(fault_file)
    arm(fault_file, "start", 1, "exit")
    factory = mpx.mp_executor_factory(num_workers=2)
    try:
        start = time.perf_counter()
        result = run_pipeline(factory)
        print(f"\nstart fault: pool up and answered in {time.perf_counter() - start:.1f} s")
        assert fired(fault_file)
        assert same(result, expected)
        assert factory.pool.size == 2
    finally:
        pids = set(factory.pool.pids())
        factory.close()
        assert_no_workers_left(pids)


@mpx.tf_computation(np.float32)
def checked(x):
    from mp_executors._tf import tf

    tf.debugging.assert_less(x, np.float32(17.0), message="reading too high")
    return x * 2.0


@mpx.federated_computation(CLIENT_TYPE)
def checked_sum(xs):
    return mpx.federated_sum(mpx.federated_map(checked, xs))


def test_client_exception_keeps_its_type_and_says_which_client(retrying):
    from mp_executors._tf import tf

    values = list(np.arange(NUM_CLIENTS, dtype=np.float32))
    with mpx.execution_context(retrying):
        before = retrying.pool.requests
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            checked_sum(values)
        message = str(info.value)
        assert "client 17" in message and "worker slot 1" in message
        assert "reading too high" in message and "worker-side traceback" in message
        # Deterministic errors are not retried: one request per worker per intrinsic, once.
        assert retrying.pool.requests - before <= 3 * 2
        # The pool stays usable.
        assert checked_sum(values[:16]) == np.float32(sum(v * 2 for v in range(16)))


@mpx.tf_computation(np.float32)
def slow(x):
    from mp_executors._tf import tf

    def body(i, a):
        return i + 1, a + tf.sin(a)

    _, a = tf.while_loop(lambda i, a: i < 2_000_000, body, (0, tf.fill([64], x)))
    return tf.reduce_sum(a)


@mpx.federated_computation(CLIENT_TYPE)
def slow_sum(xs):
    return mpx.federated_sum(mpx.federated_map(slow, xs))


def test_ctrl_c_interrupts_within_two_seconds_and_the_pool_works_after(retrying, expected):
    run_pipeline(retrying)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), mpx.execution_context(retrying):
        slow_sum(VALUES)
    waited = time.perf_counter() - start - 1.0
    print(f"\nKeyboardInterrupt {waited:.2f} s after SIGINT")
    assert waited < 2.0
    assert same(run_pipeline(retrying), expected)


def test_memory_guard_warns_with_the_numbers(retrying, caplog):
    run_pipeline(retrying)
    retrying.pool.memory_share = 64 * 2**20  # pretend each worker may only use 64 MiB
    with caplog.at_level("WARNING", logger="mp_executors"):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "MiB share of memory" not in caplog.text:
            time.sleep(0.2)
    assert "MiB share of memory" in caplog.text
    assert "worker slot" in caplog.text and "64 MiB share" in caplog.text
