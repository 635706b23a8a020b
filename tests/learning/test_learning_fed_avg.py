"""mpx.learning.fed_avg against a plain numpy reference; FedProx; vectorizability; bitwise local == mp-2."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
from _learning_reference import ServerOpt, fed_avg_rounds, hashed_uniform

import mp_executors as mpx
from mp_executors import learning
from mp_executors.learning import layout as layout_lib
from mp_executors.learning.fed_avg import hashed_uniform as tf_hashed_uniform
from mp_executors.learning.fed_avg import local_training
from mp_executors.simulation import datasets

F, K, N = 5, 3, 12  # features, classes, padded examples per client


def make_clients(sizes=(12, 7, 3), seed=0, with_id=True):
    rng = np.random.default_rng(seed)
    clients = []
    for i, n in enumerate(sizes):
        mask = np.zeros(N, np.float32)
        mask[:n] = 1.0
        c = {"x": (rng.normal(size=(N, F)) * mask[:, None]).astype(np.float32),
             "y": (rng.integers(0, K, N) * (mask > 0)).astype(np.int32), "mask": mask}
        if with_id:
            c = {"id": np.int32(10 + i), **c}
        clients.append(c)
    return clients


def run(process, clients, rounds, factory):
    with mpx.execution_context(factory):
        state = process.initialize()
        history = []
        for _ in range(rounds):
            state, metrics = process.next(state, clients)
            history.append(metrics)
    return state, history


def test_hashed_shuffle_keys_match_the_documented_hash():
    seed = (123456789, 42)
    ours = tf_hashed_uniform(tf.constant(seed, tf.int32), [4, 9]).numpy()
    np.testing.assert_array_equal(ours, hashed_uniform(seed, (4, 9)))
    assert ours.min() >= 0 and ours.max() < 1 and len(np.unique(ours)) == 36
    # A different client id gives different keys; a prefix of the shape gives the same rows.
    assert not np.array_equal(ours, hashed_uniform((123456789, 43), (4, 9)))
    np.testing.assert_array_equal(tf_hashed_uniform(tf.constant(seed, tf.int32), [2, 9]).numpy(), ours[:2])


SERVER_OPTIMIZERS = [
    ("fedavg", learning.SGD(1.0), ServerOpt("sgd", 1.0)),
    ("fedavgm", learning.SGD(0.5, momentum=0.9), ServerOpt("sgd", 0.5, momentum=0.9)),
    ("fedadam", learning.Adam(0.05), ServerOpt("adam", 0.05)),
    ("fedyogi", learning.Yogi(0.05), ServerOpt("yogi", 0.05)),
    ("fedadagrad", learning.Adagrad(0.05), ServerOpt("adagrad", 0.05, beta_1=0.0)),
]


@pytest.mark.parametrize("name, server, reference", SERVER_OPTIMIZERS, ids=[s[0] for s in SERVER_OPTIMIZERS])
def test_each_server_optimizer_matches_the_numpy_reference(name, server, reference, local):
    clients = make_clients()
    model = learning.logreg(F, K)
    w0 = model.initial_weights()
    # Non-zero start, so that every coordinate moves differently.
    w0["w"] = np.random.default_rng(1).normal(0, 0.1, (F, K)).astype(np.float32)
    model = learning.models.Model(model.names, (w0["w"], w0["b"]), model.trainable, model.forward, model.loss_fn,
                                  model.x_spec, model.y_spec, model.metrics)
    process = learning.fed_avg(model, learning.SGD(0.1), server, local_steps=4, batch_size=5, seed=3)
    state, history = run(process, clients, 2, local)
    ref_w, ref_b, ref_losses = fed_avg_rounds(clients, w0["w"], w0["b"], reference, rounds=2, seed=3,
                                              lr=0.1, batch=5, steps=4)
    np.testing.assert_allclose(state["model"]["w"], ref_w, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(state["model"]["b"], ref_b, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose([h["loss"] for h in history], ref_losses, rtol=1e-5)
    assert state["round"] == 2 and state["optimizer"]["step"] == 2
    assert history[-1]["num_examples"] == 22 and history[-1]["num_clients"] == 3
    # The model moved: the comparison is not of two untouched starts.
    assert np.abs(state["model"]["w"] - w0["w"]).max() > 1e-3


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_local_epochs_and_weighting_match_the_reference(weighting, local):
    clients = make_clients(sizes=(12, 7, 0))  # an empty client: no steps, weight 0
    model = learning.logreg(F, K)
    process = learning.fed_avg(model, 0.2, local_epochs=2, batch_size=5, client_weighting=weighting, seed=9)
    state, history = run(process, clients, 2, local)
    w0 = model.initial_weights()
    ref_w, ref_b, ref_losses = fed_avg_rounds(clients, w0["w"], w0["b"], ServerOpt("sgd", 1.0), rounds=2, seed=9,
                                              weighting=weighting, lr=0.2, batch=5, epochs=2)
    np.testing.assert_allclose(state["model"]["w"], ref_w, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(state["model"]["b"], ref_b, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose([h["loss"] for h in history], ref_losses, rtol=1e-5)


def test_fedprox_moves_the_second_step_by_minus_lr_mu_times_the_drift(local):
    """With mu, step 1 is unchanged (the proximal gradient is 0 at w_server); step 2 adds
    -lr * mu * (w1 - w_server). One client, one round, server SGD(1.0): the global model is the
    client's, so  model(mu, 2 steps) - model(0, 2 steps) = -lr * mu * (model(0, 1 step) - w0)."""
    client = make_clients(sizes=(12,))
    model = learning.mlp(F, K, hidden=4)
    lr, mu = 0.3, 0.5

    def final(steps, mu_):
        p = learning.fed_avg(model, lr, local_steps=steps, batch_size=5, mu=mu_, seed=1)
        return run(p, client, 1, local)[0]["model"]

    plain, prox, one_step = final(2, 0.0), final(2, mu), final(1, 0.0)
    w0 = model.initial_weights()
    for name in model.names:
        expected = -lr * mu * (one_step[name] - w0[name])
        np.testing.assert_allclose(prox[name] - plain[name], expected, rtol=1e-3, atol=1e-6)
        assert np.abs(expected).max() > 1e-4
    # The proximal term pulls towards the server model: less drift than plain FedAvg.
    drift = lambda m: sum(float(np.sum((m[n] - w0[n]) ** 2)) for n in model.names)  # noqa: E731
    assert drift(prox) < drift(plain)


def test_local_training_vectorizes_without_a_fallback():
    """The client function has no op without a vectorized form: tf.vectorized_map with
    fallback_to_while_loop=False equals the per-client loop (to float rounding)."""
    model = learning.mlp(F, K, hidden=4)
    clients = make_clients()
    element_type = mpx.infer_type(clients[0])
    for kwargs in (dict(local_steps=3), dict(local_epochs=2, mu=0.1)):
        process = learning.fed_avg(model, learning.Adam(0.05), batch_size=5, **kwargs)
        layout = layout_lib.layout_for(model, element_type, None, "test")
        weights = [tf.constant(w) for w in model.initial_weights().values()]
        stacked = {k: np.stack([c[k] for c in clients]) for k in ("x", "y", "mask", "id")}

        def one(args, process=process, layout=layout, weights=weights):
            x, y, mask, cid = args
            trained, loss_sum, seen, _ = local_training(
                model, process.config, layout, weights, x, y, mask, tf.stack([tf.constant(7), cid]))
            return trained, loss_sum, seen

        args = (stacked["x"], stacked["y"], stacked["mask"], stacked["id"])
        vectorized = tf.function(lambda args=args: tf.vectorized_map(one, args, fallback_to_while_loop=False))()
        looped = [one(tuple(a[i] for a in args)) for i in range(len(clients))]
        for i in range(len(clients)):
            for got, want in zip(tf.nest.flatten(vectorized), tf.nest.flatten(looped[i])):
                np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_cnn_clients_run_on_the_loop_and_the_plan_says_why_once(monkeypatch, caplog):
    """pfor converts a Conv2D only when its filter is the same for every client; in local
    training each client's filters are its own, so a CNN's client update runs on the loop
    (bitwise the same on any stack, as every loop plan). The plan is logged once, at DEBUG,
    naming the op, not pfor's own failure to report it."""
    monkeypatch.setenv("MP_EXECUTORS_CACHE_DIR", "off")  # decide now, not from an earlier run's stored plan
    keras = tf.keras

    def cnn():
        keras.utils.set_random_seed(2)
        return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
                                 keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(3)])

    model = learning.from_keras_model(
        cnn, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        input_spec=(tf.TensorSpec([None, 6, 6, 1], tf.float32), tf.TensorSpec([None], tf.int32)))
    rng = np.random.default_rng(0)
    clients = [{"x": rng.normal(size=(8, 6, 6, 1)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)}
               for _ in range(10)]
    process = learning.fed_avg(model, 0.1, local_steps=2, batch_size=4)
    caplog.set_level(logging.DEBUG, logger="mp_executors")
    with mpx.local_executor_factory() as factory, mpx.execution_context(factory):
        state = process.initialize()
        for _ in range(2):
            state, metrics = process.next(state, clients)
    assert np.isfinite(metrics["loss"])
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("map plan: client_update")]
    assert len(plans) == 1, plans
    assert "looped over clients" in plans[0] and "Conv2D" in plans[0] and "loop invariant" in plans[0], plans
    assert not any("Fix that" in r.getMessage() for r in caplog.records)  # pfor's own warning is dropped


def test_errors_are_clear_and_before_any_work(local):
    model = learning.logreg(F, K)
    with pytest.raises(ValueError, match="not both"):
        learning.fed_avg(model, 0.1, local_steps=1, local_epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        learning.fed_avg(model, 0.1, batch_size=0)
    with pytest.raises(ValueError, match="mu"):
        learning.fed_avg(model, 0.1, batch_size=2, mu=-1.0)
    with pytest.raises(TypeError, match="client_optimizer"):
        learning.fed_avg(model, "sgd", batch_size=2)
    with pytest.raises(ValueError, match="client_weighting"):
        learning.fed_avg(model, 0.1, batch_size=2, client_weighting="by_size")
    with pytest.raises(ValueError, match="aggregator"):
        learning.fed_avg(model, 0.1, batch_size=2, aggregator="median")
    process = learning.fed_avg(model, 0.1, batch_size=2)
    state = process.initialize()
    with mpx.execution_context(local):
        bad = [{"x": np.zeros((4, F + 1), np.float32), "y": np.zeros(4, np.int32)}]
        with pytest.raises(TypeError, match="'x' is float32\\[4,6\\]"):
            process.next(state, bad)
        with pytest.raises(ValueError, match="no \\['y'\\]"):
            process.next(state, [{"x": np.zeros((4, F), np.float32)}])
        with pytest.raises(ValueError, match="same structure"):
            process.next(state, make_clients()[:1] + [make_clients(with_id=False)[0]])
        with pytest.raises(ValueError, match="weight 'b'"):
            process.next({**state, "model": {**state["model"], "b": np.zeros(4, np.float32)}}, make_clients())
        with pytest.raises(ValueError, match="split='train'"):
            learning.fed_avg(model, 0.1, batch_size=2, split="train").next(state, make_clients())
        # No mask: every row is real.
        _, metrics = process.next(state, [{"x": np.ones((4, F), np.float32), "y": np.zeros(4, np.int32)}])
        assert metrics["num_examples"] == 4


def _main_job_rounds(factory):
    """FedAdam, FedProx and DP (adaptive clip, noise) on the main job's synthetic clients
    (ClientData built in the workers, split='train'), 2 rounds each, and an evaluation."""
    spec = datasets.DatasetSpec("synthetic", 20, seed=0, max_examples=20)
    clients = datasets.client_data(spec, list(range(20)))
    model = learning.mlp(60, 10, hidden=8, seed=2)
    processes = [
        learning.fed_avg(model, 0.1, learning.Adam(0.05), local_steps=3, batch_size=5, split="train"),
        learning.fed_avg(model, 0.1, local_epochs=1, batch_size=4, mu=0.1, split="train", seed=4),
        learning.fed_avg(model, 0.1, local_steps=2, batch_size=5, split="train",
                         aggregator=learning.dp(0.5, 20, adaptive=True)),
    ]
    out = []
    for process in processes:
        state, history = run(process, clients, 2, factory)
        with mpx.execution_context(factory):
            evaluation = learning.evaluate(model, split="test")(state, clients)
        out.append((state, history, evaluation))
    return out


def _flat_bytes(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key in sorted(value) for k, v in _flat_bytes(value[key], f"{prefix}/{key}").items()}
    return {prefix: np.asarray(value).tobytes()}


def test_results_are_bitwise_equal_on_local_and_mp2(local, mp2):
    a, b = _main_job_rounds(local), _main_job_rounds(mp2)
    for (state_a, hist_a, eval_a), (state_b, hist_b, eval_b) in zip(a, b):
        assert _flat_bytes(state_a) == _flat_bytes(state_b)
        assert hist_a == hist_b
        assert eval_a == eval_b
    # And they trained: the loss went down, DP adapted its clip.
    assert a[0][1][1]["loss"] < a[0][1][0]["loss"]
    assert a[2][0]["aggregator"]["clip"] != np.float32(0.1)


def test_optimizers_by_name_and_their_checks():
    get = learning.optimizers.get
    assert get("sgd") == learning.SGD(1.0) and get("sgdm") == learning.SGD(1.0, momentum=0.9)
    assert get("adam", 0.01) == learning.Adam(0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    assert get("adagrad").beta_1 == 0.0 and get("yogi").initial_state([np.zeros(2)])["v"][0][0] == np.float32(1e-6)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        get("rmsprop")
    with pytest.raises(ValueError, match="learning_rate=0"):
        learning.Adam(0)
    with pytest.raises(ValueError, match="beta_2=1.0"):
        learning.Yogi(0.1, beta_2=1.0)
    with pytest.raises(ValueError, match="momentum=-0.5"):
        learning.SGD(0.1, momentum=-0.5)
