"""The scaling suite behind `mp-executors bench` (JSON + PNG plots + markdown tables).

    mp-executors bench [--quick] [--out DIR] [--rounds R] [--peer auto|off] [--peer-venv DIR]
                       [--flower auto|off] [--flower-venv DIR]

Workloads (`workloads.py`, FACTS.md "the peer"):

- **fedavg**: one FedAvg round, 784->10 softmax, 100 examples x 784 features per client,
  5 full-batch steps, at 10 / 100 / 1,000 / 10,000 clients, on
    floor        plain TF, one `tf.function` over all clients, one process (the lower bound)
    local        `local_executor_factory`, client data passed each round
    mp           `mp_executor_factory` (auto-sized), client data passed each round
    mp-resident  the same pool, client data built in the workers (`mpx.ClientData`)
    ray          `mpx.ray_executor_factory(num_workers=2)`, data passed, at the two smallest
                 client counts only (when `ray` is importable; otherwise a note says so;
                 `--ray off` skips it)
  `local` and `mp` (data passed) stop at 1,000 clients: passing 10,000 clients (3.1 GB) every
  round holds ~4 copies at once, more than 24 GiB. A configuration that would not fit in the
  available memory is skipped with a note instead of being killed.
    tff          the peer, TFF 0.87's C++ runtime, data passed (only if its venv exists; not
                 at 10,000 clients: it needs ~3.5 GB per 1,000 clients there)
    flower       the second peer, Flower's simulation engine (Ray), a numpy client keeping its
                 data in its actor, at 100 and 1,000 clients, 4 rounds (only if its venv exists,
                 `flower_peer.py`; a note says so when not; `--flower off` skips it)
- **overhead**: `federated_sum` of one float32 per client, 10 .. 10,000 clients, on local,
  mp, ray (two smallest counts) and tff (the per-client cost of the runtime itself).
- **main**: one training round of the main job (`mp-executors run`'s FedAvg process on
  mpx.learning, built as `job.py` builds it: synthetic FedProx data, the default logreg model
  and training settings),
  client data resident (the dataset's ClientData), at 100 and 1,000 clients, on local, mp and
  ray (two smallest counts).
- **small**: the main job's model and data shape (logreg 60->10, 200 examples per client,
  10 SGD steps of minibatch 10 in a per-client random order), data resident, at 100 / 1,000 /
  10,000 clients, on
    floor        the same per-client math for ALL clients as ONE vectorized graph
                 (`tf.vectorized_map` over every client), one process, all its threads
    local        `local_executor_factory`, ClientData
    mp           `mp_executor_factory` (auto-sized), ClientData
  This is where the shards' vectorized maps matter (executors/vectorized_map.py): the
  per-op cost, not FLOPs, is the wall. `ratios` reports local/floor and mp/floor.
- **workers**: FedAvg at 1,000 resident clients on 1, 2, ... up to the usable CPUs workers
  (strong scaling), against the floor.
- **coldstart** (full suite only): a fresh process (`coldstart.py`) imports TensorFlow, traces a
  map + sum, creates the factory and calls it on 100 clients; the row is the time from the
  factory's creation to the first result (median of 3 processes), on local, mp (workers forked
  from the fork server, the default) and mp with start_method='loky' (each worker imports
  TensorFlow itself: the former default).

Every number is the median of rounds 2..R of one configuration (round 1 is warm-up: pool
start, graph import, tracing), with min, max and all samples. The 10,000-client points run
fewer rounds (3) to keep the full suite within ~15 minutes on 2 cores. `--quick` is a tiny
sweep (8 and 32 clients, 3 rounds, no peer; main and small at 8 and 32 clients) for tests and smoke checks.

Outputs in DIR: bench.json (everything, plus the machine), bench.md (the tables that go into
README's performance section: see benchmarks/update_readme.py), fedavg_scaling.png,
overhead_scaling.png, main_scaling.png, small_scaling.png, workers_scaling.png (when matplotlib
is installed).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import mp_executors as mpx
from mp_executors._tf import tf  # the quiet import (TensorFlow's start-up lines silenced)
from mp_executors.benchmarking import coldstart, flower_peer
from mp_executors.benchmarking import workloads as W
from mp_executors.simulation import datasets, job, program

FEDAVG_RUNTIMES = ("floor", "local", "mp", "mp-resident", "ray", "tff", "flower")
OVERHEAD_RUNTIMES = ("local", "mp", "ray", "tff")
MAIN_RUNTIMES = ("local", "mp", "ray")
SMALL_RUNTIMES = ("floor", "local", "mp")
#: (row name, executor, start_method) of the cold-start rows.
COLDSTART_RUNTIMES = (("local", "local", None), ("mp", "mp", None), ("mp-loky", "mp", "loky"))
#: The Ray points: a 2-actor `mpx.ray_executor_factory`, at the smallest client counts only
#: (its start-up is ~10-20 s; the sweep's time stays reasonable).
RAY_WORKERS, RAY_POINTS = 2, 2
DEFAULT_PEER_VENV = Path(os.environ.get("MP_EXECUTORS_TFF_VENV", Path.home() / ".cache/mp_executors/tff-venv"))


@dataclass
class SuiteConfig:
    fedavg_clients: list[int]
    overhead_clients: list[int]
    workers: list[int]
    workers_clients: int
    rounds: int
    big_rounds: int = 3  # rounds at >= big_threshold clients
    big_threshold: int = 10_000
    peer_fedavg_max: int = 1000  # the peer needs ~3.5 GB of RSS per 1,000 FedAvg clients
    # Passing 10,000 FedAvg clients (3.1 GB) each round holds ~4 copies at once (the parent's
    # list, the local stack's columns or the shared-memory segments, the workers' tensors):
    # more than a 24 GiB machine has. Resident data (ClientData) is what scales; these stop
    # at 1,000 clients, like the peer.
    local_fedavg_max: int = 1000
    passed_fedavg_max: int = 1000
    main_clients: list[int] = field(default_factory=lambda: [100, 1000])  # the main job's round
    small_clients: list[int] = field(default_factory=lambda: [100, 1000, 10_000])  # its shape, vs its floor
    coldstart_runs: int = 3  # fresh processes per cold-start row (0: no cold-start rows)
    coldstart_clients: int = 100
    name: str = "full"
    notes: list[str] = field(default_factory=list)

    def rounds_for(self, clients: int) -> int:
        return min(self.rounds, self.big_rounds) if clients >= self.big_threshold else self.rounds


def suite_config(quick: bool, rounds: int | None = None) -> SuiteConfig:
    cpus = max(1, len(psutil.Process().cpu_affinity()) if hasattr(psutil.Process(), "cpu_affinity")
               else psutil.cpu_count() or 1)
    if quick:
        return SuiteConfig([8, 32], [8, 32], sorted({1, min(2, cpus)}), 32, rounds or 3, main_clients=[8, 32],
                           small_clients=[8, 32], name="quick", coldstart_runs=0)
    workers = sorted({1, *[w for w in (2, 4, 8, 16, 32, 64) if w <= cpus], cpus})
    return SuiteConfig([10, 100, 1000, 10_000], [10, 100, 1000, 10_000], workers, 1000, rounds or 6)


# --------------------------------------------------------------------------- measuring


def summarize(samples: list[float]) -> dict:
    timed = samples[1:] if len(samples) > 1 else samples
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "samples": samples}


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(fn: Callable[[], Any], rounds: int, factory: Any = None) -> dict:
    """Runs `fn` `rounds` times; timing summary plus peak parent/worker RSS after each round."""
    samples, parent, workers = [], 0, 0
    pool = getattr(factory, "pool", None)
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        parent = max(parent, psutil.Process().memory_info().rss)
        if pool is not None:
            workers = max(workers, _rss(pool.pids()))
    return {**summarize(samples), "rounds": rounds, "memory": {"parent_rss": parent, "workers_rss": workers}}


class Suite:
    """Runs the configurations of a SuiteConfig and collects result rows."""

    def __init__(self, cfg: SuiteConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.rows: list[dict] = []
        self._mp = None

    def add(self, workload: str, runtime: str, clients: int, result: dict, **extra: Any) -> None:
        row = {"workload": workload, "runtime": runtime, "clients": clients, **extra, **result}
        self.rows.append(row)
        self.log(f"  {workload:8s} {runtime:12s} {clients:>6d} clients: median {row['median']:.4f} s "
                 f"(min {row['min']:.4f}, max {row['max']:.4f})")

    def mp_factory(self):
        if self._mp is None:
            self._mp = mpx.mp_executor_factory()
        return self._mp

    def ray(self) -> None:
        """FedAvg (data passed) and overhead on Ray, when `ray` is importable; else a note."""
        factory = _ray_factory()
        if factory is None:
            self.cfg.notes.append("ray not measured: Ray is not installed (pip install 'mp_executors[ray]')")
            self.log(self.cfg.notes[-1])
            return
        with factory:
            for n in sorted(self.cfg.fedavg_clients)[:RAY_POINTS]:
                self.log(f"FedAvg on Ray ({RAY_WORKERS} actors), {n} clients, {self.cfg.rounds_for(n)} rounds")
                clients = W.make_clients(n)
                self.add("fedavg", "ray", n, self._fedavg_rounds(factory, clients, self.cfg.rounds_for(n)),
                         workers=RAY_WORKERS)
            for n in sorted(self.cfg.overhead_clients)[:RAY_POINTS]:
                self.log(f"federated_sum on Ray, {n} clients, {self.cfg.rounds} rounds")
                values = list(np.random.default_rng(0).random(n, dtype=np.float32))
                with mpx.execution_context(factory):
                    self.add("overhead", "ray", n, measure(lambda v=values: W.overhead_sum(v), self.cfg.rounds),
                             workers=RAY_WORKERS)
            for n in sorted(self.cfg.main_clients)[:RAY_POINTS]:
                self.log(f"main job round on Ray, {n} clients, {self.cfg.rounds_for(n)} rounds")
                self.add("main", "ray", n, _main_rounds(factory, n, self.cfg.rounds_for(n)), workers=RAY_WORKERS)

    def close(self) -> None:
        if self._mp is not None:
            self._mp.close()
            self._mp = None

    # ------------------------------------------------------------------ workloads

    def fedavg(self) -> None:
        for n in self.cfg.fedavg_clients:
            rounds = self.cfg.rounds_for(n)
            self.log(f"FedAvg, {n} clients, {rounds} rounds")
            if not self._fits(n, copies=2.5, what="FedAvg"):  # the floor's stacked arrays + its tensors
                continue
            self.add("fedavg", "floor", n, self._floor(n, rounds))
            _release_memory()
            passed = n <= self.cfg.local_fedavg_max or n <= self.cfg.passed_fedavg_max
            clients = W.make_clients(n) if passed else None

            if n <= self.cfg.local_fedavg_max:
                with mpx.local_executor_factory() as local:
                    self.add("fedavg", "local", n, self._fedavg_rounds(local, clients, rounds), workers=0)

            mp = self.mp_factory()
            if n <= self.cfg.passed_fedavg_max:
                self.add("fedavg", "mp", n, self._fedavg_rounds(mp, clients, rounds), workers=mp.plan(n).num_workers)
                mp.clean_up_executor({mpx.CLIENTS: n})
            del clients
            _release_memory()
            # The workers hold their shard twice (built clients + the stacked column).
            if not self._fits(n, copies=2.5, what="FedAvg mp-resident"):
                continue
            resident = mpx.ClientData(W.make_client, list(range(n)), W.DATA_TYPE)
            self.add("fedavg", "mp-resident", n, self._fedavg_rounds(mp, resident, rounds),
                     workers=mp.plan(n).num_workers)
            # Drop this size's executor (and the workers' resident data) before the next size.
            mp.clean_up_executor({mpx.CLIENTS: n})
            del resident
            _release_memory()

    def _fits(self, clients: int, copies: float, what: str) -> bool:
        """Whether `copies` copies of `clients` FedAvg clients fit in 80% of available memory."""
        need = clients * W.EXAMPLES * (W.FEATURES + 1) * 4 * copies
        available = psutil.virtual_memory().available
        if need <= 0.8 * available:
            return True
        self.cfg.notes.append(f"{what} at {clients:,} clients skipped: needs ~{need / 2**30:.1f} GiB, "
                              f"{available / 2**30:.1f} GiB available")
        self.log(self.cfg.notes[-1])
        return False

    @staticmethod
    def _floor(n: int, rounds: int) -> dict:
        xs, ys = W.stacked_clients(n)
        run = W.floor_round_fn()
        m0 = W.initial_model()
        return measure(lambda: [t.numpy() for t in run(m0["w"], m0["b"], xs, ys)], rounds)

    def _fedavg_rounds(self, factory, data, rounds: int) -> dict:
        state = {"model": W.initial_model()}

        def one_round():
            state["model"] = W.fedavg_round(state["model"], data)

        with mpx.execution_context(factory):
            return measure(one_round, rounds, factory)

    def overhead(self) -> None:
        for n in self.cfg.overhead_clients:
            rounds = self.cfg.rounds
            self.log(f"federated_sum, {n} clients, {rounds} rounds")
            values = list(np.random.default_rng(0).random(n, dtype=np.float32))
            with mpx.local_executor_factory() as local, mpx.execution_context(local):
                self.add("overhead", "local", n, measure(lambda v=values: W.overhead_sum(v), rounds), workers=0)
            mp = self.mp_factory()
            with mpx.execution_context(mp):
                self.add("overhead", "mp", n, measure(lambda v=values: W.overhead_sum(v), rounds, mp),
                         workers=mp.plan(n).num_workers)

    def main(self) -> None:
        """One round of the main job's program (synthetic, logreg, defaults), data resident."""
        for n in self.cfg.main_clients:
            rounds = self.cfg.rounds_for(n)
            self.log(f"main job round (synthetic, logreg), {n} clients, {rounds} rounds")
            with mpx.local_executor_factory() as local:
                self.add("main", "local", n, _main_rounds(local, n, rounds), workers=0)
            mp = self.mp_factory()
            self.add("main", "mp", n, _main_rounds(mp, n, rounds), workers=mp.plan(n).num_workers)
            mp.clean_up_executor({mpx.CLIENTS: n})

    def small(self) -> None:
        """The main job's shape (W "small"), data resident, against its one-graph vectorized floor."""
        for n in self.cfg.small_clients:
            rounds = self.cfg.rounds_for(n)
            self.log(f"small model (logreg 60->10, 10 steps of batch 10), {n} clients, {rounds} rounds")
            self.add("small", "floor", n, _small_floor(n, rounds))
            _release_memory()
            resident = mpx.ClientData(W.make_small_client, list(range(n)), W.SMALL_DATA_TYPE)
            with mpx.local_executor_factory() as local:
                self.add("small", "local", n, _small_rounds(local, resident, rounds), workers=0)
            mp = self.mp_factory()
            self.add("small", "mp", n, _small_rounds(mp, resident, rounds), workers=mp.plan(n).num_workers)
            mp.clean_up_executor({mpx.CLIENTS: n})
            del resident
            _release_memory()

    def workers(self) -> None:
        n, rounds = self.cfg.workers_clients, self.cfg.rounds
        for w in self.cfg.workers:
            self.log(f"FedAvg, {n} resident clients, {w} worker(s), {rounds} rounds")
            resident = mpx.ClientData(W.make_client, list(range(n)), W.DATA_TYPE)
            if self._mp is not None and self._mp.plan(n).num_workers == w:
                # The suite's auto-sized pool already has w workers: no need to start another.
                self.add("workers", "mp-resident", n, self._fedavg_rounds(self._mp, resident, rounds), workers=w)
                self._mp.clean_up_executor({mpx.CLIENTS: n})
                continue
            with mpx.mp_executor_factory(num_workers=w) as factory:
                self.add("workers", "mp-resident", n, self._fedavg_rounds(factory, resident, rounds), workers=w)

    def coldstart(self) -> None:
        """Factory creation -> first result, each sample a fresh process (`coldstart.py`)."""
        n, runs = self.cfg.coldstart_clients, self.cfg.coldstart_runs
        if not runs:
            return
        for runtime, executor, start_method in COLDSTART_RUNTIMES:
            self.log(f"cold start ({runtime}), {n} clients, {runs} fresh processes")
            result = coldstart.measure(executor, start_method, clients=n, runs=runs)
            workers = result["runs"][-1].get("workers", 0)
            self.add("coldstart", runtime, n, result, workers=workers)

    def peer(self, venv: Path, script: Path, out_dir: Path) -> None:
        python = venv / "bin" / "python"
        fedavg = [n for n in self.cfg.fedavg_clients if n <= self.cfg.peer_fedavg_max]
        out = out_dir / "peer_tff.json"
        cmd = [str(python), str(script), "--fedavg-clients", ",".join(map(str, fedavg)),
               "--overhead-clients", ",".join(map(str, self.cfg.overhead_clients)),
               "--rounds", str(self.cfg.rounds), "--out", str(out)]
        learning = [n for n in fedavg if n >= 100]
        if learning:  # TFF's own tff.learning program, native and on mp_executors.tff (issue 10)
            cmd += ["--learning-clients", ",".join(map(str, learning)), "--learning-rounds", str(min(4, self.cfg.rounds))]
        self.log("peer: " + " ".join(cmd))
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            self.cfg.notes.append(f"peer (TFF) failed with exit code {proc.returncode}: {tail}")
            self.log(self.cfg.notes[-1])
            return
        doc = json.loads(out.read_text())
        for row in doc["rows"]:
            self.rows.append(row)
            self.log(f"  {row['workload']:8s} {row['runtime']:12s} {row['clients']:>6d} clients: median {row['median']:.4f} s")
        self.peer_versions = doc.get("versions", {})
        self.log(f"peer done in {time.perf_counter() - started:.0f} s")


def _main_rounds(factory: Any, clients: int, rounds: int) -> dict:
    """`rounds` training rounds of the main job's program on `factory` (`measure`d).

    The specs come from `mp-executors run`'s own flag defaults (`job.specs_from_args`), the
    model and FedAvg process from `program.build_training` (mpx.learning), and each round is
    `process.next(state, clients)` over the dataset's ClientData, exactly as
    `program.run_fedavg` calls it (without its evaluations).
    """
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    model, data, cfg = job.specs_from_args(parser.parse_args(
        ["--dataset", "synthetic", "--model", "logreg", "--clients", str(clients), "--rounds", str(rounds)]))
    process = program.build_training(model, data, cfg).process
    everyone = datasets.client_data(data)
    state = {"state": process.initialize()}

    def one_round():
        state["state"], _ = process.next(state["state"], everyone)

    with mpx.execution_context(factory):
        return measure(one_round, rounds, factory)


def _small_rounds(factory: Any, data: Any, rounds: int) -> dict:
    """`rounds` rounds of W.small_round on `factory` (a new round seed each round)."""
    state = {"model": W.small_initial_model(), "round": 0}

    def one_round():
        state["round"] += 1
        state["model"] = W.small_round(state["model"], np.int32(state["round"]), data)

    with mpx.execution_context(factory):
        return measure(one_round, rounds, factory)


def _small_floor(n: int, rounds: int) -> dict:
    """The small workload's floor: W.small_floor_round_fn over all n clients, data already tensors."""
    ids, xs, ys = W.stacked_small_clients(n)
    run = W.small_floor_round_fn()
    state = {"model": W.small_initial_model(), "round": 0}

    def one_round():
        state["round"] += 1
        w, b = run(state["model"]["w"], state["model"]["b"], tf.constant(state["round"], tf.int32), ids, xs, ys)
        state["model"] = {"w": w.numpy(), "b": b.numpy()}

    return measure(one_round, rounds)


def _ray_factory() -> Any:
    """A 2-actor `mpx.ray_executor_factory`, or None when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        return None
    return mpx.ray_executor_factory(num_workers=RAY_WORKERS)


def _release_memory() -> None:
    """Collects garbage and hands freed heap back to the OS (glibc keeps it otherwise).

    Without this, the parent of a 10,000-client point keeps ~10 GB of freed client arrays
    for the rest of the suite, and later points measure (or fail) under memory pressure.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# --------------------------------------------------------------------------- peer discovery


def find_peer_script() -> Path | None:
    """benchmarks/peers/tff_workloads.py of a source checkout (the peer is not packaged)."""
    candidates = [Path.cwd() / "benchmarks" / "peers" / "tff_workloads.py",
                  Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "tff_workloads.py"]
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------- reporting


def _median(rows: list[dict], workload: str, runtime: str, clients: int) -> float | None:
    for r in rows:
        if r["workload"] == workload and r["runtime"] == runtime and r["clients"] == clients:
            return r["median"]
    return None


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"


def ratios(rows: list[dict]) -> list[dict]:
    """ours / peer and mp / floor at every client count where both exist."""
    out = []
    for workload, ours_list in (("fedavg", ("mp", "mp-resident", "local", "ray")), ("overhead", ("mp", "local", "ray")),
                                ("tff_learning", ("mp",)), ("small", ("mp", "local"))):
        ns = sorted({r["clients"] for r in rows if r["workload"] == workload})
        for n in ns:
            peer = _median(rows, workload, "tff", n)
            flower = _median(rows, workload, flower_peer.RUNTIME, n)
            floor = _median(rows, workload, "floor", n)
            for ours in ours_list:
                m = _median(rows, workload, ours, n)
                if m is None:
                    continue
                if peer:
                    out.append({"workload": workload, "clients": n, "ours": ours, "vs": "tff", "ratio": m / peer})
                if flower:
                    out.append({"workload": workload, "clients": n, "ours": ours, "vs": flower_peer.RUNTIME,
                                "ratio": m / flower})
                if floor:
                    out.append({"workload": workload, "clients": n, "ours": ours, "vs": "floor", "ratio": m / floor})
    return out


def _table_head(first: str, clients: list[int]) -> list[str]:
    """The header and rule of a table with one column per client count."""
    return ["| " + " | ".join([first, *(f"{n:,} clients" for n in clients)]) + " |", "|---|" + "---|" * len(clients)]


def markdown(doc: dict) -> str:
    """The tables for README's performance section."""
    rows = doc["rows"]
    m = doc["machine"]
    lines = [
        f"Measured by `{doc['command']}` on {m['cpus']} CPUs, {m['memory'] / 2**30:.0f} GiB, "
        f"Python {m['python']}, TensorFlow {m['tensorflow']} ({doc['when']}); "
        f"median of rounds 2..R ({doc['config']['rounds']} rounds"
        + (f"; {doc['config']['big_rounds']} at {doc['config']['big_threshold']:,}+ clients"
           if max(doc["config"]["fedavg_clients"]) >= doc["config"]["big_threshold"] else "")
        + ").",
        "",
    ]
    fed_n = sorted({r["clients"] for r in rows if r["workload"] == "fedavg"})
    if fed_n:
        lines += ["**FedAvg round** (784→10 softmax, 100 examples × 784 features per client, 5 steps):", "",
                  *_table_head("runtime", fed_n)]
        labels = {"floor": "plain TF, one graph, 1 process (floor)", "local": "mp_executors local",
                  "mp": "mp_executors mp, data passed each round", "mp-resident": "mp_executors mp, data resident (ClientData)",
                  "ray": f"mp_executors ray ({RAY_WORKERS} actors), data passed",
                  "tff": "TFF 0.87 native runtime (peer), data passed",
                  "flower": "Flower simulation engine (Ray, 1 CPU per client actor), data kept in its actors"}
        for rt in FEDAVG_RUNTIMES:
            if any(r["workload"] == "fedavg" and r["runtime"] == rt for r in rows):
                lines.append(f"| {labels[rt]} | " + " | ".join(_fmt_s(_median(rows, "fedavg", rt, n)) for n in fed_n) + " |")
        lines.append("")
    mem = [r for r in rows if r["workload"] == "fedavg" and r["runtime"] in ("mp", "mp-resident", "tff", "flower")
           and (r.get("memory") or {}).get("workers_rss")]
    if mem:
        lines += ["**Peak worker memory during FedAvg** (RSS summed over the worker processes; the "
                  "peer's is its C++ worker, Flower's all of Ray's processes):", "",
                  *_table_head("runtime", fed_n)]
        for rt in ("mp", "mp-resident", "tff", "flower"):
            cells = {r["clients"]: r["memory"]["workers_rss"] for r in mem if r["runtime"] == rt}
            if cells:
                lines.append(f"| {rt} | " + " | ".join(
                    f"{cells[n] / 2**30:.2f} GiB" if n in cells else "–" for n in fed_n) + " |")
        lines.append("")
    ov_n = sorted({r["clients"] for r in rows if r["workload"] == "overhead"})
    if ov_n:
        lines += ["**Runtime overhead**: `federated_sum` of one float per client, µs per client "
                  "(round time / clients):", "",
                  *_table_head("runtime", ov_n)]
        for rt in OVERHEAD_RUNTIMES:
            if any(r["workload"] == "overhead" and r["runtime"] == rt for r in rows):
                cells = []
                for n in ov_n:
                    v = _median(rows, "overhead", rt, n)
                    cells.append("–" if v is None else f"{v / n * 1e6:.1f}")
                lines.append(f"| {rt} | " + " | ".join(cells) + " |")
        lines.append("")
    tl_n = sorted({r["clients"] for r in rows if r["workload"] == "tff_learning"})
    if tl_n:
        lines += ["**TFF's own tff.learning program** (`build_weighted_fed_avg`, Keras 784→10, 100 examples per "
                  "client, batch 100, 5 epochs) on TFF's runtime and on `mp_executors.tff` (2 workers):", "",
                  *_table_head("runtime", tl_n)]
        for rt, label in (("mp", "mp_executors.tff, mp"), ("tff", "TFF 0.87 native runtime")):
            lines.append(f"| {label} | " + " | ".join(_fmt_s(_median(rows, "tff_learning", rt, n)) for n in tl_n) + " |")
        lines.append("")
    main_n = sorted({r["clients"] for r in rows if r["workload"] == "main"})
    if main_n:
        lines += ["**Main job round (synthetic, logreg)**: one training round of `mp-executors run` (FedProx "
                  "synthetic(1,1), 60→10 softmax, default settings: 10 local steps of batch 10), data resident:", "",
                  *_table_head("runtime", main_n)]
        for rt in MAIN_RUNTIMES:
            if any(r["workload"] == "main" and r["runtime"] == rt for r in rows):
                lines.append(f"| {rt} | " + " | ".join(_fmt_s(_median(rows, "main", rt, n)) for n in main_n) + " |")
        lines.append("")
    small_n = sorted({r["clients"] for r in rows if r["workload"] == "small"})
    if small_n:
        lines += ["**Small-model round** (the main job's shape: logreg 60→10, 200 examples per client, 10 SGD "
                  "steps of batch 10 in a per-client random order), data resident; the floor is the same "
                  "per-client math for all clients as ONE vectorized graph in one process:", "",
                  *_table_head("runtime", small_n)]
        labels = {"floor": "plain TF, one vectorized graph, 1 process (floor)", "local": "mp_executors local",
                  "mp": "mp_executors mp"}
        for rt in SMALL_RUNTIMES:
            if any(r["workload"] == "small" and r["runtime"] == rt for r in rows):
                lines.append(f"| {labels[rt]} | " + " | ".join(_fmt_s(_median(rows, "small", rt, n)) for n in small_n) + " |")
        for rt in ("local", "mp"):
            cells = {r["clients"]: r["ratio"] for r in doc["ratios"]
                     if r["workload"] == "small" and r["ours"] == rt and r["vs"] == "floor"}
            if cells:
                lines.append(f"| {rt} / floor | " + " | ".join(
                    f"{cells[n]:.2f}×" if n in cells else "–" for n in small_n) + " |")
        lines.append("")
    wk = [r for r in rows if r["workload"] == "workers"]
    if wk:
        n = wk[0]["clients"]
        floor = _median(rows, "fedavg", "floor", n)
        base = wk[0]["median"]
        lines += [f"**Worker scaling**: FedAvg, {n:,} resident clients:", "",
                  "| workers | round | speed-up vs 1 worker | vs floor |", "|---|---|---|---|"]
        for r in wk:
            lines.append(f"| {r['workers']} | {_fmt_s(r['median'])} | {base / r['median']:.2f}× | "
                         + (f"{r['median'] / floor:.2f}× floor" if floor else "–") + " |")
        lines.append("")
    cold = [r for r in rows if r["workload"] == "coldstart"]
    if cold:
        labels = {"local": "mp_executors local", "mp": "mp_executors mp (workers forked from the fork server)",
                  "mp-loky": "mp_executors mp, start_method='loky' (each worker imports TensorFlow)"}
        lines += [f"**Cold start** (a fresh process: import, trace a map + sum, create the factory, call it on "
                  f"{cold[0]['clients']:,} clients; median of {cold[0]['rounds']} processes):", "",
                  "| runtime | factory → first result | TensorFlow import → first result | "
                  "process start → first result |", "|---|---|---|---|"]
        for r in cold:
            lines.append(f"| {labels.get(r['runtime'], r['runtime'])} | {_fmt_s(r['median'])} | "
                         f"{_fmt_s(r['after_tf_import_median'])} | {_fmt_s(r['process_to_first_result_median'])} |")
        lines.append("")
    rat = [r for r in doc["ratios"] if r["vs"] == "tff"]
    if rat:
        ns = sorted({r["clients"] for r in rat})
        lines += ["**Ours / peer**: round time divided by TFF's at the same point (< 1: faster than TFF):", "",
                  *_table_head("workload, runtime", ns)]
        for key in dict.fromkeys((r["workload"], r["ours"]) for r in rat):
            cells = {r["clients"]: r["ratio"] for r in rat if (r["workload"], r["ours"]) == key}
            lines.append(f"| {key[0]}, {key[1]} | " + " | ".join(
                f"{cells[n]:.2f}" if n in cells else "–" for n in ns) + " |")
        lines.append("")
    lines += flower_peer.ratio_table(doc["ratios"])
    for note in doc.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def plots(doc: dict, out_dir: Path) -> list[str]:
    try:
        # matplotlib is optional (the `bench` extra): imported only to draw, and its
        # non-interactive backend must be chosen before pyplot is imported.
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'mp_executors[bench]')"]
    rows, written = doc["rows"], []
    for workload, runtimes, ylabel, per_client in (
        ("fedavg", FEDAVG_RUNTIMES, "seconds per round", False),
        ("overhead", OVERHEAD_RUNTIMES, "µs per client", True),
        ("main", MAIN_RUNTIMES, "seconds per round", False),
        ("small", SMALL_RUNTIMES, "seconds per round", False),
    ):
        if not any(r["workload"] == workload for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for rt in runtimes:
            pts = sorted((r["clients"], r["median"]) for r in rows if r["workload"] == workload and r["runtime"] == rt)
            if pts:
                ax.plot([n for n, _ in pts], [v / n * 1e6 if per_client else v for n, v in pts], marker="o", label=rt)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="clients", ylabel=ylabel,
               title={"fedavg": "FedAvg round time", "overhead": "federated_sum overhead per client",
                      "main": "Main job round (synthetic, logreg)",
                      "small": "Small model (main job's shape) vs its vectorized floor"}[workload])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{workload}_scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    wk = [r for r in rows if r["workload"] == "workers"]
    if wk:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot([r["workers"] for r in wk], [r["median"] for r in wk], marker="o", label="mp, resident")
        floor = _median(rows, "fedavg", "floor", wk[0]["clients"])
        if floor:
            ax.axhline(floor, color="gray", linestyle="--", label="floor (1 process)")
        ax.set(xlabel="workers", ylabel="seconds per round", title=f"FedAvg, {wk[0]['clients']:,} clients")
        ax.set_xticks([r["workers"] for r in wk])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "workers_scaling.png", dpi=110)
        plt.close(fig)
        written.append("workers_scaling.png")
    return []


def machine() -> dict:
    """The machine the numbers are measured on (recorded with them)."""
    return {"cpus": psutil.cpu_count(), "usable_cpus": len(psutil.Process().cpu_affinity()),
            "memory": psutil.virtual_memory().total, "python": platform.python_version(),
            "tensorflow": tf.__version__, "platform": platform.platform()}


def run_suite(out_dir: Path, quick: bool = False, rounds: int | None = None, peer: str = "auto",
              peer_venv: Path | None = None, command: str = "mp-executors bench",
              log: Callable[[str], None] = print, ray: str = "auto", flower: str = "auto",
              flower_venv: Path | None = None) -> dict:
    """Runs the suite and writes bench.json, bench.md and the plots into `out_dir`."""
    cfg = suite_config(quick, rounds)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    suite = Suite(cfg, log)
    try:
        suite.fedavg()
        suite.overhead()
        suite.main()
        suite.small()
        suite.workers()
        suite.coldstart()
        if ray != "off":
            suite.ray()
    finally:
        suite.close()
    venv = peer_venv or DEFAULT_PEER_VENV
    if peer != "off" and not quick:
        script = find_peer_script()
        if not (venv / "bin" / "python").exists():
            cfg.notes.append(f"peer (TFF) not measured: no venv at {venv} (bash benchmarks/peers/setup_tff_venv.sh)")
        elif script is None:
            cfg.notes.append("peer (TFF) not measured: benchmarks/peers/tff_workloads.py not found "
                             "(run from a source checkout)")
        else:
            suite.peer(venv, script, out_dir)
    flower_versions = None
    if flower != "off" and not quick:  # after our pool is closed: Flower gets the cores to itself
        flower_rows, flower_versions, notes = flower_peer.measure(
            flower_venv or flower_peer.DEFAULT_FLOWER_VENV, cfg.fedavg_clients, min(cfg.rounds, flower_peer.MAX_ROUNDS),
            out_dir, log)
        suite.rows += flower_rows
        cfg.notes += notes
    for note in cfg.notes:
        log(note)
    doc = {
        "suite": cfg.name, "command": command, "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "config": {"rounds": cfg.rounds, "big_rounds": cfg.big_rounds, "big_threshold": cfg.big_threshold,
                   "fedavg_clients": cfg.fedavg_clients, "overhead_clients": cfg.overhead_clients,
                   "main_clients": cfg.main_clients, "small_clients": cfg.small_clients,
                   "workers": cfg.workers, "workers_clients": cfg.workers_clients,
                   "coldstart_runs": cfg.coldstart_runs, "coldstart_clients": cfg.coldstart_clients},
        "rows": suite.rows, "ratios": ratios(suite.rows), "notes": cfg.notes,
        "peer_versions": getattr(suite, "peer_versions", None), "flower_versions": flower_versions,
        "duration_s": time.perf_counter() - started,
    }
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    (out_dir / "bench.md").write_text(markdown(doc))
    for note in plots(doc, out_dir):
        log(note)
    return doc
