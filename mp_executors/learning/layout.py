"""The layout of one client's data for `mpx.learning`, checked against a model before any work.

Every client of a call has the same structure and shapes (what keeps a shard's clients in ONE
TensorFlow call, and vectorizable):

    <x=X[N, ...], y=Y[N, ...], mask=float32[N]>          mask optional (absent: all N are real)

or a struct holding that under a name (`split=`, e.g. the main job's
`<id=int32, train=<x,y,mask>, test=<x,y,mask>>` with split="train"), optionally with an int32
scalar `id` next to it, which keys the client's minibatch shuffling. Real examples may sit
anywhere; padded rows (mask 0) count for nothing. `N` must be known (a fixed padded size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.learning.models import Model


@dataclass(frozen=True)
class Layout:
    """Where a client's examples, mask and id are in its element type."""

    element_type: Any
    split: str | None
    size: int
    has_mask: bool
    has_id: bool

    def examples(self, element: Any) -> tuple[Any, Any, Any]:
        """(x, y, mask) tensors of one client inside a tf_computation (mask made if absent)."""
        data = element[self.split] if self.split is not None else element
        x, y = data["x"], data["y"]
        mask = data["mask"] if self.has_mask else tf.ones([self.size], tf.float32)
        return x, y, mask

    def client_id(self, element: Any) -> Any:
        """The client's int32 id (0 when the data has none)."""
        return tf.cast(element["id"], tf.int32) if self.has_id else tf.constant(0, tf.int32)


def _names(struct_type: Any) -> list[str]:
    return [n for n in struct_type.names() if n is not None] if isinstance(struct_type, mpx.StructType) else []


def element_type_of(client_data: Any, what: str) -> Any:
    """The per-client type of a ClientData or a list of per-client values; clear errors otherwise."""
    if isinstance(client_data, mpx.ClientData):
        return client_data.element_type
    if isinstance(client_data, (list, tuple)):
        if not client_data:
            raise ValueError(f"{what}: client_data is empty; give at least one client.")
        first = mpx.infer_type(client_data[0])
        for i, c in enumerate(client_data[1:], start=1):
            other = mpx.infer_type(c)
            if other != first:
                raise ValueError(
                    f"{what}: client {i} has type {other} but client 0 has {first}; every client must have "
                    "the same structure and shapes (pad to a common size with a mask).")
        return first
    raise TypeError(f"{what}: client_data must be an mpx.ClientData or a list of per-client values, "
                    f"got {type(client_data).__name__}.")


def layout_for(model: Model, element_type: Any, split: str | None, what: str) -> Layout:
    """Checks `element_type` against the model (names, dtypes, shapes) and returns its Layout."""
    where = f"client data ({element_type})"
    if not isinstance(element_type, mpx.StructType):
        raise TypeError(f"{what}: {where} must be a struct with 'x' and 'y' (and optionally 'mask').")
    has_id = "id" in _names(element_type)
    if has_id:
        id_t = element_type["id"]
        if not (isinstance(id_t, mpx.TensorType) and id_t.shape == () and np.issubdtype(id_t.dtype, np.integer)):
            raise TypeError(f"{what}: the client's 'id' must be an integer scalar, got {id_t}.")
    data_t = element_type
    if split is not None:
        if split not in _names(element_type):
            raise ValueError(f"{what}: split={split!r} but {where} has no member {split!r} "
                             f"(members: {_names(element_type)}).")
        data_t = element_type[split]
    names = _names(data_t)
    missing = [n for n in ("x", "y") if n not in names]
    if missing:
        hint = "" if split is not None else " (use split= to name a member holding them)"
        raise ValueError(f"{what}: the client's examples must have members 'x' and 'y' (and optionally "
                         f"'mask'); {data_t} has no {missing}{hint}.")
    x_t, y_t = data_t["x"], data_t["y"]
    for name, got, spec in (("x", x_t, model.x_spec), ("y", y_t, model.y_spec)):
        if not isinstance(got, mpx.TensorType) or len(got.shape) != len(spec.shape) or got.dtype != spec.dtype \
                or any(s is not None and g != s for g, s in zip(got.shape[1:], spec.shape[1:])):
            raise TypeError(f"{what}: the clients' {name!r} is {got}; the model takes batches of {spec} "
                            f"(one client: {spec.dtype}[N{''.join(f',{d}' for d in spec.shape[1:])}]).")
    size = x_t.shape[0]
    if size is None or y_t.shape[0] != size:
        raise ValueError(f"{what}: every client's 'x' and 'y' must have the same, known number of rows "
                         f"(pad clients to one size with a mask), got x {x_t} and y {y_t}.")
    has_mask = "mask" in names
    if has_mask:
        m_t = data_t["mask"]
        if not (isinstance(m_t, mpx.TensorType) and m_t.dtype == np.float32 and m_t.shape == (size,)):
            raise TypeError(f"{what}: 'mask' must be float32[{size}] (1 for a real row, 0 for padding), got {m_t}.")
    return Layout(element_type, split, int(size), has_mask, has_id)
