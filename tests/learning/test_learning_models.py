"""mpx.learning models: Keras models through from_keras_model give Keras's own loss and
gradients (Dense, a small CNN), inside a tf_computation; the built-in models are the main
job's; evaluation; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx
from mp_executors import learning
from mp_executors.simulation import datasets
from mp_executors.simulation import models as sim_models

keras = tf.keras


def dense_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])


def cnn_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


CASES = {
    "dense": (dense_model, (6,)),
    "cnn": (cnn_model, (6, 6, 1)),
}


def _data(shape, rows=8, real=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, *shape)).astype(np.float32)
    y = rng.integers(0, 3, rows).astype(np.int32)
    mask = np.zeros(rows, np.float32)
    mask[:real] = 1.0
    return x, y, mask


def _ours(model, x, y, mask, weights=None):
    """Our masked loss (mean over real rows), accuracy and gradients, computed inside a
    tf_computation run by the local runtime (the way fed_avg's clients run it)."""
    weights = model.initial_weights() if weights is None else weights
    names = list(model.names)

    @mpx.tf_computation(model.weights_type, mpx.TensorType(np.float32, x.shape),
                        mpx.TensorType(np.int32, y.shape), mpx.TensorType(np.float32, mask.shape))
    def loss_and_grads(w, x, y, mask):
        ws = [w[n] for n in names]
        with tf.GradientTape() as tape:
            tape.watch(ws)
            total, count, metric_sums = model.masked_sums(ws, x, y, mask)
            loss = total / count
        return loss, metric_sums[0] / count, tape.gradient(loss, ws)

    with mpx.execution_context(mpx.local_executor_factory()):
        return loss_and_grads(weights, x, y, mask)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_models_give_keras_loss_and_gradients(case):
    build, shape = CASES[case]
    keras_model = build()
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = learning.from_keras_model(
        keras_model, loss_obj,
        (tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([None], tf.int32)),
        metrics=["accuracy"])
    assert model.names == tuple(v.path for v in keras_model.trainable_variables)
    x, y, mask = _data(shape)
    loss, accuracy, grads = _ours(model, x, y, mask)
    # Keras itself, on the real rows only (padding must not count).
    real = mask > 0
    with tf.GradientTape() as tape:
        out = keras_model(x[real], training=False)
        keras_loss = loss_obj(y[real], out)
    keras_grads = tape.gradient(keras_loss, keras_model.trainable_variables)
    acc = keras.metrics.SparseCategoricalAccuracy()
    acc.update_state(y[real], out)
    np.testing.assert_allclose(loss, keras_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(accuracy, acc.result().numpy(), rtol=1e-6)
    for ours, theirs in zip(grads, keras_grads):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-7)
    assert any(np.abs(g).max() > 1e-3 for g in grads)
    # Other weights than the model's own: the forward pass reads the tensors it is given.
    moved = {n: w + 0.1 for n, w in model.initial_weights().items()}
    loss2, _, _ = _ours(model, x, y, mask, moved)
    for v, n in zip(keras_model.trainable_variables, model.names):
        v.assign(moved[n])
    np.testing.assert_allclose(loss2, loss_obj(y[real], keras_model(x[real])).numpy(), rtol=1e-6)


def test_a_keras_model_function_trains_with_fed_avg_and_keeps_non_trainable_weights(local):
    def build():
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(3)])

    model = learning.from_keras_model(build, "sparse_categorical_crossentropy",
                                      {"x": (np.float32, (None, 6)), "y": (np.int32, (None,))},
                                      metrics=[keras.metrics.SparseCategoricalAccuracy()])
    assert model.trainable.count(False) == 2  # moving mean and variance
    clients = [dict(zip(("x", "y", "mask"), _data((6,), seed=s))) for s in range(3)]
    process = learning.fed_avg(model, 0.1, local_steps=2, batch_size=4)
    with mpx.execution_context(local):
        state = process.initialize()
        state, metrics = process.next(state, clients)
    assert set(metrics) == {"loss", "num_examples", "num_clients"}
    for name, trainable, w0 in zip(model.names, model.trainable, model.initial):
        changed = not np.array_equal(state["model"][name], w0)
        assert changed == trainable, name


def test_builtin_models_are_the_main_jobs():
    for spec, model in [
        (sim_models.ModelSpec("logreg", 7, 4), learning.logreg(7, 4)),
        (sim_models.ModelSpec("mlp", 7, 4, hidden=5), learning.mlp(7, 4, hidden=5, seed=3)),
    ]:
        expected = sim_models.initial_params(spec, np.random.default_rng([3, 0]))
        assert model.names == tuple(spec.names)
        for n in spec.names:
            np.testing.assert_array_equal(model.initial_weights()[n], expected[n])
        x, y, mask = _data((7,), rows=9, real=6)
        y = y % 4
        ws = [tf.constant(model.initial_weights()[n]) for n in spec.names]
        ours = model.masked_sums(ws, x, y, mask)
        # The same sums in float64 numpy: softmax cross-entropy and correct predictions, real rows only.
        w64 = [model.initial_weights()[n].astype(np.float64) for n in spec.names]
        h = x.astype(np.float64)
        if spec.name == "mlp":
            h = np.maximum(h @ w64[0] + w64[1], 0.0)
        z = h @ w64[-2] + w64[-1]
        z = z - z.max(axis=1, keepdims=True)
        losses = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
        np.testing.assert_allclose(float(ours[0]), float((mask * losses).sum()), rtol=1e-5)
        assert float(ours[2][0]) == float((mask * (z.argmax(axis=1) == y)).sum())
        assert float(ours[1]) == 6.0


def test_evaluation_over_the_main_jobs_clients_matches_numpy(local, mp2):
    spec = datasets.DatasetSpec("synthetic", 10, seed=1, max_examples=30)
    clients = datasets.client_data(spec, list(range(10)))
    model = learning.logreg(60, 10)
    weights = {"w": np.random.default_rng(0).normal(0, 0.1, (60, 10)).astype(np.float32),
               "b": np.zeros(10, np.float32)}
    results = []
    for factory in (local, mp2):
        with mpx.execution_context(factory):
            results.append(learning.evaluate(model, split="test")(weights, clients))
    assert results[0] == results[1]
    loss = correct = count = 0.0
    for i in range(10):
        test = datasets.make_client(spec, i)["test"]
        logits = test["x"].astype(np.float64) @ weights["w"]
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        m = test["mask"]
        loss -= (m * logp[np.arange(len(m)), test["y"]]).sum()
        correct += (m * (logits.argmax(1) == test["y"])).sum()
        count += m.sum()
    got = results[0]
    assert got["num_examples"] == count and got["num_clients"] == 10
    np.testing.assert_allclose(got["loss"], loss / count, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], correct / count, rtol=1e-6)


def test_bad_models_and_specs_are_refused_clearly():
    spec = (tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int32))
    with pytest.raises(TypeError, match="Keras 3 model"):
        learning.from_keras_model(object(), "mse", spec)
    with pytest.raises(TypeError, match="input_spec must be"):
        learning.from_keras_model(dense_model, "mse", tf.TensorSpec([None, 6], tf.float32))
    with pytest.raises(ValueError, match="first dimension the batch"):
        learning.from_keras_model(dense_model, "mse", (tf.TensorSpec([6], tf.float32), spec[1]))
    with pytest.raises(TypeError, match="per-example"):
        learning.from_keras_model(dense_model, "mse", spec, metrics=[keras.metrics.AUC()])
    model = learning.from_keras_model(dense_model, lambda y, p: tf.reduce_mean(p), spec)
    with pytest.raises(ValueError, match="one value per example"):
        model.masked_sums([tf.constant(w) for w in model.initial], *(tf.constant(a) for a in _data((6,))))
    with pytest.raises(TypeError, match="mpx.learning Model"):
        learning.fed_avg(dense_model(), 0.1, batch_size=2)
    with pytest.raises(TypeError, match="mpx.learning Model"):
        learning.evaluate(dense_model())
