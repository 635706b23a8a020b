"""Client datasets of a TFF call, sent to the workers once and kept there.

What it owns: turning a CLIENTS argument of `tf.data.Dataset`s (one per
client, as tff.learning takes them) into a `ClientData` description whose
"client ids" are the datasets' serialized graphs, so that

- each worker receives only its own clients' graphs (a ClientData is split by
  client range) and rebuilds each dataset once: the built datasets stay in
  the worker's client-data cache under a key derived from the graphs'
  digests, so the same datasets passed again next round are not rebuilt;
- each dataset is serialized once in the parent (`SerializedDataset`s are
  kept per dataset object, weakly), and its graph crosses to a worker once:
  a worker keeps the datasets it rebuilt by digest (`_built`, bounded), and
  once a call with them succeeded the parent sends their digests only
  (`TffExecutorFactory` keeps what it shipped). A worker that does not have a
  dataset (restarted, evicted, resized pool) says so (`DatasetNotInWorker`)
  and the parent sends the graphs again. A program that passes the same
  dataset objects every round (the usual TFF simulation loop) pays for them
  in the first round only.

Datasets that depend on this process's Python (`from_generator`,
`py_function`) cannot be rebuilt elsewhere: they are refused here, before any
work, naming the client.

This module does not import TensorFlow Federated: the workers import it (to
rebuild datasets) without paying for TFF.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import weakref
from typing import Any

from mp_executors._tf import tf
from mp_executors.core.client_data import ClientData
from mp_executors.workers import transport


class SerializedDataset:
    """One dataset as its graph (or its digest only); it pickles; its repr stays short."""

    __slots__ = ("graph", "digest")

    def __init__(self, graph: bytes | None, digest: str):
        self.graph = graph
        self.digest = digest

    def __repr__(self) -> str:
        return f"dataset<{self.digest[:12]}>"

    def __reduce__(self):
        return (SerializedDataset, (self.graph, self.digest))

    def without_graph(self) -> SerializedDataset:
        return SerializedDataset(None, self.digest)


class DatasetNotInWorker(LookupError):
    """A worker was sent a dataset's digest but does not hold that dataset."""


#: Worker side: datasets rebuilt in this process, by digest, least recently used
#: first; at most `BUILT_BYTES_LIMIT` bytes of their graphs.
BUILT_BYTES_LIMIT = 2 << 30
_built: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
_built_bytes = 0
_built_lock = threading.Lock()


class DatasetBuilder:
    """The ClientData function: a SerializedDataset -> the dataset, rebuilt here (or kept from before)."""

    def __init__(self, element_spec: Any):
        self.element_spec = element_spec

    def __call__(self, serialized: SerializedDataset) -> Any:
        global _built_bytes
        with _built_lock:
            found = _built.get(serialized.digest)
            if found is not None:
                _built.move_to_end(serialized.digest)
                return found[0]
        if serialized.graph is None:
            raise DatasetNotInWorker(
                f"mp_executors.tff: dataset {serialized.digest[:12]} is not in this worker (its graph is resent)."
            )
        variant = tf.raw_ops.DatasetFromGraph(graph_def=serialized.graph)
        dataset = tf.data.experimental.from_variant(variant, self.element_spec)
        with _built_lock:
            _built[serialized.digest] = (dataset, len(serialized.graph))
            _built_bytes += len(serialized.graph)
            while _built_bytes > BUILT_BYTES_LIMIT and len(_built) > 1:
                _, (_, size) = _built.popitem(last=False)
                _built_bytes -= size
        return dataset


def is_missing_dataset(error: BaseException) -> bool:
    """Whether a call failed because a worker lacked a dataset sent by digest only."""
    return isinstance(error, DatasetNotInWorker) or "DatasetNotInWorker" in str(error) or \
        "is not in this worker (its graph is resent)" in str(error)


_serialized: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_serialized_lock = threading.Lock()


def serialize(dataset: Any, client: int) -> SerializedDataset:
    """The dataset's graph and digest; computed once per dataset object."""
    with _serialized_lock:
        found = _serialized.get(dataset)
    if found is not None:
        return found
    graph = transport.portable_dataset_graph(dataset, client)
    found = SerializedDataset(graph, hashlib.sha256(graph).hexdigest())
    with _serialized_lock:
        _serialized[dataset] = found
    return found


def is_dataset_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, tf.data.Dataset) for v in value)


def as_client_data(datasets: list, element_type: Any, shipped: set[str] | frozenset = frozenset()) -> ClientData:
    """A list of client datasets as a ClientData the workers build (and cache) their part of.

    The datasets of a ClientData whose key is in `shipped` travel as digests only.
    """
    specs = {repr(d.element_spec) for d in datasets}
    if len(specs) != 1:
        raise TypeError(f"the client datasets have different element structures: {sorted(specs)}.")
    serialized = [serialize(d, i) for i, d in enumerate(datasets)]
    key = client_data_key(serialized, element_type)
    if key in shipped:
        serialized = [s.without_graph() for s in serialized]
    data = ClientData(DatasetBuilder(datasets[0].element_spec), serialized, element_type)
    data.key = key
    return data


def client_data_key(serialized: list[SerializedDataset], element_type: Any) -> str:
    """The workers cache what they built by this key: the same datasets give the same key."""
    combined = hashlib.sha256("".join(s.digest for s in serialized).encode())
    combined.update(repr(element_type).encode())
    return "tff-datasets-" + combined.hexdigest()
