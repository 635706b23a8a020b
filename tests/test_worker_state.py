"""Who owns what: the worker process's `Worker`, the ClientData caches, the shard protocol.

- A worker process's state (shards, compiled functions, mapped segments, the
  ClientData cache) belongs to its one `Worker` object, which `report()`
  shows; a closed shard is gone from it; its ClientData cache is bounded.
- The local factory's shards share one ClientData cache, sized for all of
  them: with more than 4 shards, a ClientData is still built once.
- Shards run only the shard protocol's request types; the FederatingExecutor
  runs only the intrinsics of its table (an unknown one is a clear
  NotImplementedError, and a uri can no longer reach a private method).
- A request that could not be submitted registers no function as known to the worker.
"""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors.core import building_blocks as bb
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.client_shard import ClientDataCache, ClientShard
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.federating_executor import FederatingExecutor
from mp_executors.executors.in_process_shard import InProcessShard
from mp_executors.workers import worker

F32 = mpx.TensorType(np.float32)


@mpx.tf_computation(F32)
def plus_one(x):
    return x + np.float32(1.0)


@mpx.federated_computation(mpx.FederatedType(F32, mpx.CLIENTS))
def sum_plus_one(xs):
    return mpx.federated_sum(mpx.federated_map(plus_one, xs))


def make_client(scale: float, client_id: int) -> np.ndarray:
    return np.float32(scale * client_id)


BUILT: list[int] = []


def make_client_counted(client_id: int) -> np.ndarray:
    BUILT.append(client_id)
    return np.float32(client_id)


# ---------------------------------------------------------------- the worker process's Worker


def test_worker_object_reports_its_shards_functions_and_bounded_cache():
    factory = mpx.mp_executor_factory(num_workers=1)
    try:
        with mpx.execution_context(factory):
            assert sum_plus_one([1.0, 2.0, 3.0]) == np.float32(9.0)
            (report,) = factory.pool.reports()
            assert len(report["shards"]) == 1
            assert list(report["shard_ranges"].values()) == [(0, 3)]
            assert plus_one.building_block.function.digest in report["functions"]
            assert report["values_held"] >= 1

            # Closing the executor closes its shard in the worker.
            factory.clean_up_executor({mpx.CLIENTS: 3})
            (report,) = factory.pool.reports()
            assert report["shards"] == [] and report["values_held"] == 0
            # Compiled functions stay: the next executor's requests refer to them by digest.
            assert plus_one.building_block.function.digest in report["functions"]

            # A fresh ClientData per call (client sampling): the cache keeps a bounded number.
            for scale in range(1, 8):
                data = mpx.ClientData(functools.partial(make_client, float(scale)), range(4), F32)
                assert sum_plus_one(data) == np.float32(scale * 6 + 4)
            (report,) = factory.pool.reports()
            assert len(report["shards"]) == 1
            assert report["client_data_capacity"] == 4  # 4 per shard, one shard open
            assert report["client_data_entries"] == 4
    finally:
        factory.close()


def test_worker_functions_are_trampolines_to_one_worker_object():
    # This test process is not a worker: the entry points say so instead of
    # silently creating state.
    with pytest.raises(RuntimeError, match="not an mp_executors worker"):
        worker.report()


# ---------------------------------------------------------------- ClientData caches


def test_client_data_cache_is_lru_and_bounded_per_shard():
    cache = ClientDataCache(entries_per_shard=2)
    cache.attach()
    for i in range(3):
        cache.put((f"d{i}", 0, 8), [i])
    assert cache.keys() == [("d1", 0, 8), ("d2", 0, 8)]  # d0, least recently used, went
    assert cache.get(("d1", 0, 8)) == [1]  # now the most recently used
    cache.attach()  # a second shard: room for 4
    cache.put(("d3", 0, 8), [3])
    cache.put(("d4", 0, 8), [4])
    assert len(cache) == 4 and cache.capacity == 4
    cache.detach()  # back to 2: the least recently used go
    assert cache.keys() == [("d3", 0, 8), ("d4", 0, 8)]
    with pytest.raises(ValueError, match="entries_per_shard"):
        ClientDataCache(0)


def test_local_factory_with_many_shards_builds_a_client_data_once():
    # 48 clients, 8 per shard: 6 in-process shards, more than the 4 entries a
    # per-process cache used to have, so every call rebuilt every client.
    factory = mpx.local_executor_factory(max_fanout=8)
    data = mpx.ClientData(make_client_counted, range(48), F32)
    try:
        with mpx.execution_context(factory):
            BUILT.clear()
            assert sum_plus_one(data) == np.float32(sum(range(48)) + 48)
            assert sorted(BUILT) == list(range(48))
            assert sum_plus_one(data) == np.float32(sum(range(48)) + 48)
            assert sorted(BUILT) == list(range(48)), "the second call rebuilt clients"
        assert len(factory.client_data) == 6
    finally:
        factory.close()


# ---------------------------------------------------------------- explicit dispatch tables


def test_shard_runs_only_protocol_requests():
    shard = ClientShard(0, 2, None, ClientDataCache())
    shard.run(rq.Put(1, F32, [np.float32(1.0), np.float32(2.0)]))
    assert shard.run(rq.Get(1)) == [np.float32(1.0), np.float32(2.0)]
    np.testing.assert_array_equal(shard.run(rq.Reduce("sum", 1)), [np.float32(3.0)])
    with pytest.raises(TypeError, match="cannot run tuple"):
        shard.run(("get", 1))
    with pytest.raises(ValueError, match="unknown op 'mean'"):
        rq.Reduce("mean", 1)


@pytest.mark.parametrize("uri", ["federated_bogus", "drain", "each", "release_later"])
def test_unknown_intrinsic_is_a_clear_error(uri):
    executor = FederatingExecutor(EagerTFExecutor(), [InProcessShard(0, 2)], 2)

    async def call():
        fn_type = mpx.FunctionType(mpx.FederatedType(F32, mpx.CLIENTS), F32)
        fn = await executor.create_value(bb.Intrinsic(uri, fn_type))
        arg = await executor.create_value([1.0, 2.0], mpx.FederatedType(F32, mpx.CLIENTS))
        return await executor.create_call(fn, arg)

    with pytest.raises(NotImplementedError, match=f"intrinsic '{uri}' is not implemented"):
        asyncio.run(call())
    executor.close()


# ---------------------------------------------------------------- function registrations


def test_a_request_that_cannot_be_submitted_registers_no_function():
    factory = mpx.mp_executor_factory(num_workers=1)
    try:
        with mpx.execution_context(factory):
            assert sum_plus_one([1.0, 2.0]) == np.float32(5.0)
        (shard,) = factory.pool.open_shards([(0, 2)])
        slot = shard.slot
        known = set(slot.known_functions)

        @mpx.tf_computation(F32)
        def times_three(x):
            return x * np.float32(3.0)

        assert times_three.building_block.function.digest not in known
        slot.executor.shutdown(wait=True)  # the worker is gone: submit fails

        async def send():
            return await shard.send((), rq.Map(99, times_three.building_block, 1))

        with pytest.raises(mpx.WorkerCrashedError):
            asyncio.run(send())
        assert times_three.building_block.function.digest not in slot.known_functions
    finally:
        factory.close()
