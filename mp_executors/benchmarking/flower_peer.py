"""The second peer of `mp-executors bench`: Flower's simulation engine, in its own venv.

Owns everything the suite knows about Flower: where its venv and script are
(`benchmarks/peers/setup_flower_venv.sh`, `benchmarks/peers/flower_bench.py`), at which client
counts and for how many rounds it runs, running the script there as a subprocess (Flower and
Ray never enter this environment), turning its JSON into suite rows (workload "fedavg",
runtime "flower"), checking its final model against the same rounds computed by TensorFlow
here, and the notes that say why it was not measured. `suite.py` calls `measure` and puts the
rows into its tables (ours / Flower ratios); `ratio_table` renders them.

Flower runs the FedAvg workload of `workloads.py` (784->10, 100 examples per client, 5
full-batch steps) with a numpy client, each client's data built once per Ray actor and kept
there (the counterpart of mp's resident `ClientData`), 1 CPU per client actor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from mp_executors.benchmarking import workloads as W

logger = logging.getLogger("mp_executors")

RUNTIME = "flower"
DEFAULT_FLOWER_VENV = Path(os.environ.get("MP_EXECUTORS_FLOWER_VENV",
                                          Path.home() / ".cache/mp_executors/flower-venv"))
SETUP_COMMAND = "bash benchmarks/peers/setup_flower_venv.sh"
#: Flower's client counts: those of the FedAvg sweep in this range. Below 100 a round is
#: mostly Flower's fixed cost; at 10,000 one round takes minutes (~8-14 ms per client here).
MIN_CLIENTS, MAX_CLIENTS = 100, 1000
#: Rounds per point (the first is warm-up, including Ray's start): a few are enough, each
#: 1,000-client round takes ~10 s.
MAX_ROUNDS = 4
TIMEOUT_S = 1800
#: Flower's model vs TensorFlow's after the same rounds: above this, a note says they differ.
MAX_ABS_DIFF = 1e-4


class FlowerOutputError(ValueError):
    """flower_bench.py's JSON is not what the suite expects."""


def find_script() -> Path | None:
    """benchmarks/peers/flower_bench.py of a source checkout (the peers are not packaged)."""
    candidates = [Path.cwd() / "benchmarks" / "peers" / "flower_bench.py",
                  Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "flower_bench.py"]
    return next((c for c in candidates if c.is_file()), None)


def flower_clients(fedavg_clients: list[int]) -> list[int]:
    """The FedAvg client counts Flower is measured at."""
    return sorted(n for n in fedavg_clients if MIN_CLIENTS <= n <= MAX_CLIENTS)


def command(python: Path, script: Path, clients: list[int], rounds: int, out: Path, weights_dir: Path) -> list[str]:
    return [str(python), str(script), "--clients", ",".join(map(str, clients)), "--rounds", str(rounds),
            "--out", str(out), "--weights-dir", str(weights_dir)]


def parse_output(text: str, clients: list[int], rounds: int) -> tuple[list[dict], dict]:
    """(rows, versions) of flower_bench.py's JSON; FlowerOutputError naming what is wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlowerOutputError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise FlowerOutputError('expected an object with a "rows" list')
    rows = []
    for i, row in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise FlowerOutputError(f"{where} is not an object")
        if (row.get("workload"), row.get("runtime")) != ("fedavg", RUNTIME):
            raise FlowerOutputError(f'{where}: expected workload "fedavg", runtime "{RUNTIME}", got '
                                    f'{row.get("workload")!r}, {row.get("runtime")!r}')
        if row.get("clients") not in clients:
            raise FlowerOutputError(f"{where}: clients {row.get('clients')!r} was not asked for ({clients})")
        samples = row.get("samples")
        if not isinstance(samples, list) or len(samples) != rounds or not all(
                isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in samples):
            raise FlowerOutputError(f"{where}: expected {rounds} positive round times in samples, got {samples!r}")
        for key in ("median", "min", "max"):
            if not isinstance(row.get(key), (int, float)):
                raise FlowerOutputError(f"{where}: {key} missing or not a number")
        if not row["min"] <= row["median"] <= row["max"]:
            raise FlowerOutputError(f"{where}: min <= median <= max does not hold")
        rows.append(dict(row))
    missing = sorted(set(clients) - {r["clients"] for r in rows})
    if missing:
        raise FlowerOutputError(f"no row for {missing} clients")
    versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else {}
    return rows, versions


def reference_model(clients: int, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """The global model after `rounds` FedAvg rounds from zeros, by TensorFlow (the floor's graph)."""
    xs, ys = W.stacked_clients(clients)
    run = W.floor_round_fn()
    model = W.initial_model()
    w, b = model["w"], model["b"]
    for _ in range(rounds):
        w, b = (t.numpy() for t in run(w, b, xs, ys))
    return w, b


def max_abs_diff(weights_file: Path, clients: int, rounds: int) -> float:
    """max |Flower's final model - TensorFlow's| over w and b."""
    with np.load(weights_file) as f:
        fw, fb = f["w"], f["b"]
    w, b = reference_model(clients, rounds)
    if fw.shape != w.shape or fb.shape != b.shape:
        raise FlowerOutputError(f"{weights_file.name}: shapes {fw.shape}, {fb.shape}, expected {w.shape}, {b.shape}")
    return float(max(np.abs(fw - w).max(), np.abs(fb - b).max()))


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills the script and everything it started (Ray's processes), by pid."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def measure(venv: Path, fedavg_clients: list[int], rounds: int, out_dir: Path,
            log: Callable[[str], None] = print, script: Path | None = None) -> tuple[list[dict], dict, list[str]]:
    """Runs flower_bench.py in `venv`: (rows, versions, notes). Never raises for a missing or
    failing peer: the reason is a note (the suite's other numbers stand)."""
    clients = flower_clients(fedavg_clients)
    python = venv / "bin" / "python"
    if not clients:
        return [], {}, [f"Flower not measured: no FedAvg client count in {MIN_CLIENTS:,}..{MAX_CLIENTS:,}"]
    if not python.exists():
        return [], {}, [f"Flower not measured: no venv at {venv} ({SETUP_COMMAND}, or --flower-venv DIR)"]
    script = script or find_script()
    if script is None:
        return [], {}, ["Flower not measured: benchmarks/peers/flower_bench.py not found (run from a source checkout)"]
    out, weights_dir = out_dir / "peer_flower.json", out_dir / "peer_flower_weights"
    out.unlink(missing_ok=True)
    cmd = command(python, script, clients, rounds, out, weights_dir)
    log("flower: " + " ".join(cmd))
    started = time.perf_counter()
    # Its own session, so that a timeout can stop Ray's processes with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return [], {}, [f"Flower not measured: flower_bench.py took more than {TIMEOUT_S} s (stopped)"]
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        return [], {}, [f"Flower failed with exit code {proc.returncode}: {tail}"]
    try:
        rows, versions = parse_output(out.read_text() if out.exists() else "", clients, rounds)
    except FlowerOutputError as e:
        return [], {}, [f"Flower's output {out} is unusable: {e}"]
    notes = []
    diffs = {}
    for row in rows:
        n = row["clients"]
        weights = weights_dir / f"flower_fedavg_{n}.npz"
        if weights.exists():
            diffs[n] = row["max_abs_diff_vs_tf"] = max_abs_diff(weights, n, rounds)
        log(f"  fedavg   {RUNTIME:12s} {n:>6d} clients: median {row['median']:.4f} s "
            f"(first round {row['samples'][0]:.1f} s)")
    if diffs:
        worst = max(diffs.values())
        verdict = "the same math" if worst <= MAX_ABS_DIFF else f"DIFFERENT (more than {MAX_ABS_DIFF:g})"
        notes.append(f"Flower's global model after {rounds} rounds vs the same rounds in TensorFlow here: max |Δ| "
                     + ", ".join(f"{d:.1e} at {n:,} clients" for n, d in sorted(diffs.items())) + f": {verdict}")
    version = versions.get("flwr", "?")
    notes.append(f"Flower {version} (Ray {versions.get('ray', '?')}) ran in {venv}: {rounds} rounds per point "
                 f"(its first round includes Ray's start), 1 CPU per client actor; "
                 f"{time.perf_counter() - started:.0f} s in all")
    logger.info("Flower peer measured at %s clients", clients)
    return rows, versions, notes


def ratio_table(ratios: list[dict]) -> list[str]:
    """Markdown lines: ours / Flower at each client count (empty when Flower was not measured)."""
    rat = [r for r in ratios if r["vs"] == RUNTIME]
    if not rat:
        return []
    ns = sorted({r["clients"] for r in rat})
    lines = ["**Ours / Flower**: FedAvg round time divided by Flower's simulation engine's at the same point "
             "(< 1: faster than Flower):", "",
             "| " + " | ".join(["workload, runtime", *(f"{n:,} clients" for n in ns)]) + " |",
             "|---|" + "---|" * len(ns)]
    for key in dict.fromkeys((r["workload"], r["ours"]) for r in rat):
        cells = {r["clients"]: r["ratio"] for r in rat if (r["workload"], r["ours"]) == key}
        lines.append(f"| {key[0]}, {key[1]} | " + " | ".join(
            (f"{cells[n]:.3f}" if cells[n] < 0.1 else f"{cells[n]:.2f}") if n in cells else "–" for n in ns) + " |")
    return [*lines, ""]
