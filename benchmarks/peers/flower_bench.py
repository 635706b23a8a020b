"""The FedAvg workload on the second peer: Flower's simulation engine (flwr[simulation], Ray).

    ~/.cache/mp_executors/flower-venv/bin/python benchmarks/peers/flower_bench.py \
        --clients 100,1000 --rounds 4 --out peer_flower.json [--weights-dir DIR]

Runs in the separate venv made by `setup_flower_venv.sh` (Flower and Ray are never
dependencies of mp_executors, and this file imports nothing from it). It is what users pick
instead of TFF today, so it is measured the way its users run it: `flwr.simulation.run_simulation`
with a `ClientApp` (one virtual SuperNode per client) and a `ServerApp` running Flower's own
message-based `FedAvg` strategy (`flwr.serverapp.strategy.FedAvg`, every client trains every
round, no federated evaluation), on Ray actors of `--cpus-per-client` CPUs each (default 1: one
actor per usable core, each with one BLAS thread, as our workers have one TF thread each).

The workload is "fedavg" of `mp_executors/benchmarking/workloads.py`, the same math in numpy:
784->10 softmax, each client 100 examples x 784 features (generated exactly like
`workloads.make_client`, from `np.random.default_rng(client_id)`), 5 full-batch gradient
steps with lr 0.1 in float32, the server mean of the client models (Flower weights it by
"num-examples", all 100: the plain mean). A client builds its data once per Ray actor
process and keeps it (like mp's resident `ClientData`): what crosses Flower's runtime each
round is the model, both ways, per client.

Timing: `strategy.start`'s `evaluate_fn` is called before round 1 and after every round;
a round's time is the gap between two calls (sending the model to every client, their
training, the replies, the aggregation). Round 1 is warm-up: the ServerApp starts while Ray
and its actors are still starting, so it includes their start-up and every client's first data
build; the suite takes the median of rounds 2..R. The whole `run_simulation` call (Ray start
to shutdown) is reported as "simulation_s".

Output (`--out`, or stdout with `--out -`): {"rows": [{"workload": "fedavg", "runtime":
"flower", "clients", "rounds", "median", "min", "max", "samples", "simulation_s", "memory",
"checksum": {"w_sum", "w_l2", "b_sum"}}], "versions": ...}. With `--weights-dir`, the final
global model of each client count goes to DIR/flower_fedavg_{clients}.npz (w, b), so the
suite can compare it with the same rounds on TensorFlow. Ray's processes are stopped by
`run_simulation` (ray.shutdown); any that remain are killed, by pid, before this exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Flower sends usage telemetry by default; a benchmark must not wait on the network.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # FACTS.md: silences Ray's start-up warning
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

FEATURES, CLASSES, EXAMPLES, STEPS, LR = 784, 10, 100, 5, 0.1
#: Per Ray actor process: at most this many clients' data kept (1,000 FedAvg clients ~ 0.3 GB).
CACHE_CLIENTS = 2000

_DATA: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def make_client(client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's (x, y), exactly as `workloads.make_client` draws them."""
    rng = np.random.default_rng(client_id)
    return rng.random((EXAMPLES, FEATURES), dtype=np.float32), rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)


def client_data(client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The client's data, built once per process (the Ray actor) and kept."""
    data = _DATA.get(client_id)
    if data is None:
        if len(_DATA) >= CACHE_CLIENTS:
            _DATA.pop(next(iter(_DATA)))
        data = _DATA[client_id] = make_client(client_id)
    return data


def softmax_steps(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`workloads.softmax_steps` in numpy float32: 5 full-batch steps of softmax regression."""
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    n = np.float32(x.shape[0])
    lr = np.float32(LR)
    for _ in range(STEPS):
        z = x @ w + b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        w = w - lr * (x.T @ g)
        b = b - lr * g.sum(axis=0)
    return w, b


def checksum(w: np.ndarray, b: np.ndarray) -> dict:
    return {"w_sum": float(w.sum(dtype=np.float64)), "w_l2": float(np.linalg.norm(w.astype(np.float64))),
            "b_sum": float(b.sum(dtype=np.float64))}


def summarize(samples: list[float]) -> dict:
    timed = samples[1:] if len(samples) > 1 else samples
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "samples": samples}


def ints(text: str) -> list[int]:
    """'100,1000' -> [100, 1000] (argparse type: a clear error for anything else)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 100,1000, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"client counts must be at least 2 (Flower's FedAvg samples >= 2), got {text!r}")
    return values


# --------------------------------------------------------------------------- Flower apps
# Built lazily: `flwr` is imported only when the benchmark runs (the argument parsing and
# the math above are usable without it).


def build_apps(clients: int, rounds: int, record: dict):
    """The ClientApp and ServerApp of one simulation; `record` receives times and the result."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: PLC0415
    from flwr.clientapp import ClientApp  # noqa: PLC0415
    from flwr.serverapp import Grid, ServerApp  # noqa: PLC0415
    from flwr.serverapp.strategy import FedAvg  # noqa: PLC0415

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        x, y = client_data(int(context.node_config["partition-id"]))
        w, b = softmax_steps(w, b, x, y)
        content = RecordDict({"arrays": ArrayRecord([w, b]), "metrics": MetricRecord({"num-examples": EXAMPLES})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_evaluate_nodes=0, min_available_nodes=clients)
        marks = record["marks"]

        def mark(server_round: int, arrays) -> None:
            marks.append(time.perf_counter())
            pids, rss = descendants()
            record["pids"] |= pids  # Ray's processes, to kill any that outlive ray.shutdown
            record["rss"] = max(record.get("rss", 0), rss)

        initial = ArrayRecord([np.zeros((FEATURES, CLASSES), np.float32), np.zeros(CLASSES, np.float32)])
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=mark)
        record["final"] = result.arrays.to_numpy_ndarrays()

    return client_app, server_app


# --------------------------------------------------------------------------- processes


def descendants() -> tuple[set[int], int]:
    """The pids of this process's descendants (Ray's processes) and their summed RSS."""
    pids, total = set(), 0
    for p in psutil.Process().children(recursive=True):
        pids.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return pids, total


def kill_leftovers(pids: set[int]) -> int:
    """Kills, by pid, Ray processes this run started that are still alive; returns how many."""
    alive = set()
    for pid in pids | descendants()[0]:
        try:
            proc = psutil.Process(pid)
            proc.kill()
            alive.add(pid)
        except psutil.Error:
            pass
    psutil.wait_procs([psutil.Process(p) for p in alive if psutil.pid_exists(p)], timeout=5)
    return len(alive)


# --------------------------------------------------------------------------- running


def run_point(clients: int, rounds: int, cpus: float, cpus_per_client: float) -> dict:
    """One Flower simulation of `rounds` FedAvg rounds over `clients` virtual SuperNodes."""
    from flwr.simulation import run_simulation  # noqa: PLC0415

    record: dict = {"marks": [], "pids": set()}
    client_app, server_app = build_apps(clients, rounds, record)
    backend_config = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                      "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}}
    started = time.perf_counter()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                       backend_config=backend_config)
    finally:
        simulation_s = time.perf_counter() - started
        leftovers = kill_leftovers(record["pids"])
    marks = record["marks"]
    if "final" not in record or len(marks) != rounds + 1:
        raise RuntimeError(f"Flower's simulation ended after {max(0, len(marks) - 1)} of {rounds} rounds "
                           "(see its log above)")
    w, b = record["final"]
    samples = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]
    return {"workload": "fedavg", "runtime": "flower", "clients": clients, "rounds": rounds,
            **summarize(samples), "simulation_s": simulation_s, "workers": int(cpus // cpus_per_client),
            "memory": {"workers_rss": record.get("rss", 0)}, "checksum": checksum(w, b),
            "leftover_processes_killed": leftovers, "final": (w, b)}


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=ints, default=[100, 1000], help="client counts (default: 100,1000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per client count, the first is warm-up")
    parser.add_argument("--cpus", type=float, default=None, help="CPUs given to Ray (default: the usable cores)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="Ray num_cpus per client actor (default 1: one actor per core)")
    parser.add_argument("--out", default="-", help="the JSON file ('-': stdout, the default)")
    parser.add_argument("--weights-dir", default=None, help="also write DIR/flower_fedavg_{clients}.npz")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the first is warm-up), got {args.rounds}")
    args.cpus = args.cpus or float(usable_cpus())
    if not 0 < args.cpus_per_client <= args.cpus:
        parser.error(f"--cpus-per-client must be in (0, --cpus={args.cpus:g}], got {args.cpus_per_client:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One BLAS thread per CPU of an actor (inherited by Ray's workers): no oversubscription.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(max(1, int(args.cpus_per_client))))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(args.cpus_per_client))))
    import flwr  # noqa: PLC0415 - only in the Flower venv
    import ray  # noqa: PLC0415

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per round per phase otherwise
    rows = []
    for n in args.clients:
        print(f"flower: FedAvg, {n} clients, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        row = run_point(n, args.rounds, args.cpus, args.cpus_per_client)
        w, b = row.pop("final")
        if args.weights_dir:
            Path(args.weights_dir).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.weights_dir) / f"flower_fedavg_{n}.npz", w=w, b=b)
        print(f"flower: {n} clients: median {row['median']:.4f} s (first round {row['samples'][0]:.1f} s)",
              file=sys.stderr, flush=True)
        rows.append(row)
    doc = {"rows": rows, "versions": {"flwr": flwr.__version__, "ray": ray.__version__, "numpy": np.__version__,
                                      "python": platform.python_version()}}
    text = json.dumps(doc, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    # Run as the importable module `flower_bench` (this directory is on sys.path, and Flower
    # passes it to Ray's workers in PYTHONPATH): the apps' functions are then pickled by
    # reference, and a Ray actor's client-data cache (`_DATA`) lives as long as the actor,
    # instead of arriving empty with each message as a by-value copy of `__main__` would.
    import flower_bench

    sys.exit(flower_bench.main())
