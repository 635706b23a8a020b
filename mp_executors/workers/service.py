"""`Worker`: the state of one worker process, and how it answers requests.

One `Worker` per worker process, created by `worker.initialize` once the
process is pinned and TensorFlow is imported; it lives exactly as long as
the process (a loky worker or a Ray actor) and owns everything the process
keeps between requests:

    shards        ClientShards by shard id (one per executor the parent built
                  over this worker), opened and closed by the parent
    functions     compiled computations by digest, each received once
                  (`transport.strip_known_functions` on the parent's side)
    segments      the parent's shared-memory segments this process has mapped
                  (`transport.AttachedSegments`)
    client_data   the columns built from `ClientData` descriptions, shared by
                  this process's shards (`client_shard.ClientDataCache`)
    map_plans     how each computation's maps run here, vectorized or looped
                  (`vectorized_map.MapPlans`), shared by this process's shards

`worker.py` holds the importable functions loky and Ray call (they only
forward to this object); this module imports TensorFlow, so only
`worker.initialize` imports it, after pinning.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import psutil

from mp_executors._tf import tf
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.client_shard import ClientDataCache, ClientShard
from mp_executors.executors.vectorized_map import MapPlans
from mp_executors.workers import transport
from mp_executors.workers.faults import maybe_inject_fault


class Worker:
    """Everything one worker process holds; see the module docstring."""

    def __init__(self, slot_index: int, client_data_entries_per_shard: int = 4):
        self.slot_index = slot_index
        self.shards: dict[int, ClientShard] = {}
        self.functions: dict[str, Any] = {}
        self.segments = transport.AttachedSegments()
        self.client_data = ClientDataCache(client_data_entries_per_shard)
        self.map_plans = MapPlans()

    def open_shard(self, shard_id: int, start: int, stop: int, device: str | None = None) -> None:
        shard = ClientShard(start, stop, device, self.client_data, self.map_plans)
        shard.location = f" in worker slot {self.slot_index} (pid {os.getpid()})"
        self.shards[shard_id] = shard

    def close_shard(self, shard_id: int) -> None:
        shard = self.shards.pop(shard_id, None)
        if shard is not None:
            shard.close()

    def handle(self, shard_id: int, releases: tuple[int, ...], request: rq.ShardRequest,
               new_functions: list = ()) -> Any:
        """Runs one request on one shard: registers new functions, releases stale handles, runs it.

        `new_functions` are compiled computations this worker has not seen;
        the request refers to every compiled computation by digest
        (`transport.FunctionRef`).
        """
        for function in new_functions:
            self.functions[function.digest] = function
        request = transport.resolve_functions(request, self.functions)
        try:
            shard = self.shards[shard_id]
        except KeyError:
            raise RuntimeError(
                f"worker slot {self.slot_index} has no shard {shard_id} (open: {sorted(self.shards)}); "
                "its executor was closed while a request for it was on its way (a bug in mp_executors)."
            ) from None
        if releases:
            shard.release(releases)
        maybe_inject_fault(request.verb, self.slot_index)
        if isinstance(request, rq.PutColumns):
            request = request.replace(columns=self.segments.decode_columns(request.columns))
        return shard.run(request)

    def handle_batch(self, items: list[tuple], progress: tuple[str, int] | None = None) -> list[tuple[bool, Any]]:
        """Runs the requests of one message in order; one outcome per request.

        `items` are `handle`'s arguments, one tuple per request (the requests the
        parent sent to this worker in one turn of its event loop: `pool.Outbox`).
        Each runs whatever happened to the ones before it, as separate messages
        would; an outcome is (True, reply) or (False, the exception as it travels
        back, `transport.RemoteError`). `progress` is (the slot's progress cell,
        this message's number), or None: (message, index of the request) is written
        there before each request, so that if this process dies the parent can
        tell during which (`transport.ProgressCell`).
        """
        cell = self.segments.progress(progress[0]) if progress else None
        outcomes: list[tuple[bool, Any]] = []
        for index, (shard_id, releases, request, new_functions) in enumerate(items):
            if cell is not None:
                cell.mark(progress[1], index)
            try:
                outcomes.append((True, self.handle(shard_id, releases, request, new_functions)))
            except Exception as e:  # noqa: BLE001 - the parent re-raises it for this request only
                outcomes.append((False, transport.RemoteError(e)))
        return outcomes

    def report(self) -> dict[str, Any]:
        """Where and how this worker runs, and what it holds (tests, `mp-executors info`, logs)."""
        proc = psutil.Process()
        return {
            "slot": self.slot_index,
            "pid": os.getpid(),
            "cpu_affinity": proc.cpu_affinity() if hasattr(proc, "cpu_affinity") else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "rss": proc.memory_info().rss,
            "tensorflow_imported": True,
            "shards": sorted(self.shards),
            "shard_ranges": {i: (s.start, s.stop) for i, s in self.shards.items()},
            "values_held": sum(len(shard.values) for shard in self.shards.values()),
            "modules": len(sys.modules),
            "functions": sorted(self.functions),
            "client_data_entries": len(self.client_data),
            "client_data_capacity": self.client_data.capacity,
            "map_plans": self.map_plans.describe(),
            "attached_segments": self.segments.names(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }


__all__ = ["Worker"]
