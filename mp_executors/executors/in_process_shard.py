"""`InProcessShard`: a `ClientShard` in this process (the local stack's shard target),
and `SerialQueue`, which runs one shard's requests in order on a shared thread pool.

A FederatingExecutor sends each intrinsic as one request per shard and awaits
the replies later (`federating_executor.ShardTarget`). An in-process shard runs
its requests either

    inline       on the caller's thread, inside `send` (no pool given): shards run
                 one after another, as the tasks of a gather would;
    on a pool    each shard has a `SerialQueue` over a thread pool its owner (the
                 local factory) shares among all its shards: `send` queues the
                 request and returns at once; a pool task drains the queue. So
                 different shards' requests run concurrently (TensorFlow's kernels
                 release the GIL: two shards' maps overlap on two cores), while
                 one shard's requests run strictly one at a time, in the order
                 they were sent (the pipelined protocol: a later request never runs
                 before an earlier one, exactly as in a worker process).

A reply is settled on the caller's event loop (`call_soon_threadsafe`); a reply
abandoned by its caller (cancelled) is left alone, the request still runs.
Results do not depend on which way runs: each request runs the same code on
the same shard state; only when shards run changes.

Closing: `close()` may come from any thread (the factory closes executors
after their leases end, or under a call that outlived `close()`'s wait). It
marks the shard closed (later sends fail at once with a clear error, queued
requests not yet started fail with it too) and closes the `ClientShard` after
the request running now, on the queue, so it never pulls values from under a
running request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from mp_executors.executors import shard_requests as rq
from mp_executors.executors.client_shard import ClientDataCache, ClientShard
from mp_executors.executors.vectorized_map import MapPlans

logger = logging.getLogger("mp_executors")


class SerialQueue:
    """Runs callables one at a time, in submission order, on a shared `concurrent.futures.Executor`.

    At most one pool task drains a queue at any time (`_draining`, guarded by
    `_lock` with the deque), so its callables never overlap and never reorder;
    the queues of different shards drain concurrently. A drain task runs
    everything queued when it looks, so a pipelined burst (put, broadcast,
    zip, map) costs one pool hop. When the pool refuses work (its owner shut it
    down), the queue drains on the submitting thread instead: still in order.
    """

    def __init__(self, pool: concurrent.futures.Executor):
        self._pool = pool
        self._lock = threading.Lock()
        self._items: collections.deque[Callable[[], None]] = collections.deque()
        self._draining = False

    def submit(self, item: Callable[[], None]) -> None:
        """Queues `item` (which should not raise) to run after everything submitted before it."""
        with self._lock:
            self._items.append(item)
            if self._draining:
                return  # the running drain task will reach it
            self._draining = True
        try:
            self._pool.submit(self._drain)
        except RuntimeError:
            # Shut down (the factory closed under a call that outlived its wait, or
            # interpreter exit). No drain task runs for this queue (we set
            # `_draining`), so draining here keeps the order.
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._draining = False
                    return
                item = self._items.popleft()
            try:
                item()
            except BaseException:  # noqa: BLE001 - one item must not wedge the queue
                logger.exception("mp_executors: an in-process shard task failed outside its reply")


class InProcessShard:
    """A ClientShard in this process (the local stack's shard target).

    `client_data` is the ClientData cache and `map_plans` the map plans its
    owner (the local factory) shares among all its shards; without them, the
    shard has its own. `pool`: the thread pool (owned by the caller, who
    shuts it down after closing the shard) that runs this shard's requests, in
    order, concurrently with other shards'; None runs them inline in `send`.
    """

    def __init__(self, start: int, stop: int, device: str | None = None,
                 client_data: ClientDataCache | None = None, map_plans: MapPlans | None = None,
                 pool: concurrent.futures.Executor | None = None):
        self.start, self.stop = start, stop
        self.shard = ClientShard(start, stop, device, client_data if client_data is not None else ClientDataCache(),
                                 map_plans)
        self._queue = SerialQueue(pool) if pool is not None else None
        # Goes from False to True once (close, any thread); read by sends and queued requests.
        self._closed = False

    @property
    def concurrent(self) -> bool:
        """Whether requests run on a pool (True) or inline on the caller's thread."""
        return self._queue is not None

    def prepare(self, request: rq.ShardRequest) -> rq.ShardRequest:
        return request

    def discard(self, request: rq.ShardRequest) -> None:
        pass

    def send(self, releases: tuple[int, ...], request: rq.ShardRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if self._queue is None:
            # The work runs now, on the caller's thread (as the tasks of a gather would).
            _settle(reply, *self._run(releases, request))
        elif self._closed:
            reply.set_exception(self._closed_error(request))
        else:
            self._queue.submit(lambda: self._run_queued(loop, reply, releases, request))
        return reply

    def _run_queued(self, loop: asyncio.AbstractEventLoop, reply: asyncio.Future, releases: tuple[int, ...],
                    request: rq.ShardRequest) -> None:
        """A pool thread's turn: runs the request and settles its reply, whatever happens."""
        try:
            result, error = self._run(releases, request)
        except BaseException as e:  # noqa: BLE001 - an unsettled reply would hang its caller
            result, error = None, e
        _deliver(loop, reply, result, error)

    def _run(self, releases: tuple[int, ...], request: rq.ShardRequest) -> tuple[Any, BaseException | None]:
        """Runs one request on the shard; (reply, None) or (None, the error)."""
        if self._closed:
            return None, self._closed_error(request)
        try:
            if releases:
                self.shard.release(releases)
            return self.shard.run(request), None
        except Exception as e:  # noqa: BLE001 - the reply carries it, as a worker's would
            return None, e

    def _closed_error(self, request: rq.ShardRequest) -> RuntimeError:
        return RuntimeError(f"the in-process shard of clients [{self.start}, {self.stop}) is closed "
                            f"(its executor or factory was closed); {type(request).__name__} did not run.")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._queue is None:
            self.shard.close()
        else:
            self._queue.submit(self.shard.close)  # after the request running now, if any


def _deliver(loop: asyncio.AbstractEventLoop, reply: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Settles `reply` on its loop's thread (called from a pool thread)."""
    try:
        loop.call_soon_threadsafe(_settle, reply, result, error)
    except RuntimeError:  # the loop is closed: nobody awaits this reply any more
        pass


def _settle(reply: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if reply.done():  # cancelled: the caller abandoned the reply (not the request)
        return
    if error is not None:
        reply.set_exception(error)
    else:
        reply.set_result(result)
