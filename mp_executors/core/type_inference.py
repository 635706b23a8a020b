"""Inferring the type of a Python value, when no type is declared.

The bottom of the value layer: `client_data` infers its element type here,
and `values` (which converts arguments) builds on it. A value that carries
its own federated type (a `ClientData` description) says so through a
`federated_type` attribute, so this module need not know the classes above it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mp_executors.core import structure
from mp_executors.core import types as t
from mp_executors.core.structure import Struct


def is_dataset(value: Any) -> bool:
    """A tf.data.Dataset, recognized without importing TensorFlow."""
    return type(value).__name__.endswith("Dataset") or hasattr(value, "element_spec") and hasattr(value, "_variant_tensor")


def is_tensor(value: Any) -> bool:
    """A tf.Tensor (eager or symbolic), recognized without importing TensorFlow."""
    return hasattr(value, "numpy") and hasattr(value, "dtype") and hasattr(value, "shape") and not is_dataset(value)


def infer_type(value: Any) -> t.Type:
    """The type of a Python value (used when no type is declared)."""
    own_type = getattr(value, "federated_type", None)
    if isinstance(own_type, t.FederatedType):
        return own_type
    if is_dataset(value):
        # Only a dataset needs TensorFlow here, and it exists only if TF is imported.
        from mp_executors.core.tensorflow_computation import type_from_element_spec  # noqa: PLC0415

        return t.SequenceType(type_from_element_spec(value.element_spec))
    if is_tensor(value):
        return t.TensorType(np.dtype(value.dtype.as_numpy_dtype) if value.dtype.name != "string" else object, value.shape)
    if isinstance(value, bool):
        return t.TensorType(np.bool_)
    if isinstance(value, int):
        return t.TensorType(np.int32)
    if isinstance(value, float):
        return t.TensorType(np.float32)
    if isinstance(value, (str, bytes)):
        return t.TensorType(object)
    if isinstance(value, (np.ndarray, np.generic)):
        return t.TensorType(value.dtype, value.shape)
    as_struct = structure.from_container(value)
    if as_struct is not None:
        container = None if isinstance(value, Struct) else type(value)
        return t.StructType([(n, infer_type(v)) for n, v in as_struct.items()], container)
    raise TypeError(f"cannot infer a type for a value of Python type {type(value).__name__}.")
