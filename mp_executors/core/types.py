"""The type system: tensors, structs, sequences, federated values and functions.

Every value and every AST node carries one of these types. Types are immutable,
compare by value, are hashable, and print in TFF's compact notation:
``float32[3]``, ``<a=int32,b=float32>``, ``float32*``, ``{float32}@CLIENTS``,
``float32@SERVER``, ``(float32 -> float32)``.

This module knows nothing of TensorFlow beyond dtype names, so that it can be
imported cheaply (the CLI plans pools without importing TensorFlow).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- placements


class Placement:
    """A placement literal: where a federated value lives (SERVER or CLIENTS)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("placement", self.name))

    def __reduce__(self):
        return (Placement, (self.name,))


CLIENTS = Placement("CLIENTS")
SERVER = Placement("SERVER")
PLACEMENTS = (CLIENTS, SERVER)


def _check_placement(placement: Any, what: str) -> Placement:
    if isinstance(placement, Placement):
        return placement
    if isinstance(placement, str) and placement.upper() in ("CLIENTS", "SERVER"):
        return CLIENTS if placement.upper() == "CLIENTS" else SERVER
    raise TypeError(
        f"{what}: unknown placement {placement!r}; use mpx.CLIENTS or mpx.SERVER."
    )


# --------------------------------------------------------------------------- base


class Type:
    """Base of all types. Subclasses define `_key()` for equality and hashing."""

    __slots__ = ()

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __repr__(self) -> str:
        return str(self)

    def is_assignable_from(self, other: Type) -> bool:
        """True if a value of type `other` may be used where `self` is expected."""
        return self == other


# --------------------------------------------------------------------------- tensors


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """Normalises a numpy dtype, a tf.DType, a Python scalar type or a name."""
    if dtype is bool:
        return np.dtype(np.bool_)
    if dtype is int:
        return np.dtype(np.int32)
    if dtype is float:
        return np.dtype(np.float32)
    if dtype is str or dtype is bytes:
        return np.dtype(object)
    as_numpy = getattr(dtype, "as_numpy_dtype", None)  # tf.DType, without importing TF
    if as_numpy is not None:
        if getattr(dtype, "name", None) == "string":
            return np.dtype(object)
        return np.dtype(as_numpy)
    if dtype == "string":
        return np.dtype(object)
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{dtype!r} is not a dtype (use a numpy dtype, a tf.DType or int/float/bool).") from e


def dtype_name(dtype: np.dtype) -> str:
    return "string" if dtype == np.dtype(object) else dtype.name


class TensorType(Type):
    """A tensor of a dtype and a shape; a dimension may be None (unknown)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: Any, shape: Iterable[int | None] | int | None = ()):
        self.dtype = to_numpy_dtype(dtype)
        if shape is None:
            raise TypeError("TensorType shape must be a tuple of dimensions (use () for a scalar).")
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(getattr(shape, "as_list", lambda: shape)())  # accept tf.TensorShape
        for d in shape:
            if d is not None and (not isinstance(d, (int, np.integer)) or d < 0):
                raise TypeError(f"TensorType shape {shape!r}: dimensions must be ints >= 0 or None.")
        self.shape = tuple(None if d is None else int(d) for d in shape)

    def _key(self):
        return (self.dtype.str if self.dtype != np.dtype(object) else "O", self.shape)

    def __str__(self) -> str:
        if not self.shape:
            return dtype_name(self.dtype)
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{dtype_name(self.dtype)}[{dims}]"

    def is_assignable_from(self, other: Type) -> bool:
        if not isinstance(other, TensorType) or other.dtype != self.dtype:
            return False
        if len(other.shape) != len(self.shape):
            return False
        return all(a is None or a == b for a, b in zip(self.shape, other.shape))

    @property
    def is_fully_defined(self) -> bool:
        return all(d is not None for d in self.shape)


# --------------------------------------------------------------------------- structs


class StructType(Type):
    """An ordered struct of types; elements may be named, unnamed, or mixed.

    `container_type` remembers the Python container the type was built from
    (dict, OrderedDict, namedtuple, attrs class, list, tuple) so that values
    can be handed to and returned from user code in that container. It does
    not take part in equality: `<a=int32>` built from a dict equals one built
    from a namedtuple.
    """

    __slots__ = ("_elements", "container_type", "_names")

    def __init__(self, elements: Any, container_type: type | None = None):
        pairs: list[tuple[str | None, Type]] = []
        if isinstance(elements, Mapping):
            items = list(elements.items())
            if container_type is None:
                container_type = type(elements) if isinstance(elements, collections.OrderedDict) else dict
        else:
            items = list(elements)
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and (item[0] is None or isinstance(item[0], str)):
                name, t = item
            else:
                name, t = None, item
            pairs.append((name, to_type(t)))
        names = [n for n, _ in pairs if n is not None]
        if len(set(names)) != len(names):
            raise TypeError(f"StructType: duplicate element names in {names}.")
        self._elements = tuple(pairs)
        self._names = {n: i for i, (n, _) in enumerate(pairs) if n is not None}
        self.container_type = container_type

    def _key(self):
        return self._elements

    def items(self) -> tuple[tuple[str | None, Type], ...]:
        return self._elements

    def names(self) -> list[str | None]:
        return [n for n, _ in self._elements]

    def __len__(self) -> int:
        return len(self._elements)

    def __iter__(self):
        return (t for _, t in self._elements)

    def __getitem__(self, key: int | str) -> Type:
        return self._elements[self.index_of(key)][1]

    def index_of(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self._names:
                raise AttributeError(f"{self} has no element named {key!r} (names: {list(self._names)}).")
            return self._names[key]
        if isinstance(key, (int, np.integer)) and -len(self._elements) <= key < len(self._elements):
            return int(key) % len(self._elements)
        raise IndexError(f"index {key!r} out of range for {self} with {len(self._elements)} elements.")

    def __getattr__(self, name: str) -> Type:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __str__(self) -> str:
        parts = [f"{n}={t}" if n else str(t) for n, t in self._elements]
        return "<" + ",".join(parts) + ">"

    def is_assignable_from(self, other: Type) -> bool:
        if not isinstance(other, StructType) or len(other) != len(self):
            return False
        for (n1, t1), (n2, t2) in zip(self._elements, other._elements):
            if n1 is not None and n2 is not None and n1 != n2:
                return False
            if not t1.is_assignable_from(t2):
                return False
        return True

    def __reduce__(self):
        return (StructType, (list(self._elements), self.container_type))


# --------------------------------------------------------------------------- sequences


class SequenceType(Type):
    """A sequence (a tf.data.Dataset at run time) of elements of one type."""

    __slots__ = ("element",)

    def __init__(self, element: Any):
        self.element = to_type(element)
        if contains(self.element, lambda t: isinstance(t, (FederatedType, FunctionType, SequenceType))):
            raise TypeError(f"SequenceType elements must be tensors or structs of tensors, got {self.element}.")

    def _key(self):
        return (self.element,)

    def __str__(self) -> str:
        inner = str(self.element)
        return f"{inner}*" if isinstance(self.element, TensorType) else f"<{inner[1:-1]}>*" if isinstance(self.element, StructType) else f"{inner}*"

    def is_assignable_from(self, other: Type) -> bool:
        return isinstance(other, SequenceType) and self.element.is_assignable_from(other.element)


# --------------------------------------------------------------------------- federated


class FederatedType(Type):
    """A value placed at SERVER or CLIENTS; `all_equal` means one value for all."""

    __slots__ = ("member", "placement", "all_equal")

    def __init__(self, member: Any, placement: Any, all_equal: bool | None = None):
        self.member = to_type(member)
        if contains(self.member, lambda t: isinstance(t, (FederatedType, FunctionType))):
            raise TypeError(f"FederatedType member must not be federated or a function, got {self.member}.")
        self.placement = _check_placement(placement, "FederatedType")
        self.all_equal = (self.placement == SERVER) if all_equal is None else bool(all_equal)

    def _key(self):
        return (self.member, self.placement, self.all_equal)

    def __str__(self) -> str:
        member = str(self.member)
        return f"{member}@{self.placement}" if self.all_equal else f"{{{member}}}@{self.placement}"

    def is_assignable_from(self, other: Type) -> bool:
        return (
            isinstance(other, FederatedType)
            and other.placement == self.placement
            and (other.all_equal or not self.all_equal)
            and self.member.is_assignable_from(other.member)
        )


# --------------------------------------------------------------------------- functions


class FunctionType(Type):
    """A function from a parameter type (or None: no parameter) to a result type."""

    __slots__ = ("parameter", "result")

    def __init__(self, parameter: Any, result: Any):
        self.parameter = None if parameter is None else to_type(parameter)
        self.result = to_type(result)

    def _key(self):
        return (self.parameter, self.result)

    def __str__(self) -> str:
        param = "" if self.parameter is None else str(self.parameter)
        return f"({param} -> {self.result})"

    def is_assignable_from(self, other: Type) -> bool:
        if not isinstance(other, FunctionType):
            return False
        if (self.parameter is None) != (other.parameter is None):
            return False
        if self.parameter is not None and not other.parameter.is_assignable_from(self.parameter):
            return False
        return self.result.is_assignable_from(other.result)


class PlacementType(Type):
    """The type of a placement literal."""

    __slots__ = ()

    def _key(self):
        return ()

    def __str__(self) -> str:
        return "placement"


# --------------------------------------------------------------------------- helpers


def is_namedtuple(obj_or_type: Any) -> bool:
    t = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    return issubclass(t, tuple) and hasattr(t, "_fields")


def is_attrs(obj_or_type: Any) -> bool:
    t = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    return hasattr(t, "__attrs_attrs__")


def to_type(spec: Any) -> Type:
    """Converts a type-like specification into a `Type`.

    Accepts a `Type`, a dtype (numpy, tf.DType, Python scalar type), a
    `(dtype, shape)` pair, a `tf.TensorSpec`, or a Python container of those
    (list/tuple/dict/OrderedDict/namedtuple/attrs instance), which becomes a
    StructType remembering its container.
    """
    if isinstance(spec, Type):
        return spec
    if spec is None:
        raise TypeError("None is not a type.")
    # tf.TensorSpec / tf.data element specs, without importing TensorFlow.
    if type(spec).__name__ == "TensorSpec" and hasattr(spec, "shape"):
        return TensorType(spec.dtype, spec.shape)
    if type(spec).__name__ == "DatasetSpec" and hasattr(spec, "element_spec"):
        return SequenceType(to_type(spec.element_spec))
    if is_namedtuple(spec):
        return StructType([(n, to_type(getattr(spec, n))) for n in spec._fields], type(spec))
    if is_attrs(spec):
        names = [a.name for a in type(spec).__attrs_attrs__]
        return StructType([(n, to_type(getattr(spec, n))) for n in names], type(spec))
    if isinstance(spec, Mapping):
        return StructType([(k, to_type(v)) for k, v in spec.items()], type(spec))
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and not isinstance(spec[0], (Type, tuple, list, Mapping))
        and isinstance(spec[1], (list, tuple))
        and all(d is None or isinstance(d, int) for d in spec[1])
    ):
        try:
            return TensorType(spec[0], spec[1])
        except TypeError:
            pass
    if isinstance(spec, (list, tuple)):
        return StructType([to_type(s) for s in spec], type(spec))
    try:
        return TensorType(spec)
    except TypeError as e:
        raise TypeError(f"cannot interpret {spec!r} as a type.") from e


def contains(t: Type | None, predicate) -> bool:
    """True if `t` or any type nested inside it satisfies `predicate`."""
    if t is None:
        return False
    if predicate(t):
        return True
    if isinstance(t, StructType):
        return any(contains(e, predicate) for e in t)
    if isinstance(t, SequenceType):
        return contains(t.element, predicate)
    if isinstance(t, FederatedType):
        return contains(t.member, predicate)
    if isinstance(t, FunctionType):
        return contains(t.parameter, predicate) or contains(t.result, predicate)
    return False


def is_federated(t: Type | None) -> bool:
    return contains(t, lambda x: isinstance(x, (FederatedType, PlacementType)))


def is_tensorflow_compatible(t: Type | None) -> bool:
    """Tensors, sequences and structs of them: what a tf_computation can take."""
    return t is None or not contains(t, lambda x: isinstance(x, (FederatedType, FunctionType, PlacementType)))


def is_numeric(t: Type) -> bool:
    """Tensors (or structs of tensors) of a numeric dtype: what can be summed."""
    if isinstance(t, TensorType):
        return t.dtype.kind in "iuf" or t.dtype.kind == "c"
    if isinstance(t, StructType):
        return len(t) > 0 and all(is_numeric(e) for e in t)
    return False


def is_floating(t: Type) -> bool:
    if isinstance(t, TensorType):
        return t.dtype.kind == "f"
    if isinstance(t, StructType):
        return len(t) > 0 and all(is_floating(e) for e in t)
    return False
