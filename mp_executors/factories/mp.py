"""`mp_executor_factory`: the worker-pool stack.

    ReferenceResolvingExecutor
      -> FederatingExecutor                    (in the parent: SERVER values, merges)
           server: EagerTFExecutor(server_device)
           clients: RemoteShards, one per worker process of a WorkerPool,
                    each worker pinned to its CPUs / GPU, holding its shard

The pool is sized when a call arrives (`planning.plan_pool` from the
inferred number of clients and the machine), started lazily, kept warm
across calls, and resized when a later call's client count needs a
different plan. Its workers are forked from a fork server
(`workers.fork_server`) that the factory starts when it is created, so that
the first call does not wait for workers to import TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from mp_executors.checks import check_int, is_int
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.executor_base import Executor
from mp_executors.executors.federating_executor import FederatingExecutor
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor
from mp_executors.factories.base import CacheEntry, CachingExecutorFactory
from mp_executors.factories.local import check_common_arguments
from mp_executors.machine import detect_machine
from mp_executors.planning import PoolPlan, plan_pool
from mp_executors.workers import fork_server
from mp_executors.workers.pool import WorkerPool

logger = logging.getLogger("mp_executors")


class MpExecutorFactory(CachingExecutorFactory):
    def __init__(self, default_num_clients: int = 0, max_fanout: int | None = None, server_device: str | None = None,
                 client_devices: Sequence[str] = (), *, num_workers: int | None = None,
                 threads_per_worker: int | None = None, devices: Any = "auto", workers_per_gpu: int = 1,
                 memory_per_worker: int | str | None = None, oversubscribe: bool = False,
                 start_method: str | None = None, max_retries: int = 1, machine=None):
        super().__init__(default_num_clients)
        self.max_retries = check_int("max_retries", max_retries, minimum=0,
                                     fix="the retries after a worker crash, e.g. 1")
        check_common_arguments(max_fanout, server_device, client_devices)
        self.max_fanout = max_fanout
        self.server_device = server_device
        self.client_devices = tuple(client_devices)
        self._machine = machine
        self._reading: tuple[float, Any] | None = None
        self._plan_args = dict(
            num_workers=num_workers, threads_per_worker=threads_per_worker, devices=devices,
            workers_per_gpu=workers_per_gpu, memory_per_worker=memory_per_worker, oversubscribe=oversubscribe,
        )
        # Validate every sizing argument now, before any call dispatches work.
        self.plan(num_workers if is_int(num_workers) else 1)
        self.pool = WorkerPool(start_method, lock=self._lock)  # the factory's one lock
        if self.PRESTART_FORK_SERVER and self.pool.start_method == "forkserver":
            # Workers fork from a server that has imported TensorFlow: start it now
            # (or at the end of this process's own TensorFlow import), so that it is
            # ready by the first call.
            fork_server.prestart()

    #: Start the fork server when the factory is made (False for a subclass whose workers run elsewhere).
    PRESTART_FORK_SERVER = True

    #: How long a machine reading (free memory, CPUs) is reused for planning.
    MACHINE_READING_SECONDS = 5.0

    def plan(self, num_clients: int) -> PoolPlan:
        """The pool plan this factory would use for `num_clients` clients."""
        machine = self._machine
        if machine is None:
            if self._reading is None or time.monotonic() - self._reading[0] > self.MACHINE_READING_SECONDS:
                self._reading = (time.monotonic(), detect_machine())
            # The pool's own workers are part of the plan: their memory counts as available to it.
            machine = self._reading[1].reclaiming(self.pool.pids()) if hasattr(self, "pool") else self._reading[1]
        # An explicit num_workers fixes the slots (CPUs and threads per worker)
        # whatever the client count: a call with fewer clients than workers uses
        # the first slots only, instead of re-planning (and restarting) the pool.
        fixed = self._plan_args["num_workers"]
        if not is_int(fixed):
            fixed = 0  # invalid or absent: plan_pool reports a bad value by its name
        return plan_pool(max(num_clients, fixed), machine=machine, **self._plan_args)

    def _make_entry(self, key: tuple, num_clients: int) -> CacheEntry:
        """Plans, fits the pool (growing it; never stopping a slot a call holds), opens the shards.

        Planning and fitting change the pool's shape: one builder at a time.
        Opening the shards only waits for a round trip to each worker, behind
        whatever other calls queued there (possibly a long map), so it runs
        after `_end_building`, with the new executor's slots already held:
        other threads' builds go on meanwhile, and nothing stops these slots.
        """
        shards, slots = [], ()
        if num_clients:
            plan = self.plan(num_clients)
            stopped = self.pool.fit(plan)
            if stopped:
                self._drop_executors_in(stopped)
            ranges = split_clients(num_clients, plan.num_workers, BLOCK_SIZE)
            with self._lock:
                slots = tuple(self.pool.slots[:len(ranges)])
                self.pool.hold(slots)
            self._end_building()
            try:
                shards = self.pool.open_shards(ranges, slots)
            except BaseException:
                self.pool.unhold(slots)
                raise
        executor = ReferenceResolvingExecutor(
            FederatingExecutor(EagerTFExecutor(self.server_device), shards, num_clients))
        return CacheEntry(key, executor, slots, preheld=bool(slots))

    # The hooks below run with the factory's lock held (see factories.base).

    def _usable(self, entry: CacheEntry) -> bool:
        return not any(slot.broken or slot.retired for slot in entry.slots)

    def _hold(self, entry: CacheEntry) -> None:
        self.pool.hold(entry.slots)

    def _unhold(self, entry: CacheEntry) -> None:
        self.pool.unhold(entry.slots)

    def _maintain(self, entry: CacheEntry, to_close: list[CacheEntry]) -> list[Any]:
        # Idle shrink: the workers beyond what this call needs, idle long enough,
        # go. Not while a build runs: the builder is changing the slot table.
        if not entry.slots or self._building:
            return []
        gone = self.pool.detach_idle(len(entry.slots))
        self._retire_executors_in(gone, to_close)
        return gone

    def _stop(self, resources: list[Any]) -> None:
        for slot in resources:
            slot.shutdown()

    def _after_clean_up(self, to_close: list[CacheEntry]) -> None:
        # After a worker crash: the executors whose shards lived in the dead worker are stale.
        self._retire_executors_in([s for s in self.pool.slots if s.broken], to_close)

    def _retire_executors_in(self, slots: list[Any], to_close: list[CacheEntry]) -> None:
        """Retires every executor with a shard in `slots` (closed now, or when its lease ends)."""
        if not slots:
            return
        gone = set(map(id, slots))
        for entry in list(self._live.values()):
            if any(id(s) in gone for s in entry.slots):
                self._retire(entry, to_close)

    def _drop_executors_in(self, slots: list[Any]) -> None:
        to_close: list[CacheEntry] = []
        with self._lock:
            self._retire_executors_in(slots, to_close)
        self._close_entries(to_close)

    def interrupt(self, executor: Executor | None = None) -> None:
        """After Ctrl-C in the call running on `executor`: stops the workers still busy with it.

        Only that call's slots are stopped, and of those only the ones no
        other running call holds (a worker shared with another thread's call
        is left to finish the abandoned request: stopping it would fail that
        call). The interrupted executor is retired (its state is mid-call),
        and so is every executor with a shard in a stopped worker (closed
        now, or when its own call ends). `executor=None` (the pre-lease
        interface): every running call's busy workers.
        """
        with self._lock:
            entries = self._entries_of(executor)
            victims = {id(s): s for e in entries for s in e.slots if s.holds <= e.leases}
            shared = [s.slot.index for e in entries for s in e.slots if s.holds > e.leases and s.busy]
        if shared:
            logger.warning("mp_executors: interrupted; worker slot(s) %s also serve another running call: left "
                           "to finish the abandoned request", shared)
        stopped = self.pool.interrupt(None if executor is None else list(victims.values()))
        super().interrupt(executor)
        self._drop_executors_in(stopped)

    def _close_resources(self) -> None:
        self.pool.close()


def mp_executor_factory(default_num_clients: int = 0, max_fanout: int | None = None, server_device: str | None = None,
                        client_devices: Sequence[str] = (), *, num_workers: int | None = None,
                        threads_per_worker: int | None = None, devices: Any = "auto", workers_per_gpu: int = 1,
                        memory_per_worker: int | str | None = None, oversubscribe: bool = False,
                        start_method: str | None = None, max_retries: int = 1) -> MpExecutorFactory:
    """The worker-pool execution stack: clients sharded over pinned processes.

    The first four arguments mean what they mean for `local_executor_factory`
    (swapping one factory for the other is a one-word change), except that
    `max_fanout` is only checked: a worker's shard holds all its clients, so
    that each intrinsic is one request per worker. The rest size
    and place the pool; `None`/'auto' means "decide from the machine":

      num_workers: worker processes (default: min(clients, CPUs / threads,
        memory / memory_per_worker, GPUs x workers_per_gpu)).
      threads_per_worker: TensorFlow intra-op threads (and CPUs) per worker.
      devices: 'auto' (GPUs if any), 'cpu', 'gpu', or a list of GPU ids.
      workers_per_gpu: workers sharing one GPU.
      memory_per_worker: bytes or '2GB' for the memory bound (default 1 GiB).
      oversubscribe: an explicit num_workers (or memory_per_worker) that the
        available memory cannot hold is a ValueError before any process
        starts; True starts them anyway, with a warning.
      start_method: 'forkserver' (default): workers are forked, in a fraction
        of a second, from a server process that has imported TensorFlow once
        (forked from this process right after its own TensorFlow import, or
        spawned); 'loky' or 'spawn': each worker is a fresh interpreter that
        imports TensorFlow itself (seconds).
      max_retries: times a call is retried on a fresh worker after a worker
        process dies (computations are functional, so the retry gives the
        same result); then `mpx.WorkerCrashedError` is raised.
    """
    return MpExecutorFactory(
        default_num_clients, max_fanout, server_device, client_devices, num_workers=num_workers,
        threads_per_worker=threads_per_worker, devices=devices, workers_per_gpu=workers_per_gpu,
        memory_per_worker=memory_per_worker, oversubscribe=oversubscribe, start_method=start_method,
        max_retries=max_retries,
    )
