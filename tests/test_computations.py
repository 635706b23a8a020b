"""Tests of computation decorators, type signatures, intrinsic type checking and
execution contexts."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx

F32 = mpx.TensorType(np.float32)
I32 = mpx.TensorType(np.int32)
CLIENTS_F32 = mpx.FederatedType(F32, mpx.CLIENTS)
SERVER_F32 = mpx.FederatedType(F32, mpx.SERVER)
CLIENTS_I32 = mpx.FederatedType(I32, mpx.CLIENTS)
SEQ_F32 = mpx.SequenceType(F32)
SEQ_I32 = mpx.SequenceType(I32)


def add_one_f32():
    @mpx.tf_computation(np.float32)
    def add_one(x):
        return x + 1.0

    return add_one


def add_f32():
    @mpx.tf_computation(np.float32, np.float32)
    def add(a, b):
        return a + b

    return add


# ------------------------------------------------------------ tf_computation


def test_tf_computation_type_signature():
    add_one = add_one_f32()
    assert isinstance(add_one, mpx.Computation)
    assert isinstance(add_one.type_signature, mpx.FunctionType)
    assert add_one.type_signature == mpx.FunctionType(F32, F32)
    assert str(add_one.type_signature) == "(float32 -> float32)"


@pytest.mark.parametrize("spec", [np.float32, tf.float32, F32])
def test_tf_computation_parameter_spec_forms(spec):
    @mpx.tf_computation(spec)
    def square(x):
        return x * x

    assert square.type_signature == mpx.FunctionType(F32, F32)


def test_tf_computation_bare_and_empty_decorator(factory):
    @mpx.tf_computation
    def seven():
        return tf.constant(7, tf.int32)

    @mpx.tf_computation()
    def eight():
        return tf.constant(8, tf.int32)

    for comp in (seven, eight):
        assert isinstance(comp, mpx.Computation)
        assert comp.type_signature.parameter is None
        assert comp.type_signature.result == I32
    with mpx.execution_context(factory):
        assert seven() == 7
        assert eight() == 8


def test_tf_computation_result_types():
    @mpx.tf_computation(mpx.TensorType(np.float32, [3]))
    def stats(x):
        return tf.reduce_sum(x), tf.shape(x, out_type=tf.int32), tf.cast(x, tf.int64)

    result = stats.type_signature.result
    assert str(result) == "<float32,int32[1],int64[3]>"


def test_tf_computation_multiple_positional_parameters(factory):
    @mpx.tf_computation(np.float32, np.int32, mpx.TensorType(np.float32, [2]))
    def combine(a, b, c):
        return a * tf.cast(b, tf.float32) + tf.reduce_sum(c)

    assert combine.type_signature.result == F32
    with mpx.execution_context(factory):
        assert combine(2.0, 3, np.array([1.0, 0.5], np.float32)) == 7.5
        with pytest.raises(TypeError):
            combine(2.0, 3)  # too few arguments
        with pytest.raises(TypeError):
            combine(2.0, 3, [1.0, 0.5], 4.0)  # too many


def test_tf_computation_body_is_converted_by_autograph(factory):
    # The user's body (and what it calls) goes through AutoGraph: Python `if`/`for` on
    # tensors become graph control flow (the runtime's own packing around it does not).
    def clipped(v):
        if tf.reduce_sum(v) > 1.0:
            v = v / tf.reduce_sum(v)
        return v

    @mpx.tf_computation(mpx.TensorType(np.float32, [2]), np.int32)
    def halve_n_times(x, n):
        for _ in tf.range(n):
            x = x / 2.0
        return clipped(x), {"n": n}

    with mpx.execution_context(factory):
        small, big = halve_n_times(np.array([1.0, 2.0], np.float32), 3), halve_n_times(np.array([8.0, 8.0], np.float32), 1)
    np.testing.assert_allclose(small[0], [0.125, 0.25])
    np.testing.assert_allclose(big[0], [0.5, 0.5])
    assert small[1]["n"] == 3


def test_tf_computation_called_in_plain_python(factory):
    add_one = add_one_f32()
    with mpx.execution_context(factory):
        result = add_one(41.0)
        again = add_one(np.float32(-1.0))
    assert result == 42.0 and again == 0.0


# ------------------------------------------------------ federated signatures


def signature(fn, *parameter_types):
    return str(mpx.federated_computation(*parameter_types)(fn).type_signature)


def test_intrinsic_type_signatures():
    add_one = add_one_f32()
    add = add_f32()

    @mpx.tf_computation
    def one():
        return tf.constant(1.0, tf.float32)

    @mpx.tf_computation(np.float32)
    def identity(x):
        return x

    assert (
        signature(lambda x: mpx.federated_sum(x), CLIENTS_F32)
        == "({float32}@CLIENTS -> float32@SERVER)"
    )
    assert (
        signature(lambda x: mpx.federated_mean(x), CLIENTS_F32)
        == "({float32}@CLIENTS -> float32@SERVER)"
    )
    assert (
        signature(lambda x: mpx.federated_min(x), CLIENTS_F32)
        == "({float32}@CLIENTS -> float32@SERVER)"
    )
    assert (
        signature(lambda x: mpx.federated_max(x), CLIENTS_F32)
        == "({float32}@CLIENTS -> float32@SERVER)"
    )
    weighted = mpx.federated_computation(CLIENTS_F32, CLIENTS_F32)(
        lambda x, w: mpx.federated_mean(x, w)
    )
    assert weighted.type_signature.result == SERVER_F32
    assert (
        signature(lambda x: mpx.federated_broadcast(x), SERVER_F32)
        == "(float32@SERVER -> float32@CLIENTS)"
    )
    assert (
        signature(lambda x: mpx.federated_map(add_one, x), CLIENTS_F32)
        == "({float32}@CLIENTS -> {float32}@CLIENTS)"
    )
    assert (
        signature(lambda x: mpx.federated_map(add_one, x), SERVER_F32)
        == "(float32@SERVER -> float32@SERVER)"
    )
    assert (
        signature(
            lambda x: mpx.federated_aggregate(x, np.float32(0.0), add, add, identity), CLIENTS_F32
        )
        == "({float32}@CLIENTS -> float32@SERVER)"
    )
    assert (
        signature(lambda x: mpx.federated_zip((x, x)), CLIENTS_F32)
        == "({float32}@CLIENTS -> {<float32,float32>}@CLIENTS)"
    )
    eval_clients = mpx.federated_computation()(lambda: mpx.federated_eval(one, mpx.CLIENTS))
    assert eval_clients.type_signature.parameter is None
    assert eval_clients.type_signature.result == CLIENTS_F32
    eval_server = mpx.federated_computation()(lambda: mpx.federated_eval(one, mpx.SERVER))
    assert eval_server.type_signature.result == SERVER_F32
    value_clients = mpx.federated_computation()(
        lambda: mpx.federated_value(np.float32(1.0), mpx.CLIENTS)
    )
    assert value_clients.type_signature.result == mpx.FederatedType(
        F32, mpx.CLIENTS, all_equal=True
    )
    value_server = mpx.federated_computation()(
        lambda: mpx.federated_value(np.float32(1.0), mpx.SERVER)
    )
    assert value_server.type_signature.result == SERVER_F32
    assert signature(lambda x: mpx.sequence_sum(x), SEQ_I32) == "(int32* -> int32)"


def test_sequence_intrinsic_signatures():
    @mpx.tf_computation(np.int32)
    def to_float(x):
        return tf.cast(x, tf.float32)

    @mpx.tf_computation(np.float32, np.int32)
    def accumulate(acc, x):
        return acc + tf.cast(x, tf.float32)

    mapped = mpx.federated_computation(SEQ_I32)(lambda s: mpx.sequence_map(to_float, s))
    assert mapped.type_signature.result == SEQ_F32
    reduced = mpx.federated_computation(SEQ_I32)(
        lambda s: mpx.sequence_reduce(s, np.float32(0.0), accumulate)
    )
    assert reduced.type_signature.result == F32


def test_sequence_reduce_with_mixed_accumulator(factory):
    @mpx.tf_computation(np.float32, np.int32)
    def accumulate(acc, x):
        return acc * 0.5 + tf.cast(x, tf.float32)

    @mpx.federated_computation(SEQ_I32)
    def fold(s):
        return mpx.sequence_reduce(s, np.float32(1.0), accumulate)

    expected = 1.0
    for v in [4, 2, 8]:
        expected = expected * 0.5 + v
    with mpx.execution_context(factory):
        assert fold([4, 2, 8]) == pytest.approx(expected)


# ------------------------------------------------ trace-time type checking


def _bad_uses():
    """name -> (parameter types, body, substring of what the intrinsic got)."""
    add_one = add_one_f32()
    add = add_f32()

    @mpx.tf_computation(np.int32, np.int32)
    def add_i32(a, b):
        return a + b

    @mpx.tf_computation(np.float32)
    def identity(x):
        return x

    @mpx.tf_computation(np.int32)
    def int_fn(x):
        return x

    return {
        "federated_sum": ((SERVER_F32,), lambda x: mpx.federated_sum(x), "float32@SERVER"),
        "federated_mean": ((SERVER_F32,), lambda x: mpx.federated_mean(x), "float32@SERVER"),
        "federated_min": ((SERVER_F32,), lambda x: mpx.federated_min(x), "float32@SERVER"),
        "federated_max": ((SERVER_F32,), lambda x: mpx.federated_max(x), "float32@SERVER"),
        "federated_broadcast": (
            (CLIENTS_F32,),
            lambda x: mpx.federated_broadcast(x),
            "{float32}@CLIENTS",
        ),
        "federated_map": ((CLIENTS_I32,), lambda x: mpx.federated_map(add_one, x), "int32"),
        "federated_zip": (
            (CLIENTS_F32, SERVER_F32),
            lambda a, b: mpx.federated_zip((a, b)),
            "SERVER",
        ),
        "federated_aggregate": (
            (CLIENTS_F32,),
            lambda x: mpx.federated_aggregate(x, np.int32(0), add_i32, add, identity),
            "int32",
        ),
        "federated_eval": ((), lambda: mpx.federated_eval(identity, mpx.CLIENTS), "float32"),
        "sequence_sum": ((F32,), lambda x: mpx.sequence_sum(x), "float32"),
        "sequence_map": ((SEQ_F32,), lambda s: mpx.sequence_map(int_fn, s), "float32"),
        "sequence_reduce": (
            (SEQ_F32,),
            lambda s: mpx.sequence_reduce(s, np.int32(0), add_i32),
            "float32",
        ),
    }


BAD_USES = [
    "federated_sum",
    "federated_mean",
    "federated_min",
    "federated_max",
    "federated_broadcast",
    "federated_map",
    "federated_zip",
    "federated_aggregate",
    "federated_eval",
    "sequence_sum",
    "sequence_map",
    "sequence_reduce",
]


@pytest.mark.parametrize("name", BAD_USES)
def test_intrinsic_type_errors_name_the_intrinsic(name):
    parameter_types, body, got = _bad_uses()[name]
    with pytest.raises(TypeError) as info:
        mpx.federated_computation(*parameter_types)(body)
    message = str(info.value)
    assert name in message, message
    assert got in message, message


def test_federated_mean_weight_type_errors():
    with pytest.raises(TypeError, match="federated_mean"):
        mpx.federated_computation(CLIENTS_F32, SERVER_F32)(lambda x, w: mpx.federated_mean(x, w))


def test_unplaced_call_on_federated_value_is_type_error():
    add_one = add_one_f32()
    with pytest.raises(TypeError, match="float32"):
        mpx.federated_computation(CLIENTS_F32)(lambda x: add_one(x))


# ------------------------------------------------------ call-time checking


def test_call_time_type_errors(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def total(readings):
        return mpx.federated_sum(readings)

    @mpx.tf_computation(mpx.StructType([("a", F32), ("b", F32)]))
    def diff(pair):
        return pair.a - pair.b

    with mpx.execution_context(factory):
        assert total([1.0, 2.0]) == 3.0
        with pytest.raises(TypeError, match=r"readings|float32"):
            total([[1.0, 2.0], [3.0, 4.0]])  # per-client vectors, scalars expected
        with pytest.raises(TypeError):
            total()  # missing argument
        with pytest.raises(TypeError):
            total([1.0], [2.0])  # one argument too many
        assert diff(collections.OrderedDict(a=5.0, b=2.0)) == 3.0
        with pytest.raises(TypeError):
            diff(collections.OrderedDict(a=5.0, b=2.0, c=1.0))  # wrong structure


# ----------------------------------------------------- composition


def test_federated_computation_calls_unplaced_tf_computation(factory):
    add_one = add_one_f32()

    @mpx.federated_computation(np.float32)
    def twice(x):
        return add_one(add_one(x))

    assert twice.type_signature == mpx.FunctionType(F32, F32)
    with mpx.execution_context(factory):
        assert twice(1.0) == 3.0


def test_nested_federated_computations_three_levels(factory):
    add_one = add_one_f32()

    @mpx.federated_computation(CLIENTS_F32)
    def level1(x):
        return mpx.federated_map(add_one, x)

    @mpx.federated_computation(CLIENTS_F32)
    def level2(x):
        return mpx.federated_sum(level1(level1(x)))

    @mpx.federated_computation(CLIENTS_F32, SERVER_F32)
    def level3(x, s):
        return level2(x), mpx.federated_map(add_one, s)

    with mpx.execution_context(factory):
        total, bumped = level3([1.0, 2.0, 3.0], 10.0)
    assert total == 12.0
    assert bumped == 11.0


def test_map_over_struct_valued_clients(factory):
    @mpx.tf_computation(mpx.StructType([("x", F32), ("y", F32)]))
    def product(p):
        return p.x * p.y

    @mpx.federated_computation(
        mpx.FederatedType(mpx.StructType([("x", F32), ("y", F32)]), mpx.CLIENTS)
    )
    def total_product(points):
        return mpx.federated_sum(mpx.federated_map(product, points))

    points = [collections.OrderedDict(x=float(i), y=2.0) for i in range(4)]
    with mpx.execution_context(factory):
        assert total_product(points) == 12.0


# ----------------------------------------------------- execution contexts


def test_execution_context_objects(factory):
    add_one = add_one_f32()
    context = mpx.ExecutionContext(factory)
    with mpx.execution_context(factory):
        assert add_one(1.0) == 2.0
    mpx.set_execution_context(context)
    assert add_one(2.0) == 3.0
    mpx.set_execution_context(factory)
    assert add_one(3.0) == 4.0


def test_set_local_execution_context():
    @mpx.tf_computation
    def rand():
        return tf.random.uniform((), dtype=tf.float32)

    @mpx.federated_computation()
    def at_clients():
        return mpx.federated_eval(rand, mpx.CLIENTS)

    mpx.set_local_execution_context(default_num_clients=4)
    values = at_clients()
    assert isinstance(values, list) and len(values) == 4
    assert len({float(v) for v in values}) == 4
