"""TensorFlow Federated's serialized computations -> our AST and types.

What it owns: turning a TFF `Computation` proto (`comp.get_proto(comp)`) into
an `mp_executors` building block, once per distinct proto (cached by the
SHA-256 of its serialized bytes, so a `next` called every round converts once).

    TFF proto node      ours
    lambda, block,      Lambda, Block, Reference, Call, Struct, Selection
    reference, call,
    struct, selection
    placement           PlacementLiteral
    literal             Data (a numpy array)
    tensorflow          CompiledComputation: TFF's GraphDef, rewritten once to run
                        as one self-contained function call (`tff.graphs`)
    intrinsic           our intrinsic of the same URI, or a small AST that
                        computes the same thing from ours (`lower_intrinsic`)

Secure aggregation intrinsics are emulated in the clear, as TFF's simulation
runtimes do: `federated_secure_sum` and `federated_secure_sum_bitwidth` are
`federated_sum` (the bound is not enforced), `federated_secure_modular_sum`
sums each client's value modulo the modulus and reduces the total modulo it.

An intrinsic this module does not know raises NotImplementedError naming it,
while converting: before any value is sent anywhere.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import threading

import numpy as np
from tensorflow_federated.proto.v0 import computation_pb2 as pb
from tensorflow_federated.python.core.impl.compiler import array as tff_array

from mp_executors._tf import tf
from mp_executors.core import building_blocks as bb
from mp_executors.core import structure
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t
from mp_executors.tff import graphs

logger = logging.getLogger("mp_executors")

# --------------------------------------------------------------------------- types

# TFF's DataType enum (tensorflow_federated/proto/v0/data_type.proto) -> numpy.
_DTYPES = {
    10: np.bool_, 6: np.int8, 5: np.int16, 3: np.int32, 9: np.int64, 4: np.uint8, 17: np.uint16,
    22: np.uint32, 23: np.uint64, 19: np.float16, 1: np.float32, 2: np.float64, 8: np.complex64,
    18: np.complex128, 7: object,
}


def convert_type(type_pb: pb.Type) -> t.Type:
    """A TFF `Type` proto -> our type (containers are not part of TFF's protos)."""
    which = type_pb.WhichOneof("type")
    if which == "tensor":
        tensor = type_pb.tensor
        if tensor.unknown_rank:
            raise NotImplementedError("mp_executors.tff: tensors of unknown rank are not supported.")
        if tensor.dtype not in _DTYPES:
            raise NotImplementedError(f"mp_executors.tff: tensor dtype {tensor.dtype} (TFF DataType enum) is not supported.")
        return t.TensorType(_DTYPES[tensor.dtype], tuple(None if d < 0 else d for d in tensor.dims))
    if which == "struct":
        return t.StructType([(e.name or None, convert_type(e.value)) for e in type_pb.struct.element])
    if which == "sequence":
        return t.SequenceType(convert_type(type_pb.sequence.element))
    if which == "federated":
        fed = type_pb.federated
        uri = fed.placement.value.uri
        placement = {"clients": t.CLIENTS, "server": t.SERVER}.get(uri)
        if placement is None:
            raise NotImplementedError(f"mp_executors.tff: placement {uri!r} is not supported (only CLIENTS and SERVER).")
        return t.FederatedType(convert_type(fed.member), placement, all_equal=fed.all_equal)
    if which == "function":
        fn = type_pb.function
        parameter = convert_type(fn.parameter) if fn.HasField("parameter") else None
        return t.FunctionType(parameter, convert_type(fn.result))
    if which == "placement":
        return t.PlacementType()
    raise NotImplementedError(f"mp_executors.tff: TFF type kind {which!r} is not supported.")


# --------------------------------------------------------------------------- helper TF computations

_helpers: dict[tuple, bb.CompiledComputation] = {}
_helpers_lock = threading.Lock()


def _helper(key: tuple, fn, parameter_type: t.Type, name: str) -> bb.CompiledComputation:
    """A small TF computation of ours (lowering generic ops, modular sums, selects), cached."""
    with _helpers_lock:
        found = _helpers.get(key)
        if found is None:
            found = bb.CompiledComputation(tfc.trace(fn, parameter_type, unpack=False, name=name))
            _helpers[key] = found
        return found


def _leafwise(op, result_type: t.Type):
    """`op(a, b)` on every pair of leaves of a 2-struct; a single-leaf `b` is broadcast."""

    def body(arg):
        a_leaves, b_leaves = structure.flatten(arg[0]), structure.flatten(arg[1])
        if len(b_leaves) == 1 and len(a_leaves) != 1:
            b_leaves = b_leaves * len(a_leaves)
        out = [op(x, tf.cast(y, x.dtype)) for x, y in zip(a_leaves, b_leaves)]
        return structure.pack_type(result_type, out) if isinstance(result_type, t.StructType) else out[0]

    return body


def _generic_op(uri: str):
    return {"generic_plus": tf.add, "generic_multiply": tf.multiply, "generic_divide": tf.math.divide,
            "modulo": tf.math.floormod}[uri]


# --------------------------------------------------------------------------- the converter

_SUPPORTED = (
    "federated_aggregate", "federated_apply", "federated_broadcast", "federated_eval_at_clients",
    "federated_eval_at_server", "federated_map", "federated_map_all_equal", "federated_max",
    "federated_mean", "federated_min", "federated_secure_modular_sum", "federated_secure_select",
    "federated_secure_sum", "federated_secure_sum_bitwidth", "federated_select", "federated_sum",
    "federated_value_at_clients", "federated_value_at_server", "federated_weighted_mean",
    "federated_zip_at_clients", "federated_zip_at_server", "generic_divide", "generic_multiply",
    "generic_plus", "generic_zero", "sequence_map", "sequence_reduce", "sequence_sum",
)
#: Ours under the same URI, with the same operands in the same order.
_DIRECT = {
    "federated_aggregate", "federated_apply", "federated_broadcast", "federated_eval_at_clients",
    "federated_eval_at_server", "federated_map", "federated_max", "federated_mean", "federated_min",
    "federated_sum", "federated_value_at_clients", "federated_value_at_server",
    "federated_weighted_mean", "federated_zip_at_server", "sequence_map", "sequence_sum",
}


def _call(fn: bb.BuildingBlock, arg: bb.BuildingBlock | None) -> bb.Call:
    """A Call node; TFF has type-checked its AST, so where our assignability rules
    are stricter than TFF's (e.g. all-equal results of lowered intrinsics) the
    node is built without our check."""
    try:
        return bb.Call(fn, arg)
    except TypeError:
        node = object.__new__(bb.Call)
        node.function, node.argument = fn, arg
        node.type_signature = fn.type_signature.result
        return node


def _intrinsic(uri: str, parameter: t.Type | None, result: t.Type) -> bb.Intrinsic:
    return bb.Intrinsic(uri, t.FunctionType(parameter, result))


def _select(node: bb.BuildingBlock, index: int) -> bb.BuildingBlock:
    if isinstance(node, bb.Struct):
        return node.elements[index][1]
    return bb.Selection(node, index)


class _Converter:
    """One conversion: fresh names for the references the lowering introduces."""

    def __init__(self, name: str):
        self.name = name
        self._fresh = itertools.count()
        self.tf_leaves = 0

    def fresh(self, prefix: str) -> str:
        return f"_mpx_{prefix}{next(self._fresh)}"

    def bind(self, node: bb.BuildingBlock, prefix: str, build) -> bb.BuildingBlock:
        """`build(ref)` with `node` evaluated once (a Block binding it) unless it is cheap to repeat."""
        if isinstance(node, (bb.Reference, bb.Struct, bb.Data)):
            return build(node)
        name = self.fresh(prefix)
        ref = bb.Reference(name, node.type_signature)
        return bb.Block([(name, node)], build(ref))

    # ------------------------------------------------------------------ nodes

    def convert(self, comp: pb.Computation) -> bb.BuildingBlock:
        which = comp.WhichOneof("computation")
        type_spec = convert_type(comp.type)
        if which == "reference":
            return bb.Reference(comp.reference.name, type_spec)
        if which == "selection":
            return bb.Selection(self.convert(comp.selection.source), comp.selection.index)
        if which == "struct":
            return bb.Struct([(e.name or None, self.convert(e.value)) for e in comp.struct.element])
        if which == "lambda":
            fn = comp.__getattribute__("lambda")
            parameter_name = fn.parameter_name or None
            body = self.convert(fn.result)
            # `(a -> f(a))` is `f`: TFF wraps functions passed to intrinsics this
            # way, and our sequence intrinsics take TensorFlow computations.
            if (parameter_name is not None and isinstance(body, bb.Call) and isinstance(body.argument, bb.Reference)
                    and body.argument.name == parameter_name
                    and isinstance(body.function, (bb.CompiledComputation, bb.Intrinsic))):
                return body.function
            return bb.Lambda(parameter_name, type_spec.parameter, body)
        if which == "block":
            local_bindings = [(local.name, self.convert(local.value)) for local in comp.block.local]
            return bb.Block(local_bindings, self.convert(comp.block.result))
        if which == "call":
            argument = self.convert(comp.call.argument) if comp.call.HasField("argument") else None
            function = comp.call.function
            if function.WhichOneof("computation") == "intrinsic":
                return self.lower_intrinsic(function.intrinsic.uri, convert_type(function.type), argument)
            return _call(self.convert(function), argument)
        if which == "intrinsic":
            return self.standalone_intrinsic(comp.intrinsic.uri, type_spec)
        if which == "placement":
            uri = comp.placement.uri
            if uri not in ("clients", "server"):
                raise NotImplementedError(f"mp_executors.tff: placement {uri!r} is not supported.")
            return bb.PlacementLiteral(t.CLIENTS if uri == "clients" else t.SERVER)
        if which == "literal":
            value = np.asarray(tff_array.from_proto(comp.literal.value))
            if isinstance(type_spec, t.TensorType) and type_spec.dtype != np.dtype(object):
                value = value.astype(type_spec.dtype, copy=False)
            return bb.Data(value, type_spec)
        if which == "tensorflow":
            self.tf_leaves += 1
            return graphs.tensorflow_leaf(comp.tensorflow, type_spec, f"{self.name}/tf{self.tf_leaves}")
        if which == "xla":
            raise NotImplementedError(
                f"mp_executors.tff: {self.name} contains an XLA (JAX) computation; only TensorFlow "
                "computations are supported."
            )
        if which == "data":
            raise NotImplementedError(
                f"mp_executors.tff: {self.name} contains a `data` node (external data by URI); pass the "
                "data as an argument instead."
            )
        raise NotImplementedError(f"mp_executors.tff: computation node kind {which!r} is not supported.")

    def standalone_intrinsic(self, uri: str, type_spec: t.Type) -> bb.BuildingBlock:
        """An intrinsic used as a value rather than called directly."""
        if uri == "generic_zero":
            return self.lower_intrinsic(uri, type_spec, None)
        if not isinstance(type_spec, t.FunctionType):
            raise NotImplementedError(f"mp_executors.tff: intrinsic {uri!r} of type {type_spec} is not supported.")
        if type_spec.parameter is None:
            return bb.Lambda(None, None, self.lower_intrinsic(uri, type_spec, None))
        name = self.fresh("arg")
        return bb.Lambda(name, type_spec.parameter,
                         self.lower_intrinsic(uri, type_spec, bb.Reference(name, type_spec.parameter)))

    # ------------------------------------------------------------------ intrinsics

    def lower_intrinsic(self, uri: str, fn_type: t.Type, arg: bb.BuildingBlock | None) -> bb.BuildingBlock:
        if uri not in _SUPPORTED:
            raise NotImplementedError(
                f"mp_executors.tff: {self.name} uses the intrinsic {uri!r}, which this runtime does not "
                f"support (supported: {', '.join(_SUPPORTED)})."
            )
        if uri == "generic_zero":
            return self._zero(fn_type)
        if uri in _DIRECT:
            return _call(bb.Intrinsic(uri, fn_type), arg)
        return getattr(self, "_" + uri)(fn_type, arg)

    def _federated_map_all_equal(self, fn_type, arg):
        # Our federated_map over an all-equal value; the value stays one per client.
        return _call(bb.Intrinsic("federated_map", fn_type), arg)

    def _federated_zip_at_clients(self, fn_type, arg):
        """TFF zips nested structs of CLIENTS values in one call; ours zips one level."""

        def build(ref):
            elements = []
            for i, (name, element_type) in enumerate(arg.type_signature.items()):
                element = _select(ref, i)
                if not isinstance(element_type, t.FederatedType):
                    element = self._zip_clients_of(element)
                elements.append((name, element))
            flat = bb.Struct(elements)
            member = t.StructType([(n, e.type_signature.member) for n, e in elements])
            all_equal = all(e.type_signature.all_equal for _, e in elements)
            return _call(_intrinsic("federated_zip_at_clients", flat.type_signature,
                                    t.FederatedType(member, t.CLIENTS, all_equal)), flat)

        if all(isinstance(e, t.FederatedType) for e in arg.type_signature):
            return _call(bb.Intrinsic("federated_zip_at_clients", fn_type), arg)
        return self.bind(arg, "zip", build)

    def _zip_clients_of(self, node: bb.BuildingBlock) -> bb.BuildingBlock:
        member = t.StructType([(n, e.member) for n, e in node.type_signature.items()])
        all_equal = all(e.all_equal for e in node.type_signature)
        return self._federated_zip_at_clients(
            t.FunctionType(node.type_signature, t.FederatedType(member, t.CLIENTS, all_equal)), node)

    def _secure_as_sum(self, fn_type, arg):
        value = _select(arg, 0)
        return _call(_intrinsic("federated_sum", value.type_signature, fn_type.result), value)

    _federated_secure_sum = _secure_as_sum
    _federated_secure_sum_bitwidth = _secure_as_sum

    def _federated_secure_modular_sum(self, fn_type, arg):
        """sum_i (x_i mod m), mod m: the clients' values reduced in the clear."""

        def build(ref):
            value, modulus = _select(ref, 0), _select(ref, 1)
            v_type, m_type = value.type_signature.member, modulus.type_signature
            mod = self._tf_binary("modulo", v_type, m_type, v_type)
            at_clients = _call(_intrinsic("federated_value_at_clients", m_type, t.FederatedType(m_type, t.CLIENTS, True)),
                               modulus)
            pair = self._zip_clients_of(bb.Struct([(None, value), (None, at_clients)]))
            reduced = _call(_intrinsic("federated_map", t.StructType([mod.type_signature, pair.type_signature]),
                                       t.FederatedType(v_type, t.CLIENTS, False)), bb.Struct([(None, mod), (None, pair)]))
            total = _call(_intrinsic("federated_sum", reduced.type_signature, t.FederatedType(v_type, t.SERVER)), reduced)
            at_server = _call(_intrinsic("federated_value_at_server", m_type, t.FederatedType(m_type, t.SERVER)), modulus)
            zipped = _call(_intrinsic("federated_zip_at_server", t.StructType([total.type_signature, at_server.type_signature]),
                                      t.FederatedType(t.StructType([v_type, m_type]), t.SERVER)),
                           bb.Struct([(None, total), (None, at_server)]))
            return _call(_intrinsic("federated_apply", t.StructType([mod.type_signature, zipped.type_signature]),
                                    fn_type.result), bb.Struct([(None, mod), (None, zipped)]))

        return self.bind(arg, "modsum", build)

    def _tf_binary(self, op_name: str, a_type: t.Type, b_type: t.Type, result_type: t.Type) -> bb.CompiledComputation:
        pair = t.StructType([a_type, b_type])
        return _helper((op_name, pair, result_type), _leafwise(_generic_op(op_name), result_type), pair,
                       f"mpx_{op_name}")

    def _generic(self, uri, fn_type, arg):
        a_type, b_type = (e for e in arg.type_signature)
        result = fn_type.result
        if not t.is_federated(a_type) and not t.is_federated(b_type):
            return _call(self._tf_binary(uri, a_type, b_type, result), arg)
        if not (isinstance(a_type, t.FederatedType) and isinstance(b_type, t.FederatedType)
                and a_type.placement == b_type.placement):
            raise NotImplementedError(
                f"mp_executors.tff: {uri} on {a_type} and {b_type} (mixed placements) is not supported.")
        op = self._tf_binary(uri, a_type.member, b_type.member, result.member)
        placement = a_type.placement
        member = t.StructType([a_type.member, b_type.member])
        zip_uri = "federated_zip_at_server" if placement == t.SERVER else "federated_zip_at_clients"
        zipped = _call(_intrinsic(zip_uri, arg.type_signature,
                                  t.FederatedType(member, placement, a_type.all_equal and b_type.all_equal)), arg)
        map_uri = "federated_apply" if placement == t.SERVER else "federated_map"
        return _call(_intrinsic(map_uri, t.StructType([op.type_signature, zipped.type_signature]), result),
                     bb.Struct([(None, op), (None, zipped)]))

    def _generic_plus(self, fn_type, arg):
        return self._generic("generic_plus", fn_type, arg)

    def _generic_multiply(self, fn_type, arg):
        return self._generic("generic_multiply", fn_type, arg)

    def _generic_divide(self, fn_type, arg):
        return self._generic("generic_divide", fn_type, arg)

    def _zero(self, type_spec: t.Type) -> bb.BuildingBlock:
        member = type_spec.member if isinstance(type_spec, t.FederatedType) else type_spec
        if not t.is_tensorflow_compatible(member) or t.contains(member, lambda x: isinstance(x, t.SequenceType)):
            raise NotImplementedError(f"mp_executors.tff: generic_zero of type {type_spec} is not supported.")
        leaves = [np.zeros([d or 0 for d in lt.shape], lt.dtype) for lt in structure.flatten_type(member)]
        data = bb.Data(structure.pack_type(member, leaves), member)
        if not isinstance(type_spec, t.FederatedType):
            return data
        uri = "federated_value_at_server" if type_spec.placement == t.SERVER else "federated_value_at_clients"
        return _call(_intrinsic(uri, member, type_spec), data)

    def _sequence_reduce(self, fn_type, arg):
        # TFF: <seq, zero, op>; ours: <zero, op, seq>.
        def build(ref):
            seq, zero, op = _select(ref, 0), _select(ref, 1), _select(ref, 2)
            ours = bb.Struct([(None, zero), (None, op), (None, seq)])
            return _call(_intrinsic("sequence_reduce", ours.type_signature, fn_type.result), ours)

        return self.bind(arg, "reduce", build)

    def _federated_select(self, fn_type, arg):
        """Each client gets the dataset of select_fn(server_value, key) for its keys."""

        def build(ref):
            keys, server_value, select_fn = _select(ref, 0), _select(ref, 2), _select(ref, 3)
            if not isinstance(select_fn, bb.CompiledComputation):
                raise NotImplementedError(
                    "mp_executors.tff: federated_select needs its select_fn to be a TensorFlow computation.")
            value_type = server_value.type_signature.member
            keys_type = keys.type_signature.member
            helper = _select_helper(select_fn, keys_type, value_type)
            broadcast = _call(_intrinsic("federated_broadcast", server_value.type_signature,
                                         t.FederatedType(value_type, t.CLIENTS, True)), server_value)
            pair = self._zip_clients_of(bb.Struct([(None, keys), (None, broadcast)]))
            return _call(_intrinsic("federated_map", t.StructType([helper.type_signature, pair.type_signature]),
                                    fn_type.result), bb.Struct([(None, helper), (None, pair)]))

        return self.bind(arg, "select", build)

    _federated_secure_select = _federated_select


def _select_helper(select_fn: bb.CompiledComputation, keys_type: t.Type, value_type: t.Type) -> bb.CompiledComputation:
    loaded_fn = select_fn.function
    element_type = select_fn.type_signature.result
    pair = t.StructType([keys_type, value_type])

    def body(arg):
        keys, value = arg[0], arg[1]
        loaded = tfc.load(loaded_fn)
        value_leaves = structure.flatten(structure.from_container_deep(value))

        def one(key):
            out = loaded.pruned(*value_leaves, key)
            packed = structure.pack_type(element_type, list(out))
            return tfc.dataset_to_element_structure(packed, element_type)

        return tf.data.Dataset.from_tensor_slices(keys).map(one)

    return _helper(("select", loaded_fn.digest, pair), body, pair, "mpx_federated_select")


# --------------------------------------------------------------------------- cache

#: Converted computations by proto digest (a few: a program has a handful).
CACHE_ENTRIES = 64
_cache: collections.OrderedDict[str, bb.BuildingBlock] = collections.OrderedDict()
_cache_lock = threading.Lock()


def proto_digest(comp_pb: pb.Computation) -> str:
    return hashlib.sha256(comp_pb.SerializeToString(deterministic=True)).hexdigest()


def convert(comp_pb: pb.Computation, name: str = "tff_computation") -> bb.BuildingBlock:
    """A TFF Computation proto -> our building block (cached by the proto's digest)."""
    digest = proto_digest(comp_pb)
    with _cache_lock:
        found = _cache.get(digest)
        if found is not None:
            _cache.move_to_end(digest)
            return found
    converted = _Converter(name).convert(comp_pb)
    with _cache_lock:
        _cache[digest] = converted
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    logger.debug("mp_executors.tff: converted %s (%s)", name, digest[:12])
    return converted


def cache_info() -> dict[str, int]:
    """How many conversions are cached (for tests and diagnostics)."""
    with _cache_lock:
        return {"entries": len(_cache)}
