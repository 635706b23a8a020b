"""The shard protocol: the requests a `FederatingExecutor` sends to its shards.

Each intrinsic becomes one request per shard (see `federating_executor`); a
request is one of the frozen dataclasses below, and a `ClientShard` runs it
through an explicit table (`ClientShard.run`), so the set of things a parent
can ask a shard (in this process or in a worker process) is exactly this list:

    Put(handle, member_type, clients)       store one value per client (or a ClientData)
    PutColumns(handle, member_type, columns) the same, already stacked in columns (worker pool)
    PutAllEqual(handle, member_type, rep)   store one value shared by every client
    Get(handle) / GetFirst(handle)          read values back (compute())
    Zip(handle, parts, container)           column bookkeeping, no data moves
    Select(handle, source, index)
    Eval(handle, fn)                        federated_eval at CLIENTS
    Map(handle, fn, source)                 federated_map
    Reduce(op, handle, weight)              per-block partials of sum/min/max/weighted_sum
    Aggregate(handle, zero, accumulate)     per-block partials of federated_aggregate

`verb` names a request in errors and in the worker's fault-injection phases
("put", "map", ...). `function_fields` name the fields that may hold compiled
computations: the worker transport sends each of those to a worker once and
refers to it by digest afterwards (`transport.strip_known_functions`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mp_executors.core import building_blocks as bb
from mp_executors.core import types as t


@dataclass(frozen=True)
class ShardRequest:
    """Base of every shard request."""

    verb: ClassVar[str] = ""
    function_fields: ClassVar[tuple[str, ...]] = ()

    def replace(self, **changes: Any) -> ShardRequest:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Put(ShardRequest):
    handle: int
    member_type: t.Type
    clients: Any  # list of per-client reps, or a ClientData subset

    verb: ClassVar[str] = "put"


@dataclass(frozen=True)
class PutColumns(ShardRequest):
    handle: int
    member_type: t.Type
    columns: list  # encoded for the trip (transport.encode_columns), decoded by the worker

    verb: ClassVar[str] = "put"


@dataclass(frozen=True)
class PutAllEqual(ShardRequest):
    handle: int
    member_type: t.Type
    rep: Any

    verb: ClassVar[str] = "put_all_equal"


@dataclass(frozen=True)
class Get(ShardRequest):
    handle: int

    verb: ClassVar[str] = "get"


@dataclass(frozen=True)
class GetFirst(ShardRequest):
    handle: int

    verb: ClassVar[str] = "get_first"


@dataclass(frozen=True)
class Zip(ShardRequest):
    handle: int
    parts: tuple[tuple[str | None, int], ...]
    container: type | None

    verb: ClassVar[str] = "zip"


@dataclass(frozen=True)
class Select(ShardRequest):
    handle: int
    source: int
    index: int

    verb: ClassVar[str] = "select"


@dataclass(frozen=True)
class Eval(ShardRequest):
    handle: int
    fn: bb.BuildingBlock

    verb: ClassVar[str] = "eval"
    function_fields: ClassVar[tuple[str, ...]] = ("fn",)


@dataclass(frozen=True)
class Map(ShardRequest):
    handle: int
    fn: bb.BuildingBlock
    source: int

    verb: ClassVar[str] = "map"
    function_fields: ClassVar[tuple[str, ...]] = ("fn",)


@dataclass(frozen=True)
class Reduce(ShardRequest):
    op: str  # 'sum' | 'min' | 'max' | 'weighted_sum'
    handle: int
    weight: int | None = None

    verb: ClassVar[str] = "reduce"

    def __post_init__(self):
        if self.op not in ("sum", "min", "max", "weighted_sum"):
            raise ValueError(f"Reduce: unknown op {self.op!r}; expected sum, min, max or weighted_sum.")


@dataclass(frozen=True)
class Aggregate(ShardRequest):
    handle: int
    zero: Any
    accumulate: bb.BuildingBlock

    verb: ClassVar[str] = "aggregate"
    function_fields: ClassVar[tuple[str, ...]] = ("accumulate",)


__all__ = [
    "Aggregate", "Eval", "Get", "GetFirst", "Map", "Put", "PutAllEqual", "PutColumns", "Reduce", "Select",
    "ShardRequest", "Zip",
]
