"""`mp-executors run`: the main job, FedAvg on a federated dataset over a chosen runtime.

    mp-executors run [--dataset synthetic|digits] [--clients N] [--clients-per-round K]
                     [--rounds R] [--model logreg|mlp] [--executor mp|local|ray] [--workers N]
                     [--out DIR] ...

It builds the factory the flags ask for, runs `program.run_fedavg` with a progress display,
writes the outputs (`outputs.write_outputs`) and prints the summary table. The argument
definitions live here too, so `cli.py` only registers the subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mp_executors.simulation import datasets, models

EXECUTORS = ("mp", "local", "ray")


class JobError(Exception):
    """A bad combination of flags: one line on stderr, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=datasets.DATASETS, default="synthetic",
                   help="synthetic: FedProx's synthetic(alpha,beta); digits: scikit-learn's 8x8 digits "
                   "(needs the 'digits' extra) (default: synthetic)")
    d.add_argument("--clients", type=int, default=1000, metavar="N", help="number of clients (default: 1000)")
    d.add_argument("--clients-per-round", type=int, default=None, metavar="K",
                   help="clients sampled each round, without replacement (default: all)")
    d.add_argument("--alpha", type=float, default=1.0, help="synthetic: model heterogeneity (default: 1)")
    d.add_argument("--beta", type=float, default=1.0, help="synthetic: data heterogeneity (default: 1)")
    d.add_argument("--max-examples", type=int, default=250, metavar="M",
                   help="synthetic: cap on a client's examples, train+test; every client is padded to it "
                   "(default: 250)")
    d.add_argument("--partition", choices=datasets.DIGITS_PARTITIONS, default="shards",
                   help="digits: shards (non-IID, 2 label shards per client) or iid (default: shards)")
    t = p.add_argument_group("training")
    t.add_argument("--rounds", type=int, default=20, metavar="R", help="federated rounds (default: 20)")
    t.add_argument("--model", choices=models.MODELS, default="logreg", help="(default: logreg)")
    t.add_argument("--hidden", type=int, default=64, help="mlp: hidden units (default: 64)")
    t.add_argument("--local-epochs", type=int, default=1, metavar="E", help="local epochs per round (default: 1)")
    t.add_argument("--batch-size", type=int, default=10, metavar="B", help="local minibatch size (default: 10)")
    t.add_argument("--lr", type=float, default=0.05, help="client learning rate (default: 0.05)")
    t.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term; 0 = FedAvg (default: 0)")
    t.add_argument("--seed", type=int, default=0, help="seeds the data, the initial model and sampling")
    t.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate the global model on every client every N rounds (and after the last)")
    r = p.add_argument_group("runtime")
    r.add_argument("--executor", choices=EXECUTORS, default="mp",
                   help="mp: the worker pool; local: in this process; ray: a Ray cluster (default: mp)")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (mp/ray; default: sized from clients and the machine)")
    r.add_argument("--threads-per-worker", type=int, default=None, metavar="N",
                   help="TensorFlow threads (and CPUs) per worker (mp)")
    r.add_argument("--devices", default="auto", metavar="auto|cpu|gpu|0,1",
                   help="where mp workers run (default: auto)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: runs/<time>-<dataset>-<pid>)")
    o.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    o.add_argument("-q", "--quiet", action="store_true", help="no per-round lines and no pool log lines")


def specs_from_args(args: argparse.Namespace):
    """(ModelSpec, DatasetSpec, FedAvgConfig) from the flags; JobError on bad values."""
    from mp_executors.simulation.program import FedAvgConfig  # noqa: PLC0415 - imports TF

    if args.clients_per_round is not None and args.clients_per_round > args.clients:
        raise JobError(f"--clients-per-round {args.clients_per_round} is more than --clients {args.clients}")
    try:
        data = datasets.DatasetSpec(
            args.dataset, args.clients, args.seed, alpha=args.alpha, beta=args.beta,
            max_examples=args.max_examples, partition=args.partition,
        )
        model = models.ModelSpec(args.model, data.num_features, data.num_classes, hidden=args.hidden)
        cfg = FedAvgConfig(
            rounds=args.rounds, clients_per_round=args.clients_per_round, local_epochs=args.local_epochs,
            batch_size=args.batch_size, learning_rate=args.lr, mu=args.mu, seed=args.seed,
            eval_every=args.eval_every,
        )
    except ValueError as e:
        raise JobError(_flag_names(str(e))) from None
    return model, data, cfg


def _flag_names(message: str) -> str:
    for name in ("clients_per_round", "local_epochs", "batch_size", "eval_every", "max_examples", "rounds"):
        message = message.replace(name, "--" + name.replace("_", "-"))
    return message.replace("the learning rate", "--lr").replace("the number of clients", "--clients")


def make_factory(args: argparse.Namespace) -> Any:
    import mp_executors as mpx  # noqa: PLC0415

    if args.workers is not None and args.workers < 1:
        raise JobError(f"--workers must be at least 1, got {args.workers}")
    if args.executor == "local":
        return mpx.local_executor_factory()
    if args.executor == "ray":
        kwargs = {} if args.workers is None else {"num_workers": args.workers}
        try:
            return _ray_executor_factory()(**kwargs)
        except ImportError as e:  # Ray is an optional extra
            raise JobError(f"--executor ray: {e}") from None
        except ValueError as e:
            raise JobError(str(e).replace("num_workers", "--workers")) from None
    try:
        return mpx.mp_executor_factory(num_workers=args.workers, threads_per_worker=args.threads_per_worker,
                                       devices=args.devices)
    except ValueError as e:
        raise JobError(str(e).replace("num_workers", "--workers").replace("threads_per_worker", "--threads-per-worker")
                       .replace("devices", "--devices")) from None


def _ray_executor_factory() -> Any:
    """`mpx.ray_executor_factory` (it raises ImportError, saying how to install Ray, without it)."""
    import mp_executors as mpx  # noqa: PLC0415

    return mpx.ray_executor_factory


def runtime_info(args: argparse.Namespace, factory: Any) -> dict:
    info: dict[str, Any] = {"executor": args.executor, "workers_requested": args.workers}
    pool = getattr(factory, "pool", None)
    if pool is not None:
        plan = getattr(pool, "plan", None)
        if plan is not None and hasattr(plan, "to_dict"):
            info["plan"] = plan.to_dict()
        try:
            info["workers"] = [
                {k: w.get(k) for k in ("slot", "pid", "cpu_affinity", "cuda_visible_devices", "intra_op_threads",
                                       "inter_op_threads", "rss")}
                for w in pool.reports()
            ]
        except Exception as e:  # noqa: BLE001 - the table should still print
            info["workers_error"] = repr(e)
    return info


def run(args: argparse.Namespace) -> int:
    """The `run` subcommand's handler; returns the exit code."""
    from mp_executors.simulation import outputs, program  # noqa: PLC0415 - imports TF

    model, data, cfg = specs_from_args(args)
    if args.dataset == "digits":
        datasets._load_digits()  # fail now, with the install hint, not inside a worker
    out_dir = Path(args.out) if args.out else outputs.default_out_dir(args.dataset)
    factory = make_factory(args)
    # The pool's start and re-plan lines, for the duration of the job only (added after
    # every usage check, so that an error cannot leave the handler behind).
    logger = logging.getLogger("mp_executors")
    handler, old_level = None, logger.level
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    started = time.time()
    memory = outputs.MemorySampler(factory)
    if not args.quiet:
        print(f"FedAvg: {data.describe()}; {model.describe()}; {cfg.rounds} rounds of "
              f"{cfg.clients_per_round or data.num_clients} clients; executor {args.executor}", flush=True)
    progress = outputs.Progress(cfg.rounds, quiet=args.quiet)

    def on_round(record):
        memory.sample()
        progress(record)

    try:
        with factory:
            result = program.run_fedavg(model, data, cfg, factory, on_round=on_round, on_start=progress.start)
            memory.sample()
            runtime = runtime_info(args, factory)
    finally:
        progress.close()
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    runtime["memory"] = memory.to_dict()
    runtime["environment"] = outputs.environment()
    doc = outputs.build_metrics(
        result, program.config_dict(model, data, cfg),
        {"dataset": data.describe(), "model": model.describe()}, runtime, started,
    )
    notes = outputs.write_outputs(out_dir, doc, result, plots=not args.no_plots)
    print()
    print(outputs.summary_table(doc, out_dir))
    for note in notes:
        print(note)
    return 0
