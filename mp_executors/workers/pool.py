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
import dataclasses
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any

import loky
import loky.backend
import psutil
from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

from mp_executors.errors import WorkerCrashedError
from mp_executors.resources import PoolPlan, WorkerSlot
from mp_executors.workers import transport, worker

logger = logging.getLogger("mp_executors")

# A worker holding client data legitimately grows by more than loky's 300 MB
# "leak" threshold; without this loky would silently replace it (and its data).
_NO_LEAK_RESTART = str(1 << 50)


class WorkerSlotProcess:
    """One slot: a single-process loky executor, pinned as its `WorkerSlot` says.

    The pool needs of a slot only what this class offers: `submit(fn, *args)`
    returning a concurrent future, `pids()`, `exitcode()`, `kill()`,
    `shutdown()`, the attributes below, and `crash_errors` (the exceptions
    by which a future reports that the worker died). Another engine's
    workers (e.g. Ray actors) plug in by providing the same.
    """

    crash_errors: tuple[type[BaseException], ...] = (BrokenProcessPool, ShutdownExecutorError)

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
        self.process = None  # the loky process, known once the worker has started
        self.broken = False
        self.last_rss: int | None = None
        self.pending: set[Any] = set()  # concurrent futures not yet done
        self.last_used = time.monotonic()

    def submit(self, fn, *args) -> Any:
        future = self.executor.submit(fn, *args)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        if self.process is None:
            processes = list((getattr(self.executor, "_processes", None) or {}).values())
            self.process = processes[0] if processes else None
        return future

    def pids(self) -> list[int]:
        if self.process is not None and self.process.is_alive():
            return [self.process.pid]
        processes = getattr(self.executor, "_processes", None) or {}
        return [p.pid for p in processes.values()]

    def exitcode(self, wait: float = 1.0) -> int | None:
        if self.process is None:
            return None
        self.process.join(wait)
        return self.process.exitcode

    def kill(self) -> None:
        """Ends the worker now (its running request is abandoned)."""
        self.broken = True
        if self.process is not None and self.process.is_alive():
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except OSError:
                pass

    def shutdown(self) -> None:
        try:
            self.executor.shutdown(wait=True, kill_workers=True)
        finally:
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
        self.memory_share = 0
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()

    @property
    def size(self) -> int:
        return len(self._slots)

    #: How many times a slot whose worker dies while starting is started again.
    START_ATTEMPTS = 3

    def resize(self, plan: PoolPlan) -> None:
        """Makes the pool match `plan`: keeps warm, healthy workers whose slot is unchanged."""
        with self._lock:
            wanted = list(plan.slots)
            keep: list[WorkerSlotProcess | None] = []
            for i, slot in enumerate(wanted):
                current = self._slots[i] if i < len(self._slots) else None
                if current is not None and current.slot == slot and not current.broken:
                    keep.append(current)
                else:
                    if current is not None:
                        current.shutdown()
                    keep.append(None)
            for extra in self._slots[len(wanted):]:
                extra.shutdown()
            self._slots = keep  # type: ignore[assignment]
            self.plan = plan
            self.memory_share = plan.machine.available_memory // max(1, plan.num_workers)
            started = time.perf_counter()
            new = [i for i, s in enumerate(keep) if s is None]
            self._start_slots(new, wanted)
        self._ensure_monitor()
        if new:
            logger.info(
                "mp_executors: started %d worker(s) in %.1f s; pool now has %d: %s",
                len(new), time.perf_counter() - started, len(self._slots),
                "; ".join(f"slot {s.slot.index} cpus={list(s.slot.cpus)} gpu={s.slot.gpu}" for s in self._slots),
            )

    #: A worker beyond what the current call needs is kept warm this long after
    #: its last request: alternating between many and few clients (training on a
    #: sample, evaluating on all) must not restart workers every call.
    idle_shrink_seconds = 60.0

    def fit(self, plan: PoolPlan) -> bool:
        """Makes the pool serve `plan`, keeping warm workers where it can.

        Grows by starting the missing slots (extra running workers are kept:
        see `shrink_idle`); a plan whose slots differ from the running ones
        (other CPUs, threads or GPU) resizes. Returns True when a running worker
        was stopped or replaced, i.e. when executors built earlier are stale.
        """
        running = [s.slot for s in self._slots]
        wanted = list(plan.slots)
        common = min(len(running), len(wanted))
        if self.has_broken() or running[:common] != wanted[:common]:
            stale = bool(self._slots)
            if stale:
                logger.info("mp_executors: re-planning the pool: %d -> %d workers", len(running), len(wanted))
            self.resize(plan)
            return stale
        if len(wanted) > len(running):
            logger.info("mp_executors: growing the pool from %d to %d workers", len(running), len(wanted))
            self.resize(plan)
            return False
        return False

    def shrink_idle(self, needed: int) -> bool:
        """Stops the workers beyond the first `needed` that have been idle long enough.

        Returns True when a worker was stopped (executors using it are stale).
        """
        now = time.monotonic()
        keep = len(self._slots)
        # Only a contiguous tail can go: slots keep their indices.
        while keep > max(needed, 0) and now - self._slots[keep - 1].last_used >= self.idle_shrink_seconds:
            keep -= 1
        if keep == len(self._slots):
            return False
        logger.info("mp_executors: shrinking the pool from %d to %d workers (idle for %.0f s or more)",
                    len(self._slots), keep, self.idle_shrink_seconds)
        with self._lock:
            gone, self._slots = self._slots[keep:], self._slots[:keep]
            if self.plan is not None:
                self.plan = dataclasses.replace(self.plan, num_workers=keep, slots=self.plan.slots[:keep])
        for slot in gone:
            slot.shutdown()
        return True

    def _start_slots(self, indices: list[int], wanted: list[WorkerSlot]) -> None:
        """Starts workers in parallel and waits until each has imported TensorFlow."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            for i in indices:
                self._slots[i] = self._new_slot(wanted[i])
            futures = {i: self._slots[i].submit(worker.report) for i in indices}
            failed = []
            for i, future in futures.items():
                try:
                    self._slots[i].last_rss = future.result()["rss"]
                except self._slots[i].crash_errors:
                    failed.append(i)
            if not failed:
                return
            for i in failed:
                slot = self._slots[i]
                error = WorkerCrashedError(slot.slot.index, None, slot.exitcode(), slot.last_rss, "start", attempt)
                slot.shutdown()
                if attempt == self.START_ATTEMPTS:
                    for j in indices:
                        self._slots[j].shutdown()
                    self._slots = [s for j, s in enumerate(self._slots) if j not in indices]
                    raise error
                logger.warning("mp_executors: %s; starting it again", error.describe())
            indices = failed

    def _new_slot(self, slot: WorkerSlot) -> WorkerSlotProcess:
        """Starts the worker of one slot (override to run workers elsewhere)."""
        return WorkerSlotProcess(slot, self.start_method)

    def has_broken(self) -> bool:
        return any(s.broken for s in self._slots)

    def crashed(self, slot: WorkerSlotProcess, phase: str, clients: tuple[int, int] | None) -> WorkerCrashedError:
        """Marks a slot dead and describes how it died."""
        slot.broken = True
        error = WorkerCrashedError(slot.slot.index, clients, slot.exitcode(), slot.last_rss, phase)
        logger.warning("mp_executors: %s", error.describe())
        return error

    def interrupt(self) -> None:
        """After Ctrl-C: ends the workers still busy with the abandoned call.

        They are replaced (warm-started again) by the next call that needs them;
        idle workers, and the values they hold, are kept.
        """
        for slot in list(self._slots):
            if any(not f.done() for f in slot.pending):
                logger.warning("mp_executors: interrupted; stopping busy worker slot %d", slot.slot.index)
                slot.kill()

    # ------------------------------------------------------------------ memory guard

    #: A worker whose RSS passes this fraction of its share of memory is reported.
    MEMORY_WARNING_FRACTION = 0.8
    MONITOR_SECONDS = 1.0

    def _ensure_monitor(self) -> None:
        if self._monitor is None or not self._monitor.is_alive():
            self._monitor_stop.clear()
            self._monitor = threading.Thread(target=self._watch_memory, name="mp_executors-memory", daemon=True)
            self._monitor.start()

    def _watch_memory(self) -> None:
        warned: set[int] = set()
        while not self._monitor_stop.wait(self.MONITOR_SECONDS):
            for slot in list(self._slots):
                # A slot being (re)started is a None placeholder until its worker is up.
                if slot is None or slot.process is None or not slot.process.is_alive():
                    continue
                try:
                    slot.last_rss = psutil.Process(slot.process.pid).memory_info().rss
                except psutil.Error:
                    continue
                limit = self.MEMORY_WARNING_FRACTION * self.memory_share
                if slot.last_rss > limit and slot.slot.index not in warned:
                    warned.add(slot.slot.index)
                    logger.warning(
                        "mp_executors: worker slot %d uses %.0f MiB, over %.0f%% of its %.0f MiB share of "
                        "memory (%.0f MiB available on the machine); the kernel may kill it. Use more "
                        "workers, fewer clients per call, or mpx.ClientData.",
                        slot.slot.index, slot.last_rss / 2**20, 100 * self.MEMORY_WARNING_FRACTION,
                        self.memory_share / 2**20, psutil.virtual_memory().available / 2**20,
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
        self._monitor_stop.set()
        with self._lock:
            slots, self._slots = self._slots, []
            self.plan = None
        for slot in slots:
            slot.shutdown()


class RemoteShard:
    """The parent's proxy of a ClientShard living in one worker (a ShardTarget)."""

    def __init__(self, pool: WorkerPool, slot: WorkerSlotProcess, shard_id: int, start: int, stop: int):
        self.pool, self.slot, self.shard_id = pool, slot, shard_id
        self.start, self.stop = start, stop
        self._prepared: dict[int, transport.Segments] = {}  # put handle -> leased segments

    def prepare(self, method: str, args: tuple) -> tuple[str, tuple]:
        """Stacks a `put`'s client values into columns (shared memory when large).

        Runs for every shard before any request is sent, so a value that cannot
        travel (e.g. a dataset built from Python code) is refused up front.
        """
        if method != "put" or _is_client_data(args[2]):
            return method, args
        handle, member_type, reps = args
        slot = self.slot
        # Without shared memory (workers on other hosts), columns travel inline.
        segments = slot.segments.lease() if slot.segments is not None else transport.Segments(inline=True)
        try:
            columns = transport.encode_columns(member_type, reps, segments, first_client=self.start)
        except BaseException:
            segments.release()
            raise
        self._prepared[handle] = segments
        return "put_columns", (handle, member_type, columns)

    def discard_prepared(self) -> None:
        for segments in self._prepared.values():
            segments.release()
        self._prepared.clear()

    async def call(self, releases: list[int], method: str, *args: Any) -> Any:
        slot = self.slot
        segments = self._prepared.pop(args[0], None) if method == "put_columns" else None
        try:
            if slot.broken:
                raise self.pool.crashed(slot, method, (self.start, self.stop))
            args, new_functions = transport.strip_known_functions(args, slot.known_functions)
            self.pool.requests += 1
            slot.last_used = time.monotonic()
            future = slot.submit(worker.handle, self.shard_id, releases, method, args, new_functions)
            return await asyncio.wrap_future(future)
        except slot.crash_errors as e:
            phase = "put" if method == "put_columns" else method
            raise self.pool.crashed(slot, phase, (self.start, self.stop)) from e
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
