"""What a run leaves behind and shows: metrics.csv, metrics.json, model.npz, plots, the table.

metrics.json is laid out so that everything that depends on the runtime sits under two keys,
``timing`` and ``runtime``; the rest (``config``, ``dataset``, ``model``, ``metrics``) is a
pure function of the configuration and is bitwise the same on `local`, `mp` with any number
of workers, run after run (the tests compare exactly that).

Also here: the per-round progress (tqdm on a terminal, else one plain line per round), the
memory sampler (parent + worker RSS, psutil) and the closing summary table.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import mp_executors
from mp_executors.machine import format_bytes
from mp_executors.simulation.program import RoundRecord, RunResult

METRIC_KEYS = ("local_loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy")


# --------------------------------------------------------------------------- memory


class MemorySampler:
    """Peak RSS of this process, of the pool's workers and of both together (psutil).

    `sample()` takes one reading; between `start()` and `stop()` a daemon thread also takes
    one every `interval` seconds, so a peak inside a long round (or the start-up) is seen,
    not only what is left between rounds.
    """

    def __init__(self, factory: Any = None, interval: float = 0.25):
        self.factory = factory
        self.interval = interval
        self.peak_parent = 0
        self.peak_workers = 0
        self.peak_total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def worker_pids(self) -> list[int]:
        pool = getattr(self.factory, "pool", None)
        try:
            return list(pool.pids()) if pool is not None else []
        except Exception:  # noqa: BLE001 - a pool being torn down has no pids to sample
            return []

    def sample(self) -> None:
        parent = psutil.Process().memory_info().rss
        workers = 0
        for pid in self.worker_pids():
            try:
                workers += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        with self._lock:
            self.peak_parent = max(self.peak_parent, parent)
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_total = max(self.peak_total, parent + workers)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mp_executors-memory-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed reading must not end the run; the next one counts
                continue

    def to_dict(self) -> dict[str, int]:
        return {"peak_parent_rss": self.peak_parent, "peak_workers_rss": self.peak_workers,
                "peak_total_rss": self.peak_total}


# --------------------------------------------------------------------------- progress


def _round_line(record: RoundRecord, total: int) -> str:
    m = record.metrics
    parts = [f"round {record.round:>{len(str(total))}d}/{total}", f"clients {record.clients}",
             f"local loss {m['local_loss']:.4f}"]
    if "test_accuracy" in m:
        parts += [f"train loss {m['train_loss']:.4f}", f"test acc {m['test_accuracy']:.4f}"]
    timing = f"{record.train_s:.3f} s"
    if record.eval_s is not None:
        timing += f" (+{record.eval_s:.3f} s eval)"
    return "  ".join(parts + [timing])


def _is_sized_terminal(stream) -> bool:
    """A terminal with a width (a pty without one, e.g. under `script`, would hide tqdm's bar)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    """tqdm when stdout is a terminal and tqdm is installed; otherwise one line per round."""

    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total = total
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.bar = None
        self.use_bar = not quiet and _is_sized_terminal(self.stream)

    def start(self) -> None:
        """Shows the bar; called once the pool is up, so its rate does not count start-up."""
        if not self.use_bar or self.bar is not None:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional
        except ImportError:
            self.use_bar = False
            return
        self.bar = tqdm(total=self.total, unit="round", file=self.stream, dynamic_ncols=True)

    def __call__(self, record: RoundRecord) -> None:
        if self.quiet:
            return
        self.start()
        if self.bar is not None:
            m = record.metrics
            post = {"loss": f"{m['local_loss']:.3f}", "s/round": f"{record.train_s:.2f}"}
            if "test_accuracy" in m:
                post["test acc"] = f"{m['test_accuracy']:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        else:
            print(_round_line(record, self.total), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardScalars:
    """`--tensorboard DIR`: the metrics of metrics.csv as TensorBoard scalars, one step per round.

    Tags are the metric names (local_loss, train_loss, ..., clip), plus train_s and eval_s; round 0
    (the initial model) is step 0. A resumed run appends a new events file to the same folder.
    """

    def __init__(self, log_dir: Path):
        from mp_executors._tf import tf  # noqa: PLC0415 - only with --tensorboard, once TF is in

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))
        # `tf.summary.scalar` needs the tensorboard package; `tf.summary.write` with the scalars
        # plugin's metadata (what `scalar` writes) needs nothing but TensorFlow.
        self._metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))

    def write(self, step: int, metrics: dict[str, float], times: dict[str, float | None] | None = None) -> None:
        values = {**metrics, **{k: v for k, v in (times or {}).items() if v is not None}}
        with self._writer.as_default():
            for tag, value in values.items():
                if value is not None and np.isfinite(value):
                    self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32), step=step,
                                           metadata=self._metadata)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------- results


def _clean(value: Any) -> Any:
    """JSON-safe floats (numpy scalars to float; NaN/inf to None)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if np.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def timing_summary(result: RunResult) -> dict[str, float]:
    times = [r.train_s for r in result.rounds]
    evals = [r.eval_s for r in result.rounds if r.eval_s is not None]
    return {
        "startup_s": result.startup_s,
        "mean_round_s": statistics.fmean(times),
        "median_round_s": statistics.median(times),
        # Round 1 also traces and imports the computations in the workers.
        "median_round_s_after_first": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "mean_eval_s": statistics.fmean(evals) if evals else None,
        # Wall time since this process started (imports, tracing, pool, writing included).
        "total_s": time.time() - psutil.Process().create_time(),
    }


def build_metrics(
    result: RunResult, config: dict, descriptions: dict[str, str], runtime: dict, started: float,
) -> dict:
    """The metrics.json document (see the module docstring for its layout)."""
    return _clean({
        "config": config,
        "dataset": descriptions["dataset"],
        "model": descriptions["model"],
        "metrics": {
            "initial": result.initial,
            "rounds": [{"round": r.round, "clients": r.clients, **r.metrics} for r in result.rounds],
            "final": result.final_metrics,
            "final_model_sha256": result.model_digest(),
        },
        "timing": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            **timing_summary(result),
            "rounds": [{"round": r.round, "train_s": r.train_s, "eval_s": r.eval_s} for r in result.rounds],
        },
        "runtime": runtime,
    })


def environment() -> dict:
    tf = sys.modules.get("tensorflow")
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "mp_executors": mp_executors.__version__, "tensorflow": getattr(tf, "__version__", None),
        "numpy": np.__version__, "cpus": psutil.cpu_count(), "memory": psutil.virtual_memory().total,
    }


def write_outputs(out_dir: Path, doc: dict, result: RunResult, plots: bool = True) -> list[str]:
    """Writes metrics.csv, metrics.json, model.npz and (matplotlib permitting) the plots.

    Returns notes for the user (e.g. that plots were skipped and why).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    # One row per round (round 0: the initial model), the metrics and the seconds it took.
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "clients", *METRIC_KEYS, "train_s", "eval_s"])
        writer.writerow([0, "", "", *(result.initial.get(k, "") for k in METRIC_KEYS[1:]), "", ""])
        for r in result.rounds:
            writer.writerow([r.round, r.clients, *(r.metrics.get(k, "") for k in METRIC_KEYS),
                             f"{r.train_s:.6f}", "" if r.eval_s is None else f"{r.eval_s:.6f}"])
    np.savez(out_dir / "model.npz", **result.params)
    notes = []
    if plots:
        notes += write_plots(out_dir, result)
    return notes


def write_plots(out_dir: Path, result: RunResult) -> list[str]:
    """accuracy.png, loss.png, round_time.png (needs matplotlib; says so when missing)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")  # no display needed, and never steals focus
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'mp_executors[bench]')"]
    evaluated = [(0, result.initial)] + [(r.round, r.metrics) for r in result.rounds if "test_accuracy" in r.metrics]
    xs = [r for r, _ in evaluated]

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        ax.plot(xs, [m[key] for _, m in evaluated], marker=".", label=label)
    ax.set(xlabel="round", ylabel="accuracy", title="Accuracy of the global model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train (global model)"), ("test_loss", "test (global model)")):
        ax.plot(xs, [m[key] for _, m in evaluated], marker=".", label=label)
    ax.plot([r.round for r in result.rounds], [r.metrics["local_loss"] for r in result.rounds],
            marker=".", linestyle="--", label="clients' local training")
    ax.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r.round for r in result.rounds]
    ax.bar(rounds, [r.train_s for r in result.rounds], label="training round")
    ax.bar(rounds, [r.eval_s or 0.0 for r in result.rounds], bottom=[r.train_s for r in result.rounds],
           label="evaluation")
    ax.set(xlabel="round", ylabel="seconds", title="Time per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "round_time.png", dpi=110)
    plt.close(fig)
    return []


# --------------------------------------------------------------------------- summary


def summary_table(doc: dict, out_dir: Path) -> str:
    """The closing table printed after a run."""
    final = doc["metrics"]["final"]
    timing, runtime = doc["timing"], doc["runtime"]
    mem = runtime["memory"]
    rows = [
        ("dataset", doc["dataset"]),
        ("model", doc["model"]),
        ("rounds", f"{len(doc['metrics']['rounds'])} ({doc['metrics']['rounds'][-1]['clients']} clients in the last)"),
        ("final test accuracy", f"{final['test_accuracy']:.4f}"),
        ("final train accuracy / loss", f"{final['train_accuracy']:.4f} / {final['train_loss']:.4f}"),
        *([("privacy spent (DP)", f"epsilon {doc['metrics']['privacy']['epsilon']:.3g} at delta "
                                   f"{doc['metrics']['privacy']['delta']:g} ({doc['metrics']['privacy']['accountant']})")]
          if "privacy" in doc["metrics"] else []),
        ("round time, mean / median", f"{timing['mean_round_s']:.3f} s / {timing['median_round_s']:.3f} s"),
        ("start-up (first call)", f"{timing['startup_s']:.2f} s"),
        ("total (since process start)", f"{timing['total_s']:.1f} s"),
        ("executor", runtime["executor"]),
    ]
    for w in runtime.get("workers", []):
        pin = f"cpus {w.get('cpu_affinity')}"
        if w.get("cuda_visible_devices"):
            pin += f", gpu {w['cuda_visible_devices']}"
        threads = w.get("intra_op_threads")
        rows.append((f"  worker {w.get('slot')} (pid {w.get('pid')})",
                     pin + (f", {threads} TF thread(s)" if threads else "")))
    rows += [
        ("peak memory (RSS, whole run)", f"{format_bytes(mem['peak_total_rss'])}: parent {format_bytes(mem['peak_parent_rss'])}"
         f" + workers {format_bytes(mem['peak_workers_rss'])}"),
        ("outputs", str(out_dir)),
        ("final model sha256", doc["metrics"]["final_model_sha256"][:16] + "..."),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def default_out_dir(dataset: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset}-{os.getpid()}"
