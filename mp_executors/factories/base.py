"""`ExecutorFactory`: builds executors lazily, once the number of clients is known.

A factory is handed the cardinalities ({CLIENTS: n}) inferred from the
argument of each call; it builds (or reuses) an executor for them. Executors
are cached per cardinalities in a small LRU, so that alternating between a
few client counts does not rebuild stacks.

Ownership and leases (`CachingExecutorFactory`):

- The factory owns its executor cache and (pooled factories) its worker pool.
  ONE lock, `_lock` (an RLock, with the condition `_changed` on it), guards
  all of that bookkeeping: the LRU, every executor's lease count, which
  thread holds leases, whether a build is running, whether the factory is
  closed, and the pool's slot table and slot holds (the pool is given the
  same lock). The lock is held only for bookkeeping: never while a worker
  starts, a request travels, or an executor is closed.
- A call leases its executor: `with factory.lease(cardinalities) as ex:`.
  A lease is exclusive (a second call at the same cardinalities, e.g. from
  another thread, gets an executor of its own, which is not cached and is
  closed when that call ends), and while it is held nothing closes the
  executor: LRU eviction skips it (the cache may exceed `cache_size` for a
  while), `clean_up_executor` and `interrupt` retire it (out of the cache,
  closed when the lease ends), and `close()` waits for it.
- Builds run outside the lock. The part of a build that may change the
  pool's shape (planning, growing or re-planning the pool) runs one at a
  time: the builder is `_builder`, and a thread that needs a new executor
  meanwhile waits on `_changed`; threads whose executor is cached do not
  wait. A pooled factory then holds the new executor's slots and ends that
  part (`_end_building`) before opening its shards, which may wait behind
  other calls' requests in the workers.
- `create_executor`, `clean_up_executor` and `close` keep TFF's meaning:
  `create_executor` returns the cached executor and does NOT lease it (it may
  be evicted by later calls, as in TFF).
- `close()` refuses new leases at once, waits (bounded, logged) for the
  calls running in other threads, then closes the executors and the pool;
  at interpreter exit it does not wait.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from mp_executors.checks import check_int
from mp_executors.core import types as t
from mp_executors.executors.executor_base import Executor

logger = logging.getLogger("mp_executors")

Cardinalities = dict  # {Placement: int}


def _key(cardinalities: Cardinalities) -> tuple:
    return tuple(sorted((str(p), int(n)) for p, n in (cardinalities or {}).items()))


class ExecutorFactory(abc.ABC):
    """Creates executors for given cardinalities; see the module docstring."""

    @abc.abstractmethod
    def create_executor(self, cardinalities: Cardinalities) -> Executor: ...

    @abc.abstractmethod
    def clean_up_executor(self, cardinalities: Cardinalities) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @contextlib.contextmanager
    def lease(self, cardinalities: Cardinalities) -> Iterator[Executor]:
        """The executor for `cardinalities`, held until the `with` block ends.

        Factories that cache executors keep a leased one alive (not evicted,
        not closed) until then; this default, for factories that do not cache,
        just creates one.
        """
        yield self.create_executor(cardinalities)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CachingExecutorFactory(ExecutorFactory):
    """Shared machinery: defaults the client count, keeps an LRU of stacks, leases them.

    Every field below is guarded by `_lock` (see the module docstring):
    `_cache`, `_live`, each entry's `leases`/`cached`/`closed`, `_building`,
    `_closed` and `_lease_threads`. Executors are closed, and worker slots
    stopped, only after the lock is released.
    """

    cache_size = 3

    #: How long `close()` waits for calls still running on this factory in
    #: other threads before it closes their executors anyway.
    CLOSE_WAIT_SECONDS = 60.0

    def __init__(self, default_num_clients: int = 0):
        self.default_num_clients = check_int("default_num_clients", default_num_clients, minimum=0,
                                             fix="the number of clients when no argument says it, e.g. 0")
        # The one lock of this factory (and of its worker pool, which shares it).
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # leases released, a build finished
        self._cache: collections.OrderedDict[tuple, CacheEntry] = collections.OrderedDict()
        self._live: dict[int, CacheEntry] = {}  # id(executor) -> entry: cached or leased, not closed
        self._lease_threads: collections.Counter[int] = collections.Counter()
        self._builder: int | None = None  # the thread whose build may change the pool's shape
        self._builds = 0  # builds in progress (a build goes on after its shape-changing part)
        self._closed = False

    # ------------------------------------------------------------------ TFF's interface

    def resolve_cardinalities(self, cardinalities: Cardinalities) -> Cardinalities:
        n = (cardinalities or {}).get(t.CLIENTS)
        if n is None:
            n = self.default_num_clients
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of clients must be an int >= 0, got {n!r}.")
        return {t.CLIENTS: n}

    def create_executor(self, cardinalities: Cardinalities) -> Executor:
        """The cached executor for `cardinalities` (built if needed), NOT leased.

        TFF's semantics: the caller may use it until it calls
        `clean_up_executor` or `close`; an unleased executor may be evicted
        (and closed) by later calls. Use `lease` to hold one for a call.
        """
        return self._get(self.resolve_cardinalities(cardinalities), lease=False).executor

    @contextlib.contextmanager
    def lease(self, cardinalities: Cardinalities) -> Iterator[Executor]:
        """An executor for `cardinalities` that only this `with` block uses, held until it ends.

        While held it is neither evicted nor closed (nor are the workers its
        shards live in stopped by idle shrink or a re-plan). A lease is
        exclusive: another thread's call at the same cardinalities gets an
        executor of its own, so two calls never share one executor's state.
        """
        entry = self._get(self.resolve_cardinalities(cardinalities), lease=True)
        holder = threading.get_ident()  # released for this thread, even if the block ends in another
        try:
            yield entry.executor
        finally:
            self._release(entry, holder)

    def clean_up_executor(self, cardinalities: Cardinalities) -> None:
        """Drops the cached executor for `cardinalities`: closed now, or when its last lease ends."""
        key = _key(self.resolve_cardinalities(cardinalities))
        to_close: list[CacheEntry] = []
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._retire(entry, to_close)
            self._after_clean_up(to_close)
        self._close_entries(to_close)

    def interrupt(self, executor: Executor | None = None) -> None:
        """After Ctrl-C in the call using `executor` (None: every running call).

        That executor's state is mid-call: it is retired (closed when its
        lease ends, never handed out again). Pooled factories also stop the
        workers still busy with that call, and only those.
        """
        to_close: list[CacheEntry] = []
        with self._lock:
            for entry in self._entries_of(executor):
                self._retire(entry, to_close)
        self._close_entries(to_close)

    def close(self, timeout: float | None = None) -> None:
        """Refuses new leases, waits for running ones, then closes every executor.

        Calls running in other threads are waited for, up to `timeout`
        seconds (default CLOSE_WAIT_SECONDS; a log line says so); past it they
        are closed under the call, which then fails. At interpreter exit
        (atexit handlers: only daemon threads can still be running a call)
        it does not wait. A lease held by the calling thread itself is not
        waited for.
        """
        wait = self.CLOSE_WAIT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + wait
        exiting = not threading.main_thread().is_alive()  # atexit runs after the main thread stopped
        with self._lock:
            self._closed = True
            announced = False
            while True:
                running = self._leases_elsewhere()
                if not running and not self._builds:
                    break
                remaining = deadline - time.monotonic()
                if exiting or remaining <= 0:
                    logger.warning(
                        "mp_executors: closing %s with %d call(s) still running in other threads%s; "
                        "they will fail", type(self).__name__, running,
                        " (interpreter exit)" if exiting else f" after waiting {wait:.0f} s",
                    )
                    break
                if not announced:
                    logger.info("mp_executors: close() waits (up to %.0f s) for %d call(s) still running on %s",
                                wait, running, type(self).__name__)
                    announced = True
                self._changed.wait(remaining)
            entries = [e for e in self._live.values() if not e.closed]
            for entry in entries:
                entry.closed, entry.cached = True, False
            self._cache.clear()
            self._live.clear()
        self._close_entries(entries)
        self._close_resources()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ leases and the cache

    def _get(self, cardinalities: Cardinalities, lease: bool) -> CacheEntry:
        key = _key(cardinalities)
        to_close: list[CacheEntry] = []
        to_stop: list[Any] = []
        try:
            with self._lock:
                while True:
                    self._check_open()
                    entry = self._cache.get(key)
                    if entry is not None and not self._usable(entry):
                        self._retire(entry, to_close)  # its shards lived in workers that are gone
                        entry = None
                    if entry is not None and not (lease and entry.leases):
                        self._cache.move_to_end(key)
                        if lease:
                            self._take(entry)
                        to_stop = self._maintain(entry, to_close)
                        return entry
                    if self._builder is None:
                        self._builder = threading.get_ident()  # this thread builds; others wait for it
                        break
                    self._changed.wait()
        finally:
            self._close_entries(to_close)
            self._stop(to_stop)
        return self._build_entry(key, cardinalities, lease)

    def _build_entry(self, key: tuple, cardinalities: Cardinalities, lease: bool) -> CacheEntry:
        """Builds (outside the lock) and registers a new executor.

        This thread is the builder (`_builder`) until `_make_entry` calls
        `_end_building` (pooled factories do, once the pool has its shape and
        the new executor's slots are held) or returns.
        """
        to_close: list[CacheEntry] = []
        to_stop: list[Any] = []
        with self._lock:
            self._builds += 1
        try:
            try:
                entry = self._make_entry(key, cardinalities[t.CLIENTS])
            finally:
                self._end_building()
            with self._lock:
                if entry.preheld and not lease:
                    self._unhold(entry)  # create_executor: not leased, so not held
                    entry.preheld = False
                if self._closed:
                    if entry.preheld:
                        self._unhold(entry)
                    entry.closed = True
                    to_close.append(entry)
                    self._check_open()
                current = self._cache.get(key)
                if current is not None and current.leases:
                    entry.cached = False  # the cached one is in use: this one is closed after its lease
                else:
                    if current is not None:
                        self._retire(current, to_close)
                    self._cache[key] = entry
                self._live[id(entry.executor)] = entry
                if lease:
                    self._take(entry)
                self._evict(to_close)
                to_stop = self._maintain(entry, to_close)
                return entry
        finally:
            with self._lock:
                self._builds -= 1
                self._changed.notify_all()
            self._close_entries(to_close)
            self._stop(to_stop)

    def _end_building(self) -> None:
        """The running build no longer changes the pool's shape: the next builder may start."""
        with self._lock:
            if self._builder == threading.get_ident():
                self._builder = None
                self._changed.notify_all()

    @property
    def _building(self) -> bool:
        """A build is changing the pool's shape (lock held to read it meaningfully)."""
        return self._builder is not None

    def _release(self, entry: CacheEntry, holder: int) -> None:
        to_close: list[CacheEntry] = []
        with self._lock:
            entry.leases -= 1
            self._lease_threads[holder] -= 1
            if self._lease_threads[holder] <= 0:
                del self._lease_threads[holder]
            self._unhold(entry)
            if not entry.leases and not entry.cached and not entry.closed:
                entry.closed = True
                self._live.pop(id(entry.executor), None)
                to_close.append(entry)
            self._evict(to_close)  # the cache may have grown past its size while this was leased
            self._changed.notify_all()
        self._close_entries(to_close)

    def _take(self, entry: CacheEntry) -> None:
        entry.leases += 1
        self._lease_threads[threading.get_ident()] += 1
        if entry.preheld:
            entry.preheld = False  # the builder's hold becomes this lease's
        else:
            self._hold(entry)

    def _retire(self, entry: CacheEntry, to_close: list[CacheEntry]) -> None:
        """Out of the cache; closed now if no call holds it, else when its last lease ends."""
        if entry.cached and self._cache.get(entry.key) is entry:
            del self._cache[entry.key]
        entry.cached = False
        if not entry.leases and not entry.closed:
            entry.closed = True
            self._live.pop(id(entry.executor), None)
            to_close.append(entry)

    def _evict(self, to_close: list[CacheEntry]) -> None:
        """LRU eviction that skips leased executors (the cache may exceed its size meanwhile)."""
        excess = len(self._cache) - self.cache_size
        for entry in list(self._cache.values()):
            if excess <= 0:
                break
            if not entry.leases:
                self._retire(entry, to_close)
                excess -= 1

    def _entries_of(self, executor: Executor | None) -> list[CacheEntry]:
        if executor is None:
            return [e for e in self._live.values() if e.leases]
        entry = self._live.get(id(executor))
        return [entry] if entry is not None and entry.executor is executor else []

    def _leases_elsewhere(self) -> int:
        return sum(n for ident, n in self._lease_threads.items() if ident != threading.get_ident())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed; create a new factory.")

    @staticmethod
    def _close_entries(entries: list[CacheEntry]) -> None:
        for entry in entries:
            try:
                entry.executor.close()
            except Exception:  # noqa: BLE001 - closing one must not stop closing the others
                logger.debug("mp_executors: closing an executor failed", exc_info=True)

    # ------------------------------------------------------------------ hooks for pooled factories

    def _make_entry(self, key: tuple, num_clients: int) -> CacheEntry:
        """Builds the stack for `num_clients` clients (called outside the lock, one at a time)."""
        return CacheEntry(key, self._build(num_clients))

    def _build(self, num_clients: int) -> Executor:
        """Composes the stack for `num_clients` clients (or override `_make_entry`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _build nor _make_entry")

    def _usable(self, entry: CacheEntry) -> bool:
        """Whether a cached executor may be handed out (lock held)."""
        return True

    def _hold(self, entry: CacheEntry) -> None:
        """A lease of `entry` starts (lock held)."""

    def _unhold(self, entry: CacheEntry) -> None:
        """A lease of `entry` ended (lock held)."""

    def _maintain(self, entry: CacheEntry, to_close: list[CacheEntry]) -> list[Any]:
        """After `entry` was handed out (lock held): returns resources to stop once it is released."""
        return []

    def _stop(self, resources: list[Any]) -> None:
        """Stops what `_maintain` returned (lock not held)."""

    def _after_clean_up(self, to_close: list[CacheEntry]) -> None:
        """After `clean_up_executor` (lock held)."""

    def _close_resources(self) -> None:
        """Closes what the factory owns besides executors (e.g. its pool), at the end of `close()`."""


@dataclasses.dataclass(eq=False)
class CacheEntry:
    """One executor a factory built, and its bookkeeping (guarded by the factory's lock)."""

    key: tuple
    executor: Executor
    slots: tuple = ()  # the worker slots its shards live in; held while it is leased
    preheld: bool = False  # its slots were held by the builder (for the lease to come)
    leases: int = 0
    cached: bool = True  # in the LRU; once False it is closed when its last lease ends
    closed: bool = False
