"""Tests for the Flower peer of `mp-executors bench` (mp_executors.benchmarking.flower_peer, the suite's
flower rows and tables, benchmarks/peers/flower_bench.py's math), all in the main environment.

Flower itself lives only in its venv (benchmarks/peers/setup_flower_venv.sh): what it runs there
is stood in for by small scripts run the same way (a subprocess of a venv's bin/python), which
write what flower_bench.py writes; the FedAvg they report is computed by flower_bench.py's own
numpy math, and the suite checks it against TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mp_executors import cli
from mp_executors.benchmarking import flower_peer
from mp_executors.benchmarking import suite as bench
from mp_executors.benchmarking import workloads as W

REPO = Path(__file__).resolve().parents[1]
FLOWER_BENCH = REPO / "benchmarks" / "peers" / "flower_bench.py"


def _flower_bench():
    spec = importlib.util.spec_from_file_location("_flower_bench", FLOWER_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy + psutil at import; flwr only when it runs
    return module


def _venv(tmp_path: Path) -> Path:
    """A stand-in venv: bin/python is this interpreter."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    return venv


# What flower_bench.py writes, with the FedAvg computed by its own numpy client code.
FAKE_FLOWER = """
import argparse, importlib.util, json, sys
from pathlib import Path
import numpy as np
spec = importlib.util.spec_from_file_location("fb", {bench!r}); fb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fb)
p = argparse.ArgumentParser()
p.add_argument("--clients", type=fb.ints); p.add_argument("--rounds", type=int)
p.add_argument("--out"); p.add_argument("--weights-dir")
a = p.parse_args()
assert a.clients == {expect_clients!r} and a.rounds == {expect_rounds}, (a.clients, a.rounds)
rows = []
for n in a.clients:
    w, b = np.zeros((fb.FEATURES, fb.CLASSES), np.float32), np.zeros(fb.CLASSES, np.float32)
    for _ in range(a.rounds):
        local = [fb.softmax_steps(w, b, *fb.client_data(i)) for i in range(n)]
        w, b = np.mean([l[0] for l in local], 0), np.mean([l[1] for l in local], 0)
    Path(a.weights_dir).mkdir(exist_ok=True)
    np.savez(Path(a.weights_dir) / f"flower_fedavg_{{n}}.npz", w={weights_w}, b=b)
    samples = [5.0] + [0.01 * n] * (a.rounds - 1)
    rows.append({{"workload": "fedavg", "runtime": "flower", "clients": n, "rounds": a.rounds,
                 **fb.summarize(samples), "memory": {{"workers_rss": 1 << 30}}, "checksum": fb.checksum(w, b)}})
Path(a.out).write_text(json.dumps({{"rows": rows, "versions": {{"flwr": "1.42.0", "ray": "2.55.1"}}}}))
"""


def _fake_flower(tmp_path: Path, clients: list[int], rounds: int, weights_w: str = "w") -> Path:
    script = tmp_path / "fake_flower.py"
    script.write_text(FAKE_FLOWER.format(bench=str(FLOWER_BENCH), expect_clients=clients, expect_rounds=rounds,
                                         weights_w=weights_w))
    return script


def test_flower_rows_ratios_tables_and_the_check_against_tensorflow(tmp_path):
    cfg = bench.SuiteConfig([10, 100], [10], [1], 10, rounds=6)
    suite = bench.Suite(cfg, log=lambda _: None)
    suite.rows.append({"workload": "fedavg", "runtime": "mp", "clients": 100, "median": 0.25, "min": 0.2, "max": 0.3,
                       "memory": {"workers_rss": 2 << 30}})
    script = _fake_flower(tmp_path, clients=[100], rounds=4)  # only 100 is in Flower's range; rounds capped at 4
    rows, versions, notes = flower_peer.measure(_venv(tmp_path), cfg.fedavg_clients,
                                                min(cfg.rounds, flower_peer.MAX_ROUNDS), tmp_path, lambda _: None,
                                                script=script)
    assert [r["clients"] for r in rows] == [100] and versions["flwr"] == "1.42.0"
    # flower_bench.py's numpy FedAvg is the workload's math: TensorFlow's 4 rounds agree closely.
    assert rows[0]["max_abs_diff_vs_tf"] < 1e-6
    assert "max |Δ|" in notes[0] and "at 100 clients: the same math" in notes[0]
    assert "Flower 1.42.0 (Ray 2.55.1)" in notes[1]
    suite.rows += rows
    ratios = [r for r in bench.ratios(suite.rows) if r["vs"] == "flower"]
    assert ratios == [{"workload": "fedavg", "clients": 100, "ours": "mp", "vs": "flower", "ratio": 0.25}]
    doc = {"rows": suite.rows, "ratios": bench.ratios(suite.rows), "command": "x", "when": "now",
           "machine": {"cpus": 2, "memory": 2**34, "python": "3", "tensorflow": "2"},
           "config": {"rounds": 6, "big_rounds": 3, "big_threshold": 10_000, "fedavg_clients": [10, 100]},
           "notes": notes}
    md = bench.markdown(doc)
    assert "| Flower simulation engine (Ray, 1 CPU per client actor), data kept in its actors | 1.000 s |" in md
    assert "**Ours / Flower**" in md and "| fedavg, mp | 0.25 |" in md
    assert "| flower | 1.00 GiB |" in md  # its Ray processes' memory
    assert "**Ours / peer**" not in md  # no TFF rows: only Flower's ratio table
    assert "Note: Flower's global model after 4 rounds" in md


def test_flower_model_that_differs_from_tensorflow_is_reported(tmp_path):
    script = _fake_flower(tmp_path, clients=[100], rounds=2, weights_w="np.zeros_like(w)")
    rows, _, notes = flower_peer.measure(_venv(tmp_path), [100], 2, tmp_path, lambda _: None, script=script)
    assert rows[0]["max_abs_diff_vs_tf"] > 1e-3
    assert "DIFFERENT" in notes[0]


def test_note_when_the_flower_venv_is_missing(tmp_path):
    missing = tmp_path / "no-venv"
    rows, versions, notes = flower_peer.measure(missing, [10, 100, 1000, 10_000], 4, tmp_path, lambda _: None)
    assert rows == [] and versions == {}
    assert notes == [f"Flower not measured: no venv at {missing} (bash benchmarks/peers/setup_flower_venv.sh, "
                     "or --flower-venv DIR)"]
    assert flower_peer.flower_clients([10, 100, 1000, 10_000]) == [100, 1000]
    rows, _, notes = flower_peer.measure(missing, [8, 32], 3, tmp_path, lambda _: None)
    assert rows == [] and "no FedAvg client count in 100..1,000" in notes[0]


def test_failing_or_garbled_flower_output_becomes_a_note(tmp_path):
    venv = _venv(tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('ray: cannot start', file=sys.stderr)\nsys.exit(3)\n")
    rows, _, notes = flower_peer.measure(venv, [100], 2, tmp_path, lambda _: None, script=broken)
    assert rows == [] and notes == ["Flower failed with exit code 3: ray: cannot start"]
    garbled = tmp_path / "garbled.py"
    garbled.write_text("import sys\nopen(sys.argv[sys.argv.index('--out') + 1], 'w').write('{\"rows\": 3}')\n")
    rows, _, notes = flower_peer.measure(venv, [100], 2, tmp_path, lambda _: None, script=garbled)
    assert rows == [] and "is unusable: expected an object with a \"rows\" list" in notes[0]


def _row(**kw) -> dict:
    row = {"workload": "fedavg", "runtime": "flower", "clients": 100, "rounds": 3, "median": 1.0, "min": 0.5,
           "max": 2.0, "samples": [9.0, 0.5, 2.0]}
    row.update(kw)
    return row


@pytest.mark.parametrize("doc, message", [
    ("not json", "not JSON"),
    ({"rows": [_row(runtime="tff")]}, "expected workload \"fedavg\", runtime \"flower\""),
    ({"rows": [_row(clients=7)]}, "clients 7 was not asked for"),
    ({"rows": [_row(samples=[1.0, 2.0])]}, "expected 3 positive round times"),
    ({"rows": [_row(samples=[1.0, float("nan"), 2.0])]}, "expected 3 positive round times"),
    ({"rows": [_row(median="fast")]}, "median missing or not a number"),
    ({"rows": [_row(median=5.0)]}, "min <= median <= max"),
    ({"rows": []}, "no row for [100] clients"),
])
def test_parse_output_names_what_is_wrong(doc, message):
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(flower_peer.FlowerOutputError) as e:
        flower_peer.parse_output(text, [100], 3)
    assert message in str(e.value)


def test_parse_output_keeps_the_rows_and_versions():
    rows, versions = flower_peer.parse_output(json.dumps({"rows": [_row()], "versions": {"flwr": "1.42.0"}}), [100], 3)
    assert rows == [_row()] and versions == {"flwr": "1.42.0"}


def test_a_flower_run_past_the_timeout_is_stopped_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / "pids"
    hang = tmp_path / "hang.py"
    # Starts a child (as Ray's raylet would be) and hangs.
    hang.write_text("import os, subprocess, sys, time\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                    f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                    "time.sleep(60)\n")
    monkeypatch.setattr(flower_peer, "TIMEOUT_S", 2)
    rows, _, notes = flower_peer.measure(_venv(tmp_path), [100], 2, tmp_path, lambda _: None, script=hang)
    assert rows == [] and notes == ["Flower not measured: flower_bench.py took more than 2 s (stopped)"]
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"left behind: {pids}"
        time.sleep(0.05)


def test_flower_bench_client_data_and_arguments_match_the_workload():
    fb = _flower_bench()
    for i in (0, 1, 99):
        x, y = fb.make_client(i)
        ref = W.make_client(i)
        assert np.array_equal(x, ref["x"]) and np.array_equal(y, ref["y"]) and x.dtype == np.float32
    assert fb.client_data(3) is fb.client_data(3)  # built once per process, then kept
    assert (fb.FEATURES, fb.CLASSES, fb.EXAMPLES, fb.STEPS, fb.LR) == (W.FEATURES, W.CLASSES, W.EXAMPLES, W.STEPS, W.LR)
    args = fb.parse_args(["--clients", "100,1000", "--rounds", "3"])
    assert args.clients == [100, 1000] and args.rounds == 3 and args.cpus >= 1 and args.cpus_per_client == 1.0
    with pytest.raises(SystemExit):
        fb.parse_args(["--clients", "100,many"])
    with pytest.raises(SystemExit):
        fb.parse_args(["--rounds", "1"])


def test_bench_flower_flags(tmp_path, capsys, monkeypatch):
    assert cli.main(["bench", "--flower", "sometimes"]) == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert cli.main(["bench", "--flower-venv", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--flower-venv {missing} is not a virtual environment" in err and "setup_flower_venv.sh" in err
    seen = {}

    def run_suite(out, **kwargs):  # records what the CLI passes; the suite itself is tested above
        seen.update(kwargs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text("tables\n")
        return {"duration_s": 0.0}

    monkeypatch.setattr(bench, "run_suite", run_suite)
    venv = _venv(tmp_path)
    assert cli.main(["bench", "--out", str(tmp_path / "o"), "--flower-venv", str(venv)]) == 0
    assert seen["flower"] == "auto" and seen["flower_venv"] == venv
    assert cli.main(["bench", "--out", str(tmp_path / "o"), "--flower", "off", "--flower-venv", str(missing)]) == 0
    assert seen["flower"] == "off"
