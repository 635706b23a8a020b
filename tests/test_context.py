"""Execution contexts under threads and asyncio: mirrors `mp_executors/context.py` and
`mp_executors/core/context_stack.py`.

Every test uses real threads (or real asyncio tasks) and real computations; the ones
that start workers use real worker processes.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import psutil
import pytest

import mp_executors as mpx
from mp_executors import context
from mp_executors.core import context_stack
from mp_executors.factories.local import LocalExecutorFactory
from mp_executors.factories.mp import MpExecutorFactory


@mpx.tf_computation(np.float32)
def _add_one(x):
    return x + 1.0


@mpx.federated_computation(mpx.FederatedType(np.float32, mpx.CLIENTS))
def _sum_plus_one(xs):
    return mpx.federated_sum(mpx.federated_map(_add_one, xs))


class RecordingLocalFactory(LocalExecutorFactory):
    """The real in-process factory, recording the client counts of the stacks it builds."""

    def __init__(self):
        super().__init__()
        self.built: list[int] = []

    def _build(self, num_clients: int):
        self.built.append(num_clients)
        return super()._build(num_clients)


def _cached_client_counts(factory: RecordingLocalFactory) -> set[int]:
    """The client counts of the calls this factory served."""
    return set(factory.built)


@pytest.fixture
def no_default():
    """Runs a test with no process default set; restores the previous one after."""
    previous = context_stack.set_default(None)
    yield
    replaced = context_stack.set_default(previous)
    if replaced is not None and replaced is not previous:
        replaced.close()


def _run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return errors


# ------------------------------------------------------------------ (1) thread-local `with`


def test_each_thread_runs_on_the_factory_of_its_own_with_block():
    factories = [RecordingLocalFactory(), RecordingLocalFactory()]
    counts = [3, 5]  # thread i calls with counts[i] clients: the factory's cache shows who it served
    barrier = threading.Barrier(2)
    results: dict[int, list[float]] = {0: [], 1: []}

    def worker(i: int):
        with mpx.execution_context(factories[i]) as ctx:
            for step in range(15):
                barrier.wait(30)  # both threads are inside their `with` at once
                assert mpx.get_execution_context() is ctx
                xs = [float(step + c) for c in range(counts[i])]
                results[i].append((float(_sum_plus_one(xs)), sum(xs) + counts[i]))

    try:
        assert not _run_threads([lambda: worker(0), lambda: worker(1)])
        for i in (0, 1):
            assert len(results[i]) == 15 and all(got == want for got, want in results[i])
            assert _cached_client_counts(factories[i]) == {counts[i]}
    finally:
        for f in factories:
            f.close()


def test_a_thread_started_inside_a_with_block_does_not_inherit_it():
    with mpx.local_executor_factory() as factory, mpx.execution_context(factory) as ctx:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(context_stack.installed()))
        thread.start()
        thread.join()
        assert mpx.get_execution_context() is ctx
        assert seen == [()]


# ------------------------------------------------------------------ (2) one default, under a lock


def test_eight_threads_racing_for_the_default_create_it_once(no_default):
    made = []
    real = context.create_default_context

    def counting_default():
        ctx = real()
        made.append(ctx)
        return ctx

    context_stack.set_default_maker(counting_default)
    barrier = threading.Barrier(8)
    seen = []

    def first_call():
        barrier.wait(30)
        assert float(_add_one(np.float32(1.0))) == 2.0  # no clients: no worker starts
        seen.append(mpx.get_execution_context())

    try:
        assert not _run_threads([first_call] * 8)
    finally:
        context_stack.set_default_maker(mpx._create_default_context)
    assert len(made) == 1, f"{len(made)} default contexts (and pools) were created"
    assert len({id(ctx) for ctx in seen}) == 1 and seen[0] is made[0]
    assert isinstance(made[0].executor_factory, MpExecutorFactory) and made[0].owns_factory


# ------------------------------------------------------------------ (3) replaced defaults close


def _alive(pids) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_replacing_a_default_the_library_made_closes_its_pool(no_default):
    pids_per_context = []
    contexts = []
    for _ in range(3):
        contexts.append(mpx.set_mp_execution_context(num_workers=1))
        assert float(_sum_plus_one([1.0, 2.0])) == 5.0
        pids_per_context.append(contexts[-1].executor_factory.pool.pids())
    everyone = {pid for pids in pids_per_context for pid in pids}
    assert len(everyone) == 3
    # Only the current default's worker runs; the two replaced pools were closed.
    assert _alive(everyone) == set(pids_per_context[-1]), pids_per_context
    mpx.set_execution_context(mpx.local_executor_factory())  # replaces (and closes) the last one
    assert not _alive(everyone)


def test_a_factory_the_user_passed_is_not_closed_when_replaced(no_default):
    mine = mpx.local_executor_factory()
    mpx.set_execution_context(mine)
    mpx.set_local_execution_context()
    assert float(_sum_plus_one([1.0])) == 2.0
    with mpx.execution_context(mine):  # still usable: it was not closed
        assert float(_sum_plus_one([1.0, 2.0])) == 5.0
    mine.close()


# ------------------------------------------------------------------ threads on factories


def test_two_factories_in_two_threads_with_many_calls():
    factories = {"local": mpx.local_executor_factory(), "mp": mpx.mp_executor_factory(num_workers=2)}
    rng = np.random.default_rng(0)
    work = {name: [rng.normal(size=rng.integers(1, 20)).astype(np.float32) for _ in range(20)] for name in factories}

    def caller(name):
        def run():
            with mpx.execution_context(factories[name]):
                for xs in work[name]:
                    got = _sum_plus_one(list(xs))
                    np.testing.assert_allclose(got, np.sum(xs + 1.0, dtype=np.float64), rtol=1e-5)
        return run

    try:
        errors = _run_threads([caller("local"), caller("mp")])
        assert not errors, errors
    finally:
        for f in factories.values():
            f.close()


# ------------------------------------------------------------------ asyncio


def test_asyncio_tasks_in_different_contexts_do_not_see_each_other():
    factories = [RecordingLocalFactory(), RecordingLocalFactory()]
    counts = [2, 7]

    async def task(i: int, started: asyncio.Event, other_started: asyncio.Event):
        with mpx.execution_context(factories[i]) as ctx:
            started.set()
            await other_started.wait()  # both tasks are inside their `with` now
            results = []
            for step in range(5):
                await asyncio.sleep(0)
                assert mpx.get_execution_context() is ctx
                xs = [float(step)] * counts[i]
                # A call from a task: run in a thread, which carries the task's context along.
                results.append(float(await asyncio.to_thread(_sum_plus_one, xs)))
            return results

    async def main():
        events = [asyncio.Event(), asyncio.Event()]
        return await asyncio.gather(task(0, events[0], events[1]), task(1, events[1], events[0]))

    try:
        got = asyncio.run(main())
        for i in (0, 1):
            assert got[i] == [float(step * counts[i] + counts[i]) for step in range(5)]
            assert _cached_client_counts(factories[i]) == {counts[i]}
        assert context_stack.installed() == ()
    finally:
        for f in factories:
            f.close()


def test_a_call_inside_a_running_event_loop_works():
    # Jupyter: the caller's thread runs an event loop; the call runs on the library's own loop.
    async def main():
        with mpx.local_executor_factory() as factory, mpx.execution_context(factory):
            return float(_sum_plus_one([1.0, 2.0, 3.0]))

    assert asyncio.run(main()) == 9.0
