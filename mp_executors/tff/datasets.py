"""Client datasets of a TFF call, sent to the workers once and kept there.

What it owns: turning a CLIENTS argument of `tf.data.Dataset`s (one per
client, as tff.learning takes them) into a `ClientData` description whose
"client ids" are the datasets' serialized graphs, so that

- each worker receives only its own clients' graphs (a ClientData is split by
  client range) and rebuilds each dataset once: the built datasets stay in
  the worker's client-data cache under a key derived from the graphs'
  digests, so the same datasets passed again next round are not rebuilt;
- each dataset is serialized once in the parent (`SerializedDataset`s are
  kept per dataset object, weakly): a program that passes the same dataset
  objects every round (the usual TFF simulation loop) pays nothing for them
  after the first round but the bytes' trip.

Datasets that depend on this process's Python (`from_generator`,
`py_function`) cannot be rebuilt elsewhere: they are refused here, before any
work, naming the client.

This module does not import TensorFlow Federated: the workers import it (to
rebuild datasets) without paying for TFF.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any

from mp_executors._tf import tf
from mp_executors.core.client_data import ClientData


class SerializedDataset:
    """One dataset as its graph (it pickles); its repr stays short."""

    __slots__ = ("graph", "digest")

    def __init__(self, graph: bytes, digest: str):
        self.graph = graph
        self.digest = digest

    def __repr__(self) -> str:
        return f"dataset<{self.digest[:12]}>"

    def __reduce__(self):
        return (SerializedDataset, (self.graph, self.digest))


class DatasetBuilder:
    """The ClientData function: a SerializedDataset -> the dataset, rebuilt here."""

    def __init__(self, element_spec: Any):
        self.element_spec = element_spec

    def __call__(self, serialized: SerializedDataset) -> Any:
        variant = tf.raw_ops.DatasetFromGraph(graph_def=serialized.graph)
        return tf.data.experimental.from_variant(variant, self.element_spec)


_serialized: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_serialized_lock = threading.Lock()


def serialize(dataset: Any, client: int) -> SerializedDataset:
    """The dataset's graph and digest; computed once per dataset object."""
    with _serialized_lock:
        found = _serialized.get(dataset)
    if found is not None:
        return found
    try:
        # external_state_policy=2 (FAIL): refuse what cannot be rebuilt elsewhere.
        graph = tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor, external_state_policy=2).numpy()
    except Exception as e:  # noqa: BLE001 - TensorFlow reports this in several ways
        raise TypeError(
            f"client {client}'s dataset cannot be sent to a worker process: it depends on Python state in "
            f"this process (from_generator, py_function, ...): {type(e).__name__}. Build it from tensors "
            "(e.g. from_tensor_slices), or use mpx.local_executor_factory()."
        ) from None
    found = SerializedDataset(graph, hashlib.sha256(graph).hexdigest())
    with _serialized_lock:
        _serialized[dataset] = found
    return found


def is_dataset_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, tf.data.Dataset) for v in value)


def as_client_data(datasets: list, element_type: Any) -> ClientData:
    """A list of client datasets as a ClientData the workers build (and cache) their part of."""
    specs = {repr(d.element_spec) for d in datasets}
    if len(specs) != 1:
        raise TypeError(f"the client datasets have different element structures: {sorted(specs)}.")
    serialized = [serialize(d, i) for i, d in enumerate(datasets)]
    data = ClientData(DatasetBuilder(datasets[0].element_spec), serialized, element_type)
    # The workers cache what they built by this key: the same datasets give the same key.
    combined = hashlib.sha256("".join(s.digest for s in serialized).encode())
    combined.update(repr(element_type).encode())
    data.key = "tff-datasets-" + combined.hexdigest()
    return data
