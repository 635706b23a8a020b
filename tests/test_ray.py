"""`ray_executor_factory` on a real local Ray cluster (issue 6).

The core acceptance suite runs on Ray through the "ray-2" kind of conftest's
FACTORY_BUILDERS; this module adds what is specific to Ray: bitwise
determinism against the in-process stack on 1, 2 and 3 actors (the
computations of test_determinism.py), placement through Ray resources, actor
death (replacement + retry, or WorkerCrashedError), the fail-fast message
when the cluster is full, and `mp-executors run --executor ray`.

Every test shares the session's one Ray instance (conftest.shared_ray:
loopback, 2 CPUs, no dashboard). Ray is an extra that CI installs
(`pip install ".[test,ray]"`): without it these tests FAIL, saying so,
unless MPX_SKIP_RAY=1 asks to skip them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors.workers.faults import FAULT_FILE_VARIABLE

if importlib.util.find_spec("ray") is None and os.environ.get("MPX_SKIP_RAY"):
    pytest.skip("Ray is not installed and MPX_SKIP_RAY is set", allow_module_level=True)

from test_determinism import OPS, VALUES, _run, fed_sum  # noqa: E402


@pytest.fixture(scope="module")
def cluster(ray_instance_or_fail):
    import ray

    assert ray.is_initialized()
    return ray


@pytest.fixture(scope="module")
def ray_instance_or_fail(request):
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Ray is not installed: pip install '.[test,ray]' (CI does); "
                    "set MPX_SKIP_RAY=1 to skip the Ray tests on purpose.", pytrace=False)
    request.getfixturevalue("ray_instance")


@pytest.fixture(scope="module")
def reference():
    ctx = mpx.ExecutionContext(mpx.local_executor_factory())
    results = {op: _run(ctx, op) for op in OPS}
    ctx.close()
    return results


def assert_bitwise_equal(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    for name in want:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name)
        assert np.array_equal(g, w), f"{what}: {name} differs in bits"


def cpus_in_use(ray) -> float:
    return ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


# ---------------------------------------------------------------- import hygiene


def test_importing_mp_executors_does_not_import_ray():
    code = "import sys, mp_executors; dir(mp_executors); assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- determinism, placement, round trips


def check_bitwise_placement_and_round_trips(ray, factory, ctx, reference, actors: int) -> None:
    for op in OPS:
        assert_bitwise_equal(_run(ctx, op), reference[op], f"ray-{actors}: {op}")
    pool = factory.pool
    assert pool.size == actors  # 50 clients = 7 blocks: every actor held a shard
    reports = pool.reports()
    assert len({r["pid"] for r in reports}) == actors
    # Placed by Ray resources: the cluster's 2 CPUs shared by the actors (3 get 0.66 each).
    assert pool.plan.threads_per_worker == {1: 2, 2: 1, 3: 1}[actors]
    for r in reports:
        assert r["tensorflow_imported"] and r["intra_op_threads"] == pool.plan.threads_per_worker
        assert r["cuda_visible_devices"] == ""  # CPU actors see no GPU
        assert len(r["shards"]) >= 1
    assert sorted(pool.pids()) == sorted(r["pid"] for r in reports)
    expected = {1: 2.0, 2: 2.0, 3: 3 * 0.66}[actors]
    assert wait_for(lambda: abs(cpus_in_use(ray) - expected) < 1e-6), cpus_in_use(ray)
    # One round trip per actor per intrinsic, whatever the number of clients.
    deltas = []
    for n in (8 * actors, 50):
        before = pool.requests
        with mpx.execution_context(ctx):
            fed_sum(VALUES[:n])
        deltas.append(pool.requests - before)
    assert deltas[0] == deltas[1] and deltas[0] <= 3 * actors, deltas


@pytest.mark.parametrize("actors", [1, 3])  # 2 actors: in the actor-death test below
def test_bitwise_equal_to_local_reference_on_any_number_of_actors(cluster, reference, actors):
    factory = mpx.ray_executor_factory(num_workers=actors)
    ctx = mpx.ExecutionContext(factory)
    try:
        check_bitwise_placement_and_round_trips(cluster, factory, ctx, reference, actors)
    finally:
        ctx.close()
    assert wait_for(lambda: cpus_in_use(cluster) < 1e-6), "the actors' CPUs were not given back"


# ---------------------------------------------------------------- actor death


def _pids_by_slot(factory) -> dict[int, int]:
    return {r["slot"]: r["pid"] for r in factory.pool.reports()}


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not _alive(pid)), f"actor process {pid} survived SIGKILL"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_actors_bitwise_and_a_killed_actor_is_replaced_retried_or_reported(cluster, reference, tmp_path, caplog):
    fault_file = tmp_path / "fault"
    # Reaches the actors' processes (they inherit Ray's environment, not ours).
    options = {"runtime_env": {"env_vars": {FAULT_FILE_VARIABLE: str(fault_file)}}}
    factory = mpx.ray_executor_factory(num_workers=2, max_retries=1, actor_options=options)
    ctx = mpx.ExecutionContext(factory)
    try:
        check_bitwise_placement_and_round_trips(cluster, factory, ctx, reference, 2)
        want = reference["fedavg"]

        # max_retries=1: an actor killed (os.kill of the pid its report() gives) is
        # replaced, the call retried, the result the same bits.
        before = _pids_by_slot(factory)
        _kill(before[1])
        with caplog.at_level(logging.WARNING, logger="mp_executors"):
            assert_bitwise_equal(_run(ctx, "fedavg"), want, "retried after the kill")
        assert "retrying" in caplog.text and "worker slot 1" in caplog.text
        after = _pids_by_slot(factory)
        assert after[0] == before[0]  # the healthy actor stayed warm
        assert after[1] != before[1] and _alive(after[1])  # the dead one was replaced ...
        assert wait_for(lambda: abs(cpus_in_use(cluster) - 2.0) < 1e-6)  # ... on the CPU it freed

        # max_retries=0: the death is a WorkerCrashedError; the next call runs on a new actor.
        factory.max_retries = 0
        _kill(after[0])
        with pytest.raises(mpx.WorkerCrashedError) as info:
            _run(ctx, "fedavg")
        assert info.value.slot == 0 and info.value.attempts == 1
        assert "worker slot 0 died" in str(info.value)
        assert_bitwise_equal(_run(ctx, "fedavg"), want, "after the crash")

        # An actor dying in the middle of a federated_map is reported the same way.
        fault_file.write_text("map 1 sigkill")
        with pytest.raises(mpx.WorkerCrashedError) as info:
            _run(ctx, "fedavg")
        assert (tmp_path / "fault.fired").exists()
        assert info.value.slot == 1, info.value
        assert_bitwise_equal(_run(ctx, "fedavg"), want, "after the mid-call crash")
    finally:
        ctx.close()
    assert wait_for(lambda: cpus_in_use(cluster) < 1e-6), "the actors' CPUs were not given back"


# ---------------------------------------------------------------- errors that need no actor


def test_a_full_cluster_fails_fast_with_a_clear_message(cluster):
    factory = mpx.ray_executor_factory(num_workers=1, actor_options={"num_cpus": 64})
    factory.pool.RESOURCE_WAIT_SECONDS = 0.3
    try:
        with mpx.execution_context(factory), pytest.raises(RuntimeError, match=r"cannot host 1 worker actor.*64 CPU"):
            fed_sum(VALUES[:4])
        assert factory.pool.size == 0 and factory.pool.plan is None
    finally:
        factory.close()


@pytest.mark.parametrize("kwargs, mentions", [
    (dict(gpus_per_worker=-1), "gpus_per_worker"),
    (dict(gpus_per_worker=1.5), "gpus_per_worker"),
    (dict(cpus_per_worker=0), "cpus_per_worker"),
    (dict(num_workers=0), "num_workers"),
    (dict(max_retries=-1), "max_retries"),
    (dict(address=5), "address"),
])
def test_bad_arguments_raise_before_anything_starts(kwargs, mentions):
    with pytest.raises(ValueError, match=mentions):
        mpx.ray_executor_factory(**kwargs)


def test_gpus_on_a_cluster_without_gpus_is_a_clear_error(cluster):
    factory = mpx.ray_executor_factory(gpus_per_worker=1)
    try:
        with mpx.execution_context(factory), pytest.raises(ValueError, match="has 0 GPUs"):
            fed_sum(VALUES[:4])
    finally:
        factory.close()


def test_planned_for_the_cluster_not_this_machine(cluster):
    factory = mpx.ray_executor_factory()
    plan = factory.plan(1000)
    assert plan.num_workers == 2 and plan.binding == "cpu"  # the test cluster has 2 CPUs
    assert "2 usable CPUs" in plan.bounds["cpu"][1]
    factory.close()
    assert cluster.is_initialized()  # a factory that joined Ray leaves it running


def test_set_ray_execution_context_sets_the_default():
    from mp_executors.factories.ray import RayExecutorFactory

    previous = mpx.get_execution_context()
    ctx = mpx.set_ray_execution_context(num_workers=1, max_retries=2)
    try:
        assert mpx.get_execution_context() is ctx
        assert isinstance(ctx.executor_factory, RayExecutorFactory) and ctx.executor_factory.max_retries == 2
    finally:
        mpx.set_execution_context(previous)
        ctx.close()


# ---------------------------------------------------------------- the main job


def test_mp_executors_run_on_ray_gives_the_local_metrics(cluster, tmp_path, capsys):
    from mp_executors import cli

    small = ["run", "--rounds", "2", "--clients", "24", "--clients-per-round", "20", "--max-examples", "60",
             "--no-plots", "--quiet"]
    docs = {}
    for executor in ("local", "ray"):
        assert cli.main([*small, "--executor", executor, "--workers", "2", "--out", str(tmp_path / executor)]) == 0
        docs[executor] = json.loads((tmp_path / executor / "metrics.json").read_text())
    capsys.readouterr()
    assert {k: v for k, v in docs["ray"].items() if k not in ("timing", "runtime")} == \
        {k: v for k, v in docs["local"].items() if k not in ("timing", "runtime")}
    assert len(docs["ray"]["runtime"]["workers"]) == 2
