"""Tracing TensorFlow functions into portable graphs, and loading them back.

A `tf_computation` is traced once, in the parent, into a `TensorFlowFunction`:
a serialized GraphDef plus the names of its flat input and output tensors and
its type. It pickles as bytes, so a worker process can run it without the
user's Python code: `load()` re-imports the graph with `wrap_function` and
`prune`s it to a callable (~17 ms once per process, cached by digest).

Binding conventions (flat, in the order of `structure.flatten_type`):
  - a tensor leaf is one graph input/output of that dtype and shape;
  - a sequence leaf is one scalar `tf.variant` tensor holding a dataset
    (`tf.data.experimental.to_variant` / `from_variant`).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mp_executors._tf import tf
from mp_executors.core import structure
from mp_executors.core import types as t
from mp_executors.core.structure import Struct


@dataclass(frozen=True)
class TensorFlowFunction:
    """A traced TensorFlow computation in portable form."""

    name: str
    graph_def: bytes
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    type_signature: t.FunctionType
    digest: str = field(default="")

    def __post_init__(self):
        if not self.digest:
            h = hashlib.sha256(self.graph_def)
            h.update(repr((self.input_names, self.output_names, str(self.type_signature))).encode())
            object.__setattr__(self, "digest", h.hexdigest())


# --------------------------------------------------------------------------- type <-> TF


def tf_dtype(dtype: np.dtype):
    return tf.string if dtype == np.dtype(object) else tf.as_dtype(dtype)


def element_spec(type_spec: t.Type):
    """The tf.data element_spec (nested TensorSpecs) for a sequence element type."""
    if isinstance(type_spec, t.TensorType):
        return tf.TensorSpec(type_spec.shape, tf_dtype(type_spec.dtype))
    if isinstance(type_spec, t.StructType):
        names = type_spec.names()
        specs = [element_spec(e) for e in type_spec]
        ctype = type_spec.container_type
        if ctype is not None and t.is_namedtuple(ctype):
            return ctype(*specs)
        if all(n is not None for n in names) and names:
            return (ctype if ctype is not None and issubclass(ctype, dict) else dict)(zip(names, specs))
        return tuple(specs)
    raise TypeError(f"sequence elements must be tensors or structs of tensors, got {type_spec}.")


def type_from_element_spec(spec: Any) -> t.Type:
    if isinstance(spec, tf.TensorSpec):
        return t.TensorType(spec.dtype, spec.shape)
    if isinstance(spec, tf.data.DatasetSpec):
        return t.SequenceType(type_from_element_spec(spec.element_spec))
    if t.is_namedtuple(spec):
        return t.StructType([(n, type_from_element_spec(getattr(spec, n))) for n in spec._fields], type(spec))
    if isinstance(spec, dict):
        return t.StructType([(k, type_from_element_spec(v)) for k, v in spec.items()], type(spec))
    if isinstance(spec, (list, tuple)):
        return t.StructType([type_from_element_spec(s) for s in spec], type(spec))
    raise TypeError(f"unsupported dataset element spec {spec!r}.")


def dataset_to_element_structure(value: Any, type_spec: t.Type) -> Any:
    """Converts a Struct element (as the executors hold it) to tf.data nesting."""
    if isinstance(type_spec, t.StructType):
        items = list(value) if not isinstance(value, Struct) else value.values()
        spec = element_spec(type_spec)
        converted = [dataset_to_element_structure(v, e) for v, e in zip(items, type_spec)]
        if isinstance(spec, dict):
            return type(spec)(zip(spec.keys(), converted))
        if t.is_namedtuple(spec):
            return type(spec)(*converted)
        return tuple(converted)
    return value


def _placeholder_spec(leaf_type: t.Type):
    if isinstance(leaf_type, t.TensorType):
        return tf.TensorSpec(leaf_type.shape, tf_dtype(leaf_type.dtype))
    if isinstance(leaf_type, t.SequenceType):
        return tf.TensorSpec([], tf.variant)
    raise TypeError(f"a tf_computation parameter cannot have type {leaf_type}.")


def _to_user_value(value: Any, type_spec: t.Type) -> Any:
    """Packs traced leaves into the container the user's function expects."""
    if isinstance(type_spec, t.StructType):
        packed = Struct((n, _to_user_value(v, e)) for (n, e), v in zip(type_spec.items(), value))
        return structure.to_container(packed, type_spec.container_type)
    return value


# --------------------------------------------------------------------------- tracing


def _result_leaves(value: Any, path: str) -> tuple[t.Type, list[Any]]:
    """Flattens a traced result into (type, flat graph tensors)."""
    if isinstance(value, tf.data.Dataset):
        return (
            t.SequenceType(type_from_element_spec(value.element_spec)),
            [tf.data.experimental.to_variant(value)],
        )
    if isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_tensor(value):
        tensor = tf.convert_to_tensor(value)
        return t.TensorType(tensor.dtype, tensor.shape), [tensor]
    as_struct = structure.from_container(value)
    if as_struct is not None:
        types, leaves = [], []
        for i, (n, v) in enumerate(as_struct.items()):
            et, el = _result_leaves(v, f"{path}[{n or i}]")
            types.append((n, et))
            leaves += el
        container = type(value) if not isinstance(value, Struct) else None
        return t.StructType(types, container), leaves
    if isinstance(value, (bool, int, float, np.generic, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype == np.float64 and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)
        if arr.dtype == np.int64 and not isinstance(value, (np.ndarray, np.generic)):
            arr = arr.astype(np.int32)
        tensor = tf.constant(arr)
        return t.TensorType(tensor.dtype, tensor.shape), [tensor]
    if value is None:
        raise TypeError(f"a tf_computation returned None at {path}; return a tensor, a dataset or a struct of them.")
    raise TypeError(f"a tf_computation returned an unsupported value at {path}: {type(value).__name__}.")


_trace_lock = threading.Lock()


def trace(fn, parameter_type: t.Type | None, unpack: bool, name: str | None = None) -> TensorFlowFunction:
    """Traces `fn` into a TensorFlowFunction with the given parameter type.

    `unpack` means the parameter is a StructType whose elements are passed as
    separate positional arguments (a function declared with several types).
    """
    leaf_types = [] if parameter_type is None else structure.flatten_type(parameter_type)
    specs = [_placeholder_spec(lt) for lt in leaf_types]
    result_holder: dict[str, Any] = {}

    # AutoGraph converts the user's `fn` (and what it calls), not our packing around it:
    # that has no tensor-dependent control flow, and converting it, with the structure
    # code it calls, cost ~1 s of the first trace in each process.
    @tf.autograph.experimental.do_not_convert
    def user_arguments(flat) -> list:
        leaves = []
        for lt, x in zip(leaf_types, flat):
            if isinstance(lt, t.SequenceType):
                x = tf.data.experimental.from_variant(x, element_spec(lt.element))
            leaves.append(x)
        if parameter_type is None:
            return []
        packed = structure.pack_type(parameter_type, leaves)
        if unpack:
            return [_to_user_value(v, e) for v, e in zip(packed, parameter_type)]
        return [_to_user_value(packed, parameter_type)]

    @tf.autograph.experimental.do_not_convert
    def flat_result(result) -> list:
        result_type, out = _result_leaves(result, "result")
        result_holder["type"] = result_type
        return [tf.identity(o) for o in out]

    def flat_body(*flat):
        return flat_result(fn(*user_arguments(flat)))

    with _trace_lock:
        graph_fn = tf.function(flat_body, input_signature=specs, autograph=True)
        concrete = graph_fn.get_concrete_function()
    graph = concrete.graph
    if graph.variables:
        raise TypeError(
            f"tf_computation {name or fn.__name__!r} creates tf.Variables; pass state as parameters "
            "and return it instead (computations are functional)."
        )
    input_names = tuple(x.name for x in concrete.inputs[: len(specs)])
    if len(concrete.inputs) != len(specs):
        raise TypeError(
            f"tf_computation {name or fn.__name__!r} captures eager tensors or variables from Python; "
            "create constants inside the function instead."
        )
    output_names = tuple(x.name for x in concrete.outputs)
    fn_type = t.FunctionType(parameter_type, result_holder["type"])
    return TensorFlowFunction(
        name=name or getattr(fn, "__name__", "tf_computation"),
        graph_def=graph.as_graph_def().SerializeToString(),
        input_names=input_names,
        output_names=output_names,
        type_signature=fn_type,
    )


def parameter_names(fn) -> list[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# --------------------------------------------------------------------------- loading


def function_refs(node) -> list[str]:
    """What a GraphDef node may name from the function library, in a fixed order.

    Its op (a library function is called as an op), then every function-valued
    attribute (a while loop's body and cond, a call's `f`, a case's branches), by
    attribute name.
    """
    refs = [node.op]
    for key in sorted(node.attr):
        value = node.attr[key]
        kind = value.WhichOneof("value")
        if kind == "func":
            refs.append(value.func.name)
        elif kind == "list":
            refs.extend(f.name for f in value.list.func)
    return refs


def import_graph(graph_def: bytes, input_names: Sequence[str], output_names: Sequence[str]):
    """A serialized GraphDef (with its function library) imported into this process, as a callable.

    `wrap_function` + `import_graph_def`, `prune`d to the named input and output tensors:
    call it with one tensor per input name; it returns a list of the outputs. Later calls
    run as fast as the function that was traced (FACTS.md).
    """
    parsed = tf.compat.v1.GraphDef.FromString(graph_def)

    def importer():
        tf.compat.v1.import_graph_def(parsed, name="")

    wrapped = tf.compat.v1.wrap_function(importer, [])
    g = wrapped.graph
    feeds = [g.get_tensor_by_name(n) for n in input_names]
    # With an input signature the call binds its arguments directly; without one, every
    # call first tries (and fails) a structured bind whose error message formats every
    # input tensor's values: ~5 ms per call on a 100-client shard's inputs.
    signature = (tuple(tf.TensorSpec(x.shape, x.dtype) for x in feeds), {})
    return wrapped.prune(feeds, [g.get_tensor_by_name(n) for n in output_names], input_signature=signature)


class LoadedFunction:
    """A TensorFlowFunction imported into this process: call with flat leaves."""

    def __init__(self, function: TensorFlowFunction):
        self.function = function
        self.pruned = import_graph(function.graph_def, function.input_names, function.output_names)
        fn_type = function.type_signature
        self.parameter_leaves = [] if fn_type.parameter is None else structure.flatten_type(fn_type.parameter)
        self.result_leaves = structure.flatten_type(fn_type.result)

    def to_graph_inputs(self, flat_args: list[Any]) -> list[Any]:
        inputs = []
        for lt, x in zip(self.parameter_leaves, flat_args):
            if isinstance(lt, t.SequenceType):
                x = as_dataset(x, lt)._variant_tensor
            elif not tf.is_tensor(x):
                x = tf.constant(x, dtype=tf_dtype(lt.dtype))
            inputs.append(x)
        return inputs

    def from_graph_outputs(self, outputs: list[Any]) -> list[Any]:
        result = []
        for lt, y in zip(self.result_leaves, outputs):
            if isinstance(lt, t.SequenceType):
                y = tf.data.experimental.from_variant(y, element_spec(lt.element))
            result.append(y)
        return result

    def __call__(self, flat_args: list[Any]) -> list[Any]:
        """Runs the graph on flat leaves; returns flat leaves (tensors, datasets)."""
        return self.from_graph_outputs(self.pruned(*self.to_graph_inputs(flat_args)))


_loaded: dict[str, LoadedFunction] = {}
_load_lock = threading.Lock()


def load(function: TensorFlowFunction) -> LoadedFunction:
    """Imports (once per process, cached by digest) and returns a callable."""
    loaded = _loaded.get(function.digest)
    if loaded is None:
        with _load_lock:
            loaded = _loaded.get(function.digest)
            if loaded is None:
                loaded = LoadedFunction(function)
                _loaded[function.digest] = loaded
    return loaded


def as_dataset(value: Any, sequence_type: t.SequenceType):
    """A tf.data.Dataset from a dataset, a list of elements, or a numpy array.

    Lists and arrays become `from_tensor_slices` datasets (no Python
    generator), so that the dataset can later be serialized as a graph and
    rebuilt in another process.
    """
    if isinstance(value, tf.data.Dataset):
        return value
    element_type = sequence_type.element
    leaf_types = structure.flatten_type(element_type)
    if isinstance(value, np.ndarray) and isinstance(element_type, t.TensorType):
        columns = [value.astype(element_type.dtype, copy=False)]
    else:
        elements = list(value)
        columns = []
        for i, lt in enumerate(leaf_types):
            leaves = [structure.flatten(structure.from_container_deep(e))[i] for e in elements]
            shape = tuple(0 if d is None else d for d in lt.shape)
            columns.append(
                np.asarray(leaves, dtype=lt.dtype) if leaves else np.zeros((0,) + shape, dtype=lt.dtype)
            )
    packed = structure.pack_type(element_type, columns)
    return tf.data.Dataset.from_tensor_slices(dataset_to_element_structure(packed, element_type))
