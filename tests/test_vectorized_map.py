"""Vectorized shard maps (executors/vectorized_map.py): same bits on every stack, and the fallback.

A shard's `federated_map` over stacked clients runs under pfor over fixed groups of clients
where that is safe, else on the loop. These tests run real computations on

    local   local_executor_factory()                      (10-client shards: max_fanout=10)
    mp-1, mp-2, mp-3   mp_executor_factory(num_workers=k)  (k worker processes)

and compare every client's result (or the reduced result) with `np.array_equal`:

- the main job's training round and evaluation (simulation/program.py, synthetic, logreg),
  FedAvg (benchmarking/workloads.py), a computation with a nested struct result, and one over
  per-client data of wildly different magnitudes (passed as values, not ClientData);
- that those ran VECTORIZED (the plans of the local factory and of every worker say so);
- the fallback: a tf.while_loop whose trip count depends on the client's data, and a
  dataset reduce, run on the loop, with the loop's results (MP_EXECUTORS_VECTORIZE=off);
- the group size does not change a client's bits (groups of 8 and 128, padded last group);
- MP_EXECUTORS_VECTORIZE forces either path (in-process and in the workers), and a bad
  value, or `on` for a function pfor cannot convert, is a clear error;
- the batched Philox converters give bitwise the per-client random numbers.

The stacks run one after the other (a module-scoped dict of results), at most one pool alive.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx
from mp_executors.benchmarking import workloads as W
from mp_executors.executors import vectorized_map as vm
from mp_executors.executors import vectorized_random
from mp_executors.simulation import datasets, job, program

NUM_CLIENTS = 21  # mp-2: [0,16) [16,21); mp-3: [0,8) [8,16) [16,21); local: 3 shards
KINDS = ("local", "mp-1", "mp-2", "mp-3")


def _factory(kind: str):
    if kind == "local":
        return mpx.local_executor_factory(max_fanout=10)
    return mpx.mp_executor_factory(num_workers=int(kind.split("-")[1]))


# ---------------------------------------------------------------- the computations

VEC_T = mpx.TensorType(np.float32, [6])
MAT_T = mpx.TensorType(np.float32, [6, 4])


@mpx.tf_computation(MAT_T, VEC_T)
def nested(w, x):
    h = tf.tanh(tf.linalg.matvec(w, x, transpose_a=True))
    return {"h": h, "pair": (tf.reduce_sum(tf.exp(h)), tf.cast(tf.argmax(h), tf.int32)),
            "outer": tf.einsum("i,j->ij", h, h[:2])}


@mpx.federated_computation(mpx.FederatedType(MAT_T, mpx.SERVER), mpx.FederatedType(VEC_T, mpx.CLIENTS))
def nested_map(w, xs):
    return mpx.federated_map(nested, (mpx.federated_broadcast(w), xs))


@mpx.tf_computation(VEC_T)
def mixed(x):
    # Per-client data over ~8 orders of magnitude; reductions, softmax and a matmul.
    s = tf.nn.softmax(x / (tf.reduce_max(tf.abs(x)) + 1.0))
    return tf.reduce_sum(s * x) + tf.linalg.matvec(tf.tensordot(x, x, 0), s)[0]


@mpx.federated_computation(mpx.FederatedType(VEC_T, mpx.CLIENTS))
def mixed_map(xs):
    out = mpx.federated_map(mixed, xs)
    return out, mpx.federated_sum(out)


@mpx.tf_computation(VEC_T)
def data_dependent_loop(x):
    # The trip count depends on the client's value: pfor would split the group by value.
    n = tf.cast(tf.abs(x[0]) * 3.0, tf.int32) % 5 + 1
    _, acc = tf.while_loop(lambda i, a: i < n, lambda i, a: (i + 1, a * 0.5 + tf.sin(a + x)), (0, x))
    return acc


@mpx.tf_computation(VEC_T)
def dataset_reduce(x):
    return tf.data.Dataset.from_tensor_slices(x).reduce(tf.constant(0.0), lambda a, b: a * 0.75 + b)


@mpx.federated_computation(mpx.FederatedType(VEC_T, mpx.CLIENTS))
def fallbacks(xs):
    return mpx.federated_map(data_dependent_loop, xs), mpx.federated_map(dataset_reduce, xs)


def _client_vectors(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mags = 10.0 ** rng.uniform(-4, 4, size=(NUM_CLIENTS, 6))
    return list((rng.standard_normal((NUM_CLIENTS, 6)) * mags).astype(np.float32))


XS = _client_vectors(7)
W0 = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)


def _main_job():
    """The main job's FedAvg process and evaluation (mpx.learning, as `program.build_training` builds them)."""
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    model, data, cfg = job.specs_from_args(parser.parse_args(
        ["--dataset", "synthetic", "--model", "logreg", "--clients", str(NUM_CLIENTS)]))
    return data, program.build_training(model, data, cfg)


DATA, TRAINING = _main_job()


def _run_all() -> dict:
    """Every computation, once, on the current context; flat numpy results by name."""
    out = {}
    everyone = datasets.client_data(DATA)
    state, metrics = TRAINING.process.next(TRAINING.process.initialize(), everyone)
    out["main_train"] = [state["model"][k] for k in sorted(state["model"])] + [metrics["loss"]]
    out["main_eval"] = list(TRAINING.evaluate_train(state, everyone).values())
    fed = mpx.ClientData(W.make_client, list(range(NUM_CLIENTS)), W.DATA_TYPE)
    model = W.fedavg_round(W.initial_model(), fed)
    model = W.fedavg_round(model, fed)
    out["fedavg"] = [model["w"], model["b"]]
    out["nested"] = [leaf for c in nested_map(W0, XS) for leaf in (c["h"], *c["pair"], c["outer"])]
    per_client, total = mixed_map(XS)
    out["mixed"] = [*per_client, total]
    loops, reduces = fallbacks(XS)
    out["fallback"] = [*loops, *reduces]
    return out


def _plans(factory) -> list[str]:
    if hasattr(factory, "map_plans"):
        return factory.map_plans.describe()
    return [line for report in factory.pool.reports() for line in report["map_plans"]]


@pytest.fixture(scope="module")
def results() -> dict:
    out = {}
    for kind in KINDS:
        with _factory(kind) as factory, mpx.execution_context(factory):
            out[kind] = _run_all()
            out[kind]["plans"] = _plans(factory)
    os.environ["MP_EXECUTORS_VECTORIZE"] = "off"
    try:
        with _factory("local") as factory, mpx.execution_context(factory):
            out["loop"] = _run_all()
            out["loop"]["plans"] = _plans(factory)
    finally:
        del os.environ["MP_EXECUTORS_VECTORIZE"]
    return out


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(a, b))


def _plan_for(plans: list[str], name: str) -> list[str]:
    return [p for p in plans if p.startswith(f"{name} (")]


# ---------------------------------------------------------------- bitwise across stacks


@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("case", ["main_train", "main_eval", "fedavg", "nested", "mixed", "fallback"])
def test_same_bits_on_every_stack(results, kind, case):
    assert _equal(results[kind][case], results["local"][case]), f"{case} differs between {kind} and local"


@pytest.mark.parametrize("kind", KINDS)
def test_the_maps_ran_vectorized(results, kind):
    plans = results[kind]["plans"]
    for name in ("client_update", "client_eval", "nested", "mixed"):
        got = _plan_for(plans, name)
        assert got and all("vectorized in groups of" in p for p in got), (name, plans)


def test_vectorized_results_are_close_to_the_loop(results):
    # Other kernels, the same math: last-bit differences only.
    for case in ("main_train", "main_eval", "fedavg", "nested", "mixed"):
        for v, lp in zip(results["local"][case], results["loop"][case]):
            np.testing.assert_allclose(np.asarray(v, np.float64), np.asarray(lp, np.float64), rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------- fallback


@pytest.mark.parametrize("kind", KINDS)
def test_what_pfor_must_not_vectorize_runs_on_the_loop(results, kind):
    plans = results[kind]["plans"]
    (loop,) = set(_plan_for(plans, "data_dependent_loop"))
    assert "looped over clients" in loop and "data-dependent control flow" in loop
    (reduce,) = set(_plan_for(plans, "dataset_reduce"))
    assert "looped over clients" in reduce and "stateful op" in reduce
    # ... with exactly the loop's results.
    assert _equal(results[kind]["fallback"], results["loop"]["fallback"])


def test_the_fallback_results_are_those_of_per_client_calls(results):
    for i, x in enumerate(XS):
        assert np.array_equal(results["local"]["fallback"][i], data_dependent_loop(x))
        assert np.array_equal(results["local"]["fallback"][NUM_CLIENTS + i], dataset_reduce(x))


def test_forced_off_loops_everything(results):
    assert results["loop"]["plans"] and all(
        "looped over clients (MP_EXECUTORS_VECTORIZE=off)" in p for p in results["loop"]["plans"])


# ---------------------------------------------------------------- the group size


@pytest.mark.parametrize("group", [8, 16])
def test_group_size_does_not_change_a_clients_bits(results, monkeypatch, group):
    # Groups of 8 or 16 over shards of 10 and 1 clients: several groups per shard, padded
    # last groups, each client at another position with other neighbours than with 128.
    monkeypatch.setattr(vm, "GROUP_SIZE", group)
    with _factory("local") as factory, mpx.execution_context(factory):
        per_client, total = mixed_map(XS)
        nested_out = nested_map(W0, XS)
        assert all(f"groups of {group}" in p for p in factory.map_plans.describe())
    assert _equal([*per_client, total], results["local"]["mixed"])
    assert _equal([leaf for c in nested_out for leaf in (c["h"], *c["pair"], c["outer"])], results["local"]["nested"])


def test_group_is_bounded_by_the_working_set():
    assert vm._bounded_group(1) == vm.GROUP_SIZE
    assert vm._bounded_group(vm.GROUP_BUDGET // 40) == 32  # the largest BLOCK_SIZE x 2^k that fits
    assert vm._bounded_group(vm.GROUP_BUDGET // 8) == 8
    assert vm._bounded_group(vm.GROUP_BUDGET // 7) == 0  # not even one block: the loop


def test_a_computation_too_big_for_a_group_is_looped(monkeypatch):
    monkeypatch.setattr(vm, "GROUP_BUDGET", 1024)
    with mpx.local_executor_factory() as factory, mpx.execution_context(factory):
        per_client, _ = mixed_map(XS)
        (plan,) = factory.map_plans.describe()
    assert "looped over clients" in plan and "working set" in plan
    assert len(per_client) == NUM_CLIENTS


# ---------------------------------------------------------------- forcing a path


def test_forcing_on_vectorizes_and_fails_clearly_when_pfor_cannot(results, monkeypatch):
    monkeypatch.setenv("MP_EXECUTORS_VECTORIZE", "on")
    with mpx.local_executor_factory(max_fanout=10) as factory, mpx.execution_context(factory):
        per_client, total = mixed_map(XS)
        assert _equal([*per_client, total], results["local"]["mixed"])
        assert all("vectorized" in p and "MP_EXECUTORS_VECTORIZE=on" in p for p in factory.map_plans.describe())
        with pytest.raises(ValueError, match=r"MP_EXECUTORS_VECTORIZE=on, but 'dataset_reduce' cannot be vectorized"):
            fallbacks(XS)


def test_a_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MP_EXECUTORS_VECTORIZE", "sometimes")
    with pytest.raises(ValueError, match=r"MP_EXECUTORS_VECTORIZE='sometimes' is not a mode; use one of auto, on, off"):
        vm.vectorize_mode()


def test_the_mode_reaches_the_workers(results, monkeypatch):
    monkeypatch.setenv("MP_EXECUTORS_VECTORIZE", "off")
    with mpx.mp_executor_factory(num_workers=2) as factory, mpx.execution_context(factory):
        per_client, total = mixed_map(XS)
        plans = _plans(factory)
    assert plans and all("looped over clients (MP_EXECUTORS_VECTORIZE=off)" in p for p in plans)
    assert _equal([*per_client, total], results["loop"]["mixed"])


# ---------------------------------------------------------------- the random converters


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_batched_philox_gives_the_per_client_numbers(dtype):
    vectorized_random.register()
    info = np.iinfo(dtype)
    seeds = np.random.default_rng(0).integers(info.min, info.max, size=(16, 2), dtype=dtype)
    seeds[:3] = [[0, 0], [-1, -1], [info.max, info.min]]
    for shape in ([7], [3, 5], [1]):
        @tf.function
        def batched(s, shape=shape):
            return tf.vectorized_map(lambda x: tf.random.stateless_uniform(shape, seed=x), s,
                                     fallback_to_while_loop=False)

        got = batched(tf.constant(seeds)).numpy()
        want = np.stack([tf.random.stateless_uniform(shape, seed=tf.constant(s)).numpy() for s in seeds])
        assert got.shape == want.shape and np.array_equal(got, want), shape


def test_batched_philox_carries_across_counter_words():
    vectorized_random.register()
    keys = tf.constant(np.arange(1, 9, dtype=np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15))
    counters = tf.constant(np.array([[2**32 - 1 - i, 2**64 - 1 - i] for i in range(8)], np.uint64))

    @tf.function
    def batched(k, c):
        return tf.vectorized_map(
            lambda a: tf.raw_ops.StatelessRandomUniformV2(shape=[37], key=a[0], counter=a[1], alg=1), (k, c),
            fallback_to_while_loop=False)

    want = np.stack([tf.raw_ops.StatelessRandomUniformV2(shape=[37], key=keys[i], counter=counters[i], alg=1).numpy()
                     for i in range(8)])
    assert np.array_equal(batched(keys, counters).numpy(), want)
