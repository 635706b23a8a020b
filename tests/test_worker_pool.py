"""The worker pool: per-worker round trips, pinning, warm reuse, sizing, data.

Real worker processes with real TensorFlow. To keep the file fast on a small
machine, most tests share one module-scoped 2-worker factory (`pool2`); tests
that need other settings build their own and close it.

With the block size of 8 clients, a computation needs at least 9 clients to
give both of 2 workers a shard: the tests below use 12 or more.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import loky.process_executor
import numpy as np
import psutil
import pytest
import tensorflow as tf
from _pool_helpers import children_count, fake_gpu_machine, identity, wait_gone

import mp_executors as mpx
from mp_executors.factories.mp import MpExecutorFactory
from mp_executors.machine import detect_machine
from mp_executors.planning import WorkerSlot
from mp_executors.workers import fork_server
from mp_executors.workers.pool import WorkerPool

F32 = mpx.TensorType(np.float32)
CLIENTS_F32 = mpx.FederatedType(F32, mpx.CLIENTS)
SERVER_F32 = mpx.FederatedType(F32, mpx.SERVER)
VEC4 = mpx.TensorType(np.float32, [4])
CLIENTS_VEC4 = mpx.FederatedType(VEC4, mpx.CLIENTS)
SEQ_F32 = mpx.SequenceType(F32)

USABLE_CPUS = detect_machine().usable_cpus


# ---------------------------------------------------------------- computations


@mpx.tf_computation(F32, F32)
def scale(x, s):
    return x * s


@mpx.tf_computation(F32)
def add_one(x):
    return x + 1.0


@mpx.federated_computation(CLIENTS_F32, SERVER_F32)
def broadcast_map_mean(xs, s):
    # 4 intrinsics: broadcast, zip, map, mean.
    return mpx.federated_mean(
        mpx.federated_map(scale, mpx.federated_zip((xs, mpx.federated_broadcast(s))))
    )


BROADCAST_MAP_MEAN_INTRINSICS = 4


@mpx.federated_computation(CLIENTS_F32)
def sum_plus_one(xs):
    return mpx.federated_sum(mpx.federated_map(add_one, xs))


@mpx.federated_computation(CLIENTS_VEC4)
def sum_vec4(xs):
    return mpx.federated_sum(xs)


@mpx.tf_computation(SEQ_F32)
def dataset_total(ds):
    return ds.reduce(np.float32(0.0), lambda acc, x: acc + x)


@mpx.federated_computation(mpx.FederatedType(SEQ_F32, mpx.CLIENTS))
def dataset_totals(datasets):
    totals = mpx.federated_map(dataset_total, datasets)
    return totals, mpx.federated_sum(totals)


def build_client_array(client_id):
    """ClientData builder: a module-level function, imported by the workers."""
    return (np.arange(4, dtype=np.float32) + np.float32(client_id)) * np.float32(1.25)


def build_client_array_logged(log_dir, client_id):
    """Like build_client_array, but leaves a file per (process, client) it builds."""
    path = os.path.join(log_dir, f"{os.getpid()}-{client_id}")
    with open(path, "a") as f:
        f.write("x")
    return build_client_array(client_id)


def _floats(n):
    return [np.float32(0.1 * i + 0.37) for i in range(n)]


def _call(ctx, comp, *args):
    with mpx.execution_context(ctx):
        return comp(*args)


def _worker_identities(factory):
    pids = factory.pool.pids()
    ids = [identity(pid) for pid in pids]
    assert all(ids), f"a worker pid is not alive: {pids}"
    return ids


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pool2():
    """One shared num_workers=2 factory (and its context)."""
    ctx = mpx.ExecutionContext(mpx.mp_executor_factory(num_workers=2))
    yield ctx
    ctx.close()


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs, mentions",
    [
        pytest.param(dict(num_workers=0), "num_workers", id="num_workers=0"),
        pytest.param(dict(num_workers=-1), "num_workers", id="num_workers=-1"),
        pytest.param(dict(num_workers=1.5), "num_workers", id="num_workers=1.5"),
        pytest.param(dict(num_workers="two"), "num_workers", id="num_workers=two"),
        pytest.param(dict(threads_per_worker=len(USABLE_CPUS) + 1), "threads_per_worker", id="threads>cpus"),
        pytest.param(dict(memory_per_worker=0), "memory_per_worker", id="memory_per_worker=0"),
        pytest.param(dict(devices="tpu"), "devices", id="devices=tpu"),
        pytest.param(dict(devices=["7"]), "7", id="devices=[7]"),
        pytest.param(dict(start_method="fork"), "start_method", id="start_method=fork"),
    ],
)
def test_bad_sizing_arguments_raise_before_any_process_starts(kwargs, mentions):
    before = children_count()
    with pytest.raises(ValueError, match=mentions):
        mpx.mp_executor_factory(**kwargs)
    assert children_count() == before


# ---------------------------------------------------------------- round trips


def test_round_trips_are_per_worker_not_per_client(pool2):
    pool = pool2.executor_factory.pool
    deltas = {}
    for n in (16, 100):
        xs = _floats(n)
        before = pool.requests
        result = _call(pool2, broadcast_map_mean, xs, np.float32(3.0))
        deltas[n] = pool.requests - before
        assert pool.size == 2
        assert result.dtype == np.float32
        np.testing.assert_allclose(result, np.mean(np.array(xs, np.float64) * 3.0), rtol=1e-5)
    limit = (BROADCAST_MAP_MEAN_INTRINSICS + 2) * 2
    assert deltas[16] == deltas[100], deltas
    assert 2 <= deltas[16] <= limit, deltas


# ---------------------------------------------------------------- pinning


def test_workers_are_pinned_as_planned(pool2):
    factory = pool2.executor_factory
    result = _call(pool2, sum_plus_one, _floats(12))
    np.testing.assert_allclose(result, np.sum(np.array(_floats(12), np.float64) + 1.0), rtol=1e-6)
    reports = factory.pool.reports()
    plan = factory.pool.plan
    assert len(reports) == len(plan.slots) == 2
    pids = [r["pid"] for r in reports]
    assert len(set(pids)) == 2
    descendants = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pids) <= descendants
    for i, (report, slot) in enumerate(zip(reports, plan.slots)):
        assert report["slot"] == slot.index == i
        assert sorted(report["cpu_affinity"]) == sorted(slot.cpus)
        # Seen from outside too, not just self-reported.
        assert sorted(psutil.Process(report["pid"]).cpu_affinity()) == sorted(slot.cpus)
        assert report["intra_op_threads"] == len(slot.cpus)
        assert report["inter_op_threads"] == slot.inter_op_threads >= 1
        assert report["cuda_visible_devices"] == ""
        assert report["tensorflow_imported"] is True
        assert report["rss"] > 100 * 2**20
        # Forked from the fork server, which had imported TensorFlow and not initialised it.
        assert report["start"] == {"tensorflow_preimported": True, "pristine": True}
        assert psutil.Process(report["pid"]).ppid() == fork_server.server().pid
    if len(reports) <= len(USABLE_CPUS):
        sets = [set(r["cpu_affinity"]) for r in reports]
        assert not (sets[0] & sets[1]), sets
        assert sets[0] | sets[1] <= set(USABLE_CPUS)


def tf_thread_names() -> list[str]:
    """Worker-side helper: runs a TensorFlow op here, then lists this process's thread names."""
    x = tf.ones((64, 64))
    float(tf.reduce_sum(tf.matmul(x, x)))
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]


def worker_environment() -> dict[str, str]:
    """Worker-side helper."""
    return dict(os.environ)


def loky_memory_leak_limit() -> int:
    """Worker-side helper: the RSS growth after which loky silently replaces this worker."""
    return loky.process_executor._MAX_MEMORY_LEAK_SIZE


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="thread names are read from procfs")
def test_forked_workers_apply_their_own_slot_settings(monkeypatch):
    """Thread counts, CPUs and CUDA_VISIBLE_DEVICES reach each forked worker, not the server's.

    So does this process's environment as it is when the worker starts (the
    fork server's is older), as with a spawned worker.

    Slots made so that TensorFlow's defaults would differ from the settings:
    inter-op threads 2 on one CPU (the default follows the CPU count), and
    1 on the other. TensorFlow names its inter-op threads tf_Compute.
    """
    cpu = USABLE_CPUS[0]
    other = USABLE_CPUS[-1]
    base = MpExecutorFactory(num_workers=1).plan(1)
    slots = (
        WorkerSlot(0, (cpu,), intra_op_threads=1, inter_op_threads=2),
        WorkerSlot(1, (other,), intra_op_threads=1, inter_op_threads=1, gpu="3"),
    )
    fork_server.prestart()
    monkeypatch.setenv("MP_EXECUTORS_TEST_LATE_VARIABLE", "set after the fork server started")
    pool = WorkerPool()
    assert pool.start_method == "forkserver"
    try:
        pool.fit(dataclasses.replace(base, num_workers=2, slots=slots))
        reports = pool.reports()
        names = [s.submit(tf_thread_names).result() for s in pool.slots]
        envs = [s.submit(worker_environment).result() for s in pool.slots]
        leak_limits = [s.submit(loky_memory_leak_limit).result() for s in pool.slots]
    finally:
        pool.close()
    for report, slot, threads, env in zip(reports, slots, names, envs):
        assert report["start"] == {"tensorflow_preimported": True, "pristine": True}
        assert report["cpu_affinity"] == [slot.cpus[0]]
        assert report["inter_op_threads"] == slot.inter_op_threads
        assert threads.count("tf_Compute") == slot.inter_op_threads, threads
        assert env["TF_NUM_INTEROP_THREADS"] == str(slot.inter_op_threads)
        assert env["TF_NUM_INTRAOP_THREADS"] == "1"
        assert env["MP_EXECUTORS_TEST_LATE_VARIABLE"] == "set after the fork server started"
    assert [r["cuda_visible_devices"] for r in reports] == ["", "3"]
    # loky was imported by the fork server, before the slot's environment: a worker
    # holding client data must still not be replaced for "leaking" memory.
    assert all(limit >= 2**40 for limit in leak_limits), leak_limits


def _gpu_factory_check(factory, expected_gpus):
    ctx = mpx.ExecutionContext(factory)
    try:
        xs = _floats(16)
        result = _call(ctx, sum_plus_one, xs)
        np.testing.assert_allclose(result, np.sum(np.array(xs, np.float64) + 1.0), rtol=1e-6)
        assert factory.pool.size == 2
        plan = factory.pool.plan
        assert plan.device_kind == "gpu"
        assert [s.gpu for s in plan.slots] == expected_gpus
        reports = factory.pool.reports()
        assert len({r["pid"] for r in reports}) == 2
        assert [r["cuda_visible_devices"] for r in reports] == expected_gpus
        for report, slot in zip(reports, plan.slots):
            assert report["cuda_visible_devices"] == slot.gpu
            assert sorted(report["cpu_affinity"]) == sorted(slot.cpus)
    finally:
        ctx.close()


def test_gpu_pinning_one_gpu_per_worker():
    factory = MpExecutorFactory(num_workers=2, devices="gpu", machine=fake_gpu_machine(("0", "1")))
    _gpu_factory_check(factory, ["0", "1"])


def test_gpu_pinning_two_workers_share_one_gpu():
    factory = MpExecutorFactory(devices="gpu", workers_per_gpu=2, machine=fake_gpu_machine(("0",)))
    _gpu_factory_check(factory, ["0", "0"])


# ---------------------------------------------------------------- warm reuse


def test_second_call_reuses_warm_workers(pool2):
    factory = pool2.executor_factory
    xs = _floats(20)
    first = _call(pool2, sum_plus_one, xs)
    ids = _worker_identities(factory)
    children = children_count()
    requests = factory.pool.requests

    started = time.perf_counter()
    second = _call(pool2, sum_plus_one, xs)
    elapsed = time.perf_counter() - started

    assert np.array_equal(first, second)
    assert factory.pool.requests > requests  # the work really went to the workers
    assert _worker_identities(factory) == ids  # same processes (pid and start time)
    assert children_count() == children
    reports = factory.pool.reports()
    assert [(r["pid"]) for r in reports] == [pid for pid, _ in ids]
    assert all(r["tensorflow_imported"] for r in reports)
    # Starting a worker imports TensorFlow (seconds); a warm call is far quicker.
    assert elapsed < 3.0, f"a warm call took {elapsed:.2f} s"


# ---------------------------------------------------------------- grow / shrink


def test_auto_pool_grows_and_shrinks_with_the_client_count():
    factory = mpx.mp_executor_factory()
    ctx = mpx.ExecutionContext(factory)
    try:
        assert _call(ctx, sum_plus_one, [np.float32(2.5)]) == np.float32(3.5)
        assert factory.pool.size == 1
        (first_worker,) = _worker_identities(factory)

        xs = _floats(16)
        result = _call(ctx, sum_plus_one, xs)
        np.testing.assert_allclose(result, np.sum(np.array(xs, np.float64) + 1.0), rtol=1e-6)
        expected = min(2, len(USABLE_CPUS))
        assert factory.plan(16).num_workers == expected
        assert factory.pool.size == expected
        grown = _worker_identities(factory)
        assert len(grown) == expected
        # Slot 0 is unchanged by the growth: its warm worker is kept.
        assert grown[0] == first_worker

        # Fewer clients again: the extra worker stays warm while it was used recently...
        assert _call(ctx, sum_plus_one, [np.float32(-1.0)]) == np.float32(0.0)
        assert factory.pool.size == expected
        assert _worker_identities(factory) == grown
        # ...and goes once it has been idle for idle_shrink_seconds.
        factory.pool.idle_shrink_seconds = 0.0
        assert _call(ctx, sum_plus_one, [np.float32(-2.0)]) == np.float32(-1.0)
        assert factory.pool.size == 1
        assert _worker_identities(factory) == [first_worker]
        dropped = {pid: ct for pid, ct in grown[1:]}
        assert wait_gone(dropped, 10.0) == {}
    finally:
        ctx.close()


# ---------------------------------------------------------------- client data


def test_client_data_is_built_in_the_workers_and_cached(pool2, tmp_path):
    factory = pool2.executor_factory
    client_ids = list(range(20))
    fn = functools.partial(build_client_array_logged, str(tmp_path))
    data = mpx.ClientData(fn, client_ids)
    os.remove(tmp_path / f"{os.getpid()}-0")  # ClientData built client 0 here, to infer the type
    want = np.sum(np.stack([build_client_array(c) for c in client_ids]), axis=0)

    first = _call(pool2, sum_vec4, data)
    assert factory.pool.size == 2
    assert first.dtype == np.float32 and first.shape == (4,)
    np.testing.assert_allclose(first, want, rtol=1e-6)
    worker_pids = {str(pid) for pid in factory.pool.pids()}
    built = sorted(os.listdir(tmp_path))
    # Every client built exactly once, in a worker (not in this process).
    assert len(built) == len(client_ids), built
    assert {name.split("-")[0] for name in built} == worker_pids
    assert sorted(int(name.split("-")[1]) for name in built) == client_ids

    second = _call(pool2, sum_vec4, data)
    assert np.array_equal(first, second)
    assert sorted(os.listdir(tmp_path)) == built  # cached in the workers: nothing rebuilt
    assert all((tmp_path / name).read_text() == "x" for name in built)


def test_client_data_with_a_plain_module_level_function(pool2):
    client_ids = list(range(3, 23))
    data = mpx.ClientData(build_client_array, client_ids)
    want = np.sum(np.stack([build_client_array(c) for c in client_ids]), axis=0)
    first = _call(pool2, sum_vec4, data)
    second = _call(pool2, sum_vec4, data)
    np.testing.assert_allclose(first, want, rtol=1e-6)
    assert np.array_equal(first, second)


# ---------------------------------------------------------------- datasets


def test_datasets_as_clients_values_travel_to_workers(pool2):
    factory = pool2.executor_factory
    sizes = list(range(1, 13))  # 12 clients: 2 blocks, one per worker
    datasets = [tf.data.Dataset.range(n).map(lambda x: tf.cast(x, tf.float32)) for n in sizes]
    before = factory.pool.requests
    per_client, total = _call(pool2, dataset_totals, datasets)
    assert factory.pool.size == 2
    assert factory.pool.requests - before >= 2
    assert [float(v) for v in per_client] == [n * (n - 1) / 2 for n in sizes]
    assert np.asarray(total).dtype == np.float32
    assert float(total) == sum(n * (n - 1) / 2 for n in sizes)


# ---------------------------------------------------------------- handles are released


def test_values_of_finished_calls_are_released_in_the_workers(pool2):
    factory = pool2.executor_factory
    xs = _floats(20)
    counts = []
    for _ in range(6):
        assert _call(pool2, sum_plus_one, xs) == _call(pool2, sum_plus_one, xs)
        counts.append(sum(r["values_held"] for r in factory.pool.reports()))
    # A call's values are freed with the next call's first request: what the
    # workers hold stays flat instead of growing with every call.
    assert counts[-1] <= counts[1], counts


def test_fixed_num_workers_never_restarts_the_pool_when_client_counts_alternate(pool2):
    factory = pool2.executor_factory
    _call(pool2, sum_plus_one, _floats(16))
    before = _worker_identities(factory)
    for n in (1, 16, 3, 16):
        xs = _floats(n)
        np.testing.assert_allclose(
            _call(pool2, sum_plus_one, xs), np.sum(np.array(xs, np.float64) + 1.0), rtol=1e-6
        )
        assert _worker_identities(factory) == before
