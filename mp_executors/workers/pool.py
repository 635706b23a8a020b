"""The worker pool: long-lived, pinned worker processes that hold client shards.

Data flow (one intrinsic, e.g. `federated_map` over 1000 clients, 2 workers):

    parent process                                            worker processes
    --------------                                            ----------------
    FederatingExecutor                                        slot 0: CPUs {0}
      |  one request per shard (shard_requests.Map, ...)      +--------------------------+
      v  prepare all, then send all                           | worker.handle_batch      |
    RemoteShard(slot 0) -> Outbox 0 --submit--> loky 0 -pipe->|  -> Worker, in order:    |
    RemoteShard(slot 1) -> Outbox 1 --submit--> loky 1 -pipe->|   ClientShard [0,504)    |
      ^          (at the event loop's next turn:              |   values by handle,      |
      |           every request queued, one message)          |   functions by digest    |
      |  partials / acks (small), one outcome per request     +--------------------------+
      +---- reply futures <---- done callback <---- result pipe <-- slot 1: CPUs {1} ...

    A round (put, broadcast, zip, map, and the mean that awaits them) is sent
    without waiting in between, so it reaches each worker as ONE message
    (`Outbox`), not five round trips.

    big CLIENTS arguments: `prepare` stacks each leaf into a /dev/shm segment
    leased from the slot's SegmentPool (transport); the request carries only
    the segment's name. The lease is given back when the worker has answered
    (or died), or at once if the request is never sent; segments are reused
    by later calls and unlinked when the slot shuts down.

The moving parts:

- `WorkerPool` owns the slots. Each slot is its own single-process loky
  executor, so a request reaches exactly the worker that holds its values,
  each worker gets its own environment before TensorFlow initialises (CPU
  set, thread counts, CUDA_VISIBLE_DEVICES; `planning.WorkerSlot.env`), and a
  crash kills only that slot. With the default start method ('forkserver')
  the worker processes are forked from `workers.fork_server`, which has
  imported TensorFlow once and never initialised it, so a worker starts in a
  fraction of a second; with 'loky'/'spawn' each is a fresh interpreter that
  imports TensorFlow itself (`worker.initialize`, seconds). Workers stay warm
  across calls; the pool grows with `fit` and shrinks with `detach_idle`.
- `RemoteShard` is the parent's proxy for one `ClientShard` in one worker
  (whose process state, shards included, a `workers.service.Worker` owns):
  it implements the `ShardTarget` protocol of the FederatingExecutor, so the
  federating layer is the same code for the in-process and the pooled stack.
  It counts its requests (`WorkerPool.requests`; each slot's `Outbox` counts
  the messages that carried them), which is how the tests check that
  requests are per worker per intrinsic, not per client.
- Ownership under concurrent calls. The factory owns the pool, and the pool
  uses the factory's one lock for its slot table and each slot's `holds`.
  A call that leases an executor holds the slots its shards live in until it
  returns (`hold`/`unhold`); a slot is also busy while any request is in
  flight in it (`SlotUse`: counted from submit to the future's done-callback,
  which also starts the slot's idle clock, so idleness counts from the END
  of the last request). Nothing stops a held or busy slot: idle shrink
  (`detach_idle`) skips it, and a re-plan (`fit`) that would replace it
  (other CPUs or threads) reuses it as it is and replaces it at a later fit,
  once free; growing never touches running slots. Only a dead slot is
  replaced under a call (that call fails with WorkerCrashedError and is
  retried), and `interrupt` stops only the slots the factory names (the
  interrupted call's). `fit` and `resize` are called by one thread at a time
  (the factory's builder) and start or stop workers outside the lock.
- Shutdown: `WorkerPool.close()` (the factory's `close()`, atexit, Ctrl-C)
  kills and joins every worker. A worker whose parent dies (even by SIGKILL)
  exits by itself within about a second: loky workers would block on their
  pipe forever, so `worker.initialize` starts a thread that watches the
  pool owner's pid (the worker's parent, or its grandparent through the fork
  server; the fork server exits once the owner and its workers are gone).
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

from mp_executors.core.client_data import ClientData
from mp_executors.errors import WorkerCrashedError
from mp_executors.executors import shard_requests as rq
from mp_executors.planning import PoolPlan, WorkerSlot
from mp_executors.workers import fork_server, transport, worker

logger = logging.getLogger("mp_executors")

# A worker holding client data legitimately grows by more than loky's 300 MB
# "leak" threshold; without this loky would silently replace it (and its data).
_NO_LEAK_RESTART = str(1 << 50)


#: How worker processes start (`mp_executor_factory(start_method=...)`):
#: 'forkserver' forks them from a process that has imported TensorFlow once
#: (`workers.fork_server`; sub-second); 'loky' / 'spawn' start a fresh
#: interpreter per worker, which imports TensorFlow itself (seconds).
START_METHODS = ("forkserver", "loky", "spawn", "loky_init_main")
DEFAULT_START_METHOD = "forkserver"


def check_start_method(start_method: str | None) -> str:
    """The start method to use; a ValueError naming the choices for anything else."""
    method = DEFAULT_START_METHOD if start_method is None else start_method
    if method not in START_METHODS:
        raise ValueError(
            f"start_method must be one of {', '.join(map(repr, START_METHODS))} (default "
            f"{DEFAULT_START_METHOD!r}), got {start_method!r}; plain 'fork' is unsafe once TensorFlow has run."
        )
    return method


def _context(start_method: str) -> Any:
    if start_method == "forkserver":
        return fork_server.get_context()
    return loky.backend.get_context(start_method)


class SlotUse:
    """What the pool tracks of one slot's use, whatever runs the slot (loky process, Ray actor).

    - `inflight`: requests submitted and not finished. Counted by `_track`,
      under the slot's own small lock (`_use_lock`), because a request ends
      on the executor's result thread; that lock is never held while
      anything else is done, so it cannot deadlock with the factory lock.
    - `last_used`: when the last request FINISHED (its future's
      done-callback), the idle-shrink clock. A request sent long ago and
      still running keeps the slot busy, never idle.
    - `holds`: how many running calls (leases) use this slot; guarded by the
      factory's lock (the pool's `_lock`).
    - `retired`: taken out of the pool's table (stopped or being stopped):
      no executor whose shards live in it may be handed out again.
    - `outbox`: the shard requests on their way to this slot (`Outbox`).
      A request waiting there counts as in flight.
    """

    def _init_use(self) -> None:
        self._use_lock = threading.Lock()
        self.inflight = 0
        self.last_used = time.monotonic()
        self.holds = 0
        self.retired = False
        self.broken = False
        self.outbox = Outbox(self)

    def _track(self, future: Any) -> None:
        """Counts `future` as in flight until it is done (call `_begin` before submitting)."""
        future.add_done_callback(self._end)

    def _begin(self) -> None:
        with self._use_lock:
            self.inflight += 1

    def _end(self, _future: Any = None) -> None:
        with self._use_lock:
            self.inflight -= 1
            self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        """A request is in flight in this slot's worker."""
        return self.inflight > 0

    @property
    def in_use(self) -> bool:
        """Held by a running call or busy: the pool must not stop or replace it."""
        return bool(self.holds) or self.busy


class WorkerSlotProcess(SlotUse):
    """One slot: a single-process loky executor, pinned as its `WorkerSlot` says.

    The pool needs of a slot only what this class offers: `submit(fn, *args)`
    returning a concurrent future, `pids()`, `exitcode()`, `kill()`,
    `shutdown()`, the attributes below, `crash_errors` (the exceptions by
    which a future reports that the worker died) and `SlotUse`'s bookkeeping.
    Another engine's workers (e.g. Ray actors) plug in by providing the same.
    """

    crash_errors: tuple[type[BaseException], ...] = (BrokenProcessPool, ShutdownExecutorError)

    def __init__(self, slot: WorkerSlot, start_method: str):
        self.slot = slot
        env = dict(slot.env())
        env["LOKY_MAX_MEMORY_LEAK_SIZE"] = _NO_LEAK_RESTART
        self.executor = loky.ProcessPoolExecutor(
            max_workers=1,
            context=_context(start_method),
            initializer=worker.initialize,
            initargs=(slot.index, tuple(slot.cpus), env, os.getpid()),
            env=env,
        )
        self.started = time.perf_counter()
        self.segments = transport.SegmentPool()
        # Digests of the compiled computations this worker process has received.
        self.known_functions: set[str] = set()
        self.process = None  # the loky process, known once the worker has started
        self.last_rss: int | None = None
        self._init_use()

    def submit(self, fn, *args) -> Any:
        self._begin()  # busy from before the request leaves, until its reply is in
        try:
            future = self.executor.submit(fn, *args)
        except BaseException:
            self._end()
            raise
        self._track(future)
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
    """Owns the worker processes; see the module docstring.

    `lock` is the owning factory's lock (one lock per factory): it guards the
    slot table (`_slots`), `plan`, and each slot's `holds` and `retired`.
    Methods that change the table's shape (`fit`, `resize`) are called by
    one thread at a time (the factory's builder); they take the lock only to
    read and change the table, and start or stop workers without it.
    """

    def __init__(self, start_method: str | None = None, lock: threading.RLock | None = None):
        self.start_method = check_start_method(start_method)
        # Slot i at index i; None while its worker is being started by `fit`.
        self._slots: list[WorkerSlotProcess | None] = []
        self._lock = lock if lock is not None else threading.RLock()
        self._shard_ids = itertools.count(1)
        self.requests = 0
        self.plan: PoolPlan | None = None
        self.memory_share = 0
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def slots(self) -> list[WorkerSlotProcess]:
        """The running slots, in index order (a snapshot)."""
        with self._lock:
            return [s for s in self._slots if s is not None]

    #: How many times a slot whose worker dies while starting is started again.
    START_ATTEMPTS = 3

    def fit(self, plan: PoolPlan) -> list[WorkerSlotProcess]:
        """Makes the pool serve `plan`, keeping warm workers where it can.

        Grows by starting the missing slots (extra running workers are kept:
        see `detach_idle`). A running slot that differs from the plan (other
        CPUs, threads or GPU) is replaced, unless a call holds it or a
        request runs in it: then it is reused as it is (any healthy worker
        computes the same bits; only its placement differs) and replaced by
        a later `fit` once it is free. A dead slot is always replaced.
        Returns the slots that were stopped: executors whose shards lived in
        them are stale (none of them is leased: their slots were not held).
        """
        wanted = list(plan.slots)
        with self._lock:
            table = self._slots
            start: list[int] = []
            stopped: list[WorkerSlotProcess] = []
            reused: list[int] = []
            for i, slot in enumerate(wanted):
                current = table[i] if i < len(table) else None
                if current is not None and not current.broken and (current.slot == slot or current.in_use):
                    if current.slot != slot:
                        reused.append(i)
                    continue
                if i < len(table):
                    if current is not None:
                        current.retired = True
                        stopped.append(current)
                    table[i] = None
                else:
                    table.append(None)
                start.append(i)
            running = sum(1 for s in table if s is not None)
            self.plan = plan
            self.memory_share = plan.machine.available_memory // max(1, plan.num_workers)
        if reused:
            logger.info("mp_executors: worker slot(s) %s differ from the new plan but a running call uses "
                        "them: kept as they are until they are free", reused)
        if stopped:
            logger.info("mp_executors: re-planning the pool: stopping worker slot(s) %s",
                        [s.slot.index for s in stopped])
        elif start:
            logger.info("mp_executors: growing the pool from %d to %d workers", running, running + len(start))
        for slot in stopped:
            slot.shutdown()  # before its successor starts on the same CPUs
        if start:
            self._install(start, wanted)
        return stopped

    def resize(self, plan: PoolPlan) -> list[WorkerSlotProcess]:
        """`fit`, then also stops the workers beyond the plan that nothing uses (or that are dead)."""
        stopped = self.fit(plan)
        extra = self._detach_tail(len(plan.slots), lambda s: s.broken or not s.in_use)
        for slot in extra:
            slot.shutdown()
        return stopped + extra

    def _install(self, indices: list[int], wanted: list[WorkerSlot]) -> None:
        """Starts the workers of `indices` (their table entries are None) and puts them in place."""
        started = time.perf_counter()
        try:
            new = self._start_slots([wanted[i] for i in indices])
        except BaseException:
            with self._lock:
                # A hole left inside the table shifts the slots after it off their index:
                # the next fit sees that they differ from the plan and replaces them.
                self._slots = [s for s in self._slots if s is not None]
            raise
        with self._lock:
            for i, slot in zip(indices, new):
                self._slots[i] = slot
            described = "; ".join(f"slot {s.slot.index} cpus={list(s.slot.cpus)} gpu={s.slot.gpu}"
                                  for s in self._slots if s is not None)
            size = len(self._slots)
        self._ensure_monitor()
        logger.info("mp_executors: started %d worker(s) in %.1f s; pool now has %d: %s",
                    len(new), time.perf_counter() - started, size, described)

    #: A worker beyond what the current call needs is kept warm this long after
    #: its last request finished: alternating between many and few clients
    #: (training on a sample, evaluating on all) must not restart workers every call.
    idle_shrink_seconds = 60.0

    def detach_idle(self, needed: int) -> list[WorkerSlotProcess]:
        """Takes out of the pool the workers beyond the first `needed` that have been idle long enough.

        Idle means: no call holds the slot, no request runs in it, and its
        last request FINISHED `idle_shrink_seconds` ago or more (a dead
        worker always goes). Only a contiguous tail goes (slots keep their
        indices). The caller stops the returned slots (`shutdown`) once it
        has released the lock; executors whose shards lived in them are stale.
        """
        now = time.monotonic()
        gone = self._detach_tail(
            needed, lambda s: s.broken or (not s.in_use and now - s.last_used >= self.idle_shrink_seconds))
        if gone:
            logger.info("mp_executors: shrinking the pool to %d workers: slot(s) %s idle for %.0f s or more",
                        self.size, [s.slot.index for s in gone], self.idle_shrink_seconds)
        return gone

    def _detach_tail(self, needed: int, can_go: Any) -> list[WorkerSlotProcess]:
        """Takes out the longest tail of slots beyond the first `needed` for which `can_go(slot)`."""
        with self._lock:
            keep = len(self._slots)
            while keep > max(needed, 0) and self._slots[keep - 1] is not None and can_go(self._slots[keep - 1]):
                keep -= 1
            gone, self._slots = self._slots[keep:], self._slots[:keep]
            for slot in gone:
                slot.retired = True
            if gone and self.plan is not None and keep < self.plan.num_workers:
                self.plan = dataclasses.replace(self.plan, num_workers=keep, slots=self.plan.slots[:keep])
            return gone  # type: ignore[return-value]

    def shrink_idle(self, needed: int) -> bool:
        """`detach_idle` and stop what it took out; True when a worker was stopped."""
        gone = self.detach_idle(needed)
        for slot in gone:
            slot.shutdown()
        return bool(gone)

    def hold(self, slots: tuple[WorkerSlotProcess, ...]) -> None:
        """A call starts using `slots` (until `unhold`): they are not stopped meanwhile."""
        with self._lock:
            for slot in slots:
                slot.holds += 1

    def unhold(self, slots: tuple[WorkerSlotProcess, ...]) -> None:
        with self._lock:
            for slot in slots:
                slot.holds -= 1

    def _start_slots(self, wanted: list[WorkerSlot]) -> list[WorkerSlotProcess]:
        """Starts workers in parallel and waits until each has imported TensorFlow.

        Does not touch the slot table (the caller installs what it returns).
        """
        slots: list[WorkerSlotProcess | None] = [None] * len(wanted)
        indices = list(range(len(wanted)))
        for attempt in range(1, self.START_ATTEMPTS + 1):
            for i in indices:
                slots[i] = self._new_slot(wanted[i])
            futures = {i: slots[i].submit(worker.report) for i in indices}
            failed = []
            for i, future in futures.items():
                try:
                    slots[i].last_rss = future.result()["rss"]
                except slots[i].crash_errors:
                    failed.append(i)
            if not failed:
                return slots  # type: ignore[return-value]
            for i in failed:
                slot = slots[i]
                error = WorkerCrashedError(slot.slot.index, None, slot.exitcode(), slot.last_rss, "start", attempt)
                slot.shutdown()
                if attempt == self.START_ATTEMPTS:
                    for s in slots:
                        if s is not None and s is not slot:
                            s.shutdown()
                    raise error
                logger.warning("mp_executors: %s; starting it again", error.describe())
            indices = failed
        raise AssertionError("unreachable")

    def _new_slot(self, slot: WorkerSlot) -> WorkerSlotProcess:
        """Starts the worker of one slot (override to run workers elsewhere)."""
        return WorkerSlotProcess(slot, self.start_method)

    def has_broken(self) -> bool:
        return any(s is not None and s.broken for s in self._slots)

    def crashed(self, slot: WorkerSlotProcess, phase: str, clients: tuple[int, int] | None) -> WorkerCrashedError:
        """Marks a slot dead and describes how it died."""
        slot.broken = True
        error = WorkerCrashedError(slot.slot.index, clients, slot.exitcode(), slot.last_rss, phase)
        logger.warning("mp_executors: %s", error.describe())
        return error

    def interrupt(self, slots: list[WorkerSlotProcess] | None = None) -> list[WorkerSlotProcess]:
        """After Ctrl-C: ends the workers of `slots` (default: all) still busy with an abandoned call.

        They are replaced (warm-started again) by the next call that needs
        them; idle workers, and the values they hold, are kept. Returns the
        slots stopped. Which slots may be stopped (only the interrupted
        call's, not another call's) is the factory's decision.
        """
        stopped = []
        for slot in self.slots if slots is None else slots:
            if slot.busy and not slot.broken:
                logger.warning("mp_executors: interrupted; stopping busy worker slot %d", slot.slot.index)
                slot.kill()
                stopped.append(slot)
        return stopped

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

    def open_shards(self, ranges: list[tuple[int, int]],
                    slots: tuple[WorkerSlotProcess, ...] | None = None) -> list[RemoteShard]:
        """One ClientShard per range, range i in worker i (one round trip each, in parallel).

        `slots`: the workers to use (default: the pool's first ones); the
        caller holds them, so that nothing stops them meanwhile.
        """
        slots = self.slots if slots is None else list(slots)
        if len(ranges) > len(slots):
            raise ValueError(f"{len(ranges)} shards but only {len(slots)} workers.")
        shards = []
        futures = []
        for slot, (start, stop) in zip(slots, ranges):
            shard_id = next(self._shard_ids)
            device = "/GPU:0" if slot.slot.gpu is not None else None
            futures.append(slot.submit(worker.open_shard, shard_id, start, stop, device))
            shards.append(RemoteShard(self, slot, shard_id, start, stop))
        for shard, f in zip(shards, futures):
            try:
                f.result()
            except shard.slot.crash_errors as e:
                # A WorkerCrashedError: the call is retried on a fresh worker.
                raise self.crashed(shard.slot, "open", (shard.start, shard.stop)) from e
        return shards

    def reports(self) -> list[dict[str, Any]]:
        """Each worker's pid, CPU affinity, threads, GPU and memory."""
        return [f.result() for f in [s.submit(worker.report) for s in self.slots]]

    def pids(self) -> list[int]:
        return [pid for s in self.slots for pid in s.pids()]

    def close(self) -> None:
        self._monitor_stop.set()
        with self._lock:
            slots = [s for s in self._slots if s is not None]
            self._slots = []
            self.plan = None
            for slot in slots:
                slot.retired = True
        for slot in slots:
            slot.shutdown()


@dataclasses.dataclass
class _Outgoing:
    """A request in an `Outbox`, and what settling its reply needs."""

    item: tuple  # `service.Worker.handle`'s arguments: (shard id, releases, request, new functions)
    verb: str
    shard: RemoteShard
    reply: asyncio.Future
    segments: transport.Segments | None  # leased by `prepare`, given back when the message is answered
    new_digests: list[str]


class Outbox:
    """The shard requests sent to one slot in one turn of an event loop: they travel as ONE message.

    `RemoteShard.send` puts a request here and returns; the first request a loop
    puts schedules `flush` for that loop's next turn. So every request the
    federating layer sends before it next waits (a round's put, broadcasts, zip
    and map, and the reduce whose reply it then awaits) leaves as one
    `worker.handle_batch` submission: one pickling, one pipe write, one reply.
    As separate submissions, each cost a loky round trip (loky hands a worker its
    next task only once the previous one is answered): ~0.5-1 ms per request on a
    loaded 2-core machine, before the map could even start.

    What stays per request: the worker runs them in order, each whatever became of
    the ones before (as separate messages); each has its own reply, error and
    leased segments; `WorkerPool.requests` counts requests (one per worker per
    intrinsic), `messages` counts submissions. If the worker dies, every request of
    the message fails with one WorkerCrashedError naming the request it was
    running (read from the slot's `transport.ProgressCell`).

    One list per event loop, so calls driven by different loops never wait for
    each other's turn; `flush()` with no loop sends everything now (before a shard
    closes). Messages are submitted under the outbox's lock, in the order their
    requests were put.
    """

    def __init__(self, slot: SlotUse):
        self._slot = slot
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[_Outgoing]] = {}
        self._numbers = itertools.count(1)
        self.messages = 0

    def put(self, loop: asyncio.AbstractEventLoop, outgoing: _Outgoing) -> None:
        """Queues a request (on `loop`'s thread); it leaves at the loop's next turn."""
        self._slot._begin()  # busy from now: the slot must not look idle while a request waits here
        with self._lock:
            pending = self._pending.setdefault(loop, [])
            pending.append(outgoing)
            first = len(pending) == 1
        if first:
            loop.call_soon(self.flush, loop)

    def flush(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Submits what `loop` (default: every loop) has queued, as one message per loop."""
        with self._lock:
            if loop is None:
                batches = list(self._pending.values())
                self._pending.clear()
            else:
                batches = [self._pending.pop(loop, [])]
            for batch in batches:
                if batch:
                    self._submit(batch)

    def _submit(self, batch: list[_Outgoing]) -> None:
        slot = self._slot
        number = next(self._numbers)
        progress = None
        if slot.segments is not None:
            progress = (slot.segments.progress()[0], number)
        try:
            future = slot.submit(worker.handle_batch, [o.item for o in batch], progress)
        except Exception as e:  # noqa: BLE001 - every request of the message gets the error
            self._fail_unsent(batch, e)
            return
        finally:
            for _ in batch:
                slot._end()  # the message is counted in flight by `submit` from here on
        self.messages += 1
        future.add_done_callback(lambda f: self._answered(f, batch, number))

    def _fail_unsent(self, batch: list[_Outgoing], error: BaseException) -> None:
        slot = self._slot
        if isinstance(error, slot.crash_errors):
            error = self._crash(batch, None)
        for o in batch:
            if o.segments is not None:
                o.segments.release()
            slot.known_functions.difference_update(o.new_digests)
            if not o.reply.done():
                o.reply.get_loop().call_soon_threadsafe(_set_exception, o.reply, error)

    def _answered(self, future: Any, batch: list[_Outgoing], number: int) -> None:
        """On the executor's result thread: segments go back now, replies are settled on their loop."""
        for o in batch:
            if o.segments is not None:
                o.segments.release()  # the worker has copied the columns out (or is gone)
        try:
            batch[0].reply.get_loop().call_soon_threadsafe(self._settle, future, batch, number)
        except RuntimeError:  # the event loop is closed: no one waits for the replies
            pass

    def _settle(self, future: Any, batch: list[_Outgoing], number: int) -> None:
        slot = self._slot
        error = None if future.cancelled() else future.exception()
        outcomes = future.result() if not future.cancelled() and error is None else None
        if error is not None and isinstance(error, slot.crash_errors):
            crash = self._crash(batch, number)
            crash.__cause__ = error
            error = crash
        for k, o in enumerate(batch):
            if o.new_digests and (outcomes is None or not outcomes[k][0]):
                # The request may never have reached the worker (cancelled in the
                # queue, not picklable): send its functions again next time; a
                # second copy is harmless, a missing one fails every later call.
                slot.known_functions.difference_update(o.new_digests)
            if o.reply.cancelled():
                continue  # abandoned (cancelled call, Ctrl-C): nobody reads it
            if future.cancelled():
                o.reply.cancel()
            elif error is not None:
                o.reply.set_exception(error)
            elif outcomes[k][0]:
                o.reply.set_result(outcomes[k][1])
            else:
                o.reply.set_exception(outcomes[k][1])

    def _crash(self, batch: list[_Outgoing], number: int | None) -> WorkerCrashedError:
        """The error for a message whose worker died: during which of its requests, if known.

        Known from the slot's progress cell; a message the worker never reached is
        named by its first request. Without a cell (a Ray actor: no shared memory
        with its node), the phase names every kind of request the message held.
        """
        running, phase = batch[0], batch[0].verb
        if self._slot.segments is None:
            phase = "/".join(dict.fromkeys(o.verb for o in batch))
        elif number is not None:
            seen, index = self._slot.segments.progress()[1].read()
            if seen == number and 0 <= index < len(batch):
                running = batch[index]
                phase = running.verb
        shard = running.shard
        return shard.pool.crashed(self._slot, phase, (shard.start, shard.stop))


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class RemoteShard:
    """The parent's proxy of a ClientShard living in one worker (a ShardTarget).

    What it gives back, and when: the shared-memory segments a `Put` leased
    in `prepare` return to the slot's `SegmentPool` when the worker has
    answered (or died), or at once when the request is never sent
    (`discard`); a compiled computation counts as known to the worker only
    once a request carrying it was submitted. A sent request is never
    cancelled in the worker (cancelling the reply abandons only the reply):
    later requests may refer to the functions it carries.
    """

    def __init__(self, pool: WorkerPool, slot: WorkerSlotProcess, shard_id: int, start: int, stop: int):
        self.pool, self.slot, self.shard_id = pool, slot, shard_id
        self.start, self.stop = start, stop
        self._prepared: dict[int, transport.Segments] = {}  # PutColumns handle -> leased segments

    def prepare(self, request: rq.ShardRequest) -> rq.ShardRequest:
        """Stacks a `Put`'s client values into columns (shared memory when large).

        Runs for every shard before any request is sent, so a value that cannot
        travel (e.g. a dataset built from Python code) is refused up front.
        """
        if not isinstance(request, rq.Put) or isinstance(request.clients, ClientData):
            return request
        slot = self.slot
        # Without shared memory (workers on other hosts), columns travel inline.
        segments = slot.segments.lease() if slot.segments is not None else transport.Segments(inline=True)
        try:
            columns = transport.encode_columns(request.member_type, request.clients, segments, first_client=self.start)
        except BaseException:
            segments.release()
            raise
        self._prepared[request.handle] = segments
        return rq.PutColumns(request.handle, request.member_type, columns)

    def discard(self, request: rq.ShardRequest) -> None:
        if isinstance(request, rq.PutColumns):
            segments = self._prepared.pop(request.handle, None)
            if segments is not None:
                segments.release()

    def send(self, releases: tuple[int, ...], request: rq.ShardRequest) -> asyncio.Future:
        """Sends `request` to the worker (in this loop turn's message: `Outbox`); returns a future of its reply."""
        slot = self.slot
        segments = self._prepared.pop(request.handle, None) if isinstance(request, rq.PutColumns) else None
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        try:
            if slot.broken:
                raise self.pool.crashed(slot, request.verb, (self.start, self.stop))
            stripped, new_functions = transport.strip_known_functions(request, slot.known_functions)
        except BaseException as e:
            if segments is not None:
                segments.release()
            if isinstance(e, WorkerCrashedError):
                reply.set_exception(e)
                return reply
            raise
        # Known from now on: the outbox keeps the order, so the worker receives these functions
        # before any later request; if their message fails, `Outbox` forgets them again.
        digests = [f.digest for f in new_functions]
        slot.known_functions.update(digests)
        slot.outbox.put(loop, _Outgoing((self.shard_id, releases, stripped, new_functions), request.verb,
                                        self, reply, segments, digests))
        self.pool.requests += 1  # (the slot's idle clock starts when the reply is in: SlotUse)
        return reply

    def close(self) -> None:
        for segments in self._prepared.values():
            segments.release()
        self._prepared.clear()
        try:
            self.slot.outbox.flush()  # this shard's last requests leave before it closes
            self.slot.submit(worker.close_shard, self.shard_id)
        except Exception:  # the pool may already be shut down  # noqa: BLE001
            pass


__all__ = ["RemoteShard", "SlotUse", "WorkerPool", "WorkerSlotProcess"]
