"""`local_executor_factory`: the in-process stack (the reference runtime).

    ReferenceResolvingExecutor
      -> FederatingExecutor
           server: EagerTFExecutor(server_device)
           clients: InProcessShards of at most `max_fanout` clients each
                    (each a ClientShard with its own EagerTFExecutor leaf)

`max_fanout` bounds how many clients one in-process shard holds (TFF's
composing executors); results do not depend on it, because shards are made
of whole reduction blocks and partials are merged in client order.
"""

from __future__ import annotations

from collections.abc import Sequence

from mp_executors.checks import check_int
from mp_executors.executors.client_shard import ClientDataCache
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.federating_executor import FederatingExecutor, InProcessShard
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor
from mp_executors.executors.vectorized_map import MapPlans
from mp_executors.factories.base import CachingExecutorFactory


def check_common_arguments(max_fanout: int, server_device, client_devices) -> None:
    check_int("max_fanout", max_fanout, minimum=2, fix="the most children of one aggregation level, e.g. 100")
    if server_device is not None and not isinstance(server_device, str):
        raise ValueError(f"server_device must be a device string such as '/CPU:0', got {server_device!r}.")
    if isinstance(client_devices, str) or not all(isinstance(d, str) for d in client_devices):
        raise ValueError(f"client_devices must be a sequence of device strings, got {client_devices!r}.")


class LocalExecutorFactory(CachingExecutorFactory):
    def __init__(self, default_num_clients: int = 0, max_fanout: int = 100, server_device: str | None = None,
                 client_devices: Sequence[str] = ()):
        super().__init__(default_num_clients)
        check_common_arguments(max_fanout, server_device, client_devices)
        self.max_fanout = max_fanout
        self.server_device = server_device
        self.client_devices = tuple(client_devices)
        # One cache of built ClientData columns, and one set of map plans (vectorized or
        # looped, decided once per computation), for all shards of all executors it builds.
        self.client_data = ClientDataCache()
        self.map_plans = MapPlans()

    def _build(self, num_clients: int) -> ReferenceResolvingExecutor:
        shards = []
        if num_clients:
            groups = -(-num_clients // self.max_fanout)
            devices = self.client_devices or (None,)
            shards = [
                InProcessShard(a, b, devices[i % len(devices)], self.client_data, self.map_plans)
                for i, (a, b) in enumerate(split_clients(num_clients, groups, BLOCK_SIZE))
            ]
        federating = FederatingExecutor(EagerTFExecutor(self.server_device), shards, num_clients)
        return ReferenceResolvingExecutor(federating)


def local_executor_factory(default_num_clients: int = 0, max_fanout: int = 100, server_device: str | None = None,
                           client_devices: Sequence[str] = ()) -> LocalExecutorFactory:
    """The in-process execution stack: every client runs in this process.

    Args:
      default_num_clients: clients to assume when no CLIENTS argument says
        (e.g. `federated_eval` at CLIENTS with no argument).
      max_fanout: at most this many clients per in-process client group.
      server_device / client_devices: TensorFlow device strings for the
        server and (round-robin) the client groups.
    """
    return LocalExecutorFactory(default_num_clients, max_fanout, server_device, client_devices)
