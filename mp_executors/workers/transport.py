"""Moving client columns and compiled functions from the parent to a worker.

A CLIENTS argument arrives as one value per client. The parent stacks each
leaf into one array per shard (`client_shard.leaves_by_column`) and, for
arrays of at least `SHARED_MEMORY_THRESHOLD` bytes, writes it straight into a
POSIX shared-memory segment: the request then carries only the segment's name,
shape and dtype, and the worker copies it out once (FACTS: ~160 ms per
100 MiB instead of ~580 ms as a pickled argument).

Who owns what:

- Parent side, `SegmentPool` (one per worker slot, closed with the slot):
  every segment it created, named `mpx_<parent pid>_<random>` so that a test
  or an operator can tell ours in /dev/shm. A request leases segments
  (`Segments`) when it is prepared and gives them back to the pool when it has
  completed, failed, or was never sent; `leased` counts what is out.
- Worker side, `AttachedSegments` (owned by the worker process's
  `workers.worker.Worker`): the segments it has mapped, the most recent few
  kept mapped for the next request.
- Progress: each slot's `SegmentPool` also owns one 16-byte cell
  (`ProgressCell`) in which its worker notes which request of which message
  it is running, so that when the worker dies the parent can say during
  which request (`pool.Outbox`).
- Errors: an exception a request raised in the worker travels back as a
  `RemoteError` and arrives as the exception itself, its worker-side
  traceback attached as `__cause__` (as loky does for a task's exception).
- Functions: `strip_known_functions` replaces every compiled computation the
  worker already has by its digest; the caller records a digest as known only
  once the request carrying the function was actually submitted.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import secrets
import struct
import threading
import traceback
from collections import OrderedDict
from concurrent.futures.process import _RemoteTraceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # importing mp_executors.executors imports TensorFlow; a worker must pin itself first
    from mp_executors.executors.shard_requests import ShardRequest

SHARED_MEMORY_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class SharedArray:
    """A picklable reference to an array in a shared-memory segment."""

    name: str
    shape: tuple[int, ...]
    dtype: str


#: Every segment a SegmentPool creates is named f"{SEGMENT_PREFIX}_{parent pid}_{random}".
SEGMENT_PREFIX = "mpx"


class SegmentPool:
    """Shared-memory segments kept for reuse, owned by one worker slot.

    Writing into a fresh segment page-faults every page (~10 ms per 15 MB
    here); a segment reused from the previous call is already mapped on both
    sides, so moving a round's client data costs two memcpys. A segment is
    leased for the duration of one request; concurrent requests get distinct
    segments. Leases are given back from the event loop (a request never
    sent) or from the executor's result thread (a request completed), hence
    the lock. `close()` unlinks everything (the resource tracker does it if
    the parent is killed).
    """

    def __init__(self):
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []
        self._progress: tuple[shared_memory.SharedMemory, ProgressCell] | None = None
        self._lock = threading.Lock()

    def lease(self) -> Segments:
        return Segments(self)

    @property
    def leased(self) -> int:
        """How many segments requests hold right now (0 between calls)."""
        with self._lock:
            return len(self._all) - len(self._free)

    def names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._all] + ([self._progress[0].name] if self._progress else [])

    def progress(self) -> tuple[str, ProgressCell]:
        """The slot's progress cell (made on first use, kept until `close`): its name and the cell."""
        with self._lock:
            if self._progress is None:
                segment = _create_segment(ProgressCell.LAYOUT.size)
                self._progress = segment, ProgressCell(segment.buf)
            return self._progress[0].name, self._progress[1]

    def _take(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fitting = [s for s in self._free if s.size >= nbytes]
            if fitting:
                best = min(fitting, key=lambda s: s.size)
                self._free.remove(best)
                return best
            if self._free and sum(s.size for s in self._free) > 4 * nbytes:
                self._drop(self._free.pop(0))  # too many small segments: let one go
            segment = _create_segment(max(nbytes + nbytes // 4, 1))
            self._all.append(segment)
            return segment

    def _give_back(self, segments: list[shared_memory.SharedMemory]) -> None:
        with self._lock:
            self._free.extend(s for s in segments if s in self._all and s not in self._free)

    def _drop(self, segment: shared_memory.SharedMemory) -> None:
        self._all.remove(segment)
        _close_and_unlink(segment)

    def close(self) -> None:
        with self._lock:
            for segment in list(self._all):
                self._drop(segment)
            self._free = []
            if self._progress is not None:
                segment, cell = self._progress
                self._progress = None
                cell.release()
                _close_and_unlink(segment)


def _close_and_unlink(segment: shared_memory.SharedMemory) -> None:
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


class ProgressCell:
    """Which request of which message a worker is running: two int64 in shared memory.

    The worker writes (message number, request index) before each request of a
    message (`service.Worker.handle_batch`); the parent reads it only once the
    worker is dead, to tell during which request it died. Zero-filled at
    creation: message numbers start at 1.
    """

    LAYOUT = struct.Struct("<qq")

    def __init__(self, buf: memoryview):
        self._buf = buf

    def mark(self, message: int, index: int) -> None:
        self.LAYOUT.pack_into(self._buf, 0, message, index)

    def read(self) -> tuple[int, int]:
        return self.LAYOUT.unpack_from(self._buf, 0)

    def release(self) -> None:
        self._buf = None


def _create_segment(size: int) -> shared_memory.SharedMemory:
    while True:
        name = f"{SEGMENT_PREFIX}_{os.getpid()}_{secrets.token_hex(6)}"
        try:
            return shared_memory.SharedMemory(name=name, create=True, size=size)
        except FileExistsError:  # a 48-bit collision: draw again
            continue


class Segments:
    """The segments one request leased; `release()` (idempotent) gives them back."""

    def __init__(self, pool: SegmentPool | None = None, inline: bool = False):
        self._pool = pool if pool is not None else SegmentPool()
        self._owned_pool = pool is None
        self._inline = inline  # never use shared memory: arrays travel in the request
        self._segments: list[shared_memory.SharedMemory] = []

    def stack(self, items: list[Any], dtype: np.dtype) -> SharedArray | np.ndarray:
        first = np.asarray(items[0])
        shape = (len(items),) + first.shape
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._inline or nbytes < SHARED_MEMORY_THRESHOLD:
            return np.stack([np.asarray(x, dtype=dtype) for x in items])
        segment = self._pool._take(nbytes)
        self._segments.append(segment)
        out = np.ndarray(shape, dtype=dtype, buffer=segment.buf)
        np.stack([np.asarray(x) for x in items], out=out, casting="same_kind")
        del out
        return SharedArray(segment.name, shape, np.dtype(dtype).str)

    def release(self) -> None:
        segments, self._segments = self._segments, []
        self._pool._give_back(segments)
        if self._owned_pool:
            self._pool.close()


class AttachedSegments:
    """Worker side: the parent's segments this process has mapped, by name.

    Owned by the worker process's `Worker`; the `limit` most recently used
    stay mapped (a pool's segments are reused call after call), older ones are
    unmapped. Attaching registers nothing new with the resource tracker that
    matters: on Python 3.11 loky workers share the parent's tracker, and the
    parent unlinks the segments it created.
    """

    def __init__(self, limit: int = 16):
        self.limit = limit
        self._mapped: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()

    def _attach(self, name: str) -> shared_memory.SharedMemory:
        segment = self._mapped.pop(name, None)
        if segment is None:
            segment = shared_memory.SharedMemory(name=name)
            while len(self._mapped) >= self.limit:
                self._mapped.popitem(last=False)[1].close()
        self._mapped[name] = segment
        return segment

    def names(self) -> list[str]:
        return list(self._mapped)

    def progress(self, name: str) -> ProgressCell:
        """The parent's progress cell `name` for this worker's slot (see `ProgressCell`)."""
        return ProgressCell(self._attach(name).buf)

    def read(self, ref: SharedArray) -> Any:
        """An eager tensor holding a private copy of a shared array.

        Copied, because the parent reuses the segment for its next request;
        TensorFlow then aliases the private copy, so numpy views of the column
        cost nothing more.
        """
        from mp_executors._tf import tf  # noqa: PLC0415 - imported after the worker pinned itself

        view = np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=self._attach(ref.name).buf)
        try:
            return tf.convert_to_tensor(np.array(view))
        finally:
            del view

    def decode_columns(self, columns: list[tuple[str, Any]]) -> list[Any]:
        """Columns as sent by `encode_columns` -> the shard's column objects."""
        from mp_executors.executors.client_shard import Batched, PerClient  # noqa: PLC0415 - imports TF

        decoded = []
        for kind, payload in columns:
            if kind == "batched":
                decoded.append(Batched(self.read(payload) if isinstance(payload, SharedArray) else payload))
            elif kind == "datasets":
                sequence_type, graphs = payload
                decoded.append(PerClient([dataset_from_graph(g, sequence_type) for g in graphs]))
            else:
                decoded.append(PerClient(payload))
        return decoded

    def close(self) -> None:
        while self._mapped:
            self._mapped.popitem(last=False)[1].close()


def encode_columns(member_type: Any, reps: list[Any], segments: Segments, first_client: int = 0) -> list[tuple[str, Any]]:
    """Per-client reps -> columns ready to send: ('batched', array|SharedArray) or ('per_client', list)."""
    from mp_executors.core import tensorflow_computation as tfc  # noqa: PLC0415
    from mp_executors.core import types as t  # noqa: PLC0415
    from mp_executors.executors.client_shard import leaves_by_column  # noqa: PLC0415

    columns = []
    for lt, items, stacks in leaves_by_column(member_type, reps):
        if stacks:
            columns.append(("batched", segments.stack(items, lt.dtype)))
        elif isinstance(lt, t.SequenceType):
            graphs = [portable_dataset_graph(tfc.as_dataset(ds, lt), first_client + i) for i, ds in enumerate(items)]
            columns.append(("datasets", (lt, graphs)))
        else:
            columns.append(("per_client", items))
    return columns


def portable_dataset_graph(dataset: Any, client: int) -> bytes:
    """A dataset as its serialized graph (it pickles, and rebuilds in any process).

    A dataset that needs this process's Python (from_generator, py_function)
    cannot be rebuilt elsewhere: TypeError naming the client, before any work
    is sent (external_state_policy=2 is FAIL).
    """
    from mp_executors._tf import tf  # noqa: PLC0415

    try:
        graph = tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor, external_state_policy=2)
    except Exception as e:  # noqa: BLE001 - TensorFlow reports this in several ways
        raise TypeError(
            f"client {client}'s dataset cannot be sent to a worker process: it depends on Python state in "
            f"this process (from_generator, py_function, ...): {type(e).__name__}. Build it from tensors "
            "(from_tensor_slices), in the workers with mpx.ClientData, or run on mpx.local_executor_factory()."
        ) from None
    return graph.numpy()


def dataset_from_graph(graph: bytes, sequence_type: Any) -> Any:
    from mp_executors._tf import tf  # noqa: PLC0415
    from mp_executors.core import tensorflow_computation as tfc  # noqa: PLC0415

    variant = tf.raw_ops.DatasetFromGraph(graph_def=graph)
    return tf.data.experimental.from_variant(variant, tfc.element_spec(sequence_type.element))


# --------------------------------------------------------------------------- errors


class RemoteError:
    """An exception raised by a request in a worker, as it travels back to the parent.

    Unpickles as the exception itself with the worker-side traceback as its
    `__cause__` (what loky does for a task that raises). An exception that
    does not pickle travels as a RuntimeError naming its type and message.
    """

    def __init__(self, error: BaseException):
        self.traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.dumps(error)
            self.error = error
        except Exception:  # noqa: BLE001 - whatever stops it pickling, send what can be
            self.error = RuntimeError(f"{type(error).__name__}: {error} (the exception itself cannot be pickled)")

    def __reduce__(self):
        return _rebuild_error, (self.error, f'\n"""\n{self.traceback}"""')


def _rebuild_error(error: BaseException, tb: str) -> BaseException:
    error.__cause__ = _RemoteTraceback(tb)
    return error


# --------------------------------------------------------------------------- functions


@dataclass(frozen=True)
class FunctionRef:
    """Stands for a TensorFlowFunction the worker has already received."""

    digest: str


def _rebuild(node: Any, replace) -> Any:
    """Copies an AST, passing every CompiledComputation's function through `replace`."""
    from mp_executors.core import building_blocks as bb  # noqa: PLC0415

    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        return type(node)(_rebuild(x, replace) for x in node)
    if not isinstance(node, bb.BuildingBlock):
        return node
    if isinstance(node, bb.CompiledComputation):
        copy = object.__new__(bb.CompiledComputation)
        copy.function, copy.type_signature = replace(node.function), node.type_signature
        return copy
    fields = {
        bb.Lambda: ("body",), bb.Block: ("locals", "result"), bb.Call: ("function", "argument"),
        bb.Struct: ("elements",), bb.Selection: ("source",),
    }.get(type(node))
    if fields is None:
        return node
    copy = object.__new__(type(node))
    for cls in type(node).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(node, slot):
                object.__setattr__(copy, slot, getattr(node, slot))
    if isinstance(node, bb.Lambda):
        copy._free = None
    for name in fields:
        value = getattr(node, name)
        if name in ("locals", "elements"):
            value = tuple((n, _rebuild(v, replace)) for n, v in value)
        else:
            value = _rebuild(value, replace)
        object.__setattr__(copy, name, value)
    return copy


def strip_known_functions(request: ShardRequest, known: set[str]) -> tuple[ShardRequest, list[Any]]:
    """Replaces every compiled computation of `request` by a FunctionRef; returns (request, new functions).

    `new functions` are those whose digest is not in `known`: they travel with
    the request. `known` is NOT updated: the caller adds the new digests once
    the request is actually on its way (a request that is never sent must not
    leave the worker believed to have functions it never received). A
    compiled computation therefore crosses to each worker once; later
    requests carry its 64-character digest.
    """
    if not request.function_fields:
        return request, []
    new: dict[str, Any] = {}

    def replace(function):
        if function.digest not in known:
            new[function.digest] = function
        return FunctionRef(function.digest)

    changes = {name: _rebuild(getattr(request, name), replace) for name in request.function_fields}
    return dataclasses.replace(request, **changes), list(new.values())


def resolve_functions(request: ShardRequest, registry: dict[str, Any]) -> ShardRequest:
    """Worker side: FunctionRefs -> the compiled computations in `registry`."""
    if not request.function_fields:
        return request

    def replace(ref):
        if isinstance(ref, FunctionRef):
            try:
                return registry[ref.digest]
            except KeyError:
                raise RuntimeError(
                    f"worker has no compiled computation {ref.digest[:12]}; it was restarted without "
                    "being sent its functions again (a bug in mp_executors)."
                ) from None
        return ref

    changes = {name: _rebuild(getattr(request, name), replace) for name in request.function_fields}
    return dataclasses.replace(request, **changes)
