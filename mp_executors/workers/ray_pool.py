"""Worker slots as Ray actors: the same worker service, placed by a Ray cluster.

    parent process (Ray driver)                         Ray actors (any node)
    ---------------------------                         ---------------------
    RemoteShard(slot 0) --submit--> RayWorkerSlot 0 --actor.run.remote(worker.handle_batch, ...)-->  _WorkerActor 0
    RemoteShard(slot 1) --submit--> RayWorkerSlot 1 --actor.run.remote(worker.handle_batch, ...)-->  _WorkerActor 1
          ^                                   |                                                 ClientShards,
          +---- concurrent future <-- ObjectRef.future() <-- (ok, result) | (False, exception)   values by handle

`RayWorkerPool` is the `WorkerPool` of `workers.pool` with one override:
`_new_slot` starts a Ray actor instead of a loky process. Everything else
(shards, one message per worker per event-loop turn, compiled functions sent
once, crash -> `WorkerCrashedError` -> retry on a replaced actor) is the
pool's own code. Each actor hosts the transport-agnostic `workers.worker`
service: its constructor calls `worker.initialize` (which creates the actor
process's `service.Worker`, owner of its shards and functions), and its one method runs
`worker.handle_batch` / `open_shard` / `report` / ... in the actor process, in
submission order (a Ray actor runs one call at a time).

Differences from the loky slots:

- Placement and resources come from Ray: the actor asks for `num_cpus` (the
  slot's threads) and `num_gpus`; Ray sets CUDA_VISIBLE_DEVICES per actor.
  The slot's CPU list is not applied (it names CPUs of the parent's machine,
  not of the node the actor lands on); the thread-count environment is.
- No shared memory: `segments` is None, so client columns travel inline in
  the request and Ray moves them (through its object store for large ones).
- Client errors come back as values, so they reach the caller exactly as
  from a loky worker (same type and message, worker traceback attached);
  only a dead actor surfaces as a Ray error (`crash_errors`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import traceback
from concurrent.futures.process import _RemoteTraceback
from typing import Any

import psutil
import ray
import ray.exceptions

from mp_executors.planning import WorkerSlot
from mp_executors.workers import worker
from mp_executors.workers.pool import SlotUse, WorkerPool

logger = logging.getLogger("mp_executors")


class _WorkerActor:
    """The actor hosting one slot's worker service (see `workers.worker`)."""

    def __init__(self, slot_index: int, env: dict[str, str], uses_gpu: bool):
        if uses_gpu:  # keep the GPU Ray assigned to this actor
            env = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        # No CPU pinning (cpus=()) and no parent watch: Ray owns placement and lifetime.
        worker.initialize(slot_index, (), env, None)

    def run(self, fn, *args) -> tuple[bool, Any]:
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 - travels back as a value, re-raised by the parent
            e.mp_executors_remote_traceback = traceback.format_exc()
            return False, e
        if fn is worker.report:
            value = {**value, "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
        return True, value


_remote_actor_class = None


def _actor_class():
    global _remote_actor_class
    if _remote_actor_class is None:
        _remote_actor_class = ray.remote(_WorkerActor)
    return _remote_actor_class


class RayWorkerSlot(SlotUse):
    """One slot served by one Ray actor; offers what `WorkerPool` needs of a slot.

    Busy/idle bookkeeping (`SlotUse`) is the loky slot's: a request counts as
    in flight from submit until its future is settled, and the idle clock
    starts then.
    """

    crash_errors: tuple[type[BaseException], ...] = (
        ray.exceptions.RayActorError,  # ActorDiedError (killed, OOM, constructor failed), ActorUnavailableError
        ray.exceptions.WorkerCrashedError,
    )
    segments = None  # no shared memory with the actor's node: columns travel inline

    def __init__(self, slot: WorkerSlot, options: dict[str, Any]):
        self.slot = slot
        env = dict(slot.env())
        uses_gpu = bool(options.get("num_gpus"))
        self.actor = _actor_class().options(**options).remote(slot.index, env, uses_gpu)
        self.options = options
        self.known_functions: set[str] = set()
        self.process = None  # no local process handle: the memory guard skips Ray slots
        self.last_rss: int | None = None
        self._init_use()
        self.pid: int | None = None
        self.host: str | None = None
        self.death: BaseException | None = None  # the Ray error that reported the actor dead
        self._killed = False  # by us (kill/shutdown): its death is no news

    def submit(self, fn, *args) -> concurrent.futures.Future:
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._begin()
        self._track(result)  # settled below, or cancelled: either ends the request
        try:
            ref = self.actor.run.remote(fn, *args)
        except BaseException as e:
            _settle(result, error=e)
            raise

        def done(ray_future: concurrent.futures.Future) -> None:
            try:
                ok, value = ray_future.result()
            except BaseException as e:  # noqa: BLE001 - the actor died (crash_errors) or Ray failed
                self._note_death(e)
                _settle(result, error=e)
                return
            if not ok:
                tb = getattr(value, "mp_executors_remote_traceback", None)
                if tb:
                    value.__cause__ = _RemoteTraceback(tb)
                _settle(result, error=value)
                return
            if fn is worker.report:
                self.pid, self.host, self.last_rss = value["pid"], value["host"], value["rss"]
            _settle(result, value=value)

        ref.future().add_done_callback(done)
        return result

    def _note_death(self, error: BaseException) -> None:
        if isinstance(error, self.crash_errors) and self.death is None and not self._killed:
            self.death = error
            lines = str(error).strip().splitlines()
            logger.warning("mp_executors: the Ray actor of worker slot %d is gone: %s",
                           self.slot.index, " | ".join(lines[:12]))

    def _is_local(self) -> bool:
        return self.pid is not None and self.host == socket.gethostname()

    def pids(self) -> list[int]:
        """The actor's pid when it runs on this host (others are not ours to see)."""
        return [self.pid] if self._is_local() and psutil.pid_exists(self.pid) else []

    def exitcode(self, wait: float = 1.0) -> int | None:
        return None  # Ray does not report an actor process's exit status

    def kill(self) -> None:
        """Ends the actor now (its running request is abandoned)."""
        self.broken = self._killed = True
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead, or Ray already shut down
            pass

    def shutdown(self) -> None:
        if ray.is_initialized():
            self.kill()
        if self._is_local():  # like a loky shutdown: return once the process is gone
            try:
                psutil.Process(self.pid).wait(timeout=10)
            except (psutil.Error, psutil.TimeoutExpired):
                pass


def _settle(future: concurrent.futures.Future, value: Any = None, error: BaseException | None = None) -> None:
    if future.cancelled():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


class RayWorkerPool(WorkerPool):
    """A `WorkerPool` whose slots are Ray actors (see the module docstring)."""

    #: How long to wait for the cluster to free the resources new actors need.
    RESOURCE_WAIT_SECONDS = 15.0

    def __init__(self, gpus_per_worker: float = 0, actor_options: dict[str, Any] | None = None,
                 lock: threading.RLock | None = None):
        super().__init__(lock=lock)
        self.gpus_per_worker = gpus_per_worker
        self.actor_options = dict(actor_options or {})

    def _options(self, slot: WorkerSlot) -> dict[str, Any]:
        cpus: float = len(slot.cpus)
        plan = self.plan
        total = len(plan.machine.usable_cpus) if plan is not None else cpus
        if plan is not None and plan.num_workers * cpus > total:
            # More workers than the cluster has CPUs (an explicit num_workers): share them.
            share = total / plan.num_workers
            cpus = float(int(share)) if share >= 1 else int(share * 100) / 100
        options: dict[str, Any] = {
            "num_cpus": cpus, "max_restarts": 0, "max_task_retries": 0, "scheduling_strategy": "SPREAD",
        }
        if self.gpus_per_worker:
            options["num_gpus"] = self.gpus_per_worker
        options.update(self.actor_options)
        return options

    def _new_slot(self, slot: WorkerSlot) -> RayWorkerSlot:
        return RayWorkerSlot(slot, self._options(slot))

    def _start_slots(self, wanted: list[WorkerSlot]) -> list[RayWorkerSlot]:
        try:
            self._wait_for_resources([self._options(slot) for slot in wanted])
        except BaseException:
            self.plan = None  # the next call plans (and starts actors) again
            raise
        return super()._start_slots(wanted)

    def _wait_for_resources(self, options: list[dict[str, Any]]) -> None:
        """Fails fast, with a clear message, when the cluster cannot host the new actors.

        A Ray actor whose resources are not free waits for them without limit;
        the pool would hang. Actors just killed (a resize) free theirs within
        moments, hence the short wait.
        """
        need = {"CPU": sum(o.get("num_cpus") or 0 for o in options),
                "GPU": sum(o.get("num_gpus") or 0 for o in options)}
        deadline = time.monotonic() + self.RESOURCE_WAIT_SECONDS
        while True:
            free = ray.available_resources()
            short = {k: v for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
            if not short:
                return
            if time.monotonic() > deadline:
                total = ray.cluster_resources()
                missing = ", ".join(f"{v:g} {k} (free {free.get(k, 0.0):g} of {total.get(k, 0.0):g})"
                                    for k, v in short.items())
                raise RuntimeError(
                    f"the Ray cluster cannot host {len(options)} worker actor(s): they need {missing}. "
                    "Other actors hold the rest (another ray_executor_factory still open?). Close other "
                    "factories, add nodes, or ask for less: num_workers=, cpus_per_worker=, or "
                    "actor_options={'num_cpus': 0} to place actors without reserving CPUs."
                )
            time.sleep(0.2)


__all__ = ["RayWorkerPool", "RayWorkerSlot"]
