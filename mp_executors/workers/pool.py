"""The worker pool: long-lived, pinned worker processes that hold client shards.

Data flow (one intrinsic, e.g. `federated_map` over 1000 clients, 2 workers):

    parent process                                          worker processes
    --------------                                          ----------------
    FederatingExecutor                                      slot 0: CPUs {0}
      |  one request per shard                              +------------------------+
      v                                                     | worker.handle()        |
    RemoteShard(slot 0) --submit--> loky executor 0 --pipe->|   ClientShard [0,504)  |
    RemoteShard(slot 1) --submit--> loky executor 1 --pipe->|   values by handle     |
      ^                                                     +------------------------+
      |  partials / acks (small)                            slot 1: CPUs {1}
      +---- asyncio.wrap_future <---- result pipe <-------- |   ClientShard [504,1000)|
                                                            +------------------------+
    big CLIENTS arguments: parent stacks each leaf into /dev/shm (transport.Segments),
    the request carries only the segment name; unlinked when the request completes.

The moving parts:

- `WorkerPool` owns the slots. Each slot is its own single-process loky
  executor, so a request reaches exactly the worker that holds its values,
  each worker gets its own environment before Python starts (CPU set, thread
  counts, CUDA_VISIBLE_DEVICES; `resources.WorkerSlot.env`), and a crash kills
  only that slot. Workers import TensorFlow once (`worker.initialize`) and
  stay warm across calls; the pool grows and shrinks with `resize`.
- `RemoteShard` is the parent's proxy for one `ClientShard` in one worker:
  it implements the `ShardTarget` protocol of the FederatingExecutor, so the
  federating layer is the same code for the in-process and the pooled stack.
  It counts its round trips (`WorkerPool.requests`), which is how the tests
  check that messages are per worker, not per client.
- Shutdown: `WorkerPool.close()` (the factory's `close()`, atexit, Ctrl-C)
  kills and joins every worker. A worker whose parent dies (even by SIGKILL)
  exits by itself within about a second: loky workers would block on their
  pipe forever, so `worker.initialize` starts a thread that watches the
  parent's pid.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import Any

import loky
import loky.backend

from mp_executors.resources import PoolPlan, WorkerSlot
from mp_executors.workers import transport, worker

logger = logging.getLogger("mp_executors")

# A worker holding client data legitimately grows by more than loky's 300 MB
# "leak" threshold; without this loky would silently replace it (and its data).
_NO_LEAK_RESTART = str(1 << 50)


class WorkerSlotProcess:
    """One slot: a single-process loky executor, pinned as its `WorkerSlot` says."""

    def __init__(self, slot: WorkerSlot, start_method: str):
        self.slot = slot
        env = dict(slot.env())
        env["LOKY_MAX_MEMORY_LEAK_SIZE"] = _NO_LEAK_RESTART
        self.executor = loky.ProcessPoolExecutor(
            max_workers=1,
            context=loky.backend.get_context(start_method),
            initializer=worker.initialize,
            initargs=(slot.index, tuple(slot.cpus), env, os.getpid()),
            env=env,
        )
        self.started = time.perf_counter()
        self.segments = transport.SegmentPool()
        # Digests of the compiled computations this worker process has received.
        self.known_functions: set[str] = set()

    def submit(self, fn, *args) -> Any:
        return self.executor.submit(fn, *args)

    def pids(self) -> list[int]:
        processes = getattr(self.executor, "_processes", None) or {}
        return [p.pid for p in processes.values()]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, kill_workers=True)
        self.segments.close()


class WorkerPool:
    """Owns the worker processes; see the module docstring."""

    def __init__(self, start_method: str | None = None):
        self.start_method = start_method or "loky"
        if self.start_method not in ("loky", "spawn", "loky_init_main"):
            raise ValueError(
                f"start_method must be 'loky' (default) or 'spawn', got {start_method!r}; "
                "fork is unsafe with TensorFlow threads."
            )
        self._slots: list[WorkerSlotProcess] = []
        self._lock = threading.Lock()
        self._shard_ids = itertools.count(1)
        self.requests = 0
        self.plan: PoolPlan | None = None

    @property
    def size(self) -> int:
        return len(self._slots)

    def resize(self, plan: PoolPlan) -> None:
        """Makes the pool match `plan`: keeps warm workers whose slot is unchanged."""
        with self._lock:
            wanted = list(plan.slots)
            keep = []
            for i, slot in enumerate(wanted):
                if i < len(self._slots) and self._slots[i].slot == slot:
                    keep.append(self._slots[i])
                else:
                    if i < len(self._slots):
                        self._slots[i].shutdown()
                    keep.append(None)
            for extra in self._slots[len(wanted):]:
                extra.shutdown()
            started = time.perf_counter()
            new = [i for i, s in enumerate(keep) if s is None]
            for i in new:
                keep[i] = WorkerSlotProcess(wanted[i], self.start_method)
            self._slots = keep
            self.plan = plan
        if new:
            # Warm the new workers now (in parallel): each imports TensorFlow once.
            futures = [self._slots[i].submit(worker.report) for i in new]
            for f in futures:
                f.result()
            logger.info(
                "mp_executors: started %d worker(s) in %.1f s; pool now has %d: %s",
                len(new), time.perf_counter() - started, len(self._slots),
                "; ".join(f"slot {s.slot.index} cpus={list(s.slot.cpus)} gpu={s.slot.gpu}" for s in self._slots),
            )

    def open_shards(self, ranges: list[tuple[int, int]]) -> list[RemoteShard]:
        """One ClientShard per range, range i in worker i (one round trip each, in parallel)."""
        if len(ranges) > len(self._slots):
            raise ValueError(f"{len(ranges)} shards but only {len(self._slots)} workers.")
        shards = []
        futures = []
        for slot, (start, stop) in zip(self._slots, ranges):
            shard_id = next(self._shard_ids)
            device = "/GPU:0" if slot.slot.gpu is not None else None
            futures.append(slot.submit(worker.open_shard, shard_id, start, stop, device))
            shards.append(RemoteShard(self, slot, shard_id, start, stop))
        for f in futures:
            f.result()
        return shards

    def reports(self) -> list[dict[str, Any]]:
        """Each worker's pid, CPU affinity, threads, GPU and memory."""
        return [f.result() for f in [s.submit(worker.report) for s in self._slots]]

    def pids(self) -> list[int]:
        return [pid for s in self._slots for pid in s.pids()]

    def close(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, []
        for slot in slots:
            slot.shutdown()


class RemoteShard:
    """The parent's proxy of a ClientShard living in one worker (a ShardTarget)."""

    def __init__(self, pool: WorkerPool, slot: WorkerSlotProcess, shard_id: int, start: int, stop: int):
        self.pool, self.slot, self.shard_id = pool, slot, shard_id
        self.start, self.stop = start, stop

    async def call(self, releases: list[int], method: str, *args: Any) -> Any:
        segments = None
        if method == "put" and not _is_client_data(args[2]):
            segments = self.slot.segments.lease()
            handle, member_type, reps = args
            method, args = "put_columns", (handle, member_type, transport.encode_columns(member_type, reps, segments))
        args, new_functions = transport.strip_known_functions(args, self.slot.known_functions)
        self.pool.requests += 1
        future = self.slot.submit(worker.handle, self.shard_id, releases, method, args, new_functions)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if segments is not None:
                segments.release()

    def close(self) -> None:
        try:
            self.slot.submit(worker.close_shard, self.shard_id)
        except Exception:  # the pool may already be shut down  # noqa: BLE001
            pass


def _is_client_data(value: Any) -> bool:
    from mp_executors.core.client_data import ClientData  # noqa: PLC0415

    return isinstance(value, ClientData)


__all__ = ["RemoteShard", "WorkerPool"]
