"""`local_executor_factory`: the in-process stack (the reference runtime).

    ReferenceResolvingExecutor
      -> FederatingExecutor
           server: EagerTFExecutor(server_device)
           clients: InProcessShards (each a ClientShard with its own EagerTFExecutor
                    leaf), run concurrently on the factory's thread pool

How clients are split into in-process shards (`shard_ranges`): by default in
whole vectorization groups (`vectorized_map.GROUP_SIZE` = 128 clients, so only
the stack's last group is padded), into as few shards as keep the threads busy
(a shard's map keeps GROUPS_IN_FLIGHT groups in flight: one shard per two
threads, and at least one per client device); an explicit `max_fanout`
(TFF's argument) bounds the clients of one shard instead. Shards run
concurrently on the factory's thread pool (`shard_threads`, default the usable
CPUs; TensorFlow's kernels release the GIL), each shard's requests in order.
Results never depend on the split, nor on the threads: shards are made of
whole reduction blocks, partials are merged in client order, and a vectorized
client's result does not depend on its group (tests/test_determinism.py,
tests/test_vectorized_map.py, tests/test_local_shards.py).

Why (measured at 1,000 small-model clients, 2 CPUs, interleaved with the
one-graph floor; README "Vectorized shards"): ten shards of <= 100 clients one
after another, each one padded group with nothing to overlap, cost ~2.3x the
floor; the same shards on a 2-thread pool ~1.6-1.8x; one shard of 8 groups
(two in flight) ~1.0-1.35x, and two shards of 512 + 488 on the pool 5-15%
more than that (four groups in flight on two cores contend). So on 2 CPUs the
default is one shard, and the pool serves more shards than that (an explicit
`max_fanout`, several client devices, more CPUs).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

from mp_executors.checks import check_int
from mp_executors.executors.client_shard import ClientDataCache
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.federating_executor import FederatingExecutor
from mp_executors.executors.in_process_shard import InProcessShard
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor
from mp_executors.executors.vectorized_map import GROUP_SIZE, MapPlans
from mp_executors.factories.base import CachingExecutorFactory
from mp_executors.machine import detect_machine

#: Vectorized groups one shard's map keeps in flight (`vectorized_map`'s while loop runs
#: with parallel_iterations=2): one shard already keeps this many threads busy, so the
#: default split makes one shard per this many threads.
GROUPS_IN_FLIGHT = 2


def check_common_arguments(max_fanout: int | None, server_device, client_devices) -> None:
    if max_fanout is not None:
        check_int("max_fanout", max_fanout, minimum=2, fix="the most children of one aggregation level, e.g. 100")
    if server_device is not None and not isinstance(server_device, str):
        raise ValueError(f"server_device must be a device string such as '/CPU:0', got {server_device!r}.")
    if isinstance(client_devices, str) or not all(isinstance(d, str) for d in client_devices):
        raise ValueError(f"client_devices must be a sequence of device strings, got {client_devices!r}.")


class LocalExecutorFactory(CachingExecutorFactory):
    """See `local_executor_factory`.

    Owns, for all the executors it builds: the ClientData cache, the map plans,
    and the thread pool its shards run on (`_pool`: created under `_lock` by the
    first build that has more than one shard, shut down by `close()` after every
    executor is closed; leases make `close()` wait for running calls first).
    """

    def __init__(self, default_num_clients: int = 0, max_fanout: int | None = None, server_device: str | None = None,
                 client_devices: Sequence[str] = (), shard_threads: int | None = None):
        super().__init__(default_num_clients)
        check_common_arguments(max_fanout, server_device, client_devices)
        if shard_threads is not None:
            check_int("shard_threads", shard_threads, minimum=1,
                      fix="how many in-process shards may run at once (1: one after another), or None for the usable CPUs")
        self.max_fanout = max_fanout
        self.server_device = server_device
        self.client_devices = tuple(client_devices)
        self.shard_threads = shard_threads if shard_threads is not None else len(detect_machine().usable_cpus)
        # One cache of built ClientData columns, and one set of map plans (vectorized or
        # looped, decided once per computation), for all shards of all executors it builds.
        self.client_data = ClientDataCache()
        self.map_plans = MapPlans()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # guarded by _lock

    def _build(self, num_clients: int) -> ReferenceResolvingExecutor:
        shards = []
        if num_clients:
            devices = self.client_devices or (None,)
            # Enough shards that their groups in flight cover the threads, and one per device.
            auto_shards = max(-(-self.shard_threads // GROUPS_IN_FLIGHT), len(devices))
            ranges = shard_ranges(num_clients, self.max_fanout, auto_shards)
            pool = self._shard_pool() if len(ranges) > 1 else None
            shards = [
                InProcessShard(a, b, devices[i % len(devices)], self.client_data, self.map_plans, pool)
                for i, (a, b) in enumerate(ranges)
            ]
        federating = FederatingExecutor(EagerTFExecutor(self.server_device), shards, num_clients)
        return ReferenceResolvingExecutor(federating)

    def _shard_pool(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The pool the shards run on, created on first need; None when shards run one at a time."""
        if self.shard_threads < 2:
            return None
        with self._lock:
            self._check_open()  # a pool made after close() would have no owner to shut it down
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.shard_threads, thread_name_prefix="mp_executors-local-shard")
            return self._pool

    def _close_resources(self) -> None:
        # Every executor is closed by now (their shards' close() is queued behind their
        # running requests): shutting down waits for those, then the threads end.
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def shard_ranges(num_clients: int, max_fanout: int | None, shards: int) -> list[tuple[int, int]]:
    """The [start, stop) client ranges of the in-process shards.

    max_fanout None: `shards` shards (fewer if there are fewer groups), balanced in
    whole vectorization groups (boundaries at multiples of GROUP_SIZE: only the
    last shard's last group is padded). max_fanout >= GROUP_SIZE: shards of at
    most max_fanout clients, in whole groups. A smaller max_fanout: shards of
    about max_fanout clients in whole reduction blocks of BLOCK_SIZE (a shard
    may then hold up to BLOCK_SIZE - 1 more). Every boundary is a multiple of
    BLOCK_SIZE (GROUP_SIZE is one), as reductions require.
    """
    groups = -(-num_clients // GROUP_SIZE)
    if max_fanout is None:
        return split_clients(num_clients, max(1, min(shards, groups)), GROUP_SIZE)
    if max_fanout >= GROUP_SIZE:
        per_shard = max_fanout // GROUP_SIZE
        return split_clients(num_clients, max(1, -(-groups // per_shard)), GROUP_SIZE)
    return split_clients(num_clients, max(1, -(-num_clients // max_fanout)), BLOCK_SIZE)


def local_executor_factory(default_num_clients: int = 0, max_fanout: int | None = None,
                           server_device: str | None = None, client_devices: Sequence[str] = (), *,
                           shard_threads: int | None = None) -> LocalExecutorFactory:
    """The in-process execution stack: every client runs in this process.

    Args:
      default_num_clients: clients to assume when no CLIENTS argument says
        (e.g. `federated_eval` at CLIENTS with no argument).
      max_fanout: None (default): shards in whole vectorization groups of 128
        clients, one per two `shard_threads` and at least one per client
        device (on 2 CPUs: one shard for all clients). An int:
        shards of at most this many clients (in whole groups of 128 when it is
        >= 128; else in whole reduction blocks of 8, so a shard may hold up to
        7 more). TFF's argument; results never depend on it.
      server_device / client_devices: TensorFlow device strings for the
        server and (round-robin) the client shards.
      shard_threads: how many shards run at once, on a thread pool the factory
        owns (created on first need, shut down by `close()`); a shard's own
        requests still run one at a time, in order. None: the usable CPUs;
        1: shards run one after another on the calling thread. Results never
        depend on it (nor on how many shards there are).
    """
    return LocalExecutorFactory(default_num_clients, max_fanout, server_device, client_devices, shard_threads)
