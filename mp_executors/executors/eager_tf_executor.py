"""`EagerTFExecutor`: the leaf executor. Runs TensorFlow graphs eagerly.

It owns unplaced values (numpy arrays, Structs, tf.data.Datasets), calls
compiled TensorFlow computations on them (each graph imported once per
process, cached by digest), and implements the sequence intrinsics
(`sequence_map`, `sequence_reduce`, `sequence_sum`) with tf.data. It knows
nothing of placements. It never suspends, so `run_sync` can drive it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from mp_executors._tf import tf
from mp_executors.core import building_blocks as bb
from mp_executors.core import structure, type_inference, uris, values
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t
from mp_executors.core.structure import Struct
from mp_executors.executors.executor_base import Executor, ExecutorValue, element_items


class EagerValue(ExecutorValue):
    """A value held by an EagerTFExecutor: a rep, or a function (AST node)."""

    __slots__ = ("rep", "_type")

    def __init__(self, rep: Any, type_signature: t.Type):
        self.rep = rep
        self._type = type_signature

    @property
    def type_signature(self) -> t.Type:
        return self._type

    async def compute(self) -> Any:
        return to_numpy(self.rep)


def to_numpy(rep: Any) -> Any:
    """Eager tensors -> numpy, inside Structs; datasets are left as they are."""
    if isinstance(rep, Struct):
        return structure.map_structure(to_numpy, rep)
    if tf.is_tensor(rep) and not isinstance(rep, tf.data.Dataset):
        return rep.numpy()
    return rep


def flatten_element(element: Any, type_spec: t.Type) -> list[Any]:
    """Flattens a tf.data element in our leaf order (tf.nest sorts dict keys)."""
    if isinstance(type_spec, t.StructType):
        leaves = []
        for i, (name, et) in enumerate(type_spec.items()):
            sub = element[name] if isinstance(element, dict) else element[i]
            leaves += flatten_element(sub, et)
        return leaves
    return [element]


def call_function(fn: bb.BuildingBlock, arg_rep: Any) -> Any:
    """Calls a compiled TF computation on a rep; returns the result rep."""
    if not isinstance(fn, bb.CompiledComputation):
        raise TypeError(f"expected a compiled TensorFlow computation, got {fn!r}.")
    loaded = tfc.load(fn.function)
    flat = [] if arg_rep is None else structure.flatten(arg_rep)
    return structure.pack_type(fn.type_signature.result, loaded(flat))


class EagerTFExecutor(Executor):
    """Runs compiled TensorFlow computations eagerly, optionally on one device."""

    def __init__(self, device: str | None = None):
        self._device = device

    def _scope(self):
        return tf.device(self._device) if self._device else contextlib.nullcontext()

    async def create_value(self, value: Any, type_spec: Any = None) -> EagerValue:
        if isinstance(value, EagerValue):
            return value
        if isinstance(value, (bb.CompiledComputation, bb.Intrinsic)):
            return EagerValue(value, value.type_signature)
        if isinstance(value, bb.BuildingBlock):
            raise TypeError(f"EagerTFExecutor cannot hold {type(value).__name__} nodes; use a ReferenceResolvingExecutor above it.")
        type_spec = type_inference.infer_type(value) if type_spec is None else t.to_type(type_spec)
        if t.is_federated(type_spec) or isinstance(type_spec, t.FunctionType):
            raise TypeError(f"EagerTFExecutor holds unplaced values only, not {type_spec}.")
        with self._scope():
            return EagerValue(values.to_representation(value, type_spec), type_spec)

    async def create_call(self, comp: ExecutorValue, arg: ExecutorValue | None = None) -> EagerValue:
        fn = comp.rep
        arg_rep = None if arg is None else arg.rep
        with self._scope():
            if isinstance(fn, bb.Intrinsic):
                return EagerValue(self._sequence_intrinsic(fn, arg_rep), fn.type_signature.result)
            return EagerValue(call_function(fn, arg_rep), fn.type_signature.result)

    async def create_struct(self, elements: Any) -> EagerValue:
        items = element_items(elements)
        return EagerValue(
            Struct((n, v.rep) for n, v in items),
            t.StructType([(n, v.type_signature) for n, v in items]),
        )

    async def create_selection(self, source: ExecutorValue, index: int | str) -> EagerValue:
        ts = source.type_signature
        if not isinstance(ts, t.StructType):
            raise TypeError(f"cannot select {index!r} from a value of type {ts}.")
        i = ts.index_of(index)
        return EagerValue(source.rep[i], ts[i])

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ sequences

    def _sequence_intrinsic(self, intrinsic: bb.Intrinsic, arg: Any) -> Any:
        param = intrinsic.type_signature.parameter
        if intrinsic.uri == uris.SEQUENCE_SUM:
            seq_type = param
            ds = tfc.as_dataset(arg, seq_type)
            leaf_types = structure.flatten_type(seq_type.element)
            zero = tuple(tf.zeros(lt.shape, tfc.tf_dtype(lt.dtype)) for lt in leaf_types)
            total = ds.reduce(zero, lambda acc, e: tuple(a + x for a, x in zip(acc, flatten_element(e, seq_type.element))))
            return structure.pack_type(seq_type.element, list(total))
        if intrinsic.uri == uris.SEQUENCE_MAP:
            fn, seq = arg[0], arg[1]
            seq_type, result_type = param[1], intrinsic.type_signature.result
            loaded = _loaded(fn, "sequence_map")
            ds = tfc.as_dataset(seq, seq_type)

            def apply(*element):
                element = element[0] if len(element) == 1 else element
                out = loaded.pruned(*flatten_element(element, seq_type.element))
                packed = structure.pack_type(result_type.element, list(out))
                return tfc.dataset_to_element_structure(packed, result_type.element)

            return ds.map(apply)
        if intrinsic.uri == uris.SEQUENCE_REDUCE:
            zero, op, seq = arg[0], arg[1], arg[2]
            zero_type, seq_type = param[0], param[2]
            loaded = _loaded(op, "sequence_reduce")
            ds = tfc.as_dataset(seq, seq_type)
            initial = tuple(tf.convert_to_tensor(z) for z in structure.flatten(zero))
            state = ds.reduce(
                initial,
                lambda acc, e: tuple(loaded.pruned(*acc, *flatten_element(e, seq_type.element))),
            )
            return structure.pack_type(zero_type, list(state))
        raise NotImplementedError(f"EagerTFExecutor does not implement the intrinsic {intrinsic.uri}.")


def _loaded(fn: Any, name: str) -> tfc.LoadedFunction:
    if not isinstance(fn, bb.CompiledComputation):
        raise TypeError(f"{name}: the function must be a tf_computation, got {fn!r}.")
    return tfc.load(fn.function)


__all__ = ["EagerTFExecutor", "EagerValue", "call_function", "to_numpy"]
