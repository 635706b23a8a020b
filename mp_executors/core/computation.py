"""`Computation`, the decorators that make one, and federated tracing.

`@tf_computation(*types)` traces a TensorFlow function into a portable graph
(`tensorflow_computation.trace`). `@federated_computation(*types)` calls the
Python function once with symbolic `Value`s; every intrinsic or computation
it calls appends a binding to the current trace, so the body becomes
`Lambda(arg, Block([(name, Call...)...], result))`. Binding every call once
is what makes `v = random(); return v, v` return two equal values.

A computation called from plain Python runs in the current execution context
(`core.context_stack.current()`, which the runtime installs into); called on `Value`s inside a federated trace it
adds a `Call` to the trace.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from mp_executors._tf import tf
from mp_executors.core import building_blocks as bb
from mp_executors.core import context_stack, structure, type_inference, uris, values
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t
from mp_executors.core.structure import Struct
from mp_executors.core.tensorflow_computation import parameter_names

# --------------------------------------------------------------------------- tracing state


class _Trace:
    def __init__(self):
        self.bindings: list[tuple[str, bb.BuildingBlock]] = []


_state = threading.local()
_names = itertools.count()


def _traces() -> list[_Trace]:
    if not hasattr(_state, "traces"):
        _state.traces = []
    return _state.traces


def in_federated_trace() -> bool:
    return bool(_traces())


def bind(node: bb.BuildingBlock) -> Value:
    """Adds `node` as a local of the innermost trace; returns a Value naming it."""
    traces = _traces()
    if not traces:
        raise RuntimeError("bind() outside a federated computation trace.")
    name = f"_v{next(_names)}"
    traces[-1].bindings.append((name, node))
    return Value(bb.Reference(name, node.type_signature))


class Value:
    """A symbolic value inside a `federated_computation` body."""

    __slots__ = ("_node",)

    def __init__(self, node: bb.BuildingBlock):
        object.__setattr__(self, "_node", node)

    @property
    def type_signature(self) -> t.Type:
        return self._node.type_signature

    def __repr__(self) -> str:
        return f"Value({self._node!r}: {self.type_signature})"

    def _select(self, key: int | str) -> Value:
        ts = self.type_signature
        if isinstance(ts, t.StructType):
            return Value(bb.Selection(self._node, key))
        if isinstance(ts, t.FederatedType) and isinstance(ts.member, t.StructType):
            return _select_federated_member(self._node, ts, key)
        raise TypeError(f"cannot select {key!r} from a value of type {ts}: it is not a struct.")

    def __getattr__(self, name: str) -> Value:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._select(name)
        except (AttributeError, IndexError) as e:
            raise AttributeError(str(e)) from None

    def __getitem__(self, key: int | str) -> Value:
        return self._select(key)

    def __len__(self) -> int:
        ts = self.type_signature
        if isinstance(ts, t.StructType):
            return len(ts)
        raise TypeError(f"a value of type {ts} has no length.")

    def __iter__(self):
        ts = self.type_signature
        member = ts.member if isinstance(ts, t.FederatedType) else ts
        if not isinstance(member, t.StructType):
            raise TypeError(f"cannot iterate over a value of type {ts}.")
        return (self._select(i) for i in range(len(member)))

    def __call__(self, *args: Any) -> Value:
        ts = self.type_signature
        if not isinstance(ts, t.FunctionType):
            raise TypeError(f"a value of type {ts} is not callable.")
        return _call_node(self._node, ts, args, unpack=False, name="function value")

    def __bool__(self):
        raise TypeError("a symbolic Value has no truth value during tracing; use TensorFlow inside a tf_computation.")


def _select_federated_member(node: bb.BuildingBlock, ts: t.FederatedType, key: int | str) -> Value:
    """`value.a` on a federated struct: the member's element, at the same placement.

    Built here rather than in `intrinsics` (which builds on this module): it is
    what selecting from a symbolic Value means, not a function users call.
    """
    index = ts.member.index_of(key)
    index_node = bb.Data(np.asarray(index, dtype=np.int32), t.TensorType(np.int32))
    arg = bb.Struct([(None, node), (None, index_node)])
    result = t.FederatedType(ts.member[index], ts.placement, ts.all_equal)
    return bind(bb.Call(bb.Intrinsic(uris.FEDERATED_SELECT_MEMBER, t.FunctionType(arg.type_signature, result)), arg))


def to_building_block(value: Any, what: str = "value") -> bb.BuildingBlock:
    """Converts what user code passes inside a trace into an AST node."""
    if isinstance(value, Value):
        return value._node
    if isinstance(value, Computation):
        return value.building_block
    if isinstance(value, t.Placement):
        return bb.PlacementLiteral(value)
    if isinstance(value, bb.BuildingBlock):
        return value
    if callable(value) and not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(
            f"{what}: got the Python function {getattr(value, '__name__', value)!r}; decorate it with "
            "@mpx.tf_computation(...) or @mpx.federated_computation(...) first."
        )
    as_struct = None if isinstance(value, (str, bytes)) else structure.from_container(value)
    if as_struct is not None:
        container = None if isinstance(value, Struct) else type(value)
        return bb.Struct([(n, to_building_block(v, what)) for n, v in as_struct.items()], container)
    try:
        value_type = type_inference.infer_type(value)
    except TypeError as e:
        raise TypeError(f"{what}: {e}") from None
    return bb.Data(values.to_representation(value, value_type, what), value_type)


def _pack_arguments(args: tuple, parameter: t.Type | None, unpack: bool, name: str):
    if parameter is None:
        if args:
            raise TypeError(f"{name} takes no arguments, got {len(args)}.")
        return None
    if unpack:
        if len(args) != len(parameter):
            raise TypeError(f"{name} takes {len(parameter)} arguments ({parameter}), got {len(args)}.")
        return Struct((n, a) for n, a in zip(parameter.names(), args))
    if len(args) != 1:
        raise TypeError(f"{name} takes 1 argument of type {parameter}, got {len(args)}.")
    return args[0]


def _call_node(fn_node: bb.BuildingBlock, fn_type: t.FunctionType, args: tuple, unpack: bool, name: str) -> Value:
    packed = _pack_arguments(args, fn_type.parameter, unpack, name)
    arg_node = None if packed is None else to_building_block(packed, f"argument of {name}")
    if arg_node is not None and not fn_type.parameter.is_assignable_from(arg_node.type_signature):
        raise TypeError(
            f"{name} expects an argument of type {fn_type.parameter}, got {arg_node.type_signature}."
        )
    return bind(bb.Call(fn_node, arg_node))


# --------------------------------------------------------------------------- Computation


class Computation:
    """A traced computation: a building block (AST or TF graph) and its type."""

    def __init__(self, building_block: bb.BuildingBlock, name: str, unpack: bool, python_fn: Callable | None = None):
        self.building_block = building_block
        self.name = name
        self._unpack = unpack
        self._python_fn = python_fn
        if python_fn is not None:
            functools.update_wrapper(self, python_fn, updated=())

    @property
    def type_signature(self) -> t.FunctionType:
        return self.building_block.type_signature

    def __repr__(self) -> str:
        return f"Computation({self.name}: {self.type_signature})"

    def argument_path(self) -> str:
        """How call-time errors name the argument: "fn: parameter 'xs'" or "fn: argument"."""
        names = parameter_names(self._python_fn) if self._python_fn is not None else None
        if not self._unpack and names and len(names) == 1:
            return f"{self.name}: parameter {names[0]!r}"
        return f"{self.name}: argument"

    def pack_arguments(self, args: tuple, kwargs: dict) -> Any:
        """Packs call-site arguments into the single parameter value."""
        if kwargs:
            names = self.type_signature.parameter.names() if self._unpack else []
            if not self._unpack or any(k not in names for k in kwargs):
                raise TypeError(f"{self.name}: unexpected keyword arguments {sorted(kwargs)}.")
            args = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
        return _pack_arguments(args, self.type_signature.parameter, self._unpack, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if in_federated_trace():
            if kwargs:
                raise TypeError(f"{self.name}: pass arguments positionally inside a federated computation.")
            return _call_node(self.building_block, self.type_signature, args, self._unpack, self.name)
        if isinstance(self.building_block, bb.CompiledComputation):
            if tf.inside_function():  # called from another tf_computation's body
                return self._call_inside_tensorflow(args)
        return context_stack.current().invoke(self, self.pack_arguments(args, kwargs))

    def _call_inside_tensorflow(self, args: tuple) -> Any:
        fn_type = self.type_signature
        packed = _pack_arguments(args, fn_type.parameter, self._unpack, self.name)
        flat = [] if packed is None else structure.flatten(structure.from_container_deep(packed))
        outputs = tfc.load(self.building_block.function)(flat)
        result = structure.pack_type(fn_type.result, outputs)
        return tfc._to_user_value(result, fn_type.result) if isinstance(fn_type.result, t.StructType) else result


def _parameter_type(parameter_types: tuple, fn: Callable) -> tuple[t.Type | None, bool]:
    """The single parameter type, and whether the function takes it unpacked."""
    if not parameter_types:
        return None, False
    types = [t.to_type(p) for p in parameter_types]
    if len(types) == 1:
        return types[0], False
    names = parameter_names(fn) or []
    if len(names) != len(types):
        names = [None] * len(types)
    return t.StructType(list(zip(names, types))), True


def _check_arity(fn: Callable, parameter: t.Type | None, unpack: bool, decorator: str) -> None:
    names = parameter_names(fn)
    if names is None:
        return
    expected = 0 if parameter is None else (len(parameter) if unpack else 1)
    if len(names) != expected:
        raise TypeError(
            f"@{decorator} on {fn.__name__!r}: the function takes {len(names)} parameter(s) {names} "
            f"but {expected} type(s) were declared; declare one type per parameter, e.g. "
            f"@mpx.{decorator}(np.float32)."
        )


def _decorator(builder: Callable, decorator: str, parameter_types: tuple):
    # Bare use: @tf_computation on a function (no parentheses).
    if len(parameter_types) == 1 and callable(parameter_types[0]) and not isinstance(parameter_types[0], (type, t.Type)) \
            and not hasattr(parameter_types[0], "as_numpy_dtype"):
        return builder(parameter_types[0], ())

    def wrap(fn: Callable) -> Computation:
        return builder(fn, parameter_types)

    return wrap


def _build_tf(fn: Callable, parameter_types: tuple) -> Computation:
    parameter, unpack = _parameter_type(parameter_types, fn)
    _check_arity(fn, parameter, unpack, "tf_computation")
    if parameter is not None and not t.is_tensorflow_compatible(parameter):
        raise TypeError(f"tf_computation {fn.__name__!r}: parameter type {parameter} is not tensors/sequences/structs.")
    function = tfc.trace(fn, parameter, unpack, getattr(fn, "__name__", None))
    return Computation(bb.CompiledComputation(function), function.name, unpack, fn)


def tf_computation(*parameter_types: Any):
    """Decorates a TensorFlow function: `@tf_computation(np.float32, ...)`.

    The body is ordinary TensorFlow; it is traced once into a serialized graph
    that runs in any worker process. Parameters may be tensors, sequences
    (tf.data.Dataset in the body) or structs of them.
    """
    return _decorator(_build_tf, "tf_computation", parameter_types)


def _user_parameter(node: bb.BuildingBlock, type_spec: t.Type) -> Any:
    if isinstance(type_spec, t.StructType) and type_spec.container_type not in (None, Struct):
        packed = Struct((n, _user_parameter(bb.Selection(node, i), e)) for i, (n, e) in enumerate(type_spec.items()))
        return structure.to_container(packed, type_spec.container_type)
    return Value(node)


def trace_federated(fn: Callable, parameter: t.Type | None, unpack: bool) -> bb.Lambda:
    trace = _Trace()
    _traces().append(trace)
    param_name = None
    try:
        if parameter is None:
            result = fn()
        else:
            # A name of its own: an inner computation's parameter must not shadow
            # the outer one's, or a closure over it would look bound.
            param_name = f"_arg{next(_names)}"
            ref = bb.Reference(param_name, parameter)
            if unpack:
                result = fn(*[_user_parameter(bb.Selection(ref, i), e) for i, e in enumerate(parameter)])
            else:
                result = fn(_user_parameter(ref, parameter))
        if result is None:
            raise TypeError(f"federated_computation {fn.__name__!r} returned None; return a value.")
        result_node = to_building_block(result, f"result of {fn.__name__!r}")
    finally:
        _traces().pop()
    body = bb.Block(trace.bindings, result_node) if trace.bindings else result_node
    return bb.Lambda(None if parameter is None else param_name, parameter, body)


def _build_federated(fn: Callable, parameter_types: tuple) -> Computation:
    parameter, unpack = _parameter_type(parameter_types, fn)
    _check_arity(fn, parameter, unpack, "federated_computation")
    return Computation(trace_federated(fn, parameter, unpack), getattr(fn, "__name__", "federated_computation"), unpack, fn)


def federated_computation(*parameter_types: Any):
    """Decorates a function of federated values: `@federated_computation(...)`.

    The body calls intrinsics (`federated_map`, `federated_sum`, ...) and other
    computations; it is traced once into an AST.
    """
    return _decorator(_build_federated, "federated_computation", parameter_types)
