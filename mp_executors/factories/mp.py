"""`mp_executor_factory`: the worker-pool stack.

    ReferenceResolvingExecutor
      -> FederatingExecutor                    (in the parent: SERVER values, merges)
           server: EagerTFExecutor(server_device)
           clients: RemoteShards, one per worker process of a WorkerPool,
                    each worker pinned to its CPUs / GPU, holding its shard

The pool is sized when a call arrives (`planning.plan_pool` from the
inferred number of clients and the machine), started lazily, kept warm
across calls, and resized when a later call's client count needs a
different plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from mp_executors.checks import check_int, is_int
from mp_executors.core.types import CLIENTS
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.federating_executor import FederatingExecutor
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor
from mp_executors.factories.base import CachingExecutorFactory
from mp_executors.factories.local import check_common_arguments
from mp_executors.machine import detect_machine
from mp_executors.planning import PoolPlan, plan_pool
from mp_executors.workers.pool import WorkerPool

logger = logging.getLogger("mp_executors")


class MpExecutorFactory(CachingExecutorFactory):
    def __init__(self, default_num_clients: int = 0, max_fanout: int = 100, server_device: str | None = None,
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
        self.pool = WorkerPool(start_method)

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

    def _build(self, num_clients: int) -> ReferenceResolvingExecutor:
        shards = []
        if num_clients:
            plan = self.plan(num_clients)
            if self.pool.fit(plan):
                self._drop_cached_executors()  # their shards lived in workers that were stopped
            ranges = split_clients(num_clients, plan.num_workers, BLOCK_SIZE)
            shards = self.pool.open_shards(ranges)
        return ReferenceResolvingExecutor(FederatingExecutor(EagerTFExecutor(self.server_device), shards, num_clients))

    def create_executor(self, cardinalities):
        executor = super().create_executor(cardinalities)
        n = self.resolve_cardinalities(cardinalities)[CLIENTS]
        if n and self.pool.size:
            needed = len(split_clients(n, self.plan(n).num_workers, BLOCK_SIZE))
            if self.pool.shrink_idle(needed):
                with self._lock:
                    self._drop_cached_executors()
                executor = super().create_executor(cardinalities)
        return executor

    def _drop_cached_executors(self) -> None:
        # Their shards live in workers that are about to change.
        executors, self._executors = list(self._executors.values()), type(self._executors)()
        for executor in executors:
            executor.close()

    def clean_up_executor(self, cardinalities) -> None:
        super().clean_up_executor(cardinalities)
        if self.pool.has_broken():
            with self._lock:
                self._drop_cached_executors()  # their shards lived in the dead worker

    def interrupt(self) -> None:
        """After Ctrl-C: stop busy workers; drop the executors whose shards they held."""
        self.pool.interrupt()
        if self.pool.has_broken():
            with self._lock:
                self._drop_cached_executors()

    def close(self) -> None:
        super().close()
        self.pool.close()


def mp_executor_factory(default_num_clients: int = 0, max_fanout: int = 100, server_device: str | None = None,
                        client_devices: Sequence[str] = (), *, num_workers: int | None = None,
                        threads_per_worker: int | None = None, devices: Any = "auto", workers_per_gpu: int = 1,
                        memory_per_worker: int | str | None = None, oversubscribe: bool = False,
                        start_method: str | None = None, max_retries: int = 1) -> MpExecutorFactory:
    """The worker-pool execution stack: clients sharded over pinned processes.

    The first four arguments mean what they mean for `local_executor_factory`
    (swapping one factory for the other is a one-word change). The rest size
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
      start_method: 'loky' (default) or 'spawn'.
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
