"""`ClientShard`: the values of a contiguous range of clients, and the
per-shard half of every intrinsic.

The same class runs in-process (under `local_executor_factory`, in an
`InProcessShard` per range of clients: `factories.local.shard_ranges`) and inside every worker process (under
`mp_executor_factory`, one shard per worker). Because both stacks run this
code, and reductions are done in a fixed order, the results are bitwise the
same whatever the number of shards. A shard answers the requests of the
shard protocol (`shard_requests`: Put, Map, Reduce, ...) through `run`, an
explicit table; it holds its values until closed.

`ClientDataCache` (also here) keeps the columns built from `ClientData`
descriptions; its owner (a worker process's `Worker`, or the local factory)
shares one among all its shards.

A CLIENTS value in a shard is a `ShardValue`: its member type and one *leaf
column* per tensor/sequence leaf of that type, each column one of
  Batched(array)    the clients' values stacked on a leading client axis,
  Broadcast(value)  one value shared by every client (broadcast, federated_value),
  PerClient(list)   one value per client (datasets, ragged shapes).
Zipping and selecting are column bookkeeping, no data moves. A `federated_map`
of a tf_computation over Batched/Broadcast columns is ONE TensorFlow call over
all the shard's clients (a per-client call costs ~1.7 ms, one call over 500
clients ~0.35 ms per client): vectorized over fixed-size groups of clients
where the function allows it, else a loop over the clients inside the graph.
The `vectorized_map.MapPlans` that decides (once per computation) belongs to
the shard's owner, like the ClientData cache.

Fixed reduction order: clients are grouped in global blocks of `BLOCK_SIZE`
consecutive clients (a shard always starts on a block boundary). Within a
block, values are folded left to right (elementwise numpy adds, or the user's
`accumulate`); the shard returns one partial per block, stacked; the parent
folds the partials of all shards in client order (`merge_partials`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any

import numpy as np

from mp_executors._tf import tf
from mp_executors.core import building_blocks as bb
from mp_executors.core import structure, values
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t
from mp_executors.core.client_data import ClientData
from mp_executors.core.structure import Struct
from mp_executors.errors import with_client_context
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.eager_tf_executor import EagerTFExecutor, call_function
from mp_executors.executors.executor_base import run_sync
from mp_executors.executors.reduction_blocks import BLOCK_SIZE
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor
from mp_executors.executors.vectorized_map import MapPlan, MapPlans

# --------------------------------------------------------------------------- ClientData cache


class ClientDataCache:
    """Client data built from `ClientData` descriptions, stacked in columns; a bounded LRU.

    Keyed by (description key, first client, end): the columns of one shard's
    range of one description. They stay resident across calls (and across the
    executors that share the cache), so a simulation's data is built and
    stacked once. Owners: a worker process's `workers.worker.Worker` (for the
    shards of every executor that worker hosts) and the local factory (one
    cache for all its `InProcessShard`s); it lives as long as its owner.

    The bound is per shard: at most `entries_per_shard` x (shards attached)
    entries, least recently used dropped first. A call over N shards puts N
    entries per description, so the bound keeps the last `entries_per_shard`
    descriptions whatever N is (a fixed entry count smaller than N would
    rebuild every client on every call); a fresh ClientData per round (client
    sampling) cannot grow it without bound.
    """

    def __init__(self, entries_per_shard: int = 4):
        if not isinstance(entries_per_shard, int) or entries_per_shard < 1:
            raise ValueError(f"entries_per_shard must be an int >= 1, got {entries_per_shard!r}.")
        self.entries_per_shard = entries_per_shard
        self._entries: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self._shards = 0
        # Shards of calls made from several threads may share one cache.
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.entries_per_shard * max(1, self._shards)

    def attach(self) -> None:
        """A shard starts using this cache (the bound grows by `entries_per_shard`)."""
        with self._lock:
            self._shards += 1

    def detach(self) -> None:
        """A shard was closed; entries beyond the smaller bound go (least recently used first)."""
        with self._lock:
            self._shards = max(0, self._shards - 1)
            self._trim()

    def get(self, key: tuple) -> list | None:
        with self._lock:
            columns = self._entries.get(key)
            if columns is not None:
                self._entries.move_to_end(key)
            return columns

    def put(self, key: tuple, columns: list) -> None:
        with self._lock:
            self._entries[key] = columns
            self._entries.move_to_end(key)
            self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def keys(self) -> list[tuple]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------- columns


class Batched:
    """Stacked client values; kept both as numpy and (lazily) as an eager tensor.

    The tensor is made once and reused by every later map over the column
    (converting 150 MB of client data per call would cost more than the
    map); for CPU tensors `.numpy()` shares the buffer, so holding both is free.
    """

    __slots__ = ("_array", "_tensor")

    def __init__(self, array: Any):
        if tf.is_tensor(array):
            self._array, self._tensor = None, array
        else:
            self._array, self._tensor = array, None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self._tensor.numpy()
        return self._array

    def tensor(self, dtype) -> Any:
        if self._tensor is None or self._tensor.dtype != dtype:
            # `self.array`, not `_array`: a column cached for two executors' shards may be
            # converted by two threads at once, and the other may have just dropped `_array`.
            self._tensor = tf.convert_to_tensor(self.array, dtype)
            # One copy is enough: `.numpy()` of a CPU tensor shares its buffer.
            self._array = None if self._tensor.device.endswith("CPU:0") else self._array
        return self._tensor

    @property
    def size(self) -> int:
        return (self._array if self._array is not None else self._tensor).shape[0]

    def get(self, i: int) -> Any:
        return self.array[i]


class Broadcast:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def get(self, i: int) -> Any:
        return self.value


class PerClient:
    __slots__ = ("items",)

    def __init__(self, items: list):
        self.items = items

    def get(self, i: int) -> Any:
        return self.items[i]


class ShardValue:
    """A CLIENTS value of one shard: member type + one column per leaf."""

    __slots__ = ("type", "columns", "size")

    def __init__(self, member_type: t.Type, columns: list, size: int):
        self.type = member_type
        self.columns = columns
        self.size = size

    def client(self, i: int) -> Any:
        """Client i's value as a rep (a Struct tree of leaves)."""
        return structure.pack_type(self.type, [c.get(i) for c in self.columns])

    def clients(self) -> list[Any]:
        return [self.client(i) for i in range(self.size)]


def _is_tensor_leaf(leaf_type: t.Type) -> bool:
    return isinstance(leaf_type, t.TensorType) and leaf_type.dtype != np.dtype(object)


def _as_numpy(x: Any) -> Any:
    # numpy values first: tf.is_tensor checks a typing Protocol (~10-40 us a call), and a
    # CLIENTS list is converted value by value.
    if isinstance(x, (np.ndarray, np.generic)):
        return x
    return x.numpy() if tf.is_tensor(x) and not isinstance(x, tf.data.Dataset) else x


def leaves_by_column(member_type: t.Type, reps: list[Any]) -> list[tuple[t.Type, list[Any], bool]]:
    """Per leaf of `member_type`: (leaf type, every client's value, whether they stack).

    Values stack into one array when the leaf is a tensor and every client's
    shape agrees; shared by the in-process path and the worker transport.
    """
    leaf_types = structure.flatten_type(member_type)
    per_leaf: list[list[Any]] = [[] for _ in leaf_types]
    for rep in reps:
        for j, leaf in enumerate(structure.flatten(rep)):
            per_leaf[j].append(_as_numpy(leaf))
    return [
        (lt, items, _is_tensor_leaf(lt) and bool(items) and all(np.shape(x) == np.shape(items[0]) for x in items))
        for lt, items in zip(leaf_types, per_leaf)
    ]


def columns_from_clients(member_type: t.Type, reps: list[Any]) -> list:
    """Stacks per-client reps into columns (Batched where shapes agree)."""
    return [
        Batched(np.stack([np.asarray(x, dtype=lt.dtype) for x in items])) if stacks else PerClient(items)
        for lt, items, stacks in leaves_by_column(member_type, reps)
    ]


def columns_from_value(member_type: t.Type, rep: Any) -> list:
    return [Broadcast(_as_numpy(leaf)) for leaf in structure.flatten(rep)]


# --------------------------------------------------------------------------- shard


class ClientShard:
    """Holds the values of clients [start, stop) and runs per-shard intrinsics.

    Values are named by integer handles chosen by the parent, so a request
    never waits for a reply to learn a name. The parent sends one request
    (`shard_requests`) per shard per intrinsic; `run` dispatches it through
    `_HANDLERS`, an explicit table: nothing but those requests reaches a shard.
    `client_data` is the cache of built `ClientData` columns this shard shares
    with its owner's other shards (see `ClientDataCache`); `map_plans`, how its
    maps run (vectorized or looped, see `vectorized_map`), likewise shared with
    its owner's shards (a shard without an owner's makes its own).
    """

    def __init__(self, start: int, stop: int, device: str | None, client_data: ClientDataCache,
                 map_plans: MapPlans | None = None):
        if start % BLOCK_SIZE:
            raise ValueError(f"a shard must start on a block boundary (multiple of {BLOCK_SIZE}), got {start}.")
        self.start, self.stop = start, stop
        self.size = stop - start
        self.values: dict[int, ShardValue] = {}
        self.device = device
        #: Appended to error messages, e.g. " in worker slot 1" (set by the worker).
        self.location = ""
        self._leaf_stack = ReferenceResolvingExecutor(EagerTFExecutor(device))
        self._map_plans = map_plans if map_plans is not None else MapPlans()
        self._client_data = client_data
        client_data.attach()
        self._closed = False

    def run(self, request: rq.ShardRequest) -> Any:
        """Runs one request of the shard protocol; returns its reply (None for an acknowledgement)."""
        try:
            handler = _HANDLERS[type(request)]
        except KeyError:
            raise TypeError(f"a shard cannot run {type(request).__name__}; expected one of "
                            f"{', '.join(c.__name__ for c in _HANDLERS)}.") from None
        return handler(self, request)

    def close(self) -> None:
        """Drops every value; the shard must not be used afterwards."""
        self.values.clear()
        if not self._closed:
            self._closed = True
            self._client_data.detach()

    # ------------------------------------------------------------------ storage

    def put(self, handle: int, member_type: t.Type, reps: list[Any] | ClientData) -> None:
        """Stores one value per client of this shard (or builds them from ClientData)."""
        if isinstance(reps, ClientData):
            columns = self._client_data_columns(reps, member_type)
        else:
            if len(reps) != self.size:
                raise ValueError(f"shard [{self.start},{self.stop}) got {len(reps)} values for {self.size} clients.")
            columns = columns_from_clients(member_type, reps)
        self.values[handle] = ShardValue(member_type, columns, self.size)

    def _client_data_columns(self, data: ClientData, member_type: t.Type) -> list:
        """The stacked columns of a ClientData shard: built once, then reused as they are."""
        key = (data.key, self.start, self.stop)
        columns = self._client_data.get(key)
        if columns is None:
            reps = []
            for i in range(len(data)):
                path = f"ClientData client {data.client_ids[i]!r}"
                reps.append(values.to_representation(data.build(i), member_type, path))
            columns = columns_from_clients(member_type, reps)
            self._client_data.put(key, columns)
        if columns and len(data) != self.size:
            raise ValueError(f"shard [{self.start},{self.stop}) got ClientData for {len(data)} clients.")
        return columns

    def put_columns(self, handle: int, member_type: t.Type, columns: list) -> None:
        """Stores values that arrive already stacked in columns (from a worker pool)."""
        for column in columns:
            if isinstance(column, Batched) and column.size != self.size:
                raise ValueError(f"shard [{self.start},{self.stop}) got {column.size} values for {self.size} clients.")
        self.values[handle] = ShardValue(member_type, columns, self.size)

    def put_all_equal(self, handle: int, member_type: t.Type, rep: Any) -> None:
        """Stores one value shared by all clients of the shard (a broadcast)."""
        self.values[handle] = ShardValue(member_type, columns_from_value(member_type, rep), self.size)

    def get(self, handle: int) -> list[Any]:
        """Every client's value, as numpy reps (for `compute()`)."""
        return [structure.map_structure(_as_numpy, v) for v in self.values[handle].clients()]

    def get_first(self, handle: int) -> Any:
        return structure.map_structure(_as_numpy, self.values[handle].client(0))

    def release(self, handles: list[int]) -> None:
        for h in handles:
            self.values.pop(h, None)

    # ------------------------------------------------------------------ structure

    def zip(self, handle: int, parts: list[tuple[str | None, int]], container: type | None) -> None:
        vals = [(n, self.values[h]) for n, h in parts]
        member = t.StructType([(n, v.type) for n, v in vals], container)
        columns = [c for _, v in vals for c in v.columns]
        self.values[handle] = ShardValue(member, columns, self.size)

    def select(self, handle: int, source: int, index: int) -> None:
        value = self.values[source]
        leaf_counts = [len(structure.flatten_type(e)) for e in value.type]
        begin = sum(leaf_counts[:index])
        self.values[handle] = ShardValue(
            value.type[index], value.columns[begin : begin + leaf_counts[index]], self.size
        )

    # ------------------------------------------------------------------ computation

    def eval(self, handle: int, fn: bb.BuildingBlock) -> None:
        """federated_eval at CLIENTS: calls a no-argument function once per client."""
        with self._device_scope():
            outputs = [self._apply_for(i, fn, None) for i in range(self.size)]
        self.values[handle] = ShardValue(fn.type_signature.result, columns_from_clients(fn.type_signature.result, outputs), self.size)

    def map(self, handle: int, fn: bb.BuildingBlock, source: int) -> None:
        """federated_map: applies `fn` to every client's value of `source`."""
        value = self.values[source]
        result_type = fn.type_signature.result
        with self._device_scope():
            columns = self._map_columns(fn, value, result_type)
        self.values[handle] = ShardValue(result_type, columns, self.size)

    def _device_scope(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    def _map_columns(self, fn: bb.BuildingBlock, value: ShardValue, result_type: t.Type) -> list:
        if self._can_batch(fn, value):
            mask = tuple(isinstance(c, Batched) for c in value.columns)
            plan = self._map_plans.get(fn.function, mask)
            try:
                return self._map_batched(plan, value)
            except Exception as batched_error:  # noqa: BLE001 - find which client failed
                for i in range(self.size):
                    self._apply_for(i, fn, value.client(i))
                if not plan.vectorized:
                    raise with_client_context(
                        batched_error, f"clients {self.start}..{self.stop - 1}{self.location}"
                    ) from None
                # Every client runs alone: the vectorized form itself failed. Loop from now on.
                plan = self._map_plans.demote(fn.function, mask, f"{type(batched_error).__name__}: {batched_error}")
                return self._map_batched(plan, value)
        outputs = [self._apply_for(i, fn, value.client(i)) for i in range(self.size)]
        return columns_from_clients(result_type, outputs)

    def _apply_for(self, i: int, fn: bb.BuildingBlock, arg: Any) -> Any:
        """`_apply` for client i of this shard; errors say which client and where."""
        try:
            return self._apply(fn, arg)
        except Exception as e:  # noqa: BLE001 - re-raised with the client's index
            raise with_client_context(e, f"client {self.start + i}{self.location}") from None

    def _apply(self, fn: bb.BuildingBlock, arg: Any) -> Any:
        if isinstance(fn, bb.CompiledComputation):
            return call_function(fn, arg)
        stack = self._leaf_stack
        fn_value = run_sync(stack.create_value(fn))
        arg_value = None if arg is None else run_sync(stack.create_value(arg, fn.type_signature.parameter))
        return run_sync(run_sync(stack.create_call(fn_value, arg_value)).compute())

    def _can_batch(self, fn: bb.BuildingBlock, value: ShardValue) -> bool:
        # Not conditioned on the shard's size: a one-client shard must take the same path
        # (vectorized or looped) as the shards of any other split of the same clients.
        if not isinstance(fn, bb.CompiledComputation):
            return False
        if not all(isinstance(c, (Batched, Broadcast)) for c in value.columns):
            return False
        if not any(isinstance(c, Batched) for c in value.columns):
            return False
        leaves = structure.flatten_type(value.type) + structure.flatten_type(fn.type_signature.result)
        return all(_is_tensor_leaf(lt) and lt.is_fully_defined for lt in leaves)

    def _map_batched(self, plan: MapPlan, value: ShardValue) -> list:
        leaf_types = structure.flatten_type(value.type)
        mapped, fixed = [], []
        for column, lt in zip(value.columns, leaf_types):
            if isinstance(column, Batched):
                mapped.append(column.tensor(tfc.tf_dtype(lt.dtype)))
            else:
                fixed.append(tf.constant(column.value, tfc.tf_dtype(lt.dtype)))
        outputs = plan.run(mapped, fixed)
        return [Batched(o) for o in outputs]

    # ------------------------------------------------------------------ reductions

    def _blocks(self) -> list[tuple[int, int]]:
        return [(b, min(b + BLOCK_SIZE, self.size)) for b in range(0, self.size, BLOCK_SIZE)]

    def reduce(self, op: str, handle: int, weight: int | None = None) -> Any:
        """Per-block partials of sum / weighted sum / min / max, stacked per leaf.

        Returns a Struct tree (the member's shape) whose leaves have a leading
        block axis; for 'weighted_sum' a pair (sum of w*v, sum of w).
        """
        value = self.values[handle]
        leaf_types = structure.flatten_type(value.type)
        if op == "weighted_sum":
            w = _column_array(self.values[weight].columns[0], self.size)
            leaves = [
                _fold_blocks(_column_array(c, self.size) * w.astype(lt.dtype).reshape((-1,) + (1,) * len(lt.shape)), np.add)
                for c, lt in zip(value.columns, leaf_types)
            ]
            weights = _fold_blocks(w.astype(leaf_types[0].dtype), np.add)
            return Struct.unnamed(structure.pack_type(value.type, leaves), weights)
        ufunc = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op]
        leaves = [_fold_blocks(_column_array(c, self.size), ufunc) for c in value.columns]
        return structure.pack_type(value.type, leaves)

    def aggregate(self, handle: int, zero: Any, accumulate: bb.BuildingBlock) -> list[Any]:
        """Per-block partials of federated_aggregate: fold `accumulate` from `zero`."""
        value = self.values[handle]
        partials = []
        for begin, end in self._blocks():
            acc = zero
            for i in range(begin, end):
                acc = structure.map_structure(
                    _as_numpy, self._apply_for(i, accumulate, Struct.unnamed(acc, value.client(i)))
                )
            partials.append(acc)
        return partials


#: The shard protocol: request type -> how a shard runs it.
_HANDLERS: dict[type, Any] = {
    rq.Put: lambda s, r: s.put(r.handle, r.member_type, r.clients),
    rq.PutColumns: lambda s, r: s.put_columns(r.handle, r.member_type, r.columns),
    rq.PutAllEqual: lambda s, r: s.put_all_equal(r.handle, r.member_type, r.rep),
    rq.Get: lambda s, r: s.get(r.handle),
    rq.GetFirst: lambda s, r: s.get_first(r.handle),
    rq.Zip: lambda s, r: s.zip(r.handle, r.parts, r.container),
    rq.Select: lambda s, r: s.select(r.handle, r.source, r.index),
    rq.Eval: lambda s, r: s.eval(r.handle, r.fn),
    rq.Map: lambda s, r: s.map(r.handle, r.fn, r.source),
    rq.Reduce: lambda s, r: s.reduce(r.op, r.handle, r.weight),
    rq.Aggregate: lambda s, r: s.aggregate(r.handle, r.zero, r.accumulate),
}


# --------------------------------------------------------------------------- helpers


def _column_array(column: Any, size: int) -> np.ndarray:
    if isinstance(column, Batched):
        return column.array
    if isinstance(column, Broadcast):
        return np.broadcast_to(np.asarray(column.value), (size,) + np.shape(column.value))
    return np.stack([np.asarray(x) for x in column.items])


def _fold_blocks(array: np.ndarray, ufunc) -> np.ndarray:
    """Left fold of consecutive rows within each block; returns [num_blocks, ...].

    Row j of every block is combined in the same order (((x0 op x1) op x2)...),
    vectorised across blocks: elementwise IEEE operations, so the result of a
    block does not depend on how many blocks are computed together.
    """
    n = array.shape[0]
    full, rest = divmod(n, BLOCK_SIZE)
    parts = []
    if full:
        blocks = array[: full * BLOCK_SIZE].reshape((full, BLOCK_SIZE) + array.shape[1:])
        acc = np.array(blocks[:, 0])
        for j in range(1, BLOCK_SIZE):
            acc = ufunc(acc, blocks[:, j])
        parts.append(acc)
    if rest:
        tail = array[full * BLOCK_SIZE :]
        acc = np.array(tail[0])
        for j in range(1, rest):
            acc = ufunc(acc, tail[j])
        parts.append(acc[None])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def merge_partials(partials: list[Any], ufunc=np.add) -> Any:
    """Folds stacked block partials (from shards, in client order) left to right."""
    stacked = structure.map_structure(lambda *xs: np.concatenate(xs), *partials) if len(partials) > 1 else partials[0]

    def fold(x):
        acc = np.array(x[0])
        for k in range(1, x.shape[0]):
            acc = ufunc(acc, x[k])
        return acc

    return structure.map_structure(fold, stacked)
