"""The federated intrinsics users call inside a `federated_computation`.

Each function checks its operands' types at trace time (TypeError naming the
intrinsic, what it expected and what it got), then adds
`Call(Intrinsic(uri), <operands>)` to the trace. What the intrinsics *do* is
the executors' business (`executors.federating_executor` and, for sequences,
`executors.eager_tf_executor`).
"""

from __future__ import annotations

from typing import Any

from mp_executors.core import building_blocks as bb
from mp_executors.core import computation as comp
from mp_executors.core import types as t
from mp_executors.core.uris import (
    FEDERATED_AGGREGATE,
    FEDERATED_APPLY,
    FEDERATED_BROADCAST,
    FEDERATED_EVAL_CLIENTS,
    FEDERATED_EVAL_SERVER,
    FEDERATED_MAP,
    FEDERATED_MAX,
    FEDERATED_MEAN,
    FEDERATED_MIN,
    FEDERATED_SUM,
    FEDERATED_VALUE_CLIENTS,
    FEDERATED_VALUE_SERVER,
    FEDERATED_WEIGHTED_MEAN,
    FEDERATED_ZIP_CLIENTS,
    FEDERATED_ZIP_SERVER,
    SEQUENCE_MAP,
    SEQUENCE_REDUCE,
    SEQUENCE_SUM,
)


def _require_trace(name: str) -> None:
    if not comp.in_federated_trace():
        raise RuntimeError(
            f"mpx.{name} can only be called inside a @mpx.federated_computation body "
            "(it builds the computation; it does not run by itself)."
        )


def _node(value: Any, name: str, operand: str) -> bb.BuildingBlock:
    return comp.to_building_block(value, f"{name}: {operand}")


def _call(uri: str, operands: list[bb.BuildingBlock], result_type: t.Type) -> comp.Value:
    arg = bb.Struct([(None, o) for o in operands]) if len(operands) != 1 else operands[0]
    intrinsic = bb.Intrinsic(uri, t.FunctionType(arg.type_signature, result_type))
    return comp.bind(bb.Call(intrinsic, arg))


def _error(name: str, expected: str, got: Any) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got a value of type {got}.")


def _federated(node: bb.BuildingBlock, name: str, operand: str, placement: t.Placement | None = None) -> t.FederatedType:
    ts = node.type_signature
    if not isinstance(ts, t.FederatedType) or (placement is not None and ts.placement != placement):
        where = f"@{placement}" if placement else " (placed at CLIENTS or SERVER)"
        raise _error(name, f"{operand}: a federated value{where}", ts)
    return ts


def _function(node: bb.BuildingBlock, name: str, operand: str) -> t.FunctionType:
    ts = node.type_signature
    if not isinstance(ts, t.FunctionType):
        raise _error(name, f"{operand}: a computation", ts)
    if t.is_federated(ts):
        raise _error(name, f"{operand}: a computation on unplaced values (no placements inside)", ts)
    if isinstance(node, bb.Lambda) and node.free_references():
        raise TypeError(
            f"{name}: {operand} uses values from the enclosing computation "
            f"({', '.join(sorted(node.free_references()))}); a function given to an intrinsic runs on the "
            "clients and must be self-contained: pass those values in its argument instead "
            "(e.g. federated_zip them with the data, or broadcast them)."
        )
    return ts


def _applies(fn_type: t.FunctionType, arg_type: t.Type, name: str, operand: str) -> None:
    if fn_type.parameter is None or not fn_type.parameter.is_assignable_from(arg_type):
        raise TypeError(
            f"{name}: {operand} takes {fn_type.parameter} but would be applied to {arg_type}."
        )


def _maybe_zip(value: Any, name: str) -> bb.BuildingBlock:
    """Struct of federated values -> their federated_zip (TFF's implicit zip)."""
    node = _node(value, name, "value")
    ts = node.type_signature
    if isinstance(ts, t.StructType) and len(ts) and all(isinstance(e, t.FederatedType) for e in ts):
        return federated_zip(comp.Value(node))._node
    return node


# --------------------------------------------------------------------------- placement


def federated_value(value: Any, placement: t.Placement) -> comp.Value:
    """Places an unplaced value at `placement` (all clients get the same value)."""
    name = "federated_value"
    _require_trace(name)
    node = _node(value, name, "value")
    placement = t._check_placement(placement, name)
    if t.is_federated(node.type_signature) or isinstance(node.type_signature, t.FunctionType):
        raise _error(name, "an unplaced value (a tensor, sequence or struct)", node.type_signature)
    uri = FEDERATED_VALUE_CLIENTS if placement == t.CLIENTS else FEDERATED_VALUE_SERVER
    return _call(uri, [node], t.FederatedType(node.type_signature, placement, all_equal=True))


def federated_eval(fn: Any, placement: t.Placement) -> comp.Value:
    """Runs a no-argument computation at `placement` (once per client at CLIENTS)."""
    name = "federated_eval"
    _require_trace(name)
    node = _node(fn, name, "fn")
    fn_type = _function(node, name, "fn")
    if fn_type.parameter is not None:
        raise _error(name, "fn: a computation with no parameters", fn_type)
    placement = t._check_placement(placement, name)
    if placement == t.CLIENTS:
        return _call(FEDERATED_EVAL_CLIENTS, [node], t.FederatedType(fn_type.result, t.CLIENTS, all_equal=False))
    return _call(FEDERATED_EVAL_SERVER, [node], t.FederatedType(fn_type.result, t.SERVER))


def federated_broadcast(value: Any) -> comp.Value:
    """Sends a SERVER value to every client (all-equal at CLIENTS)."""
    name = "federated_broadcast"
    _require_trace(name)
    node = _node(value, name, "value")
    ts = _federated(node, name, "value", t.SERVER)
    return _call(FEDERATED_BROADCAST, [node], t.FederatedType(ts.member, t.CLIENTS, all_equal=True))


# --------------------------------------------------------------------------- map / zip


def federated_map(fn: Any, value: Any) -> comp.Value:
    """Applies `fn` to each member of a CLIENTS value (or to a SERVER value)."""
    name = "federated_map"
    _require_trace(name)
    fn_node = _node(fn, name, "fn")
    fn_type = _function(fn_node, name, "fn")
    node = _maybe_zip(value, name)
    ts = _federated(node, name, "value")
    _applies(fn_type, ts.member, name, "fn")
    if ts.placement == t.SERVER:
        return _call(FEDERATED_APPLY, [fn_node, node], t.FederatedType(fn_type.result, t.SERVER))
    return _call(FEDERATED_MAP, [fn_node, node], t.FederatedType(fn_type.result, t.CLIENTS, all_equal=False))


def federated_zip(value: Any) -> comp.Value:
    """Turns a struct of federated values (one placement) into a federated struct."""
    name = "federated_zip"
    _require_trace(name)
    node = _node(value, name, "value")
    ts = node.type_signature
    if isinstance(ts, t.FederatedType):
        return comp.Value(node)
    if not isinstance(ts, t.StructType) or not len(ts) or not all(isinstance(e, t.FederatedType) for e in ts):
        raise _error(name, "a non-empty struct of federated values", ts)
    placements = {e.placement for e in ts}
    if len(placements) != 1:
        raise _error(name, "federated values all at CLIENTS or all at SERVER", ts)
    placement = placements.pop()
    member = t.StructType([(n, e.member) for n, e in ts.items()], ts.container_type)
    all_equal = all(e.all_equal for e in ts)
    uri = FEDERATED_ZIP_CLIENTS if placement == t.CLIENTS else FEDERATED_ZIP_SERVER
    return _call(uri, [node], t.FederatedType(member, placement, all_equal=all_equal))


# --------------------------------------------------------------------------- aggregations


def _clients_numeric(value: Any, name: str, floating: bool = False) -> tuple[bb.BuildingBlock, t.FederatedType]:
    node = _node(value, name, "value")
    ts = _federated(node, name, "value", t.CLIENTS)
    ok = t.is_floating(ts.member) if floating else t.is_numeric(ts.member)
    if not ok:
        kind = "floating-point" if floating else "numeric"
        raise _error(name, f"a CLIENTS value of {kind} tensors (or a struct of them)", ts)
    return node, ts


def federated_sum(value: Any) -> comp.Value:
    """Sums a CLIENTS value; the result is at SERVER."""
    node, ts = _clients_numeric(value, "federated_sum")
    return _call(FEDERATED_SUM, [node], t.FederatedType(ts.member, t.SERVER))


def federated_mean(value: Any, weight: Any = None) -> comp.Value:
    """The (optionally weighted) mean of a CLIENTS value; the result is at SERVER."""
    name = "federated_mean"
    _require_trace(name)
    node, ts = _clients_numeric(value, name, floating=True)
    result = t.FederatedType(ts.member, t.SERVER)
    if weight is None:
        return _call(FEDERATED_MEAN, [node], result)
    w_node = _node(weight, name, "weight")
    wts = _federated(w_node, name, "weight", t.CLIENTS)
    if not (isinstance(wts.member, t.TensorType) and wts.member.shape == () and t.is_numeric(wts.member)):
        raise _error(name, "weight: a CLIENTS value of numeric scalars", wts)
    return _call(FEDERATED_WEIGHTED_MEAN, [node, w_node], result)


def _extremum(value: Any, name: str, uri: str) -> comp.Value:
    node, ts = _clients_numeric(value, name)
    return _call(uri, [node], t.FederatedType(ts.member, t.SERVER))


def federated_min(value: Any) -> comp.Value:
    """The elementwise minimum over clients; the result is at SERVER."""
    return _extremum(value, "federated_min", FEDERATED_MIN)


def federated_max(value: Any) -> comp.Value:
    """The elementwise maximum over clients; the result is at SERVER."""
    return _extremum(value, "federated_max", FEDERATED_MAX)


def federated_aggregate(value: Any, zero: Any, accumulate: Any, merge: Any, report: Any) -> comp.Value:
    """Generalised aggregation of a CLIENTS value into a SERVER value.

    Order of evaluation (fixed, so results do not depend on the number of
    workers): clients are taken in blocks of `BLOCK_SIZE` consecutive
    clients; within a block `accumulate` folds the clients' values into
    `zero`; the block partials are folded with `merge` in client order;
    `report` runs once on the total. So `zero` must be an identity of
    `merge` (merge(zero, a) == a), as in TFF's composing executors: a `zero`
    that is not (e.g. 10 with add) is counted once per block.
    """
    name = "federated_aggregate"
    _require_trace(name)
    node = _node(value, name, "value")
    ts = _federated(node, name, "value", t.CLIENTS)
    zero_node = _node(zero, name, "zero")
    if t.is_federated(zero_node.type_signature):
        raise _error(name, "zero: an unplaced value", zero_node.type_signature)
    acc_type = zero_node.type_signature
    fns = []
    for operand, fn in (("accumulate", accumulate), ("merge", merge), ("report", report)):
        fn_node = _node(fn, name, operand)
        _function(fn_node, name, operand)
        fns.append(fn_node)
    acc_t, merge_t, report_t = (f.type_signature for f in fns)
    _applies(acc_t, t.StructType([acc_type, ts.member]), name, "accumulate")
    if not acc_type.is_assignable_from(acc_t.result):
        raise TypeError(f"{name}: accumulate returns {acc_t.result} but zero has type {acc_type}.")
    _applies(merge_t, t.StructType([acc_type, acc_type]), name, "merge")
    if not acc_type.is_assignable_from(merge_t.result):
        raise TypeError(f"{name}: merge returns {merge_t.result} but zero has type {acc_type}.")
    _applies(report_t, acc_type, name, "report")
    return _call(FEDERATED_AGGREGATE, [node, zero_node, *fns], t.FederatedType(report_t.result, t.SERVER))


# --------------------------------------------------------------------------- sequences


def _sequence_operand(seq: Any, name: str) -> tuple[bb.BuildingBlock, t.SequenceType, t.FederatedType | None]:
    node = _node(seq, name, "seq")
    ts = node.type_signature
    fed = ts if isinstance(ts, t.FederatedType) else None
    member = fed.member if fed else ts
    if not isinstance(member, t.SequenceType):
        raise _error(name, "seq: a sequence (or a federated sequence)", ts)
    return node, member, fed


def _sequence_call(uri: str, name: str, node, fed, operands: list, result: t.Type) -> comp.Value:
    if fed is None:
        return _call(uri, [*operands, node], result)
    # A federated sequence: apply pointwise, as a federated_map of a lambda.
    param = bb.Reference("seq", fed.member)
    parts = [*operands, param]
    arg = parts[0] if len(parts) == 1 else bb.Struct([(None, o) for o in parts])
    body = bb.Call(bb.Intrinsic(uri, t.FunctionType(arg.type_signature, result)), arg)
    fn = comp.Computation(bb.Lambda("seq", fed.member, body), name, unpack=False)
    return federated_map(fn, comp.Value(node))


def sequence_map(fn: Any, seq: Any) -> comp.Value:
    """Applies `fn` to each element of a sequence (pointwise if federated)."""
    name = "sequence_map"
    _require_trace(name)
    fn_node = _node(fn, name, "fn")
    fn_type = _function(fn_node, name, "fn")
    node, seq_type, fed = _sequence_operand(seq, name)
    _applies(fn_type, seq_type.element, name, "fn")
    return _sequence_call(SEQUENCE_MAP, name, node, fed, [fn_node], t.SequenceType(fn_type.result))


def sequence_reduce(seq: Any, zero: Any, op: Any) -> comp.Value:
    """Folds a sequence with `op(accumulator, element)` starting from `zero`."""
    name = "sequence_reduce"
    _require_trace(name)
    node, seq_type, fed = _sequence_operand(seq, name)
    zero_node = _node(zero, name, "zero")
    op_node = _node(op, name, "op")
    op_type = _function(op_node, name, "op")
    _applies(op_type, t.StructType([zero_node.type_signature, seq_type.element]), name, "op")
    return _sequence_call(SEQUENCE_REDUCE, name, node, fed, [zero_node, op_node], zero_node.type_signature)


def sequence_sum(seq: Any) -> comp.Value:
    """Sums the elements of a numeric sequence (pointwise if federated)."""
    name = "sequence_sum"
    _require_trace(name)
    node, seq_type, fed = _sequence_operand(seq, name)
    if not t.is_numeric(seq_type.element):
        raise _error(name, "seq: a sequence of numeric tensors", seq_type)
    return _sequence_call(SEQUENCE_SUM, name, node, fed, [], seq_type.element)
