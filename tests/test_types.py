"""Tests of the type system: construction, compact printing, equality, hashing."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx

F32 = mpx.TensorType(np.float32)
I32 = mpx.TensorType(np.int32)


def np_dtype(dtype):
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


# ----------------------------------------------------------- placements


def test_placements():
    assert mpx.CLIENTS != mpx.SERVER
    assert mpx.CLIENTS == mpx.CLIENTS
    assert str(mpx.CLIENTS) == "CLIENTS"
    assert str(mpx.SERVER) == "SERVER"
    assert len({mpx.CLIENTS, mpx.SERVER, mpx.CLIENTS}) == 2


# ----------------------------------------------------------- TensorType


@pytest.mark.parametrize("spec", [np.float32, np.dtype("float32"), tf.float32])
def test_tensor_type_accepts_numpy_and_tf_dtypes(spec):
    t = mpx.TensorType(spec)
    assert t == F32
    assert hash(t) == hash(F32)
    assert str(t) == "float32"
    assert np_dtype(t.dtype) == np.float32
    assert tuple(t.shape) == ()


def test_tensor_type_accepts_python_scalar_types():
    # TFF convention (tf.as_dtype): float -> float32, int -> int32.
    assert mpx.TensorType(float) == F32
    assert mpx.TensorType(int) == I32
    assert mpx.TensorType(bool) == mpx.TensorType(np.bool_)
    assert str(mpx.TensorType(bool)) == "bool"


@pytest.mark.parametrize(
    "dtype, shape, text",
    [
        (np.float32, (), "float32"),
        (np.int32, (), "int32"),
        (np.int64, (), "int64"),
        (np.float64, (), "float64"),
        (np.float32, [3], "float32[3]"),
        (np.float32, (3,), "float32[3]"),
        (np.int32, [2, 3], "int32[2,3]"),
    ],
)
def test_tensor_type_str(dtype, shape, text):
    t = mpx.TensorType(dtype, shape)
    assert str(t) == text
    assert tuple(t.shape) == tuple(shape)


def test_tensor_type_equality_by_value():
    assert mpx.TensorType(np.float32, [3]) == mpx.TensorType(np.float32, (3,))
    assert mpx.TensorType(np.float32, [3]) != mpx.TensorType(np.float32, [4])
    assert mpx.TensorType(np.float32, [3]) != mpx.TensorType(np.float32)
    assert F32 != I32
    assert mpx.TensorType(np.float32) != mpx.TensorType(np.float64)
    assert F32 != "float32"  # comparing with a non-type is False, not an error
    assert not (F32 == 1)


# ----------------------------------------------------------- StructType


def test_struct_type_str_named():
    t = mpx.StructType([("a", I32), ("b", mpx.TensorType(np.float32, [3]))])
    assert str(t) == "<a=int32,b=float32[3]>"


def test_struct_type_str_from_dict():
    t = mpx.StructType({"a": I32, "b": mpx.TensorType(np.float32, [3])})
    assert str(t) == "<a=int32,b=float32[3]>"
    t = mpx.StructType(collections.OrderedDict([("b", F32), ("a", I32)]))
    assert str(t) == "<b=float32,a=int32>"  # order is kept


def test_struct_type_str_unnamed_and_nested():
    assert str(mpx.StructType([I32, F32])) == "<int32,float32>"
    nested = mpx.StructType([("a", mpx.StructType([I32, I32])), ("b", F32)])
    assert str(nested) == "<a=<int32,int32>,b=float32>"


def test_struct_type_equality_and_hash():
    a1 = mpx.StructType([("a", I32), ("b", F32)])
    a2 = mpx.StructType([("a", mpx.TensorType(np.int32)), ("b", mpx.TensorType(tf.float32))])
    assert a1 == a2
    assert hash(a1) == hash(a2)
    assert a1 != mpx.StructType([("a", I32), ("c", F32)])  # names matter
    assert a1 != mpx.StructType([("b", F32), ("a", I32)])  # order matters
    assert a1 != mpx.StructType([I32, F32])  # named vs unnamed
    assert mpx.StructType([I32, F32]) != mpx.StructType([F32, I32])


# ----------------------------------------------------------- SequenceType


def test_sequence_type():
    t = mpx.SequenceType(F32)
    assert str(t) == "float32*"
    assert t == mpx.SequenceType(mpx.TensorType(tf.float32))
    assert t != mpx.SequenceType(I32)
    assert t != F32
    assert t.element == F32
    struct_seq = mpx.SequenceType(mpx.StructType([("x", F32), ("y", I32)]))
    assert str(struct_seq) == "<x=float32,y=int32>*"


# ----------------------------------------------------------- FederatedType


def test_federated_type_str_and_all_equal_defaults():
    at_clients = mpx.FederatedType(F32, mpx.CLIENTS)
    at_server = mpx.FederatedType(F32, mpx.SERVER)
    assert str(at_clients) == "{float32}@CLIENTS"
    assert str(at_server) == "float32@SERVER"
    assert at_clients.all_equal is False
    assert at_server.all_equal is True
    assert at_clients.placement == mpx.CLIENTS
    assert at_server.placement == mpx.SERVER
    assert at_clients.member == F32


def test_federated_type_explicit_all_equal():
    all_equal_clients = mpx.FederatedType(F32, mpx.CLIENTS, all_equal=True)
    assert all_equal_clients.all_equal is True
    assert str(all_equal_clients) == "float32@CLIENTS"
    assert all_equal_clients != mpx.FederatedType(F32, mpx.CLIENTS)
    assert mpx.FederatedType(F32, mpx.CLIENTS, all_equal=False) == mpx.FederatedType(
        F32, mpx.CLIENTS
    )


def test_federated_type_of_struct_str():
    member = mpx.StructType([("a", I32), ("b", mpx.TensorType(np.float32, [3]))])
    assert str(mpx.FederatedType(member, mpx.CLIENTS)) == "{<a=int32,b=float32[3]>}@CLIENTS"
    assert str(mpx.FederatedType(member, mpx.SERVER)) == "<a=int32,b=float32[3]>@SERVER"
    seq = mpx.SequenceType(F32)
    assert str(mpx.FederatedType(seq, mpx.CLIENTS)) == "{float32*}@CLIENTS"


def test_federated_type_equality_and_hash():
    a = mpx.FederatedType(F32, mpx.CLIENTS)
    b = mpx.FederatedType(mpx.TensorType(tf.float32), mpx.CLIENTS)
    assert a == b and hash(a) == hash(b)
    assert a != mpx.FederatedType(F32, mpx.SERVER)
    assert a != mpx.FederatedType(I32, mpx.CLIENTS)
    assert a != F32


# ----------------------------------------------------------- FunctionType


def test_function_type():
    t = mpx.FunctionType(F32, F32)
    assert str(t) == "(float32 -> float32)"
    assert t.parameter == F32
    assert t.result == F32
    assert t == mpx.FunctionType(mpx.TensorType(np.float32), mpx.TensorType(tf.float32))
    assert t != mpx.FunctionType(F32, I32)
    assert t != mpx.FunctionType(I32, F32)


def test_function_type_str_compound():
    pair = mpx.StructType([F32, F32])
    assert str(mpx.FunctionType(pair, F32)) == "(<float32,float32> -> float32)"
    fed = mpx.FunctionType(mpx.FederatedType(F32, mpx.CLIENTS), mpx.FederatedType(F32, mpx.SERVER))
    assert str(fed) == "({float32}@CLIENTS -> float32@SERVER)"


def test_function_type_without_parameter():
    t = mpx.FunctionType(None, F32)
    assert t.parameter is None
    assert t.result == F32
    assert t == mpx.FunctionType(None, F32)
    assert t != mpx.FunctionType(F32, F32)


# ----------------------------------------------------------- hashing overall


def test_types_usable_as_dict_keys_and_in_sets():
    def build():
        return [
            mpx.TensorType(np.float32),
            mpx.TensorType(np.float32, [3]),
            mpx.StructType([("a", I32), ("b", F32)]),
            mpx.SequenceType(F32),
            mpx.FederatedType(F32, mpx.CLIENTS),
            mpx.FederatedType(F32, mpx.SERVER),
            mpx.FunctionType(F32, F32),
        ]

    first, second = build(), build()
    table = {t: i for i, t in enumerate(first)}
    assert len(table) == len(first)  # all distinct
    assert [table[t] for t in second] == list(range(len(first)))
    assert set(first) == set(second)
