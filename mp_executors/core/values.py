"""Values in and out: Python values <-> the executors' representation.

The representation ("rep") the executors hold, by type:
  TensorType          np.ndarray of exactly that dtype (or an eager tf.Tensor)
  StructType          structure.Struct of reps
  SequenceType        tf.data.Dataset
  {T}@CLIENTS         list of reps, one per client (or a ClientData description)
  T@SERVER, T@CLIENTS (all equal)   the member's rep

`to_representation` checks a user's value against a type and converts it,
raising TypeError with the path of the offending part ("parameter 'x'[2].w:
expected float32[3], got shape (4,)") before any work is dispatched.
`to_python` turns results back into numpy values and the user's containers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mp_executors.core import structure
from mp_executors.core import types as t
from mp_executors.core.client_data import ClientData
from mp_executors.core.structure import Struct
from mp_executors.core.type_inference import is_dataset, is_tensor

# --------------------------------------------------------------------------- conversion in


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__} ({value!r})" if not is_dataset(value) else "a dataset"


def _tensor(value: Any, ts: t.TensorType, path: str) -> np.ndarray:
    # The common case first, without the checks below (~8 us a value): a numpy value of
    # exactly the dtype and shape. It matters for CLIENTS lists, converted per client.
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype == ts.dtype and ts.dtype != np.dtype(object):
        if len(value.shape) == len(ts.shape) and all(d is None or d == a for d, a in zip(ts.shape, value.shape)):
            return np.asarray(value)
    if is_dataset(value) or callable(value) and not isinstance(value, np.ndarray):
        raise TypeError(f"{path}: expected {ts}, got {_describe(value)}.")
    if is_tensor(value):
        value = value.numpy()
    if ts.dtype == np.dtype(object):
        arr = np.asarray(value, dtype=object)
        if not all(isinstance(x, (str, bytes, np.str_, np.bytes_)) for x in arr.reshape(-1)):
            raise TypeError(f"{path}: expected {ts}: strings or bytes, got {_describe(value)}.")
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{path}: expected {ts}, got a value that is not a rectangular array ({e}).") from None
        if arr.dtype == object:
            raise TypeError(
                f"{path}: expected {ts}, got {_describe(value)} that does not form a rectangular "
                "numeric array (ragged lists or mixed types?)."
            )
        src, dst = arr.dtype, ts.dtype
        if (src.kind == "b") != (dst.kind == "b") or (src.kind in "U S") or not np.can_cast(src, dst, "same_kind") and not (
            src.kind in "iu" and dst.kind in "iuf"
        ):
            raise TypeError(f"{path}: expected dtype {t.dtype_name(dst)} ({ts}), got {_describe(value)}.")
        if src.kind in "iu" and dst.kind in "iu":
            info = np.iinfo(dst)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise TypeError(f"{path}: values out of range for {t.dtype_name(dst)}.")
        arr = arr.astype(dst, copy=False)
    if len(arr.shape) != len(ts.shape) or any(d is not None and d != a for d, a in zip(ts.shape, arr.shape)):
        raise TypeError(f"{path}: expected {ts} (shape {ts.shape}), got shape {arr.shape}.")
    return arr


def _struct(value: Any, ts: t.StructType, path: str, clients: list) -> Struct:
    as_struct = structure.from_container(value)
    if as_struct is None or isinstance(value, str):
        raise TypeError(f"{path}: expected a struct {ts}, got {_describe(value)}.")
    if len(as_struct) != len(ts):
        raise TypeError(f"{path}: expected a struct of {len(ts)} elements {ts}, got {len(as_struct)} elements.")
    value_names = as_struct.names()
    elements = []
    if all(n is not None for n in ts.names()) and all(n is not None for n in value_names):
        if set(value_names) != set(ts.names()):
            raise TypeError(
                f"{path}: expected elements named {ts.names()}, got {value_names}."
            )
        for name, et in ts.items():
            elements.append((name, to_representation(as_struct[name], et, f"{path}.{name}", clients)))
    else:
        for i, ((name, et), (vn, v)) in enumerate(zip(ts.items(), as_struct.items())):
            if name is not None and vn is not None and name != vn:
                raise TypeError(f"{path}: element {i} should be named {name!r}, got {vn!r}.")
            elements.append((name, to_representation(v, et, f"{path}[{name or i}]", clients)))
    return Struct(elements)


def _sequence(value: Any, ts: t.SequenceType, path: str):
    from mp_executors.core import tensorflow_computation as tfc  # noqa: PLC0415 - TF only when needed

    if is_dataset(value):
        actual = tfc.type_from_element_spec(value.element_spec)
        if not ts.element.is_assignable_from(actual):
            raise TypeError(f"{path}: expected a sequence of {ts.element}, got a dataset of {actual}.")
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        elements = [to_representation(v, ts.element, f"{path}[{i}]", []) for i, v in enumerate(value)]
        if isinstance(value, np.ndarray) and isinstance(ts.element, t.TensorType):
            return tfc.as_dataset(np.stack(elements) if elements else value, ts)
        return tfc.as_dataset(elements, ts)
    raise TypeError(f"{path}: expected a sequence of {ts.element} (a tf.data.Dataset, a list or an array), got {_describe(value)}.")


def to_representation(value: Any, type_spec: t.Type, path: str = "value", clients: list | None = None) -> Any:
    """Checks `value` against `type_spec` and converts it to the executors' rep.

    `clients` collects (path, count) for every CLIENTS-placed part, so that
    the caller can infer and check the number of clients.
    """
    clients = [] if clients is None else clients
    if isinstance(type_spec, t.TensorType):
        return _tensor(value, type_spec, path)
    if isinstance(type_spec, t.StructType):
        return _struct(value, type_spec, path, clients)
    if isinstance(type_spec, t.SequenceType):
        return _sequence(value, type_spec, path)
    if isinstance(type_spec, t.FederatedType):
        member = type_spec.member
        if type_spec.placement == t.CLIENTS and not type_spec.all_equal:
            if isinstance(value, ClientData):
                if not member.is_assignable_from(value.element_type):
                    raise TypeError(f"{path}: expected client data of {member}, got ClientData of {value.element_type}.")
                clients.append((path, len(value)))
                return value
            if not isinstance(value, (list, tuple)) or t.is_namedtuple(value):
                raise TypeError(
                    f"{path}: expected {type_spec}: a list with one value per client, got {_describe(value)}."
                )
            clients.append((path, len(value)))
            return [to_representation(v, member, f"{path}[client {i}]", clients) for i, v in enumerate(value)]
        return to_representation(value, member, path, clients)
    if isinstance(type_spec, t.FunctionType):
        raise TypeError(f"{path}: functions cannot be passed as values here; pass a Computation to an intrinsic instead.")
    raise TypeError(f"{path}: unsupported type {type_spec}.")


def infer_cardinalities(value: Any, type_spec: t.Type) -> dict[t.Placement, int]:
    """The number of clients implied by a value of `type_spec` ({} if none).

    Raises ValueError if two CLIENTS-placed parts disagree, naming both counts.
    """
    found: list[tuple[str, int]] = []
    to_representation(value, t.to_type(type_spec), "argument", found)
    return _cardinality_from(found)


def _cardinality_from(found: list[tuple[str, int]]) -> dict[t.Placement, int]:
    if not found:
        return {}
    for path, n in found:
        if n == 0:
            raise ValueError(
                f"{path} has 0 clients (an empty list); a CLIENTS value needs one entry per client "
                "(default_num_clients only applies when no CLIENTS argument is given)."
            )
    first_path, first_n = found[0]
    for path, n in found[1:]:
        if n != first_n:
            raise ValueError(
                f"inconsistent numbers of clients: {first_path} has {first_n} clients but {path} has {n}; "
                "every CLIENTS-placed part of one call must have the same number of clients."
            )
    return {t.CLIENTS: first_n}


def convert_argument(value: Any, type_spec: t.Type, path: str) -> tuple[Any, dict[t.Placement, int]]:
    """`to_representation` plus cardinality inference, in one pass."""
    found: list[tuple[str, int]] = []
    rep = to_representation(value, type_spec, path, found)
    return rep, _cardinality_from(found)


# --------------------------------------------------------------------------- conversion out


def _numpy(value: Any) -> Any:
    if is_tensor(value):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value[()]
    return value


def to_python(rep: Any, type_spec: t.Type) -> Any:
    """Turns a rep into what users get back: numpy values in their containers."""
    if isinstance(type_spec, t.TensorType):
        return _numpy(rep)
    if isinstance(type_spec, t.StructType):
        items = rep.items() if isinstance(rep, Struct) else structure.from_container(rep).items()
        packed = Struct((n, to_python(v, et)) for (n, v), et in zip(items, type_spec))
        if any(n is None for n in type_spec.names()) and type_spec.container_type is not None and issubclass(
            type_spec.container_type, dict
        ):
            return packed
        return structure.to_container(packed, type_spec.container_type)
    if isinstance(type_spec, t.SequenceType):
        if is_dataset(rep):
            return [to_python(structure.from_container_deep(e), type_spec.element) for e in rep]
        return [to_python(e, type_spec.element) for e in rep]
    if isinstance(type_spec, t.FederatedType):
        if type_spec.placement == t.CLIENTS and not type_spec.all_equal:
            return [to_python(v, type_spec.member) for v in rep]
        return to_python(rep, type_spec.member)
    raise TypeError(f"cannot return a value of type {type_spec} to Python.")
