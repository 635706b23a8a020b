"""Tests for `mp-executors bench` (mp_executors.benchmarking.suite: the quick sweep, its report, the peer hook)
and benchmarks/update_readme.py."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from mp_executors import cli
from mp_executors.benchmarking import suite as bench

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code(path: Path) -> str:
    text = path.read_text()
    return text[text.index("from __future__"):]


def test_quick_bench_writes_json_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    start = time.perf_counter()
    # Ray (when installed) is tested below with a stand-in: a real cluster start costs ~15 s.
    assert cli.main(["bench", "--quick", "--ray", "off", "--out", str(out)]) == 0
    elapsed = time.perf_counter() - start
    # ~30 s on a quiet 2-core machine; the bound leaves room for a loaded CI box.
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"
    stdout = capsys.readouterr().out
    doc = json.loads((out / "bench.json").read_text())
    assert doc["suite"] == "quick"
    got = {(r["workload"], r["runtime"], r["clients"]) for r in doc["rows"]}
    for n in (8, 32):
        for rt in ("floor", "local", "mp", "mp-resident"):
            assert ("fedavg", rt, n) in got
        assert ("overhead", "local", n) in got and ("overhead", "mp", n) in got
        assert ("main", "local", n) in got and ("main", "mp", n) in got  # the main job's round
    assert {r["workers"] for r in doc["rows"] if r["workload"] == "workers"} >= {1}
    for r in doc["rows"]:
        assert r["min"] <= r["median"] <= r["max"] and len(r["samples"]) == r["rounds"] == 3
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["tensorflow"]
    md = (out / "bench.md").read_text()
    assert "**FedAvg round**" in md and "| mp_executors mp, data resident (ClientData) |" in md
    assert "**Main job round (synthetic, logreg)**" in md
    assert "**Worker scaling**" in md and "**Peak worker memory during FedAvg**" in md and md in stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert {"fedavg_scaling.png", "overhead_scaling.png", "main_scaling.png", "workers_scaling.png"} <= {
            p.name for p in out.iterdir()}


def test_ray_rows_when_ray_is_installed_and_a_note_when_not(monkeypatch):
    import mp_executors as mpx

    cfg = bench.SuiteConfig([4, 8, 16], [4, 8, 16], [1], 8, rounds=2, main_clients=[4, 8, 16])
    suite = bench.Suite(cfg, log=lambda _: None)
    monkeypatch.setattr(bench, "_ray_factory", mpx.local_executor_factory)  # stands in for 2 Ray actors
    suite.ray()
    got = sorted((r["workload"], r["clients"]) for r in suite.rows if r["runtime"] == "ray")
    assert got == [("fedavg", 4), ("fedavg", 8), ("main", 4), ("main", 8), ("overhead", 4), ("overhead", 8)]
    assert all(r["workers"] == bench.RAY_WORKERS and len(r["samples"]) == 2 for r in suite.rows)
    doc = {"rows": suite.rows, "ratios": bench.ratios(suite.rows), "command": "x", "when": "now",
           "machine": {"cpus": 2, "memory": 2**34, "python": "3", "tensorflow": "2"},
           "config": {"rounds": 2, "big_rounds": 3, "big_threshold": 10_000, "fedavg_clients": [4, 8, 16]},
           "notes": []}
    assert "| mp_executors ray (2 actors), data passed |" in bench.markdown(doc)
    monkeypatch.setattr(bench, "_ray_factory", lambda: None)  # not installed
    suite.ray()
    assert cfg.notes == ["ray not measured: Ray is not installed (pip install 'mp_executors[ray]')"]


def test_bench_rejects_one_round(capsys):
    assert cli.main(["bench", "--rounds", "1"]) == 2
    assert "--rounds must be at least 2" in capsys.readouterr().err


FAKE_PEER = """
import argparse, json
p = argparse.ArgumentParser()
p.add_argument("--fedavg-clients"); p.add_argument("--overhead-clients")
p.add_argument("--rounds", type=int); p.add_argument("--out")
p.add_argument("--learning-clients"); p.add_argument("--learning-rounds")  # tff.learning (issue 10)
a = p.parse_args()
assert a.learning_clients == "100,1000", a.learning_clients
rows = [{"workload": w, "runtime": "tff", "clients": int(n), "rounds": a.rounds, "median": 2.0 * int(n),
         "min": 1.0, "max": 3.0, "samples": [1.0] * a.rounds, "memory": {}}
        for w, ns in (("fedavg", a.fedavg_clients), ("overhead", a.overhead_clients)) for n in ns.split(",")]
json.dump({"rows": rows, "versions": {"tensorflow_federated": "fake"}}, open(a.out, "w"))
"""


def test_peer_rows_and_ratios(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    cfg = bench.SuiteConfig([10, 100, 1000, 10_000], [10, 10_000], [1], 10, rounds=3)
    suite = bench.Suite(cfg, log=lambda _: None)
    suite.rows.append({"workload": "fedavg", "runtime": "mp", "clients": 100, "median": 50.0, "min": 1, "max": 1})
    suite.peer(venv, script, tmp_path)
    peer_n = sorted(r["clients"] for r in suite.rows if r["runtime"] == "tff" and r["workload"] == "fedavg")
    assert peer_n == [10, 100, 1000]  # never the peer at 10,000 FedAvg clients
    ratio = [r for r in bench.ratios(suite.rows) if r["vs"] == "tff"]
    assert ratio == [{"workload": "fedavg", "clients": 100, "ours": "mp", "vs": "tff", "ratio": 0.25}]
    doc = {"rows": suite.rows, "ratios": bench.ratios(suite.rows), "command": "x", "when": "now",
           "machine": {"cpus": 2, "memory": 2**34, "python": "3", "tensorflow": "2"},
           "config": {"rounds": 3, "big_rounds": 3, "big_threshold": 10_000, "fedavg_clients": [10]}, "notes": []}
    md = bench.markdown(doc)
    assert "TFF 0.87 native runtime (peer)" in md and "| fedavg, mp | 0.25 |" in md


def test_peer_failure_becomes_a_note(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit('no tensorflow_federated here')\n")
    cfg = bench.SuiteConfig([10], [10], [1], 10, rounds=3)
    suite = bench.Suite(cfg, log=lambda _: None)
    suite.peer(venv, script, tmp_path)
    assert not suite.rows and "peer (TFF) failed" in cfg.notes[0] and "no tensorflow_federated" in cfg.notes[0]


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    update = _load(REPO / "benchmarks" / "update_readme.py", "_update_readme")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\n## After\nkeep\n")
    tables = tmp_path / "bench.md"
    tables.write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert update.main(["--bench", str(tables), "--readme", str(readme), "--check"]) == 1
    assert update.main(["--bench", str(tables), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| 1 | 2 |" in text and text.endswith("## After\nkeep\n")
    assert text.count("<!-- bench:start -->") == 1 and text.count("<!-- bench:end -->") == 1
    assert update.main(["--bench", str(tables), "--readme", str(readme), "--check"]) == 0
    update.main(["--bench", str(tables), "--readme", str(readme)])
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    assert update.main(["--bench", str(tables), "--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers\n"
