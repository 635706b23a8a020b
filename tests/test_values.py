"""Tests of how values go in (arguments) and come out (results)."""

import collections
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

Pair = collections.namedtuple("Pair", ["first", "second"])


def field(value, name):
    if isinstance(value, Mapping):
        return value[name]
    return getattr(value, name)


# ------------------------------------------------------------ tensors


@pytest.mark.parametrize(
    "dtype, value",
    [
        (np.float32, 1.5),
        (np.float64, 2.25),
        (np.int32, 7),
        (np.int64, 2**40),
        (np.bool_, True),
    ],
)
def test_scalar_results_are_numpy_scalars(factory, dtype, value):
    @mpx.tf_computation(dtype)
    def identity(x):
        return tf.identity(x)

    with mpx.execution_context(factory):
        result = identity(value)
    assert isinstance(result, np.generic), type(result)
    assert result.dtype == np.dtype(dtype)
    assert result == value


def test_array_results_are_ndarrays(factory):
    @mpx.tf_computation(mpx.TensorType(np.float32, [2, 3]))
    def transpose(x):
        return tf.transpose(x)

    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    with mpx.execution_context(factory):
        from_numpy = transpose(data)
        from_lists = transpose(data.tolist())
    for result in (from_numpy, from_lists):
        assert isinstance(result, np.ndarray)
        assert result.dtype == np.float32
        np.testing.assert_array_equal(result, data.T)


def test_python_scalars_convert_to_declared_dtype(factory):
    @mpx.tf_computation(np.float32, np.int64)
    def scale(x, n):
        return x * tf.cast(n, tf.float32)

    with mpx.execution_context(factory):
        result = scale(2, 3)  # Python ints, declared float32 / int64
    assert isinstance(result, np.generic) and result.dtype == np.float32
    assert result == 6.0


# ------------------------------------------------------------ placements


def test_clients_argument_list_or_tuple_and_clients_result_list(factory):
    @mpx.tf_computation(np.float32)
    def double(x):
        return x * 2.0

    @mpx.federated_computation(CLIENTS_F32)
    def double_all(x):
        return mpx.federated_map(double, x)

    with mpx.execution_context(factory):
        from_list = double_all([1.0, 2.0, 3.0])
        from_tuple = double_all((1.0, 2.0, 3.0))
        from_numpy_items = double_all([np.float32(1.0), np.float32(2.0), np.float32(3.0)])
    for result in (from_list, from_tuple, from_numpy_items):
        assert isinstance(result, list)
        assert all(isinstance(v, np.generic) and v.dtype == np.float32 for v in result)
        assert [float(v) for v in result] == [2.0, 4.0, 6.0]


def test_server_result_is_one_value(factory):
    @mpx.federated_computation(SERVER_F32)
    def identity(x):
        return x

    with mpx.execution_context(factory):
        result = identity(3.0)
    assert isinstance(result, np.generic) and result == 3.0


def test_all_equal_clients_result_is_one_value(factory, make_factory):
    @mpx.federated_computation(SERVER_F32, CLIENTS_F32)
    def broadcast(s, clients):
        del clients
        return mpx.federated_broadcast(s)

    with mpx.execution_context(factory):
        result = broadcast(5.0, [0.0, 0.0, 0.0, 0.0])
    assert not isinstance(result, list)
    assert isinstance(result, np.generic) and result == 5.0

    @mpx.federated_computation(SERVER_F32)
    def broadcast_only(s):
        return mpx.federated_broadcast(s)

    with mpx.execution_context(make_factory(default_num_clients=3)):
        assert broadcast_only(6.0) == 6.0


def test_struct_valued_clients_arguments_and_results(factory):
    point_t = mpx.StructType([("x", F32), ("y", F32)])

    @mpx.tf_computation(point_t)
    def swap(p):
        return collections.OrderedDict(x=field(p, "y"), y=field(p, "x"))

    @mpx.federated_computation(mpx.FederatedType(point_t, mpx.CLIENTS))
    def swap_all(points):
        return mpx.federated_map(swap, points)

    points = [collections.OrderedDict(x=float(i), y=float(10 * i)) for i in range(3)]
    with mpx.execution_context(factory):
        result = swap_all(points)
    assert isinstance(result, list) and len(result) == 3
    for i, p in enumerate(result):
        assert isinstance(p, collections.OrderedDict)
        assert list(p) == ["x", "y"]
        assert (float(p["x"]), float(p["y"])) == (10.0 * i, float(i))


# ------------------------------------------------------------ containers


@pytest.mark.parametrize(
    "build, container",
    [
        pytest.param(lambda a, b: (a, b), tuple, id="tuple"),
        pytest.param(lambda a, b: [a, b], list, id="list"),
        pytest.param(lambda a, b: {"first": a, "second": b}, dict, id="dict"),
        pytest.param(
            lambda a, b: collections.OrderedDict(first=a, second=b),
            collections.OrderedDict,
            id="OrderedDict",
        ),
        pytest.param(lambda a, b: Pair(first=a, second=b), Pair, id="namedtuple"),
    ],
)
def test_tf_computation_result_containers(factory, build, container):
    @mpx.tf_computation(np.float32)
    def split(x):
        return build(x + 1.0, tf.cast(x, tf.int32))

    with mpx.execution_context(factory):
        result = split(2.0)
    assert type(result) is container
    if isinstance(result, Mapping):
        first, second = result["first"], result["second"]
        assert list(result) == ["first", "second"]
    else:
        first, second = result[0], result[1]
        assert len(result) == 2
    assert first == 3.0 and first.dtype == np.float32
    assert second == 2 and second.dtype == np.int32


def test_federated_computation_result_containers(factory):
    @mpx.federated_computation(CLIENTS_F32)
    def several(x):
        return [
            mpx.federated_sum(x),
            Pair(first=mpx.federated_min(x), second=mpx.federated_max(x)),
            (x,),
        ]

    with mpx.execution_context(factory):
        result = several([3.0, 1.0, 2.0])
    assert type(result) is list and len(result) == 3
    assert result[0] == 6.0
    assert type(result[1]) is Pair
    assert (result[1].first, result[1].second) == (1.0, 3.0)
    assert type(result[2]) is tuple
    assert [float(v) for v in result[2][0]] == [3.0, 1.0, 2.0]


def test_nested_containers(factory):
    @mpx.tf_computation(np.int32)
    def nest(x):
        return collections.OrderedDict(outer=(x, [x * 2, {"inner": x * 3}]))

    with mpx.execution_context(factory):
        result = nest(1)
    assert type(result) is collections.OrderedDict
    outer = result["outer"]
    assert type(outer) is tuple and type(outer[1]) is list and type(outer[1][1]) is dict
    assert (outer[0], outer[1][0], outer[1][1]["inner"]) == (1, 2, 3)


def test_struct_parameter_without_container_is_mpx_struct(factory):
    seen = []

    @mpx.tf_computation(mpx.StructType([("a", F32), ("b", F32)]))
    def combine(s):
        seen.append(type(s))
        return s.a * 10.0 + s[1]  # attribute and index access

    @mpx.tf_computation(mpx.StructType([("a", F32), ("b", F32)]))
    def echo(s):
        return s

    with mpx.execution_context(factory):
        assert combine(collections.OrderedDict(a=1.0, b=2.0)) == 12.0
        result = echo(collections.OrderedDict(a=3.0, b=4.0))
    assert seen and all(t is mpx.Struct for t in seen), seen
    # The computation returned an mpx.Struct, so that is what comes back.
    assert isinstance(result, mpx.Struct)
    assert (result.a, result.b) == (3.0, 4.0)
    assert (result[0], result[1]) == (3.0, 4.0)


@pytest.mark.parametrize(
    "spec, argument, container",
    [
        pytest.param(
            Pair(first=np.float32, second=np.float32), Pair(4.0, 2.0), Pair, id="namedtuple"
        ),
        pytest.param(
            {"first": np.float32, "second": np.float32},
            {"first": 4.0, "second": 2.0},
            dict,
            id="dict",
        ),
        pytest.param(
            collections.OrderedDict(first=np.float32, second=np.float32),
            collections.OrderedDict(first=4.0, second=2.0),
            collections.OrderedDict,
            id="OrderedDict",
        ),
    ],
)
def test_struct_parameter_from_container_type(factory, spec, argument, container):
    seen = []

    @mpx.tf_computation(spec)
    def divide(p):
        seen.append(type(p))
        return field(p, "first") / field(p, "second")

    with mpx.execution_context(factory):
        assert divide(argument) == 2.0
    assert seen and all(t is container for t in seen), seen


# ------------------------------------------------------------ sequences


@pytest.mark.parametrize(
    "make_data",
    [
        pytest.param(lambda: tf.data.Dataset.range(1, 6), id="dataset"),
        pytest.param(lambda: [1, 2, 3, 4, 5], id="list"),
        pytest.param(lambda: np.arange(1, 6, dtype=np.int64), id="ndarray"),
    ],
)
def test_sequence_argument_forms(factory, make_data):
    @mpx.tf_computation(mpx.SequenceType(I64))
    def sum_and_count(ds):
        return ds.reduce((np.int64(0), np.int64(0)), lambda acc, x: (acc[0] + x, acc[1] + 1))

    with mpx.execution_context(factory):
        total, count = sum_and_count(make_data())
    assert (total, count) == (15, 5)


def test_sequence_of_vectors_and_batching(factory):
    @mpx.tf_computation(mpx.SequenceType(mpx.TensorType(np.float32, [2])))
    def batched_sums(ds):
        return ds.batch(2).reduce(np.float32(0.0), lambda acc, b: acc + tf.reduce_max(b))

    data = np.arange(10, dtype=np.float32).reshape(5, 2)
    expected = sum(float(data[i : i + 2].max()) for i in range(0, 5, 2))
    with mpx.execution_context(factory):
        assert batched_sums(data) == expected
        assert batched_sums(tf.data.Dataset.from_tensor_slices(data)) == expected


def test_sequence_of_structs_from_dataset(factory):
    element = mpx.StructType([("a", I32), ("b", I32)])

    @mpx.tf_computation(mpx.SequenceType(element))
    def dot(ds):
        return ds.reduce(np.int32(0), lambda acc, e: acc + field(e, "a") * field(e, "b"))

    data = collections.OrderedDict(a=np.array([1, 2, 3], np.int32), b=np.array([4, 5, 6], np.int32))
    with mpx.execution_context(factory):
        assert dot(tf.data.Dataset.from_tensor_slices(data)) == 32


def test_clients_holding_datasets(factory):
    @mpx.tf_computation(mpx.SequenceType(I64))
    def count(ds):
        return ds.reduce(np.int64(0), lambda n, _: n + 1)

    @mpx.federated_computation(mpx.FederatedType(mpx.SequenceType(I64), mpx.CLIENTS))
    def counts(data):
        return mpx.federated_map(count, data)

    lengths = [3, 0, 7, 1]
    with mpx.execution_context(factory):
        result = counts([tf.data.Dataset.range(n) for n in lengths])
        from_lists = counts([list(range(n)) for n in lengths])
    assert [int(v) for v in result] == lengths
    assert [int(v) for v in from_lists] == lengths


# ------------------------------------------------------------ cardinalities


def test_infer_cardinalities():
    clients_f32 = CLIENTS_F32
    assert mpx.infer_cardinalities([1.0, 2.0, 3.0], clients_f32) == {mpx.CLIENTS: 3}
    assert mpx.infer_cardinalities((1.0,), clients_f32) == {mpx.CLIENTS: 1}
    mixed = mpx.StructType([("a", clients_f32), ("b", SERVER_F32)])
    inferred = mpx.infer_cardinalities(collections.OrderedDict(a=[1.0] * 4, b=2.0), mixed)
    assert inferred[mpx.CLIENTS] == 4
    nested = mpx.StructType(
        [("outer", mpx.StructType([("inner", clients_f32)])), ("c", clients_f32)]
    )
    value = collections.OrderedDict(outer=collections.OrderedDict(inner=[1.0] * 6), c=[0.0] * 6)
    assert mpx.infer_cardinalities(value, nested)[mpx.CLIENTS] == 6


def test_infer_cardinalities_inconsistent():
    pair = mpx.StructType([CLIENTS_F32, CLIENTS_F32])
    with pytest.raises(ValueError, match=r"\b2\b(.|\n)*\b4\b|\b4\b(.|\n)*\b2\b"):
        mpx.infer_cardinalities(([1.0, 2.0], [1.0, 2.0, 3.0, 4.0]), pair)
