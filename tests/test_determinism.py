"""Results are bitwise the same whatever runs them.

DESIGN.md: reductions happen in a fixed order (fixed-size blocks of
consecutive clients, then the block partials in client order), so a result is
bitwise the same whatever the number of workers, and the same as the
in-process stack. These tests run the same computations over 50 clients on

    local            local_executor_factory()               (the reference)
    local-fanout10   local_executor_factory(max_fanout=10)  (5 in-process shards)
    mp-1, mp-2, mp-3 mp_executor_factory(num_workers=k)     (k worker processes)

and compare with `np.array_equal` and dtype equality. The values have many
significant digits and wildly different magnitudes, so a different summation
order WOULD change bits (checked by `test_values_are_order_sensitive`).

Each factory kind is a module-scoped parameter: pytest runs every test of one
kind before building the next, so at most one worker pool is alive at a time.
"""

import collections
from collections.abc import Mapping

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx

NUM_CLIENTS = 50
VEC = 6  # length of each client's vector in the reduction tests

F32 = mpx.TensorType(np.float32)
VEC_T = mpx.TensorType(np.float32, [VEC])
CLIENTS_VEC = mpx.FederatedType(VEC_T, mpx.CLIENTS)
CLIENTS_F32 = mpx.FederatedType(F32, mpx.CLIENTS)

# FedAvg: softmax regression, 20 features, 5 classes, 30 example slots per client.
FEATURES, CLASSES, SLOTS = 20, 5, 30
LEARNING_RATE = 0.5
LOCAL_STEPS = 3
MODEL_T = mpx.StructType(
    [("W", mpx.TensorType(np.float32, [FEATURES, CLASSES])), ("b", mpx.TensorType(np.float32, [CLASSES]))]
)
DATA_T = mpx.StructType(
    [("x", mpx.TensorType(np.float32, [SLOTS, FEATURES])), ("y", mpx.TensorType(np.int32, [SLOTS]))]
)

KINDS = {
    "local": lambda: mpx.local_executor_factory(),
    "local-fanout10": lambda: mpx.local_executor_factory(max_fanout=10),
    "mp-1": lambda: mpx.mp_executor_factory(num_workers=1),
    "mp-2": lambda: mpx.mp_executor_factory(num_workers=2),
    "mp-3": lambda: mpx.mp_executor_factory(num_workers=3),
}


# ---------------------------------------------------------------- data


def _client_vectors(seed: int) -> list[np.ndarray]:
    """Per-client float32 vectors with full mantissas over ~8 orders of magnitude."""
    rng = np.random.default_rng(seed)
    mags = 10.0 ** rng.uniform(-4, 4, size=(NUM_CLIENTS, VEC))
    values = (rng.standard_normal((NUM_CLIENTS, VEC)) * mags).astype(np.float32)
    return list(values)


VALUES = _client_vectors(1234)
WEIGHTS = [np.float32(w) for w in np.random.default_rng(99).uniform(0.1, 1000.0, NUM_CLIENTS)]


def _fedavg_data():
    rng = np.random.default_rng(2024)
    model = collections.OrderedDict(
        W=(rng.standard_normal((FEATURES, CLASSES)) * 0.1).astype(np.float32),
        b=(rng.standard_normal(CLASSES) * 0.01).astype(np.float32),
    )
    clients = []
    for i in range(NUM_CLIENTS):
        n = int(rng.integers(10, SLOTS + 1))  # real examples; the rest is padding (y = -1)
        scale = 0.5 + (i % 7) * 0.3
        x = (rng.standard_normal((SLOTS, FEATURES)) * scale + rng.uniform(-1, 1)).astype(np.float32)
        y = rng.integers(0, CLASSES, SLOTS).astype(np.int32)
        x[n:] = 0.0
        y[n:] = -1
        clients.append(collections.OrderedDict(x=x, y=y))
    return model, clients


FEDAVG_MODEL, FEDAVG_CLIENTS = _fedavg_data()


def field(value, name):
    if isinstance(value, Mapping):
        return value[name]
    return getattr(value, name)


# ---------------------------------------------------------------- computations


@mpx.federated_computation(CLIENTS_VEC)
def fed_sum(x):
    return mpx.federated_sum(x)


@mpx.federated_computation(CLIENTS_VEC)
def fed_mean(x):
    return mpx.federated_mean(x)


@mpx.federated_computation(CLIENTS_VEC, CLIENTS_F32)
def fed_weighted_mean(x, w):
    return mpx.federated_mean(x, weight=w)


@mpx.tf_computation(VEC_T, VEC_T)
def _accumulate(acc, x):
    return acc + x * x * 0.5 - x / 3.0


@mpx.tf_computation(VEC_T, VEC_T)
def _merge(a, b):
    return a + b


@mpx.tf_computation(VEC_T)
def _report(a):
    return a / 7.0


@mpx.federated_computation(CLIENTS_VEC)
def fed_aggregate(x):
    return mpx.federated_aggregate(x, np.full(VEC, 0.1, np.float32), _accumulate, _merge, _report)


@mpx.federated_computation(CLIENTS_VEC)
def fed_min_max(x):
    return mpx.federated_min(x), mpx.federated_max(x)


@mpx.tf_computation(MODEL_T, DATA_T)
def client_update(model, data):
    """LOCAL_STEPS steps of full-batch softmax-regression gradient descent (padding masked)."""
    w, b = model.W, model.b
    mask = tf.cast(data.y >= 0, tf.float32)
    n = tf.reduce_sum(mask)
    onehot = tf.one_hot(tf.maximum(data.y, 0), CLASSES, dtype=tf.float32) * mask[:, None]
    for _ in range(LOCAL_STEPS):
        probs = tf.nn.softmax(tf.matmul(data.x, w) + b) * mask[:, None]
        grad = (probs - onehot) / n
        w = w - LEARNING_RATE * tf.matmul(data.x, grad, transpose_a=True)
        b = b - LEARNING_RATE * tf.reduce_sum(grad, axis=0)
    return collections.OrderedDict(W=w, b=b)


@mpx.tf_computation(DATA_T)
def num_examples(data):
    return tf.reduce_sum(tf.cast(data.y >= 0, tf.float32))


@mpx.federated_computation(mpx.FederatedType(MODEL_T, mpx.SERVER), mpx.FederatedType(DATA_T, mpx.CLIENTS))
def fedavg_round(model, data):
    client_models = mpx.federated_map(client_update, mpx.federated_zip((mpx.federated_broadcast(model), data)))
    weights = mpx.federated_map(num_examples, data)
    return mpx.federated_mean(client_models, weight=weights)


def _leaves(result, op):
    """The result as a dict of named float32 arrays."""
    if op == "min_max":
        return {"min": result[0], "max": result[1]}
    if op == "fedavg":
        return {"W": field(result, "W"), "b": field(result, "b")}
    return {"value": result}


OPS = {
    "sum": lambda: fed_sum(VALUES),
    "mean": lambda: fed_mean(VALUES),
    "weighted_mean": lambda: fed_weighted_mean(VALUES, WEIGHTS),
    "aggregate": lambda: fed_aggregate(VALUES),
    "min_max": lambda: fed_min_max(VALUES),
    "fedavg": lambda: fedavg_round(FEDAVG_MODEL, FEDAVG_CLIENTS),
}


# ---------------------------------------------------------------- numpy references


def numpy_fedavg(model, clients):
    """The FedAvg round in float64 numpy."""
    w0, b0 = model["W"].astype(np.float64), model["b"].astype(np.float64)
    total_w, total_b, total_n = np.zeros_like(w0), np.zeros_like(b0), 0.0
    for c in clients:
        x, y = c["x"].astype(np.float64), c["y"]
        mask = (y >= 0).astype(np.float64)
        n = mask.sum()
        onehot = np.eye(CLASSES)[np.maximum(y, 0)] * mask[:, None]
        w, b = w0.copy(), b0.copy()
        for _ in range(LOCAL_STEPS):
            logits = x @ w + b
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True) * mask[:, None]
            grad = (probs - onehot) / n
            w = w - LEARNING_RATE * x.T @ grad
            b = b - LEARNING_RATE * grad.sum(axis=0)
        total_w += n * w
        total_b += n * b
        total_n += n
    return total_w / total_n, total_b / total_n


def _fold(rows, op=np.add):
    acc = np.array(rows[0])
    for r in rows[1:]:
        acc = op(acc, r)
    return acc


# ---------------------------------------------------------------- fixtures


def _run(ctx, op):
    with mpx.execution_context(ctx):
        return _leaves(OPS[op](), op)


@pytest.fixture(scope="module")
def reference():
    """Results of the in-process reference stack, computed once per op."""
    ctx = mpx.ExecutionContext(mpx.local_executor_factory())
    cache = {}

    def get(op):
        if op not in cache:
            cache[op] = _run(ctx, op)
        return cache[op]

    yield get
    ctx.close()


@pytest.fixture(scope="module", params=list(KINDS))
def kind_context(request):
    ctx = mpx.ExecutionContext(KINDS[request.param]())
    yield request.param, ctx
    ctx.close()


# ---------------------------------------------------------------- tests


def test_values_are_order_sensitive():
    """Sanity: these values DO give different float32 bits when summed in another order."""
    rows = np.stack(VALUES)
    forward = _fold(list(rows))
    backward = _fold(list(rows[::-1]))
    pairwise = np.array([np.sum(np.ascontiguousarray(rows[:, j])) for j in range(VEC)], np.float32)
    assert forward.dtype == backward.dtype == pairwise.dtype == np.float32
    assert not np.array_equal(forward, backward), "reversed order gives the same bits: values too tame"
    assert not (np.array_equal(forward, pairwise) and np.array_equal(backward, pairwise))
    # The weighted sums of the FedAvg models are order-sensitive too.
    w = np.array(WEIGHTS, np.float32)
    assert not np.array_equal(_fold(list(rows * w[:, None])), _fold(list((rows * w[:, None])[::-1])))


@pytest.mark.parametrize("op", list(OPS))
def test_bitwise_equal_to_local_reference(kind_context, reference, op):
    kind, ctx = kind_context
    got = _run(ctx, op)
    want = reference(op)
    assert list(got) == list(want)
    for name in want:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        assert g.dtype == w.dtype == np.float32, (kind, op, name, g.dtype, w.dtype)
        assert g.shape == w.shape, (kind, op, name, g.shape, w.shape)
        assert np.array_equal(g, w), (
            f"{kind}: {op}.{name} differs from the local stack in bits: "
            f"max abs diff {np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))}"
        )
    if kind.startswith("mp-"):
        k = int(kind[-1])
        # 50 clients = 7 blocks of 8: every worker really held a shard.
        assert ctx.executor_factory.pool.size == k


def test_results_match_numpy(reference):
    rows = np.stack(VALUES).astype(np.float64)
    w = np.array(WEIGHTS, np.float64)
    np.testing.assert_allclose(reference("sum")["value"], rows.sum(0), rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(reference("mean")["value"], rows.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        reference("weighted_mean")["value"], (rows * w[:, None]).sum(0) / w.sum(), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(reference("min_max")["min"], np.stack(VALUES).min(0))
    np.testing.assert_array_equal(reference("min_max")["max"], np.stack(VALUES).max(0))
    # aggregate: zero is folded in once per block of 8 consecutive clients (7 blocks).
    blocks = -(-NUM_CLIENTS // 8)
    acc = (rows * rows * 0.5 - rows / 3.0).sum(0) + 0.1 * blocks
    np.testing.assert_allclose(reference("aggregate")["value"], acc / 7.0, rtol=1e-5)


def test_fedavg_matches_numpy_reference(reference):
    want_w, want_b = numpy_fedavg(FEDAVG_MODEL, FEDAVG_CLIENTS)
    got = reference("fedavg")
    assert got["W"].shape == (FEATURES, CLASSES) and got["b"].shape == (CLASSES,)
    np.testing.assert_allclose(got["W"], want_w, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["b"], want_b, rtol=0, atol=1e-5)
    # The round did move the model (the test would notice a no-op update).
    assert np.max(np.abs(want_w - FEDAVG_MODEL["W"])) > 1e-2
