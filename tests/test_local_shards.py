"""The local stack's in-process shards: order, concurrency, the factory's thread pool, the split.

- `SerialQueue`: one queue's callables run one at a time, in submission order, while
  different queues run at once on the shared pool (real threads, a barrier proves the
  overlap; no timing).
- `InProcessShard` on a pool: a shard's requests are pipelined (each reply in order);
  `close()` runs after the request running now, queued ones fail with a clear error,
  later sends too.
- The local factory's pool: created on first need (not for a one-shard stack), gone after
  `close()` (threads ended), and `close()` waits for a running call first.
- Results are bitwise the same whatever the split and the threads: the small-model round
  (vectorized) and a FedAvg-like round, one shard, shards on the pool, shards one after
  another; two calls from two threads at once on one factory.
- `shard_ranges`: vectorization-group boundaries by default, `max_fanout` honoured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors.benchmarking import workloads as W
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.in_process_shard import InProcessShard, SerialQueue
from mp_executors.executors.reduction_blocks import BLOCK_SIZE
from mp_executors.executors.vectorized_map import GROUP_SIZE, MapPlans
from mp_executors.factories.local import LocalExecutorFactory, shard_ranges

POOL_THREAD = "mp_executors-local-shard"
F32 = mpx.TensorType(np.float32)


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(POOL_THREAD) and t.is_alive()]


# --------------------------------------------------------------------------- SerialQueue


def test_serial_queue_keeps_each_queue_in_order_and_runs_queues_at_once():
    queues_n, items_n = 4, 50
    barrier = threading.Barrier(queues_n, timeout=30)  # every queue's first item must run at once
    ran: dict[int, list[int]] = {q: [] for q in range(queues_n)}
    running = dict.fromkeys(range(queues_n), 0)
    overlaps: list[int] = []
    lock = threading.Lock()

    def item(q: int, i: int):
        def run():
            with lock:
                running[q] += 1
                if running[q] > 1:
                    overlaps.append(q)
            if i == 0:
                barrier.wait()  # raises BrokenBarrierError (caught below) if queues ran one at a time
            ran[q].append(i)
            with lock:
                running[q] -= 1
        return run

    with concurrent.futures.ThreadPoolExecutor(queues_n) as pool:
        queues = [SerialQueue(pool) for _ in range(queues_n)]

        def submitter(q: int):
            for i in range(items_n):
                queues[q].submit(item(q, i))

        # Each queue is fed from its own thread, all at once.
        threads = [threading.Thread(target=submitter, args=(q,)) for q in range(queues_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not barrier.broken
    assert overlaps == []
    assert all(ran[q] == list(range(items_n)) for q in range(queues_n))


def test_serial_queue_runs_in_order_on_the_caller_when_the_pool_is_shut_down():
    pool = concurrent.futures.ThreadPoolExecutor(2)
    pool.shutdown()
    queue, ran = SerialQueue(pool), []
    for i in range(3):
        queue.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    me = threading.current_thread().name
    assert ran == [(0, me), (1, me), (2, me)]


def test_serial_queue_goes_on_after_an_item_that_raises():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queue, ran = SerialQueue(pool), []
        queue.submit(lambda: 1 / 0)
        queue.submit(lambda: ran.append("after"))
    assert ran == ["after"]


# --------------------------------------------------------------------------- InProcessShard on a pool

_gate = threading.Event()
_entered = threading.Event()


def _gated_client(client_id: int) -> np.ndarray:
    """A ClientData builder that waits for the test (module level: ClientData pickles it)."""
    _entered.set()
    if not _gate.wait(30):
        raise TimeoutError("the test never opened the gate")
    return np.float32(client_id)


def _plain_client(client_id: int) -> np.ndarray:
    return np.float32(client_id)


def test_a_shard_runs_its_requests_in_order_on_the_pool():
    async def main(shard: InProcessShard):
        replies = []
        for h in range(1, 21):  # each put replaces the previous value: order decides what Get sees
            replies.append(shard.send((), rq.PutAllEqual(h, F32, np.float32(h))))
            replies.append(shard.send((h - 1,) if h > 1 else (), rq.GetFirst(h)))
        got = await asyncio.gather(*replies)
        assert shard.shard.values.keys() == {20}  # the releases ran in order too
        return got[1::2]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shard = InProcessShard(0, 3, pool=pool)
        assert shard.concurrent
        got = asyncio.run(main(shard))
        shard.close()
    assert [float(v) for v in got] == [float(h) for h in range(1, 21)]


def test_closing_a_shard_waits_for_the_running_request_and_fails_the_queued_ones():
    _gate.clear()
    _entered.clear()
    gated = mpx.ClientData(_gated_client, [0, 1], F32)

    async def main(shard: InProcessShard):
        running = shard.send((), rq.Put(1, F32, gated))
        queued = shard.send((), rq.Put(2, F32, mpx.ClientData(_plain_client, [0, 1], F32)))
        await asyncio.get_running_loop().run_in_executor(None, _entered.wait, 30)
        shard.close()  # from the loop's thread while a pool thread runs `running`
        later = shard.send((), rq.GetFirst(1))
        assert later.done()
        _gate.set()
        return await asyncio.gather(running, queued, later, return_exceptions=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shard = InProcessShard(0, 2, pool=pool)
        running, queued, later = asyncio.run(main(shard))
    assert running is None  # it ran to the end (a Put's reply is an acknowledgement)
    for error in (queued, later):
        assert isinstance(error, RuntimeError)
        assert "in-process shard of clients [0, 2) is closed" in str(error)
    assert shard.shard.values == {}  # closed after the running request


# --------------------------------------------------------------------------- the factory's pool


@mpx.tf_computation(F32)
def _double(x):
    return x * np.float32(2.0)


@mpx.federated_computation(mpx.FederatedType(F32, mpx.CLIENTS))
def _sum_doubled(xs):
    return mpx.federated_sum(mpx.federated_map(_double, xs))


def test_the_pool_is_made_on_first_need_and_gone_after_close():
    before = set(_pool_threads())
    factory = mpx.local_executor_factory(max_fanout=8, shard_threads=2)
    one_shard = mpx.local_executor_factory(shard_threads=2)  # 2 threads, default split: one shard
    try:
        assert factory._pool is None
        with mpx.execution_context(one_shard):
            assert _sum_doubled([1.0, 2.0, 3.0]) == 12.0
        assert one_shard._pool is None
        with mpx.execution_context(factory):
            assert _sum_doubled([float(i) for i in range(40)]) == 2.0 * sum(range(40))  # 5 shards
        assert factory._pool is not None
        assert set(_pool_threads()) - before
    finally:
        factory.close()
        one_shard.close()
    assert factory._pool is None
    assert set(_pool_threads()) <= before  # its threads ended
    with pytest.raises(RuntimeError, match="LocalExecutorFactory is closed"):
        with mpx.execution_context(factory):
            _sum_doubled([1.0, 2.0])


def test_close_waits_for_a_call_running_on_the_pool():
    _gate.clear()
    _entered.clear()
    factory = mpx.local_executor_factory(max_fanout=8, shard_threads=2)
    data = mpx.ClientData(_gated_client, list(range(20)), F32)
    result: list = []

    def call():
        with mpx.execution_context(factory):
            result.append(_sum_doubled(data))

    caller = threading.Thread(target=call)
    caller.start()
    assert _entered.wait(30)  # a pool thread is building the clients now
    closer = threading.Thread(target=factory.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # close() waits for the call's lease...
    _gate.set()
    caller.join(60)
    closer.join(60)
    assert result == [2.0 * sum(range(20))]  # ...so the call finished whole
    assert factory._pool is None


def test_an_error_in_a_pooled_shard_names_the_client():
    with mpx.local_executor_factory(max_fanout=8, shard_threads=2) as factory, mpx.execution_context(factory):
        with pytest.raises(Exception, match="client 13"):
            _sum_doubled(mpx.ClientData(_failing_client, list(range(20)), F32))


def _failing_client(client_id: int) -> np.ndarray:
    if client_id == 13:
        raise ValueError("client 13 has no data")
    return np.float32(client_id)


def test_bad_shard_threads_is_a_clear_error():
    with pytest.raises(ValueError, match="shard_threads"):
        mpx.local_executor_factory(shard_threads=0)


# --------------------------------------------------------------------------- bitwise, whatever the split

SPLITS = {  # name -> LocalExecutorFactory kwargs
    "one shard": {"shard_threads": 1},
    "default": {},
    "2 shards of whole groups on 2 threads": {"max_fanout": GROUP_SIZE, "shard_threads": 2},
    "shards of ~40 on 3 threads": {"max_fanout": 40, "shard_threads": 3},
    "shards of ~40 one after another": {"max_fanout": 40, "shard_threads": 1},
}


def _small_rounds(factory, data, rounds: int = 2) -> dict:
    model = W.small_initial_model()
    with mpx.execution_context(factory):
        for r in range(1, rounds + 1):
            model = W.small_round(model, np.int32(r), data)
    return model


def test_small_model_rounds_are_bitwise_equal_whatever_the_split():
    n = GROUP_SIZE + 60  # two groups: the second padded
    data = mpx.ClientData(W.make_small_client, list(range(n)), W.SMALL_DATA_TYPE)
    plans = MapPlans()  # shared: pfor converts the client function once for all factories
    results = {}
    for name, kwargs in SPLITS.items():
        factory = LocalExecutorFactory(**kwargs)
        factory.map_plans = plans
        try:
            results[name] = _small_rounds(factory, data)
        finally:
            factory.close()
    assert any(plan.vectorized for plan in plans._plans.values())  # the vectorized path ran
    reference = results.pop("one shard")
    for name, model in results.items():
        for key in ("w", "b"):
            assert np.array_equal(np.asarray(model[key]), np.asarray(reference[key])), (name, key)


def test_two_threads_calling_one_pooled_factory_get_the_sequential_bits():
    n = 96
    data = mpx.ClientData(W.make_small_client, list(range(n)), W.SMALL_DATA_TYPE)
    with LocalExecutorFactory(max_fanout=16, shard_threads=1) as sequential:
        reference = _small_rounds(sequential, data)
    with LocalExecutorFactory(max_fanout=16, shard_threads=2) as factory:
        got: list = [None, None]

        def call(i: int):
            got[i] = _small_rounds(factory, data)  # two leases: two executors, one ClientData cache

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for model in got:
        for key in ("w", "b"):
            assert np.array_equal(np.asarray(model[key]), np.asarray(reference[key]))


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n", [1, 7, 100, 128, 129, 1000, 10_000])
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_the_default_split_is_whole_groups(n, shards):
    ranges = shard_ranges(n, None, shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a == prev_b for (a, _), (_, prev_b) in zip(ranges[1:], ranges))
    assert all(a % GROUP_SIZE == 0 for a, _ in ranges)  # only the stack's last group is padded
    assert len(ranges) == min(shards, -(-n // GROUP_SIZE))


@pytest.mark.parametrize("max_fanout", [2, 3, 8, 10, 100, 127, 128, 200, 256, 1000])
@pytest.mark.parametrize("n", [1, 50, 129, 1000, 3001])
def test_max_fanout_bounds_a_shard(max_fanout, n):
    ranges = shard_ranges(n, max_fanout, shards=2)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a % BLOCK_SIZE == 0 for a, _ in ranges)
    bound = max_fanout if max_fanout >= GROUP_SIZE else -(-max_fanout // BLOCK_SIZE) * BLOCK_SIZE
    assert max(b - a for a, b in ranges) <= bound
    if max_fanout >= GROUP_SIZE:
        assert all(a % GROUP_SIZE == 0 for a, _ in ranges)
