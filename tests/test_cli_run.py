"""Tests for `mp-executors run`, the main job: outputs, reproducibility across runtimes, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import mp_executors as mpx
from mp_executors import cli

# 24 clients = 3 reduction blocks, so 2 workers really split them; 20 sampled per round.
SMALL = ["--rounds", "2", "--clients", "24", "--clients-per-round", "20", "--max-examples", "60", "--no-plots"]
RUNTIME_KEYS = {"timing", "runtime"}


def run_job(tmp_path, name, *extra, capsys=None):
    out = tmp_path / name
    code = cli.main(["run", *SMALL, "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text()), out


def deterministic_part(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in RUNTIME_KEYS}


def test_run_writes_its_outputs_and_a_summary(tmp_path, capsys):
    doc, out = run_job(tmp_path, "local", "--executor", "local")
    stdout = capsys.readouterr().out
    # Not a terminal: one plain line per round, then the table.
    assert "round 1/2" in stdout and "round 2/2" in stdout
    for row in ("final test accuracy", "round time, mean / median", "peak memory (RSS, whole run)", "total (since process start)", "executor"):
        assert row in stdout
    assert set(doc) == {"config", "dataset", "model", "metrics", "timing", "runtime"}
    assert doc["config"]["fedavg"]["rounds"] == 2 and doc["config"]["dataset"]["num_clients"] == 24
    rounds = doc["metrics"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == 20 for r in rounds)
    assert 0.0 <= doc["metrics"]["final"]["test_accuracy"] <= 1.0
    assert doc["timing"]["median_round_s"] > 0 and len(doc["timing"]["rounds"]) == 2
    assert doc["runtime"]["memory"]["peak_total_rss"] > 0
    with open(out / "metrics.csv") as f:
        assert len(list(csv.reader(f))) == 1 + 1 + 2  # header, round 0, two rounds
    model = np.load(out / "model.npz")
    assert model["w"].shape == (60, 10)
    assert not list(out.glob("*.png"))  # --no-plots


def test_same_metrics_on_local_and_on_one_or_two_workers(tmp_path, capsys):
    docs = {
        "local": run_job(tmp_path, "local", "--executor", "local")[0],
        "mp-1": run_job(tmp_path, "mp1", "--executor", "mp", "--workers", "1")[0],
        "mp-2": run_job(tmp_path, "mp2", "--executor", "mp", "--workers", "2")[0],
    }
    capsys.readouterr()
    ref = deterministic_part(docs["local"])
    for kind, doc in docs.items():
        assert deterministic_part(doc) == ref, kind
    # ... and the pool really had that many pinned workers.
    assert len(docs["mp-1"]["runtime"]["workers"]) == 1
    workers = docs["mp-2"]["runtime"]["workers"]
    assert len(workers) == 2 and all(w["cpu_affinity"] for w in workers)


def test_plots_are_drawn_when_matplotlib_is_installed(tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli.main(["run", "--rounds", "2", "--clients", "8", "--max-examples", "30", "--executor", "local",
                     "--eval-every", "2", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "round 1/2" not in text  # --quiet
    doc = json.loads((out / "metrics.json").read_text())
    assert "test_accuracy" not in doc["metrics"]["rounds"][0]  # evaluated every 2 rounds only
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert {p.name for p in out.glob("*.png")} == {"accuracy.png", "loss.png", "round_time.png"}


def test_ray_executor_without_ray_installed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from mp_executors.simulation import job

    def without_ray(**kwargs):
        raise ImportError("ray_executor_factory needs Ray: pip install 'mp_executors[ray]'")

    monkeypatch.setattr(job, "_ray_executor_factory", lambda: without_ray)
    assert cli.main(["run", *SMALL, "--executor", "ray", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--executor ray" in err and "pip install 'mp_executors[ray]'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--clients", "10", "--clients-per-round", "20"], "--clients-per-round 20 is more than --clients 10"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--dataset", "digits", "--clients", "5000"], "at most 359 clients with the 'dirichlet' partition"),
    (["--workers", "0"], "argument --workers: must be 'auto' or at least 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'; choose synthetic, digits or a PATH.npz"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--workers", "many"], "expected 'auto' or a number of workers"),
    (["--local-steps", "5", "--local-epochs", "1"], "not allowed with argument"),
    (["--local-steps", "0"], "--local-steps must be at least 1"),
    (["--dataset", "/nonexistent/data.npz"], "/nonexistent/data.npz: no such file"),
    (["--noise-multiplier", "1"], "--noise-multiplier needs a --clip"),
    (["--clients", "10", "--eval-clients", "11"], "--eval-clients 11 is more than the 10 clients"),
    (["--eval-clients", "0"], "argument --eval-clients: must be 'all' or at least 1"),
    (["--model", "cnn"], "expected logreg, mlp or MODULE:FUNCTION"),
    (["--model", "no_such_module_xyz:make"], "cannot import 'make' from 'no_such_module_xyz'"),
    (["--server-optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--server-lr", "0"], "--server-lr must be > 0"),
    (["--clip", "-1"], "--clip must be > 0"),
    # DP's adaptive-clipping bound, said with the flags that move it (not dp()'s keyword arguments).
    (["--clients", "50", "--clients-per-round", "10", "--noise-multiplier", "1", "--adaptive-clip"],
     "--noise-multiplier 1 is too much noise for --adaptive-clip with 10 clients a round (adaptive clipping adds its "
     "own noise, of std clients/20, which must exceed half the noise multiplier); lower --noise-multiplier below 1, "
     "raise --clients-per-round above 10, or leave --adaptive-clip out and give a fixed norm: --clip C."),
    (["--clients", "8", "--noise-multiplier", "1.5", "--adaptive-clip"],
     "lower --noise-multiplier below 0.8, raise --clients above 15 (every client is in each round), or leave "
     "--adaptive-clip out"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert cli.main(["run", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "clipped_count_stddev" not in err and "=" not in err.split(": error: ", 1)[1]  # no keyword arguments


def test_sampling_fewer_clients_than_workers_keeps_the_pool(tmp_path, capsys):
    # Training calls have 1 client, evaluation calls 16: the pool must not shrink and regrow.
    assert cli.main(["run", "--rounds", "2", "--clients", "16", "--clients-per-round", "1", "--max-examples", "30",
                     "--workers", "2", "--no-plots", "--out", str(tmp_path / "k1")]) == 0
    err = capsys.readouterr().err
    # One pool start, never a restart (the log words for one changed: count the starts).
    assert err.count("started ") == 1 and "started 2 worker(s)" in err, err


def test_ray_executor_is_used_when_it_exists(tmp_path, capsys, monkeypatch):
    # The real one starts a Ray cluster (~20 s): a stand-in checks the wiring and the results.
    from mp_executors.simulation import job

    calls = []

    def fake_ray_executor_factory(**kwargs):
        calls.append(kwargs)
        return mpx.local_executor_factory()

    monkeypatch.setattr(job, "_ray_executor_factory", lambda: fake_ray_executor_factory)
    ray_doc, _ = run_job(tmp_path, "ray", "--executor", "ray", "--workers", "2")
    local_doc, _ = run_job(tmp_path, "local", "--executor", "local")
    assert calls == [{"num_workers": 2}]
    assert ray_doc["runtime"]["executor"] == "ray"
    assert deterministic_part(ray_doc) == deterministic_part(local_doc)


def test_workers_auto_is_accepted():
    parser = cli.build_parser()
    assert parser.parse_args(["run", "--workers", "auto"]).workers is None
    assert parser.parse_args(["run", "--workers", "3"]).workers == 3
    args = parser.parse_args(["run"])
    # --rounds: None reads as 10 (job.DEFAULT_ROUNDS); None lets a resume tell "left out" from "--rounds 10".
    assert (args.clients, args.rounds, args.workers, args.local_steps, args.local_epochs) == (None, None, None, None, None)


def _write_npz(path, clients=6, per_client=(8, 12), features=5, classes=3, seed=0, **override):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(per_client[0], per_client[1] + 1, clients)
    ids = np.repeat(np.arange(100, 100 + clients), sizes)
    rng.shuffle(ids)  # rows of one client need not be together
    x = rng.normal(size=(len(ids), features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)  # learnable, `classes` = 3
    arrays = {"x": x, "y": y, "client_ids": ids, **override}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_run_on_a_users_npz(tmp_path, capsys):
    path = tmp_path / "mine.npz"
    _write_npz(path)
    out = tmp_path / "out"
    assert cli.main(["run", "--dataset", str(path), "--rounds", "2", "--clients", "4", "--executor", "local",
                     "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["config"]["dataset"]["num_clients"] == 4 and doc["config"]["dataset"]["npz_features"] == 5
    assert doc["config"]["dataset"]["npz_classes"] == 3 and "mine.npz" in doc["dataset"]
    assert np.load(out / "model.npz")["w"].shape == (5, 3)
    assert [r["clients"] for r in doc["metrics"]["rounds"]] == [4, 4]
    capsys.readouterr()


@pytest.mark.parametrize("write, args, message", [
    (lambda p: p.write_text("not a zip"), [], "is not an npz file"),
    (lambda p: _write_npz(p, y=None), [], "has no array 'y'"),
    (lambda p: _write_npz(p, client_ids=np.zeros(3, np.int64)), [], "must have the same length"),
    (lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.array([0, 1, 0.5, 1]), client_ids=np.array([1, 1, 2, 2])), [],
     "labels y must be integers"),
    (lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([0, 1, 0]), client_ids=np.array([1, 1, 2])), [],
     "client 2 has 1 example(s)"),
    (lambda p: _write_npz(p, clients=3), ["--clients", "5"], "--clients 5 is more than the 3 distinct client ids"),
    (lambda p: _write_npz(p, clients=3), ["--clients-per-round", "4"], "--clients-per-round 4 is more than the 3"),
])
def test_bad_npz_is_one_line_and_exit_2(write, args, message, tmp_path, capsys):
    path = tmp_path / "data.npz"
    write(path)
    out = tmp_path / "x"
    assert cli.main(["run", "--dataset", str(path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


FEDOPT_DP = ["--server-optimizer", "yogi", "--server-lr", "0.05", "--clip", "1.0", "--noise-multiplier", "0.5",
             "--eval-clients", "10"]


def test_server_optimizer_dp_and_eval_sample_are_the_same_on_local_and_two_workers(tmp_path, capsys):
    local, _ = run_job(tmp_path, "local", "--executor", "local", *FEDOPT_DP)
    mp2, _ = run_job(tmp_path, "mp2", "--executor", "mp", "--workers", "2", *FEDOPT_DP)
    stdout = capsys.readouterr().out
    assert deterministic_part(local) == deterministic_part(mp2)
    cfg = local["config"]["fedavg"]
    assert (cfg["server_optimizer"], cfg["clip"], cfg["eval_clients"]) == ("yogi", 1.0, 10)
    assert all(r["clip"] == 1.0 for r in local["metrics"]["rounds"])
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        assert "privacy spent not computed" in stdout
    else:
        privacy = local["metrics"]["privacy"]
        assert privacy["rounds"] == 2 and privacy["sampling_probability"] == 20 / 24 and privacy["epsilon"] > 0
        assert "privacy spent (DP)" in stdout
    plain, _ = run_job(tmp_path, "plain", "--executor", "local")
    capsys.readouterr()
    assert plain["metrics"]["final_model_sha256"] != local["metrics"]["final_model_sha256"]


def test_eval_clients_is_a_fixed_sample(tmp_path, capsys):
    all_, _ = run_job(tmp_path, "all", "--executor", "local", "--eval-clients", "all")
    default, _ = run_job(tmp_path, "default", "--executor", "local")
    few, _ = run_job(tmp_path, "few", "--executor", "local", "--eval-clients", "5")
    capsys.readouterr()
    # 24 clients: the default (min(N, 1000)) is everyone; a sample of 5 sees other numbers, same model.
    assert deterministic_part(all_) == deterministic_part(default)
    assert few["metrics"]["final_model_sha256"] == all_["metrics"]["final_model_sha256"]
    assert few["metrics"]["final"]["test_loss"] != all_["metrics"]["final"]["test_loss"]


def test_keras_model_from_module_function(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_keras_models.py").write_text(
        "import keras\n"
        "def small():\n"
        "    return keras.Sequential([keras.Input((60,)), keras.layers.Dense(8, activation='relu'),\n"
        "                             keras.layers.Dense(10)])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a, out = run_job(tmp_path, "k1", "--executor", "local", "--model", "my_keras_models:small")
    b, _ = run_job(tmp_path, "k2", "--executor", "mp", "--workers", "2", "--model", "my_keras_models:small")
    capsys.readouterr()
    assert deterministic_part(a) == deterministic_part(b)  # seeded initial weights, same bits
    assert "Keras model from my_keras_models:small" in a["model"]
    assert a["metrics"]["final"]["train_loss"] < a["metrics"]["initial"]["train_loss"]
    assert len(np.load(out / "model.npz").files) == 4


def test_a_population_far_larger_than_a_cohort(tmp_path, capsys):
    # 100,000 clients, 100 a round: only the sampled clients and the evaluation sample (1,000) are
    # ever built, in the workers; building everyone took ~10 GiB per worker.
    out = tmp_path / "big"
    assert cli.main(["run", "--clients", "100000", "--clients-per-round", "100", "--rounds", "3", "--workers", "2",
                     "--no-plots", "-q", "--out", str(out)]) == 0
    capsys.readouterr()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["config"]["fedavg"]["eval_clients"] == 1000
    assert [r["clients"] for r in doc["metrics"]["rounds"]] == [100, 100, 100]
    assert len(doc["runtime"]["workers"]) == 2
    assert doc["runtime"]["memory"]["peak_workers_rss"] < 2 * 1.5 * 2**30  # measured ~0.9 GiB for both


def test_tensorboard_scalars_are_the_metrics(tmp_path, capsys):
    from mp_executors._tf import tf

    doc, _ = run_job(tmp_path, "run", "--executor", "local", "--tensorboard", str(tmp_path / "tb"))
    capsys.readouterr()
    seen: dict[tuple[str, int], float] = {}
    for path in (tmp_path / "tb").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                seen[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    assert seen[("test_accuracy", 0)] == np.float32(doc["metrics"]["initial"]["test_accuracy"])
    for r in doc["metrics"]["rounds"]:
        for key in ("local_loss", "train_loss", "test_accuracy"):
            assert seen[(key, r["round"])] == np.float32(r[key])
    assert ("train_s", 1) in seen and ("eval_s", 2) in seen
