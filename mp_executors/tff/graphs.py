"""TFF's TensorFlow graphs as our `TensorFlowFunction`s: the rewrites that make them one fast call.

What it owns: turning a TFF `tensorflow` computation (a GraphDef with
parameter/result bindings, an `initialize_op`, a session-token placeholder)
into a `TensorFlowFunction` that our executors load and call like any traced
`tf_computation`, in the parent or in a worker, with no TFF installed there.

The rewrites, done once per graph in the parent (the result is cached by the
converter and, in the workers, by digest):

1. Variables become anonymous. TFF's graphs create their variables (Keras
   models' weights, metrics) with `VarHandleOp`s named by the variable. With
   TensorFlow's anonymous shared name each run of the op creates a new
   variable, as TF2's eager variables do: calls never share state, even when
   a shard runs its clients concurrently inside one graph.
2. The initializer runs first: every node that does not feed `initialize_op`
   gets a control dependency on it, so one call initializes, then computes
   (TFF's runtime runs the initializer as a separate session step).
3. The session token placeholder becomes a constant.
4. `ReduceDataset` becomes a while loop over an iterator (`_reduce_as_loop`).
   A `ReduceDataset` op instantiates its reduce function afresh each time it
   runs (and drops it when done), which costs tens of milliseconds per call
   for a Keras model's training step: more than the training itself. The same
   reduction as a `While` loop calling the same function is instantiated once
   per loaded graph. tff.learning's client update is such a reduce: this is
   what makes a client's round cost about its arithmetic. The dataset is
   iterated with tf.data's graph optimizations and autotuning off (they too
   would run on every call); elements and their order are unchanged.
"""

from __future__ import annotations

import collections
import threading

from tensorflow_federated.proto.v0 import computation_pb2 as pb

from mp_executors._tf import tf
from mp_executors.core import building_blocks as bb
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t

#: TensorFlow's `ResourceHandle::ANONYMOUS_NAME`: a VarHandleOp with this shared
#: name creates a new variable each time it runs.
ANONYMOUS_NAME = b"cd2c89b7-88b7-44c8-ad83-06c2a9158347"


class GraphConversionError(TypeError):
    """A TFF graph this runtime cannot run as it is."""


# --------------------------------------------------------------------------- bindings


def binding_names(binding: pb.TensorFlow.Binding, type_spec: t.Type | None, what: str) -> list[str]:
    """Tensor names of a binding, in our leaf order (`structure.flatten_type`)."""
    kind = binding.WhichOneof("binding")
    if kind == "tensor":
        return [binding.tensor.tensor_name]
    if kind == "sequence":
        if binding.sequence.WhichOneof("binding") != "variant_tensor_name":
            raise NotImplementedError(
                f"mp_executors.tff: a {what} sequence bound as a serialized GraphDef tensor (TFF's legacy "
                "binding) is not supported; re-trace the computation with a current TFF."
            )
        return [binding.sequence.variant_tensor_name]
    if kind == "struct":
        if not isinstance(type_spec, t.StructType) or len(type_spec) != len(binding.struct.element):
            raise GraphConversionError(f"mp_executors.tff: a {what} binding does not match its type {type_spec}.")
        names: list[str] = []
        for element, element_type in zip(binding.struct.element, type_spec):
            names += binding_names(element, element_type, what)
        return names
    if kind is None and isinstance(type_spec, t.StructType) and not len(type_spec):
        return []
    raise GraphConversionError(f"mp_executors.tff: unknown {what} binding kind {kind!r}.")


def _node_name(tensor_name: str) -> str:
    return tensor_name.lstrip("^").split(":")[0]


# --------------------------------------------------------------------------- rewrites 1-3


def _anonymize_variables(graph_def) -> None:
    for node in graph_def.node:
        if node.op == "VarHandleOp":
            node.attr["shared_name"].s = ANONYMOUS_NAME
        elif node.op in ("VariableV2", "Variable"):
            raise NotImplementedError(
                "mp_executors.tff: TF1 reference variables (VariableV2) in a TFF graph are not supported; "
                "use resource variables (TF2's default)."
            )


def _add_init_control_deps(graph_def, init_op: str) -> None:
    """Makes `init_op` run before every node that does not feed it.

    Ancestors of the initializer (the variables, their initial values) cannot
    wait for it; nodes that already depend on it need nothing; placeholders
    are fed.
    """
    inputs = {n.name: [_node_name(i) for i in n.input] for n in graph_def.node}
    if init_op not in inputs:
        raise GraphConversionError(f"mp_executors.tff: the graph has no initialize_op {init_op!r}.")

    def closure(start: str, edges: dict[str, list[str]]) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    children: dict[str, list[str]] = collections.defaultdict(list)
    for name, parents in inputs.items():
        for parent in parents:
            children[parent].append(name)
    skip = closure(init_op, inputs) | closure(init_op, children) | {init_op}
    for node in graph_def.node:
        if node.name not in skip and node.op != "Placeholder":
            node.input.append("^" + init_op)


def _replace_session_token(graph_def, tensor_name: str) -> None:
    name = _node_name(tensor_name)
    for node in graph_def.node:
        if node.name == name and node.op in ("Placeholder", "PlaceholderWithDefault"):
            dtype = node.attr["dtype"].type
            value = tf.make_tensor_proto("" if dtype == tf.string.as_datatype_enum else 0, dtype=tf.as_dtype(dtype))
            node.op = "Const"
            del node.input[:]
            for key in list(node.attr):
                del node.attr[key]
            node.attr["dtype"].type = dtype
            node.attr["value"].tensor.CopyFrom(value)
            return


# --------------------------------------------------------------------------- rewrite 4: ReduceDataset


def _iteration_options():
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return options


_loops: dict[tuple, tuple[str, list]] = {}
_loops_lock = threading.Lock()


def _reduce_loop_functions(reduce_fn, state_types, element_types, capture_types) -> tuple[str, list]:
    """A function (variant, *state, *captures) -> state looping `reduce_fn` over the dataset.

    Returns its name and the FunctionDefs it needs (itself, its loop body and
    condition, its branches), traced once per signature in a graph of its own.
    """
    key = (reduce_fn.SerializeToString(), tuple(state_types), tuple(element_types), tuple(capture_types))
    with _loops_lock:
        found = _loops.get(key)
        if found is not None:
            return found
        num_state = len(state_types)
        signature = (
            [tf.TensorSpec([], tf.variant)]
            + [tf.TensorSpec(None, tf.as_dtype(d)) for d in state_types]
            + [tf.TensorSpec(None, tf.as_dtype(d)) for d in capture_types]
        )
        element_spec = tuple(tf.TensorSpec(None, tf.as_dtype(d)) for d in element_types)
        out_types = [tf.as_dtype(d) for d in state_types]

        def loop(variant, *args):
            state, captures = list(args[:num_state]), list(args[num_state:])
            dataset = tf.data.experimental.from_variant(variant, element_spec).with_options(_iteration_options())
            iterator = iter(dataset)

            def step(has_value, *state):
                del has_value
                optional = iterator.get_next_as_optional()

                def apply():
                    element = list(optional.get_value())
                    out = tf.raw_ops.StatefulPartitionedCall(
                        args=[*state, *element, *captures], Tout=out_types, f=reduce_fn)
                    return [tf.identity(o) for o in out]

                new_state = tf.cond(optional.has_value(), apply, lambda: [tf.identity(s) for s in state])
                return [optional.has_value(), *new_state]

            results = tf.while_loop(
                lambda has_value, *_: has_value, step, [tf.constant(True), *state],
                shape_invariants=[tf.TensorShape([])] + [tf.TensorShape(None)] * num_state,
            )
            return [tf.identity(r) for r in results[1:]]

        with tf.Graph().as_default():
            concrete = tf.function(loop, input_signature=signature, autograph=False).get_concrete_function()
            library = list(concrete.graph.as_graph_def().library.function)
            found = (concrete.function_def.signature.name, [concrete.function_def, *library])
        _loops[key] = found
        return found


def _function_signatures(graph_def) -> dict[str, object]:
    return {f.signature.name: f.signature for f in graph_def.library.function}


def _rewrite_reduce(node, signatures, added: dict[str, object]) -> str | None:
    """Turns one ReduceDataset NodeDef into a call of a loop function; returns the old output arg name."""
    reduce_fn = node.attr["f"].func
    state_types = list(node.attr["Tstate"].list.type)
    capture_types = list(node.attr["Targuments"].list.type)
    fn_signature = signatures.get(reduce_fn.name)
    if fn_signature is None:
        return None  # not ours to rewrite: leave it as it is
    inputs = [a.type for a in fn_signature.input_arg]
    element_types = inputs[len(state_types): len(inputs) - len(capture_types)]
    name, functions = _reduce_loop_functions(reduce_fn, state_types, element_types, capture_types)
    for function in functions:
        added.setdefault(function.signature.name, function)
    node.op = "StatefulPartitionedCall"
    keep = {k: v for k, v in node.attr.items() if k.startswith("_") and k != "_output_shapes"}
    for key in list(node.attr):
        del node.attr[key]
    for key, value in keep.items():
        node.attr[key].CopyFrom(value)
    node.attr["Tin"].list.type.extend([tf.variant.as_datatype_enum, *state_types, *capture_types])
    node.attr["Tout"].list.type.extend(state_types)
    node.attr["f"].func.name = name
    node.attr["config"].s = b""
    node.attr["config_proto"].s = b""
    node.attr["executor_type"].s = b""
    return "components"


def reduce_as_loop(graph_def) -> int:
    """Rewrites every ReduceDataset (top level and in library functions); returns how many."""
    signatures = _function_signatures(graph_def)
    added: dict[str, object] = {}
    count = 0
    rewritten: list[str] = []
    for node in graph_def.node:
        if node.op == "ReduceDataset" and _rewrite_reduce(node, signatures, added):
            count += 1
    for function in graph_def.library.function:
        renamed = []
        for node in function.node_def:
            if node.op == "ReduceDataset" and _rewrite_reduce(node, signatures, added):
                renamed.append(node.name)
                count += 1
        if renamed:
            # Inside a FunctionDef, outputs are named "<node>:<output arg>:<i>".
            old = {f"{n}:components:": f"{n}:output:" for n in renamed}

            def fix(ref: str, old=old) -> str:
                for prefix, replacement in old.items():
                    if ref.startswith(prefix):
                        return replacement + ref[len(prefix):]
                return ref

            for node in function.node_def:
                node.input[:] = [fix(i) for i in node.input]
            for key in list(function.ret):
                function.ret[key] = fix(function.ret[key])
            rewritten.append(function.signature.name)
    existing = set(signatures)
    for name, function in added.items():
        if name not in existing:
            graph_def.library.function.add().CopyFrom(function)
    if rewritten:
        # TensorFlow refuses two different definitions of one function name in a
        # process, and in TFF's own process (the parent, where TFF traced these
        # graphs) TFF's definitions are registered: every function of a
        # rewritten graph (the changed ones and all that refer to them) gets a
        # name of its own.
        _rename_functions(graph_def, {f.signature.name: f"{f.signature.name}_mpx"
                                      for f in graph_def.library.function})
    return count


def _rename_functions(graph_def, mapping: dict[str, str]) -> None:
    """Renames library functions and every reference to them (func attrs, gradients)."""

    def fix_attr(value) -> None:
        if value.HasField("func"):
            if value.func.name in mapping:
                value.func.name = mapping[value.func.name]
            for inner in value.func.attr.values():
                fix_attr(inner)
        elif value.HasField("list"):
            for func in value.list.func:
                if func.name in mapping:
                    func.name = mapping[func.name]

    for node in graph_def.node:
        for value in node.attr.values():
            fix_attr(value)
    for function in graph_def.library.function:
        if function.signature.name in mapping:
            function.signature.name = mapping[function.signature.name]
        for node in function.node_def:
            for value in node.attr.values():
                fix_attr(value)
    for gradient in graph_def.library.gradient:
        gradient.function_name = mapping.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = mapping.get(gradient.gradient_func, gradient.gradient_func)


# --------------------------------------------------------------------------- the leaf


def tensorflow_leaf(tf_pb: pb.TensorFlow, fn_type: t.FunctionType, name: str) -> bb.CompiledComputation:
    """TFF's `tensorflow` node -> a CompiledComputation running the same graph."""
    graph_def = tf.compat.v1.GraphDef()
    if not tf_pb.graph_def.Unpack(graph_def):
        raise GraphConversionError("mp_executors.tff: a tensorflow computation's graph_def is not a GraphDef.")
    inputs = binding_names(tf_pb.parameter, fn_type.parameter, "parameter") if tf_pb.HasField("parameter") else []
    outputs = binding_names(tf_pb.result, fn_type.result, "result")
    if tf_pb.session_token_tensor_name:
        _replace_session_token(graph_def, tf_pb.session_token_tensor_name)
    _anonymize_variables(graph_def)
    if tf_pb.initialize_op:
        _add_init_control_deps(graph_def, _node_name(tf_pb.initialize_op))
    reduce_as_loop(graph_def)
    function = tfc.TensorFlowFunction(
        name=name,
        graph_def=graph_def.SerializeToString(),
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        type_signature=fn_type,
    )
    return bb.CompiledComputation(function)
