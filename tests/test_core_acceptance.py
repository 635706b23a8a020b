"""Core acceptance tests for mp_executors (the scenarios required by the issue).

Every test takes the ``factory`` fixture (see conftest.py) and runs its
computations under ``with mpx.execution_context(factory):``.
"""

import asyncio
import collections
import math
import re
from collections.abc import Mapping

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx

F32 = mpx.TensorType(np.float32)
I32 = mpx.TensorType(np.int32)
I64 = mpx.TensorType(np.int64)
CLIENTS_F32 = mpx.FederatedType(F32, mpx.CLIENTS)
SERVER_F32 = mpx.FederatedType(F32, mpx.SERVER)
CLIENTS_I32 = mpx.FederatedType(I32, mpx.CLIENTS)

CLIENT_VALUES = [10.0, 11.0, 12.0]


# ---------------------------------------------------------------- helpers


def field(value, name):
    """Reads a named field of a struct, whatever container it came back in."""
    if isinstance(value, Mapping):
        return value[name]
    return getattr(value, name)


def assert_numpy_scalar(value, dtype):
    assert isinstance(value, (np.generic, np.ndarray)), type(value)
    assert np.shape(value) == (), np.shape(value)
    assert value.dtype == np.dtype(dtype), value.dtype


def as_floats(values):
    assert isinstance(values, list), type(values)
    return [float(v) for v in values]


def make_add(dtype):
    @mpx.tf_computation(dtype, dtype)
    def add(a, b):
        return a + b

    return add


def make_identity(dtype):
    @mpx.tf_computation(dtype)
    def identity(a):
        return a

    return identity


def make_random():
    @mpx.tf_computation
    def random():
        return tf.random.uniform((), dtype=tf.float32)

    return random


def make_add_one():
    @mpx.tf_computation(np.float32)
    def add_one(x):
        return x + 1.0

    return add_one


# ------------------------------------------------ the 3-client scenarios


def test_federated_sum(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def total(x):
        return mpx.federated_sum(x)

    with mpx.execution_context(factory):
        result = total(CLIENT_VALUES)
    assert_numpy_scalar(result, np.float32)
    assert result == 33.0


def test_federated_mean(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def mean(x):
        return mpx.federated_mean(x)

    with mpx.execution_context(factory):
        result = mean(CLIENT_VALUES)
    assert_numpy_scalar(result, np.float32)
    assert result == pytest.approx(11.0, rel=1e-6)


def test_federated_weighted_mean(factory):
    @mpx.federated_computation(CLIENTS_F32, CLIENTS_F32)
    def weighted_mean(x, w):
        return mpx.federated_mean(x, weight=w)

    weights = [10.0, 11.0, 12.0]
    with mpx.execution_context(factory):
        result = weighted_mean(CLIENT_VALUES, weights)
    assert_numpy_scalar(result, np.float32)
    assert result == pytest.approx(365.0 / 33.0, rel=1e-6)
    assert result == pytest.approx(np.average(CLIENT_VALUES, weights=weights), rel=1e-6)


def test_federated_aggregate(factory):
    add = make_add(np.float32)
    identity = make_identity(np.float32)

    @mpx.federated_computation(CLIENTS_F32)
    def aggregate(x):
        return mpx.federated_aggregate(x, np.float32(10.0), add, add, identity)

    with mpx.execution_context(factory):
        result = aggregate(CLIENT_VALUES)
    assert_numpy_scalar(result, np.float32)
    # 3 clients fit in one block: zero is used once.
    assert result == 43.0


def test_federated_zip_with_itself(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def zip_self(x):
        return mpx.federated_zip((x, x))

    with mpx.execution_context(factory):
        result = zip_self(CLIENT_VALUES)
    assert isinstance(result, list)
    assert [(float(e[0]), float(e[1])) for e in result] == [(10, 10), (11, 11), (12, 12)]


def test_broadcast_then_map(factory, make_factory):
    add_one = make_add_one()

    @mpx.federated_computation(SERVER_F32, CLIENTS_F32)
    def broadcast_add_one(s, clients):  # `clients` only fixes the client count
        del clients
        return mpx.federated_map(add_one, mpx.federated_broadcast(s))

    with mpx.execution_context(factory):
        result = broadcast_add_one(np.float32(10.0), CLIENT_VALUES)
    assert as_floats(result) == [11.0, 11.0, 11.0]

    @mpx.federated_computation(SERVER_F32)
    def broadcast_add_one_default(s):
        return mpx.federated_map(add_one, mpx.federated_broadcast(s))

    with mpx.execution_context(make_factory(default_num_clients=3)):
        result = broadcast_add_one_default(10.0)
    assert as_floats(result) == [11.0, 11.0, 11.0]


def test_federated_eval_random_at_clients_is_per_client(factory, make_factory):
    random = make_random()

    @mpx.federated_computation()
    def random_at_clients():
        return mpx.federated_eval(random, mpx.CLIENTS)

    with mpx.execution_context(make_factory(default_num_clients=3)):
        result = random_at_clients()
    values = as_floats(result)
    assert len(values) == 3
    assert len(set(values)) == 3, values
    assert all(0.0 <= v < 1.0 for v in values)

    @mpx.federated_computation(CLIENTS_F32)
    def random_like(x):
        del x
        return mpx.federated_eval(random, mpx.CLIENTS)

    with mpx.execution_context(factory):
        values = as_floats(random_like(CLIENT_VALUES))
    assert len(values) == 3
    assert len(set(values)) == 3, values


def test_unplaced_value_is_computed_once(factory):
    random = make_random()

    @mpx.federated_computation()
    def pair():
        v = random()
        return v, v

    with mpx.execution_context(factory):
        first = pair()
        second = pair()
    assert isinstance(first, tuple) and len(first) == 2
    assert first[0] == first[1]
    assert second[0] == second[1]
    # ... and `random` really is random, so the equality above means something.
    assert first[0] != second[0]


def test_federated_min_max(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def min_max(x):
        return mpx.federated_min(x), mpx.federated_max(x)

    with mpx.execution_context(factory):
        lo, hi = min_max([11.0, 10.0, 12.0])
    assert_numpy_scalar(lo, np.float32)
    assert (float(lo), float(hi)) == (10.0, 12.0)


# ----------------------------------------------------- fanout and counts


def test_sum_with_small_max_fanout(factory, make_factory):
    @mpx.federated_computation(CLIENTS_I32)
    def total(x):
        return mpx.federated_sum(x)

    with mpx.execution_context(make_factory(max_fanout=3)):
        result = total(list(range(1, 11)))
    assert_numpy_scalar(result, np.int32)
    assert result == 55
    with mpx.execution_context(factory):
        assert total(list(range(1, 11))) == 55


def test_identity_with_changing_number_of_clients(factory):
    @mpx.federated_computation(CLIENTS_I32)
    def identity(x):
        return x

    five = list(range(5))
    ten = list(range(100, 110))
    with mpx.execution_context(factory):
        r5 = identity(five)
        r10 = identity(ten)
        r5_again = identity(five)
    for got, want in [(r5, five), (r10, ten), (r5_again, five)]:
        assert isinstance(got, list)
        assert [int(v) for v in got] == want


# ----------------------------------------------------- temperature sensors


def test_temperature_sensor_example(factory):
    seq_f32 = mpx.SequenceType(F32)

    @mpx.tf_computation(seq_f32, np.float32)
    def count_over(readings, threshold):
        return readings.reduce(np.float32(0.0), lambda n, t: n + tf.cast(t > threshold, tf.float32))

    @mpx.tf_computation(seq_f32)
    def count_total(readings):
        return readings.reduce(np.float32(0.0), lambda n, _: n + 1.0)

    @mpx.federated_computation(mpx.FederatedType(seq_f32, mpx.CLIENTS), SERVER_F32)
    def counts_over(readings, threshold):
        return mpx.federated_map(
            count_over, mpx.federated_zip((readings, mpx.federated_broadcast(threshold)))
        )

    @mpx.federated_computation(mpx.FederatedType(seq_f32, mpx.CLIENTS), SERVER_F32)
    def mean_count_over(readings, threshold):
        counts = mpx.federated_map(
            count_over, mpx.federated_zip((readings, mpx.federated_broadcast(threshold)))
        )
        totals = mpx.federated_map(count_total, readings)
        return mpx.federated_mean(counts, weight=totals)

    def datasets():
        return [
            tf.data.Dataset.range(n).map(lambda x: tf.cast(x, tf.float32)) for n in (10, 20, 30)
        ]

    with mpx.execution_context(factory):
        per_client = counts_over(datasets(), 15.0)
        result = mean_count_over(datasets(), 15.0)
    assert as_floats(per_client) == [0.0, 4.0, 14.0]
    assert_numpy_scalar(result, np.float32)
    assert result == pytest.approx(500.0 / 60.0, rel=1e-6)


def test_dataset_sum_in_tf_computation(factory):
    @mpx.tf_computation(mpx.SequenceType(I64))
    def total(ds):
        return ds.reduce(np.int64(0), lambda a, b: a + b)

    with mpx.execution_context(factory):
        result = total(tf.data.Dataset.range(10))
    assert_numpy_scalar(result, np.int64)
    assert result == 45


# ----------------------------------------------------- structs and containers

Stats = collections.namedtuple("Stats", ["total", "average"])


@pytest.mark.parametrize(
    "make_container",
    [
        pytest.param(lambda t, a: collections.OrderedDict(total=t, average=a), id="OrderedDict"),
        pytest.param(lambda t, a: Stats(total=t, average=a), id="namedtuple"),
        pytest.param(lambda t, a: {"total": t, "average": a}, id="dict"),
    ],
)
def test_named_struct_results_keep_names_and_container(factory, make_container):
    @mpx.federated_computation(CLIENTS_F32)
    def stats(x):
        return make_container(mpx.federated_sum(x), mpx.federated_mean(x))

    expected_type = type(make_container(0, 0))
    with mpx.execution_context(factory):
        result = stats(CLIENT_VALUES)
    assert type(result) is expected_type
    if isinstance(result, Mapping):
        assert list(result) == ["total", "average"]
    else:
        assert result._fields == ("total", "average")
    assert field(result, "total") == 33.0
    assert field(result, "average") == pytest.approx(11.0)


Point = collections.namedtuple("Point", ["x", "y"])


def test_tf_computation_struct_parameters(factory):
    seen = []

    @mpx.tf_computation(Point(np.float32, np.float32))
    def cross(p):
        seen.append(type(p))
        return p.x * 10.0 + p.y

    @mpx.tf_computation({"a": np.float32, "b": np.int32})
    def combine(d):
        seen.append(type(d))
        return d["a"] * tf.cast(d["b"], tf.float32)

    with mpx.execution_context(factory):
        assert cross(Point(2.0, 3.0)) == 23.0
        assert combine({"a": 1.5, "b": 4}) == 6.0
    # The function saw its parameter in the container the type was built from.
    assert Point in seen and dict in seen
    assert set(seen) <= {Point, dict}


def test_federated_zip_of_named_structs(factory):
    @mpx.tf_computation(mpx.StructType([("a", F32), ("b", F32)]))
    def a_minus_b(s):
        return field(s, "a") - field(s, "b")

    @mpx.federated_computation(CLIENTS_F32, CLIENTS_F32)
    def zipped(a, b):
        return mpx.federated_zip(collections.OrderedDict(a=a, b=b))

    @mpx.federated_computation(CLIENTS_F32, CLIENTS_F32)
    def differences(a, b):
        return mpx.federated_map(a_minus_b, mpx.federated_zip(collections.OrderedDict(a=a, b=b)))

    assert str(zipped.type_signature.result) == "{<a=float32,b=float32>}@CLIENTS"
    with mpx.execution_context(factory):
        pairs = zipped([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
        diffs = differences([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    assert isinstance(pairs, list) and len(pairs) == 3
    assert [(float(field(p, "a")), float(field(p, "b"))) for p in pairs] == [
        (1.0, 10.0),
        (2.0, 20.0),
        (3.0, 30.0),
    ]
    assert as_floats(diffs) == [-9.0, -18.0, -27.0]


# ----------------------------------------------------- more intrinsics


def test_federated_value_at_server_and_clients(factory, make_factory):
    identity = make_identity(np.float32)

    @mpx.federated_computation()
    def at_server():
        return mpx.federated_value(np.float32(2.5), mpx.SERVER)

    @mpx.federated_computation()
    def at_clients():
        v = mpx.federated_value(np.float32(2.5), mpx.CLIENTS)
        return v, mpx.federated_sum(mpx.federated_map(identity, v))

    with mpx.execution_context(factory):
        server = at_server()
    assert_numpy_scalar(server, np.float32)
    assert server == 2.5
    with mpx.execution_context(make_factory(default_num_clients=3)):
        clients_value, total = at_clients()
    # An all-equal CLIENTS value comes back as one value.
    assert_numpy_scalar(clients_value, np.float32)
    assert clients_value == 2.5
    assert total == 7.5


def test_federated_map_at_server(factory):
    add_one = make_add_one()

    @mpx.federated_computation(SERVER_F32)
    def server_add_one(x):
        return mpx.federated_map(add_one, x)

    assert server_add_one.type_signature.result == SERVER_F32
    with mpx.execution_context(factory):
        result = server_add_one(41.0)
    assert_numpy_scalar(result, np.float32)
    assert result == 42.0


def test_sequence_intrinsics(factory):
    seq_i32 = mpx.SequenceType(I32)
    add = make_add(np.int32)

    @mpx.tf_computation(np.int32)
    def square(x):
        return x * x

    @mpx.federated_computation(seq_i32)
    def sum_of_squares(s):
        return mpx.sequence_sum(mpx.sequence_map(square, s))

    @mpx.federated_computation(seq_i32)
    def reduce_from_100(s):
        return mpx.sequence_reduce(s, np.int32(100), add)

    @mpx.federated_computation(seq_i32)
    def plain_sum(s):
        return mpx.sequence_sum(s)

    data = [1, 2, 3, 4]
    with mpx.execution_context(factory):
        assert sum_of_squares(data) == 30
        assert reduce_from_100(data) == 110
        assert plain_sum(data) == 10
        assert plain_sum(np.array(data, dtype=np.int32)) == 10
        assert plain_sum(tf.data.Dataset.from_tensor_slices(np.array(data, np.int32))) == 10


def test_nested_federated_computation(factory):
    @mpx.tf_computation(np.float32)
    def double(x):
        return x * 2.0

    @mpx.federated_computation(CLIENTS_F32)
    def inner_sum(x):
        return mpx.federated_sum(x)

    @mpx.federated_computation(CLIENTS_F32)
    def outer(x):
        return mpx.federated_map(double, inner_sum(x))

    assert str(outer.type_signature) == "({float32}@CLIENTS -> float32@SERVER)"
    with mpx.execution_context(factory):
        assert outer(CLIENT_VALUES) == 66.0


def test_computations_passed_to_federated_map(factory):
    def map_then_sum(fn):
        @mpx.federated_computation(CLIENTS_F32)
        def comp(x):
            return mpx.federated_sum(mpx.federated_map(fn, x))

        return comp

    @mpx.tf_computation(np.float32)
    def square(x):
        return x * x

    @mpx.tf_computation(np.float32)
    def negate(x):
        return -x

    with mpx.execution_context(factory):
        assert map_then_sum(square)(CLIENT_VALUES) == 100.0 + 121.0 + 144.0
        assert map_then_sum(negate)(CLIENT_VALUES) == -33.0
        assert map_then_sum(make_add_one())(CLIENT_VALUES) == 36.0


# ----------------------------------------------------- errors


def test_type_error_at_trace_time_names_intrinsic(factory):
    del factory  # tracing needs no executor
    with pytest.raises(TypeError) as info:

        @mpx.federated_computation(SERVER_F32)
        def bad_sum(x):
            return mpx.federated_sum(x)

    message = str(info.value)
    assert "federated_sum" in message
    assert "float32@SERVER" in message  # what it got


def test_type_error_when_tracing_a_call_with_wrong_argument(factory):
    del factory
    add_one = make_add_one()
    with pytest.raises(TypeError, match="float32"):

        @mpx.federated_computation(CLIENTS_I32)
        def bad_call(x):
            return mpx.federated_map(add_one, x)

    with pytest.raises(TypeError, match="float32"):

        @mpx.federated_computation(CLIENTS_F32)
        def bad_direct_call(x):
            return add_one(x)  # a federated value to an unplaced parameter


def test_type_error_at_call_time_names_parameter(factory):
    @mpx.tf_computation(mpx.TensorType(np.float32, [3]))
    def total(temperature):
        return tf.reduce_sum(temperature)

    @mpx.federated_computation(SERVER_F32)
    def at_server(threshold):
        return threshold

    with mpx.execution_context(factory):
        assert total([1.0, 2.0, 3.0]) == 6.0
        with pytest.raises(TypeError, match=r"temperature|float32\[3\]"):
            total([1.0, 2.0, 3.0, 4.0])  # wrong shape
        with pytest.raises(TypeError, match=r"temperature|float32\[3\]"):
            total("not a tensor")
        with pytest.raises(TypeError, match=r"threshold|float32"):
            at_server([1.0, 2.0, 3.0])  # a list where a SERVER scalar is expected


def test_zero_clients_error_mentions_default_num_clients(factory):
    random = make_random()

    @mpx.federated_computation()
    def random_at_clients():
        return mpx.federated_eval(random, mpx.CLIENTS)

    with mpx.execution_context(factory):  # default_num_clients=0
        with pytest.raises(ValueError, match="default_num_clients"):
            random_at_clients()


def test_inconsistent_cardinalities(factory):
    clients_f32 = CLIENTS_F32
    assert mpx.infer_cardinalities([1.0, 2.0, 3.0], clients_f32) == {mpx.CLIENTS: 3}
    struct_t = mpx.StructType([("a", clients_f32), ("b", clients_f32)])
    with pytest.raises(ValueError) as info:
        mpx.infer_cardinalities(
            collections.OrderedDict(a=[1.0, 2.0, 3.0], b=[1.0, 2.0, 3.0, 4.0, 5.0]), struct_t
        )
    assert re.search(r"\b3\b", str(info.value)) and re.search(r"\b5\b", str(info.value))

    @mpx.federated_computation(clients_f32, clients_f32)
    def add_sums(a, b):
        return mpx.federated_sum(a), mpx.federated_sum(b)

    with mpx.execution_context(factory):
        with pytest.raises(ValueError) as info:
            add_sums([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert re.search(r"\b3\b", str(info.value)) and re.search(r"\b5\b", str(info.value))


# ----------------------------------------------------- execution machinery


def test_call_inside_running_asyncio_loop(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def total(x):
        return mpx.federated_sum(x)

    add_one = make_add_one()

    async def main():
        await asyncio.sleep(0)
        first = total(CLIENT_VALUES)
        await asyncio.sleep(0)
        return first, add_one(1.0)

    with mpx.execution_context(factory):
        result, plain = asyncio.run(main())
    assert result == 33.0
    assert plain == 2.0


class CountingFactory(mpx.ExecutorFactory):
    """Wraps a factory and records create_executor/clean_up_executor calls."""

    def __init__(self, inner):
        super().__init__()
        self._inner = inner
        self.created = []
        self.cleaned = []

    def create_executor(self, cardinalities):
        self.created.append(dict(cardinalities))
        return self._inner.create_executor(cardinalities)

    def clean_up_executor(self, cardinalities):
        self.cleaned.append(dict(cardinalities))
        return self._inner.clean_up_executor(cardinalities)

    def close(self):  # the inner factory is session-owned
        pass


def test_executor_factory_is_lazy(factory):
    counting = CountingFactory(factory)

    @mpx.federated_computation(CLIENTS_F32)
    def total(x):
        return mpx.federated_sum(x)

    assert counting.created == []
    with mpx.execution_context(counting):
        assert counting.created == []  # entering the context creates nothing
        assert total(CLIENT_VALUES) == 33.0
        assert any(c.get(mpx.CLIENTS) == 3 for c in counting.created), counting.created
        assert total([1.0, 2.0, 3.0, 4.0, 5.0]) == 15.0
        assert any(c.get(mpx.CLIENTS) == 5 for c in counting.created), counting.created


def test_public_executor_api(factory):
    ex = mpx.executors
    for name in [
        "Executor",
        "ExecutorValue",
        "EagerTFExecutor",
        "ReferenceResolvingExecutor",
        "FederatingExecutor",
    ]:
        assert isinstance(getattr(ex, name), type), name
    for name in ["EagerTFExecutor", "ReferenceResolvingExecutor", "FederatingExecutor"]:
        assert issubclass(getattr(ex, name), ex.Executor), name
    assert isinstance(factory, mpx.ExecutorFactory)
    with pytest.raises(TypeError):
        mpx.ExecutorFactory()  # abstract


# ----------------------------------------------------- reduction order


def test_aggregate_uses_fixed_block_order(factory, make_factory):
    from mp_executors.executors.client_shard import BLOCK_SIZE

    assert isinstance(BLOCK_SIZE, int) and BLOCK_SIZE >= 8
    p, q, zero = 1_000_003, 2_147_483_647, 7

    # Order-sensitive, non-commutative operations: the result identifies the
    # exact block structure, accumulation order and merge order.
    @mpx.tf_computation(np.int64, np.int64)
    def accumulate(acc, x):
        return (acc * 31 + x) % p

    @mpx.tf_computation(np.int64, np.int64)
    def merge(a, b):
        return (a * p + b) % q

    @mpx.tf_computation(np.int64)
    def report(a):
        return a * 2 + 1

    @mpx.federated_computation(mpx.FederatedType(I64, mpx.CLIENTS))
    def aggregate(x):
        return mpx.federated_aggregate(x, np.int64(zero), accumulate, merge, report)

    n = 2 * BLOCK_SIZE + 3
    values = [int(v) for v in np.random.default_rng(7).integers(0, 1000, n)]
    blocks = []
    for start in range(0, n, BLOCK_SIZE):
        acc = zero
        for v in values[start : start + BLOCK_SIZE]:
            acc = (acc * 31 + v) % p
        blocks.append(acc)
    merged = blocks[0]
    for b in blocks[1:]:
        merged = (merged * p + b) % q
    expected = merged * 2 + 1

    with mpx.execution_context(factory):
        assert aggregate(values) == expected
    with mpx.execution_context(make_factory(max_fanout=3)):
        assert aggregate(values) == expected


def test_float_sum_independent_of_fanout(factory, make_factory):
    @mpx.federated_computation(CLIENTS_F32)
    def total(x):
        return mpx.federated_sum(x)

    values = [float(v) for v in np.random.default_rng(3).normal(size=37).astype(np.float32)]
    with mpx.execution_context(factory):
        wide = total(values)
    with mpx.execution_context(make_factory(max_fanout=3)):
        narrow = total(values)
    assert wide.tobytes() == narrow.tobytes()  # bit-identical
    assert float(wide) == pytest.approx(math.fsum(values), abs=1e-4)


# ----------------------------------------------------- FedAvg


def test_fedavg_linear_regression_matches_numpy(factory):
    num_clients, max_examples, steps, lr, rounds = 20, 10, 5, 0.1, 3
    rng = np.random.default_rng(1234)
    true_w, true_b = np.array([2.0, -1.0]), 0.5
    client_data = []
    for _ in range(num_clients):
        n = int(rng.integers(3, max_examples + 1))
        x = rng.normal(size=(max_examples, 2)).astype(np.float32)
        noise = 0.1 * rng.normal(size=max_examples)
        y = (x @ true_w + true_b + noise).astype(np.float32)
        mask = (np.arange(max_examples) < n).astype(np.float32)
        client_data.append(collections.OrderedDict(x=x, y=y, mask=mask))

    model_t = mpx.StructType([("w", mpx.TensorType(np.float32, [2])), ("b", F32)])
    data_t = mpx.StructType(
        [
            ("x", mpx.TensorType(np.float32, [max_examples, 2])),
            ("y", mpx.TensorType(np.float32, [max_examples])),
            ("mask", mpx.TensorType(np.float32, [max_examples])),
        ]
    )

    @mpx.tf_computation(model_t, data_t)
    def client_update(model, data):
        w, b = field(model, "w"), field(model, "b")
        x, y, mask = field(data, "x"), field(data, "y"), field(data, "mask")
        n = tf.reduce_sum(mask)
        for _ in range(steps):
            err = (tf.linalg.matvec(x, w) + b - y) * mask
            w = w - lr * 2.0 * tf.linalg.matvec(x, err, transpose_a=True) / n
            b = b - lr * 2.0 * tf.reduce_sum(err) / n
        return collections.OrderedDict(w=w, b=b)

    @mpx.tf_computation(data_t)
    def client_weight(data):
        return tf.reduce_sum(field(data, "mask"))

    @mpx.federated_computation(
        mpx.FederatedType(model_t, mpx.SERVER), mpx.FederatedType(data_t, mpx.CLIENTS)
    )
    def fedavg_round(model, data):
        client_models = mpx.federated_map(
            client_update, mpx.federated_zip((mpx.federated_broadcast(model), data))
        )
        weights = mpx.federated_map(client_weight, data)
        return mpx.federated_mean(client_models, weight=weights)

    def reference_round(w, b):
        ws, bs, ns = [], [], []
        for d in client_data:
            x, y, mask = (d[k].astype(np.float64) for k in ("x", "y", "mask"))
            n = mask.sum()
            cw, cb = w.copy(), b
            for _ in range(steps):
                err = (x @ cw + cb - y) * mask
                cw = cw - lr * 2.0 * (x.T @ err) / n
                cb = cb - lr * 2.0 * err.sum() / n
            ws.append(cw)
            bs.append(cb)
            ns.append(n)
        return np.average(ws, axis=0, weights=ns), float(np.average(bs, weights=ns))

    model = collections.OrderedDict(w=np.zeros(2, np.float32), b=np.float32(0.0))
    ref_w, ref_b = np.zeros(2), 0.0
    with mpx.execution_context(factory):
        for _ in range(rounds):
            out = fedavg_round(model, client_data)
            model = collections.OrderedDict(
                w=np.asarray(field(out, "w"), np.float32), b=np.float32(field(out, "b"))
            )
            ref_w, ref_b = reference_round(ref_w, ref_b)
            np.testing.assert_allclose(model["w"], ref_w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(model["b"], ref_b, rtol=1e-4, atol=1e-5)
    # Sanity: training moved the model towards the generating parameters.
    assert np.linalg.norm(model["w"] - true_w) < 0.5 * np.linalg.norm(true_w)
