"""`ClientData`: a picklable description from which workers build client data.

Passing client data as values moves every byte through the parent on every
call. A `ClientData(fn, client_ids)` instead travels as a few bytes; each
worker calls `fn(client_id)` for the clients of its own shard and keeps the
result resident (cached by the description's `key`) for later calls, so the
data of a simulation never crosses a process boundary.

`fn` must be importable or cloudpickle-able (a module-level function or a
lambda over picklable values), deterministic in `client_id`, and return a
value of `element_type` (numpy arrays, nested structures, or a tf.data.Dataset).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from mp_executors.core import types as t
from mp_executors.core.type_inference import infer_type


class ClientData:
    """Client data described by a builder function and a list of client ids."""

    def __init__(self, fn: Callable[[Any], Any], client_ids: Sequence[Any], element_type: Any = None):
        if not callable(fn):
            raise TypeError(f"ClientData: fn must be callable (client_id -> data), got {type(fn).__name__}.")
        try:
            cloudpickle.dumps(fn)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the workers cannot get it
            raise TypeError(
                f"ClientData: fn {getattr(fn, '__name__', fn)!r} cannot be sent to worker processes "
                f"({type(e).__name__}: {e}); use a module-level function over picklable values."
            ) from None
        self.fn = fn
        if isinstance(client_ids, (str, bytes)) or not hasattr(client_ids, "__iter__"):
            raise TypeError(
                f"ClientData: client_ids must be a sequence of client ids (e.g. range(100)), "
                f"got {type(client_ids).__name__} {client_ids!r}."
            )
        self.client_ids = list(client_ids)
        if not self.client_ids:
            raise ValueError("ClientData: client_ids is empty; give at least one client id.")
        if element_type is None:
            sample = fn(self.client_ids[0])
            try:
                element_type = infer_type(sample)
            except TypeError as e:
                raise TypeError(
                    f"ClientData: fn({self.client_ids[0]!r}) returned a value whose type cannot be inferred "
                    f"({e}); return numpy arrays or structures of them, or pass element_type=."
                ) from None
        try:
            self.element_type = t.to_type(element_type)
        except TypeError as e:
            raise TypeError(f"ClientData: element_type {element_type!r} is not a type ({e}).") from None
        # Identifies this description across calls: workers cache built data by it.
        self.key = uuid.uuid4().hex

    @property
    def federated_type(self) -> t.FederatedType:
        """What a ClientData argument is: one `element_type` value per client."""
        return t.FederatedType(self.element_type, t.CLIENTS)

    def __len__(self) -> int:
        return len(self.client_ids)

    def subset(self, start: int, stop: int) -> ClientData:
        """The description of clients [start, stop), sharing this one's cache key."""
        part = object.__new__(ClientData)
        part.fn, part.client_ids, part.element_type = self.fn, self.client_ids[start:stop], self.element_type
        part.key = f"{self.key}[{start}:{stop}]"
        return part

    def build(self, index: int) -> Any:
        return self.fn(self.client_ids[index])

    def __repr__(self) -> str:
        return f"ClientData({getattr(self.fn, '__name__', 'fn')}, {len(self)} clients, {self.element_type})"
