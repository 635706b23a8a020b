"""`ray_executor_factory`: the worker-pool stack with its workers as Ray actors.

    ReferenceResolvingExecutor
      -> FederatingExecutor                  (in this process, the Ray driver)
           server: EagerTFExecutor(server_device)
           clients: RemoteShards, one per Ray actor of a RayWorkerPool
                    (workers.ray_pool), each actor hosting the worker service

It is `mp_executor_factory` with two changes: the pool's slots are Ray actors
(`RayWorkerPool`), and the pool is planned (`planning.plan_pool`, the same
code) for the machine the Ray cluster is: its CPUs, GPUs and memory from
`ray.cluster_resources()`. Ray is connected to (or, with `address=None` and no
connection yet, started on this machine, bound to loopback) on the first call
that has clients; importing this module does not start anything.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from mp_executors.checks import is_int
from mp_executors.factories.mp import MpExecutorFactory
from mp_executors.machine import Machine, detect_machine
from mp_executors.planning import PoolPlan, plan_pool

logger = logging.getLogger("mp_executors")

_connect_lock = threading.Lock()


def init_local_ray(num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """Starts a Ray instance on this machine for this process, bound to loopback only.

    No dashboard; `num_cpus` defaults to the CPUs this process may use
    (affinity and cgroup quota, as `mp-executors info` shows). Ray 2.x turns
    `_node_ip_address="127.0.0.1"` into the machine's routable address; what
    keeps every Ray daemon on 127.0.0.1 is its single-machine mode
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), set here for the start only: the
    daemons inherit it, this process is left as it was.
    """
    import ray  # noqa: PLC0415
    import ray._private.ray_constants as ray_constants  # noqa: PLC0415

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # FACTS.md: silences a start-up warning
    if num_cpus is None:
        num_cpus = len(detect_machine().usable_cpus)
    kwargs = {"address": "local", "include_dashboard": False, "num_cpus": num_cpus,
              "logging_level": logging.WARNING, **init_kwargs}
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def cluster_machine(gpus_per_worker: float = 0) -> Machine:
    """The connected Ray cluster as a `machine.Machine`, for `plan_pool`.

    CPUs and memory are the cluster's totals. GPUs are counted in units of
    `gpus_per_worker` (2 GPUs at 0.5 per worker = 4 units), so that the
    plan's GPU bound is the number of actors the cluster's GPUs can hold.
    """
    import ray  # noqa: PLC0415

    res = ray.cluster_resources()
    cpus = int(res.get("CPU", 0))
    if cpus < 1:
        raise RuntimeError(f"the Ray cluster has no CPUs (resources: {res}); start a node with CPUs.")
    memory = int(res.get("memory", 0)) or detect_machine().available_memory
    units = int(res.get("GPU", 0) / gpus_per_worker + 1e-9) if gpus_per_worker else 0
    if gpus_per_worker and units < 1:
        raise ValueError(
            f"gpus_per_worker={gpus_per_worker:g} but the Ray cluster has {res.get('GPU', 0):g} GPUs; "
            "use gpus_per_worker=0 (CPU actors) or add GPU nodes."
        )
    return Machine(usable_cpus=tuple(range(cpus)), logical_cpus=cpus, physical_cores=cpus,
                   total_memory=memory, available_memory=memory, gpus=tuple(str(i) for i in range(units)))


class RayExecutorFactory(MpExecutorFactory):
    """`MpExecutorFactory` over Ray actors, planned for the Ray cluster."""

    PRESTART_FORK_SERVER = False  # the workers are Ray actors, not forked here

    #: How long a reading of the cluster's resources is reused for planning.
    MACHINE_READING_SECONDS = 5.0

    def __init__(self, address: str | None = None, default_num_clients: int = 0, max_fanout: int | None = None,
                 server_device: str | None = None, client_devices: Sequence[str] = (), *,
                 num_workers: int | None = None, cpus_per_worker: int | None = None, gpus_per_worker: float = 0,
                 memory_per_worker: int | str | None = None, oversubscribe: bool = False, max_retries: int = 1,
                 actor_options: dict[str, Any] | None = None, init_kwargs: dict[str, Any] | None = None):
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address must be None, 'auto', 'ray://host:port' or 'host:port', got {address!r}.")
        if (isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, numbers.Real)
                or gpus_per_worker < 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker))):
            raise ValueError(f"gpus_per_worker must be 0, a fraction of one GPU (e.g. 0.5) or a whole number "
                             f"of GPUs, got {gpus_per_worker!r}.")
        self.address = address
        self.gpus_per_worker = gpus_per_worker
        self.init_kwargs = dict(init_kwargs or {})
        self._owns_ray = False
        self._reading: tuple[float, Machine] | None = None
        # Checks every sizing argument now, on a stand-in machine: the cluster is
        # only connected to when a call needs workers.
        n = cpus_per_worker if is_int(cpus_per_worker) else 1
        stand_in = Machine(usable_cpus=tuple(range(n)), logical_cpus=n, physical_cores=n,
                           total_memory=1 << 60, available_memory=1 << 60, gpus=("0",) if gpus_per_worker else ())
        super().__init__(default_num_clients, max_fanout, server_device, client_devices, num_workers=num_workers,
                         threads_per_worker=cpus_per_worker, devices="gpu" if gpus_per_worker else "cpu",
                         memory_per_worker=memory_per_worker, oversubscribe=oversubscribe, max_retries=max_retries,
                         machine=stand_in)
        self._machine = None

        try:
            from mp_executors.workers.ray_pool import RayWorkerPool  # noqa: PLC0415 - imports ray
        except ImportError as e:
            if e.name is None or e.name.split(".")[0] != "ray":
                raise
            raise ImportError("ray_executor_factory needs Ray, an optional extra: "
                              "pip install 'mp_executors[ray]'") from e
        self.pool = RayWorkerPool(gpus_per_worker, actor_options, lock=self._lock)  # the factory's one lock

    def connect(self) -> None:
        """Connects to the cluster (or starts the local instance) unless Ray already is."""
        import ray  # noqa: PLC0415

        with _connect_lock:
            if ray.is_initialized():
                return
            # Like ray.init(): with no address given, $RAY_ADDRESS names the cluster.
            address = self.address if self.address is not None else os.environ.get("RAY_ADDRESS") or None
            if address is None:
                init_local_ray(**self.init_kwargs)
                self._owns_ray = True
                logger.info("mp_executors: started a local Ray instance (loopback): %s", ray.cluster_resources())
            else:
                ray.init(address=address, **{"logging_level": logging.WARNING, **self.init_kwargs})
                logger.info("mp_executors: joined the Ray cluster at %s: %s", address, ray.cluster_resources())

    def plan(self, num_clients: int) -> PoolPlan:
        """The pool plan for `num_clients` clients on the Ray cluster (connects to it)."""
        machine = self._machine
        if machine is None:
            self.connect()
            # One reading per MACHINE_READING_SECONDS (nodes may join or leave meanwhile).
            if self._reading is None or time.monotonic() - self._reading[0] > self.MACHINE_READING_SECONDS:
                self._reading = (time.monotonic(), cluster_machine(self.gpus_per_worker))
            machine = self._reading[1]
        try:
            return plan_pool(num_clients, machine=machine, **self._plan_args)
        except ValueError as e:
            raise ValueError(str(e).replace("threads_per_worker", "cpus_per_worker")
                             .replace("usable CPUs of this machine", "CPUs of the Ray cluster")) from None

    def close(self, timeout: float | None = None) -> None:
        super().close(timeout)
        if self._owns_ray:
            import ray  # noqa: PLC0415

            self._owns_ray = False
            ray.shutdown()


def ray_executor_factory(address: str | None = None, default_num_clients: int = 0, max_fanout: int | None = None,
                         server_device: str | None = None, client_devices: Sequence[str] = (), *,
                         num_workers: int | None = None, cpus_per_worker: int | None = None,
                         gpus_per_worker: float = 0, memory_per_worker: int | str | None = None,
                         oversubscribe: bool = False, max_retries: int = 1, actor_options: dict[str, Any] | None = None,
                         init_kwargs: dict[str, Any] | None = None) -> RayExecutorFactory:
    """The worker-pool execution stack on a Ray cluster: one actor per worker slot.

    Computations do not change: this is `mp_executor_factory` with its
    workers in Ray actors (values stay resident in the actors; one round trip
    per actor per intrinsic; results bitwise the same for any number of
    actors; a dead actor is replaced and the call retried).

      address: None starts a Ray instance on this machine, bound to loopback,
        on the first call (and stops it on `close()`), unless $RAY_ADDRESS
        names a cluster; if this process is already connected to Ray, that
        connection is used. 'auto' joins the cluster this machine is part of
        (`ray start ...`); 'ray://host:10001' joins a remote cluster through
        Ray Client.
      num_workers: actors (default: min(clients, cluster CPUs / cpus_per_worker,
        cluster memory / memory_per_worker, GPUs / gpus_per_worker)).
      cpus_per_worker: CPUs Ray reserves for each actor and its TensorFlow
        threads (default 1, or the cluster's CPUs shared among num_workers).
      gpus_per_worker: GPUs per actor (0: CPU only; 0.5: two actors share a
        GPU); Ray assigns them (CUDA_VISIBLE_DEVICES per actor).
      memory_per_worker, oversubscribe, max_retries: as for `mp_executor_factory`
        (the memory bound is the cluster's memory; a num_workers beyond it is
        refused when the first call plans the pool, before any actor starts).
      actor_options: extra `.options()` for the actors (e.g. `runtime_env`,
        `resources`, or `{'num_cpus': 0}` to place them without reserving CPUs).
      init_kwargs: extra `ray.init` arguments (e.g. `num_cpus` of the local
        instance, `runtime_env`).
    """
    return RayExecutorFactory(
        address, default_num_clients, max_fanout, server_device, client_devices, num_workers=num_workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, memory_per_worker=memory_per_worker,
        oversubscribe=oversubscribe, max_retries=max_retries, actor_options=actor_options, init_kwargs=init_kwargs,
    )


__all__ = ["RayExecutorFactory", "cluster_machine", "init_local_ray", "ray_executor_factory"]
