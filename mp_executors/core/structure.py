"""`Struct`: the runtime value of a StructType, and flatten/pack helpers.

A Struct is an immutable ordered sequence of elements, each optionally named,
with index access (`s[0]`), attribute access (`s.a`) and iteration. It is what
user code receives for a struct that was not built from a Python container,
and what the executors use internally for every struct value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mp_executors.core import types as t


class Struct:
    """An ordered, optionally named, immutable collection of values."""

    __slots__ = ("_elements", "_names")

    def __init__(self, elements: Iterable[tuple[str | None, Any]]):
        self._elements = tuple(elements)
        self._names = {n: i for i, (n, _) in enumerate(self._elements) if n is not None}

    @classmethod
    def unnamed(cls, *values: Any) -> Struct:
        return cls((None, v) for v in values)

    @classmethod
    def named(cls, **values: Any) -> Struct:
        return cls(values.items())

    def items(self) -> tuple[tuple[str | None, Any], ...]:
        return self._elements

    def names(self) -> list[str | None]:
        return [n for n, _ in self._elements]

    def values(self) -> list[Any]:
        return [v for _, v in self._elements]

    def __len__(self) -> int:
        return len(self._elements)

    def __iter__(self):
        return (v for _, v in self._elements)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, slice):
            return [v for _, v in self._elements[key]]
        if isinstance(key, str):
            return self._elements[self._names[key]][1]
        return self._elements[key][1]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._elements[self._names[name]][1]
        except KeyError:
            raise AttributeError(f"Struct has no element named {name!r} (names: {list(self._names)}).") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Struct) and self._elements == other._elements

    def __hash__(self) -> int:
        return hash(self._elements)

    def __repr__(self) -> str:
        parts = [f"{n}={v!r}" if n else repr(v) for n, v in self._elements]
        return "<" + ",".join(parts) + ">"

    def __reduce__(self):
        return (Struct, (self._elements,))

    def to_dict(self) -> dict[str, Any]:
        return {n: v for n, v in self._elements if n is not None}


def from_container(value: Any) -> Struct | None:
    """Wraps a Python container as a Struct (names kept); None if not a container."""
    if isinstance(value, Struct):
        return value
    if t.is_namedtuple(value):
        return Struct((n, getattr(value, n)) for n in value._fields)
    if t.is_attrs(value):
        return Struct((a.name, getattr(value, a.name)) for a in type(value).__attrs_attrs__)
    if isinstance(value, dict):
        return Struct(value.items())
    if isinstance(value, (list, tuple)):
        return Struct((None, v) for v in value)
    return None


def to_container(struct: Struct, container_type: type | None) -> Any:
    """Builds `container_type` from a Struct's elements (a Struct if None)."""
    if container_type is None or container_type is Struct:
        return struct
    if t.is_namedtuple(container_type):
        return container_type(**{n: v for n, v in struct.items()}) if all(struct.names()) else container_type(*struct)
    if t.is_attrs(container_type):
        return container_type(**{n: v for n, v in struct.items()})
    if issubclass(container_type, dict):
        if not all(n is not None for n in struct.names()):
            return struct
        return container_type(struct.items())
    if issubclass(container_type, (list, tuple)):
        return container_type(struct)
    return struct


def map_structure(fn, value: Any, *others: Any) -> Any:
    """Applies `fn` to the leaves of Struct trees of the same shape."""
    if isinstance(value, Struct):
        return Struct(
            (n, map_structure(fn, v, *(o[i] for o in others))) for i, (n, v) in enumerate(value.items())
        )
    return fn(value, *others)


def flatten(value: Any) -> list[Any]:
    if isinstance(value, Struct):
        return [leaf for v in value for leaf in flatten(v)]
    return [value]


def flatten_type(type_spec: t.Type) -> list[t.Type]:
    if isinstance(type_spec, t.StructType):
        return [leaf for e in type_spec for leaf in flatten_type(e)]
    return [type_spec]


def pack_type(type_spec: t.Type, leaves: list[Any]) -> Any:
    """Rebuilds a Struct tree shaped like `type_spec` from flat leaves."""
    it = iter(leaves)

    def build(ts):
        if isinstance(ts, t.StructType):
            return Struct((n, build(e)) for n, e in ts.items())
        return next(it)

    return build(type_spec)


def from_container_deep(value: Any) -> Any:
    """Recursively converts Python containers into Struct trees (leaves kept)."""
    as_struct = from_container(value)
    if as_struct is None:
        return value
    return Struct((n, from_container_deep(v)) for n, v in as_struct.items())
