"""Tests for mp_executors.simulation: datasets, models, masking, sampling (in-process, fast)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors.simulation import datasets, models, program


def test_synthetic_clients_have_fixed_shapes_and_a_mask():
    spec = datasets.DatasetSpec("synthetic", 50, seed=3, max_examples=120)
    et = datasets.element_type(spec)
    assert spec.split_sizes == (96, 24)
    for i in range(50):
        c = datasets.make_client(spec, i)
        assert c["train"]["x"].shape == (96, 60) and c["test"]["x"].shape == (24, 60)
        for split in ("train", "test"):
            m = c[split]["mask"]
            n = int(m.sum())
            assert n >= 1
            # Real rows first, then padding of zeros.
            assert np.all(m[:n] == 1) and np.all(m[n:] == 0)
            assert not c[split]["x"][n:].any() and not c[split]["y"][n:].any()
        assert mpx.infer_type(c) is not None
    assert str(et).startswith("<id=int32,train=<x=float32[96,60]")


def test_synthetic_sizes_follow_the_power_law_and_respect_the_cap():
    spec = datasets.DatasetSpec("synthetic", 400, seed=0, max_examples=250)
    counts = datasets.example_counts(spec)
    assert counts.min() >= 50 and counts.max() <= 250
    assert (counts == 250).mean() > 0.1  # the heavy tail is capped, not absent
    assert np.median(counts) < 250


def test_synthetic_client_does_not_depend_on_the_number_of_clients():
    a = datasets.make_client(datasets.DatasetSpec("synthetic", 10, seed=1), 7)
    b = datasets.make_client(datasets.DatasetSpec("synthetic", 1000, seed=1), 7)
    c = datasets.make_client(datasets.DatasetSpec("synthetic", 1000, seed=2), 7)
    assert np.array_equal(a["train"]["x"], b["train"]["x"])
    assert not np.array_equal(a["train"]["x"], c["train"]["x"])


def test_client_data_is_memoized_and_read_only():
    spec = datasets.DatasetSpec("synthetic", 10, seed=5)
    assert datasets.make_client(spec, 4) is datasets.make_client(spec, 4)
    with pytest.raises(ValueError):
        datasets.make_client(spec, 4)["train"]["x"][0, 0] = 1.0
    cd = datasets.client_data(spec, [1, 4])
    assert len(cd) == 2 and cd.element_type == datasets.element_type(spec)


def test_digits_partitions():
    pytest.importorskip("sklearn")
    spec = datasets.DatasetSpec("digits", 20, seed=0, partition="shards")
    clients = [datasets.make_client(spec, i) for i in range(20)]
    size = 2 * (1797 // 40)
    assert sum(spec.split_sizes) == size
    labels = [set(np.concatenate([c["train"]["y"], c["test"]["y"]]).tolist()) for c in clients]
    assert np.mean([len(s) for s in labels]) <= 3  # non-IID: about two labels per client
    assert all(c["train"]["mask"].all() for c in clients)  # equal sizes: no padding
    iid = datasets.DatasetSpec("digits", 20, seed=0, partition="iid")
    assert np.mean([len(set(datasets.make_client(iid, i)["train"]["y"])) for i in range(20)]) > 7


def test_dataset_spec_errors_say_what_to_do():
    with pytest.raises(ValueError, match="at most 299 clients.*synthetic"):
        datasets.DatasetSpec("digits", 1000, partition="shards")
    with pytest.raises(ValueError, match="at most 359 clients"):
        datasets.DatasetSpec("digits", 1000)
    with pytest.raises(ValueError, match="local_steps or local_epochs"):
        program.FedAvgConfig(local_steps=3, local_epochs=1)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.DatasetSpec("mnist", 10)
    with pytest.raises(ValueError, match="max_examples"):
        datasets.DatasetSpec("synthetic", 10, max_examples=2)
    with pytest.raises(ValueError, match="at least 1"):
        program.FedAvgConfig(rounds=0)


def test_masked_sums_ignore_padding():
    from mp_executors import learning
    from mp_executors._tf import tf

    model = learning.mlp(60, 10, hidden=8)  # the main job's --model mlp --hidden 8
    client = datasets.make_client(datasets.DatasetSpec("synthetic", 30, seed=0, max_examples=250), 3)
    tr = client["train"]
    n = int(tr["mask"].sum())
    assert n < len(tr["mask"])
    ws = [tf.constant(w) for w in model.initial]

    def sums(rows):  # (loss sum, examples, correct)
        total, count, (correct,) = model.masked_sums(ws, tr["x"][rows], tr["y"][rows], tr["mask"][rows])
        return [float(total), float(count), float(correct)]

    padded, real = sums(slice(None)), sums(slice(0, n))
    assert padded[1] == n
    np.testing.assert_allclose(padded, real, rtol=1e-6)


def test_sample_schedule_is_seeded_sorted_and_without_replacement():
    cfg = program.FedAvgConfig(rounds=5, clients_per_round=7, seed=11)
    a, b = program.sample_schedule(40, cfg), program.sample_schedule(40, cfg)
    assert a == b and len(a) == 5
    for ids in a:
        assert ids == sorted(set(ids)) and len(ids) == 7 and max(ids) < 40
    assert program.sample_schedule(40, program.FedAvgConfig(rounds=5, clients_per_round=7, seed=12)) != a
    assert program.sample_schedule(7, cfg) == [None] * 5  # K >= N: everyone
    # Round r's cohort does not depend on the total (a resumed run may extend its rounds).
    assert program.sample_schedule(40, program.FedAvgConfig(rounds=9, clients_per_round=7, seed=11))[:5] == a


def test_fedavg_learns_digits_locally():
    pytest.importorskip("sklearn")
    data = datasets.DatasetSpec("digits", 16, seed=0, partition="iid")
    model = models.ModelSpec("logreg", data.num_features, data.num_classes)
    cfg = program.FedAvgConfig(rounds=3, clients_per_round=12, local_epochs=2, learning_rate=0.1)
    seen = []
    with mpx.local_executor_factory() as factory:
        result = program.run_fedavg(model, data, cfg, factory, on_round=seen.append)
    assert [r.round for r in seen] == [1, 2, 3] and all(r.clients == 12 for r in seen)
    assert result.initial["test_accuracy"] < 0.2
    assert result.final_metrics["test_accuracy"] > 0.6
    assert result.final_metrics["train_loss"] < result.initial["train_loss"]


def test_fedprox_term_pulls_clients_towards_the_server_model():
    data = datasets.DatasetSpec("synthetic", 8, seed=0, max_examples=60)
    model = models.ModelSpec("logreg", data.num_features, data.num_classes)
    dist = {}
    with mpx.local_executor_factory() as factory:
        for mu in (0.0, 10.0):
            cfg = program.FedAvgConfig(rounds=1, local_epochs=3, learning_rate=0.05, mu=mu)
            res = program.run_fedavg(model, data, cfg, factory)
            dist[mu] = float(np.linalg.norm(res.params["w"]))  # the start is all zeros
    assert dist[10.0] < dist[0.0]


def test_dirichlet_partition_is_skewed_seeded_and_uses_every_example_once():
    labels = np.repeat(np.arange(10), 180)
    parts = datasets.dirichlet_partition(labels, 50, 0.5, np.random.default_rng(0))
    again = datasets.dirichlet_partition(labels, 50, 0.5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = datasets.dirichlet_partition(labels, 50, 0.5, np.random.default_rng(1))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    everything = np.concatenate(parts)
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)
    assert min(len(p) for p in parts) >= datasets.DIGITS_MIN_EXAMPLES
    # Skewed: a client's most common label is far above the 10% of a uniform mix.
    top = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top) > 0.25
    iid = datasets.dirichlet_partition(labels, 50, 1000.0, np.random.default_rng(0))
    assert np.median([np.bincount(labels[p], minlength=10).max() / len(p) for p in iid]) < 0.2


def test_digits_dirichlet_clients_are_padded_to_the_largest():
    pytest.importorskip("sklearn")
    spec = datasets.DatasetSpec("digits", 40, seed=3)
    assert spec.partition == "dirichlet"
    clients = [datasets.make_client(spec, i) for i in range(40)]
    counts = datasets.example_counts(spec)
    assert counts.sum() == 1797 and counts.max() == sum(spec.split_sizes)  # all used; padded to the largest
    assert len({c["train"]["x"].shape for c in clients}) == 1
    capped = datasets.DatasetSpec("digits", 40, seed=3, max_examples=30)
    assert sum(capped.split_sizes) == 30 and datasets.example_counts(capped).max() == 30


def test_npz_clients_are_built_from_the_file(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array(["b"] * 7 + ["a"] * 3 + ["c"] * 20)
    x = rng.normal(size=(30, 2, 2))  # flattened to 4 features
    y = np.arange(30) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(float), client_ids=ids)
    spec = datasets.open_npz(tmp_path / "d.npz", num_clients=2, seed=1, max_examples=None)
    # The first 2 ids in sorted order: "a" (3 examples) and "b" (7): padded to 7.
    assert (spec.num_clients, spec.num_features, spec.num_classes, spec.split_sizes) == (2, 4, 4, (6, 1))
    a = datasets.make_client(spec, 0)
    assert a["train"]["mask"].sum() + a["test"]["mask"].sum() == 3
    rows = np.flatnonzero(ids == "a")
    got = np.concatenate([a["train"]["x"][a["train"]["mask"] > 0], a["test"]["x"][:1]])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, x[rows].reshape(3, 4).astype(np.float32).tolist()))
    everyone = datasets.open_npz(tmp_path / "d.npz", seed=1, max_examples=10)
    assert everyone.num_clients == 3 and sum(everyone.split_sizes) == 10  # "c" capped at 10
    assert datasets.example_counts(everyone).tolist() == [3, 7, 10]


def test_run_fedavg_evaluates_as_scheduled_and_an_extended_run_drops_the_old_last_evaluation():
    # (That every client takes the same local_steps, whatever its size, is checked step by step
    # against the numpy reference in tests/learning/test_learning_fed_avg.py.)
    data = datasets.DatasetSpec("synthetic", 6, seed=0, max_examples=60)
    model = models.ModelSpec("logreg", data.num_features, data.num_classes)
    cfg = program.FedAvgConfig(rounds=4, local_steps=3, batch_size=4, eval_every=3)
    with mpx.local_executor_factory() as factory:
        res = program.run_fedavg(model, data, cfg, factory)
    assert [r.eval_s is not None for r in res.rounds] == [False, False, True, True]  # every 3rd and the last
    assert all(r.metrics["local_loss"] > 0 for r in res.rounds)
    assert "test_accuracy" in res.rounds[3].metrics and "test_accuracy" not in res.rounds[1].metrics
    # Extended to 7 rounds, round 4 is no longer the last: its evaluation goes, round 3's stays.
    program.evaluations_as_scheduled(res, dataclasses.replace(cfg, rounds=7))
    assert [r.eval_s is not None for r in res.rounds] == [False, False, True, False]
    assert not set(program.EVAL_KEYS) & set(res.rounds[3].metrics) and "local_loss" in res.rounds[3].metrics


def test_eval_sample_is_fixed_seeded_and_sorted():
    cfg = program.FedAvgConfig(eval_clients=50, seed=4)
    a, b = program.eval_ids(100_000, cfg), program.eval_ids(100_000, cfg)
    assert a == b and a == sorted(set(a)) and len(a) == 50 and max(a) < 100_000
    assert program.eval_ids(100_000, program.FedAvgConfig(eval_clients=50, seed=5)) != a
    assert program.eval_ids(50, cfg) is None and program.eval_ids(10, program.FedAvgConfig()) is None  # everyone


def test_fedavg_config_checks_the_new_settings():
    with pytest.raises(ValueError, match="unknown server_optimizer 'lamb'"):
        program.FedAvgConfig(server_optimizer="lamb")
    with pytest.raises(ValueError, match="noise_multiplier needs a clip"):
        program.FedAvgConfig(noise_multiplier=1.0)
    assert program.FedAvgConfig(noise_multiplier=1.0, adaptive_clip=True).private
    assert program.FedAvgConfig(clip=1.0).private and not program.FedAvgConfig().private
    with pytest.raises(ValueError, match="eval_clients must be at least 1"):
        program.FedAvgConfig(eval_clients=0)


def test_checkpoint_state_round_trips_with_any_weight_names(tmp_path):
    from mp_executors.simulation import checkpoint

    state = {"model": {"sequential/dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                       "sequential/dense/bias": np.zeros(3, np.float32)},
             "optimizer": {"step": np.int32(3), "m": {"sequential/dense/kernel": np.ones((2, 3), np.float32)}},
             "round": np.int32(3)}
    checkpoint.save(tmp_path, state, {"round": 3, "note": "x"})
    loaded = checkpoint.load(tmp_path)
    assert loaded.round == 3 and loaded.meta["note"] == "x"
    flat_in, flat_out = checkpoint.flatten(state), checkpoint.flatten(loaded.state)
    assert flat_in.keys() == flat_out.keys()
    for k in flat_in:
        assert flat_in[k].dtype == flat_out[k].dtype and np.array_equal(flat_in[k], flat_out[k])
    assert not (tmp_path / "checkpoint.npz.tmp").exists()


def test_learning_program_is_the_same_on_local_and_two_workers():
    data = datasets.DatasetSpec("synthetic", 20, seed=1, max_examples=40)
    model = models.ModelSpec("mlp", data.num_features, data.num_classes, hidden=8)
    cfg = program.FedAvgConfig(rounds=2, clients_per_round=12, local_steps=2, server_optimizer="sgdm",
                               clip=0.5, noise_multiplier=0.2, eval_clients=9)
    results = {}
    for name, factory in (("local", mpx.local_executor_factory()), ("mp-2", mpx.mp_executor_factory(num_workers=2))):
        with factory:
            results[name] = program.run_fedavg(model, data, cfg, factory)
    a, b = results["local"], results["mp-2"]
    assert a.model_digest() == b.model_digest()
    assert [r.metrics for r in a.rounds] == [r.metrics for r in b.rounds]
