"""How shard requests travel to a worker, and what a worker keeps for all its shards.

- The requests one call sends to a worker before it waits (a round's put,
  broadcasts, zip, map and the reduce it awaits) travel as ONE message
  (`pool.Outbox` -> `worker.handle_batch`); requests are still counted one per
  worker per intrinsic, and the results are the local stack's bits.
- In a message, each request keeps its own outcome: one that fails does not
  stop the next, and its error comes back as itself with the worker-side
  traceback (`transport.RemoteError`).
- A worker that dies in the middle of a message is reported as dying during
  the request it was running (the slot's progress cell), not the message's first.
- The map plans are the worker's, shared by every shard (executor) it hosts,
  and bounded (`vectorized_map.MapPlans`, least recently used dropped first).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.vectorized_map import MapPlans
from mp_executors.workers import transport
from mp_executors.workers.faults import FAULT_FILE_VARIABLE
from mp_executors.workers.service import Worker

F32 = mpx.TensorType(np.float32)
ROW = mpx.TensorType(np.float32, [3])


@mpx.tf_computation(ROW, F32)
def scaled(x, s):
    return x * s + np.float32(0.25)


@mpx.federated_computation(mpx.FederatedType(ROW, mpx.CLIENTS), mpx.FederatedType(F32, mpx.SERVER))
def broadcast_map_mean(xs, s):
    return mpx.federated_mean(mpx.federated_map(scaled, (xs, mpx.federated_broadcast(s))))


@mpx.tf_computation(F32)
def plus_one(x):
    return x + np.float32(1.0)


@mpx.tf_computation(F32)
def plus_two(x):
    return x + np.float32(2.0)


@mpx.tf_computation(F32)
def plus_three(x):
    return x + np.float32(3.0)


@mpx.federated_computation(mpx.FederatedType(F32, mpx.CLIENTS))
def sum_plus_one(xs):
    return mpx.federated_sum(mpx.federated_map(plus_one, xs))


def rows(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal(3).astype(np.float32) for _ in range(n)]


def messages(factory) -> int:
    # White box: every slot's outbox counts the messages it submitted (workers.pool.Outbox).
    return sum(slot.outbox.messages for slot in factory.pool.slots)


# ---------------------------------------------------------------- one message per worker per call


def test_a_round_is_one_message_per_worker_and_one_request_per_intrinsic():
    xs, s = rows(40), np.float32(1.5)
    with mpx.local_executor_factory() as local, mpx.execution_context(local):
        want = broadcast_map_mean(xs, s)
    factory = mpx.mp_executor_factory(num_workers=2)
    try:
        with mpx.execution_context(factory):
            np.testing.assert_array_equal(broadcast_map_mean(xs, s), want)  # warm: functions sent
            for _ in range(3):
                before_messages, before_requests = messages(factory), factory.pool.requests
                got = broadcast_map_mean(xs, s)
                np.testing.assert_array_equal(got, want)
                assert messages(factory) - before_messages == 2
                # put, broadcast, zip, map, reduce: one request per worker each.
                assert factory.pool.requests - before_requests == 5 * 2
    finally:
        factory.close()


# ---------------------------------------------------------------- outcomes inside one message


def test_each_request_of_a_message_keeps_its_own_outcome():
    w = Worker(slot_index=0)
    w.open_shard(1, 0, 2)
    fn = plus_one.building_block
    outcomes = w.handle_batch([
        (1, (), rq.PutAllEqual(10, F32, np.float32(2.0)), []),
        (1, (), rq.Map(11, fn, 99), [fn.function]),  # no value 99 in the shard: fails
        (1, (), rq.Map(12, fn, 10), []),  # runs anyway, with the function registered above
        (1, (), rq.Get(12), []),
    ])
    assert [ok for ok, _ in outcomes] == [True, False, True, True]
    assert outcomes[3][1] == [np.float32(3.0), np.float32(3.0)]
    # The failure travels as the exception itself, the worker's traceback as its cause.
    error = pickle.loads(pickle.dumps(outcomes[1][1]))
    assert isinstance(error, KeyError) and "99" in str(error)
    assert "Traceback" in str(error.__cause__) and "handle" in str(error.__cause__)


def test_an_exception_that_does_not_pickle_travels_as_a_runtime_error():
    class Local(Exception):  # defined in a function: pickle cannot find it by name
        pass

    error = pickle.loads(pickle.dumps(transport.RemoteError(Local("bad thing"))))
    assert type(error) is RuntimeError
    assert "Local" in str(error) and "bad thing" in str(error)


# ---------------------------------------------------------------- a worker dying mid-message


@pytest.mark.parametrize("phase", ["put", "reduce"])
def test_a_worker_dying_mid_message_is_reported_during_the_request_it_ran(tmp_path, monkeypatch, phase):
    fault = str(tmp_path / "fault")
    monkeypatch.setenv(FAULT_FILE_VARIABLE, fault)  # the workers started below inherit it
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=0)
    try:
        with mpx.execution_context(factory):
            values = [np.float32(i) for i in range(20)]
            assert sum_plus_one(values) == np.float32(sum(range(20)) + 20)
            with open(fault, "w") as f:
                f.write(f"{phase} 1 sigkill")
            with pytest.raises(mpx.WorkerCrashedError) as info:
                sum_plus_one(values)  # one message per worker: put, map, reduce
            assert os.path.exists(fault + ".fired")
            assert info.value.slot == 1 and info.value.phase == phase
            assert sum_plus_one(values) == np.float32(sum(range(20)) + 20)  # replaced, works
    finally:
        factory.close()


# ---------------------------------------------------------------- the worker's map plans


def test_map_plans_are_shared_by_a_workers_shards():
    factory = mpx.mp_executor_factory(num_workers=1)
    try:
        with mpx.execution_context(factory):
            for n in (3, 5, 9):  # three executors: three shards in the one worker
                assert sum_plus_one([np.float32(i) for i in range(n)]) == np.float32(sum(range(n)) + n)
        (report,) = factory.pool.reports()
        assert len(report["shards"]) == 3
        plans = [line for line in report["map_plans"] if "plus_one" in line]
        assert len(plans) == 1, report["map_plans"]
    finally:
        factory.close()


def test_map_plans_are_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setenv("MP_EXECUTORS_VECTORIZE", "off")  # loop plans: no pfor conversion, fast
    plans = MapPlans(capacity=2)
    one, two, three = (f.building_block.function for f in (plus_one, plus_two, plus_three))
    first = plans.get(one, (True,))
    plans.get(two, (True,))
    assert plans.get(one, (True,)) is first  # a hit: now the most recently used
    plans.get(three, (True,))
    assert len(plans) == 2
    kept = " ".join(plans.describe())
    assert "plus_one" in kept and "plus_three" in kept and "plus_two" not in kept
    with pytest.raises(ValueError, match="capacity"):
        MapPlans(capacity=0)
