"""`mp-executors run`: the main job, FedAvg on a federated dataset over a chosen runtime.

    mp-executors run [--dataset synthetic|digits|PATH.npz] [--clients N] [--clients-per-round K]
                     [--rounds R] [--model logreg|mlp|MODULE:FUNCTION] [--local-steps S | --local-epochs E]
                     [--batch-size B] [--lr LR] [--server-optimizer sgd|sgdm|adam|yogi|adagrad]
                     [--server-lr LR] [--clip C] [--noise-multiplier Z] [--adaptive-clip]
                     [--eval-clients K|all] [--seed S] [--executor mp|local|ray] [--workers auto|N]
                     [--out DIR] [--checkpoint-every N] [--resume DIR] ...

It builds the factory the flags ask for, runs `program.run_fedavg` with a progress display and
a checkpoint (`checkpoint.save`) every `--checkpoint-every` rounds, writes the outputs
(`outputs.write_outputs`) and prints the summary table. `--resume DIR` restores the flags that
decide the numbers from DIR's checkpoint (refusing any that contradict it, except `--rounds`:
RESUMABLE_FLAGS) and continues, to the checkpointed total or to the `--rounds` given.
Ctrl-C writes the finished rounds' outputs and ends with one line, exit code 130. The argument
definitions live here too, so `cli.py` only registers the subcommand.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import mp_executors as mpx
from mp_executors.simulation import checkpoint, datasets, models, outputs, program
from mp_executors.simulation.program import DEFAULT_LOCAL_STEPS, DEFAULT_LR, FedAvgConfig

EXECUTORS = ("mp", "local", "ray")
DEFAULT_CLIENTS = 100
DEFAULT_ROUNDS = 10


class JobError(Exception):
    """A bad combination of flags: one line on stderr, exit code 2."""


def _word_or_count(value: str, word: str, expected: str) -> int | str:
    """A flag that takes a keyword (`word`) or a positive integer."""
    if value.strip().lower() == word:
        return word
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be '{word}' or at least 1, got {n}")
    return n


def _workers(value: str) -> int | None:
    """--workers: 'auto' (None: sized from the clients and the machine) or a positive integer."""
    n = _word_or_count(value, "auto", "'auto' or a number of workers")
    return None if n == "auto" else n


def _model(value: str) -> str:
    if value in models.MODELS or models.is_keras(value):
        return value
    raise argparse.ArgumentTypeError(f"expected logreg, mlp or MODULE:FUNCTION, got {value!r}")


def _eval_clients(value: str) -> int | str:
    """--eval-clients: 'all' or a positive number of clients."""
    return _word_or_count(value, "all", "a number of clients or 'all'")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="synthetic", metavar="synthetic|digits|PATH.npz",
                   help="synthetic: FedProx's synthetic(alpha,beta); digits: scikit-learn's 8x8 digits "
                   "(needs the 'digits' extra); PATH.npz: your arrays x, y and client_ids (default: synthetic)")
    d.add_argument("--clients", type=int, default=None, metavar="N",
                   help=f"number of clients (default: {DEFAULT_CLIENTS}; with PATH.npz, every client id in the "
                   "file, and N takes the first N ids in sorted order)")
    d.add_argument("--clients-per-round", type=int, default=None, metavar="K",
                   help="clients sampled each round, without replacement (default: all)")
    d.add_argument("--alpha", type=float, default=1.0, help="synthetic: model heterogeneity (default: 1)")
    d.add_argument("--beta", type=float, default=1.0, help="synthetic: data heterogeneity (default: 1)")
    d.add_argument("--max-examples", type=int, default=None, metavar="M",
                   help="cap on a client's examples, train+test (the surplus is left out); every client is "
                   "padded to the largest capped client (default: 250 for synthetic, no cap otherwise)")
    d.add_argument("--partition", choices=datasets.DIGITS_PARTITIONS, default="dirichlet",
                   help="digits: dirichlet (non-IID, label proportions per client ~ Dirichlet(--dirichlet-alpha)), "
                   "shards (2 label shards per client) or iid (default: dirichlet)")
    d.add_argument("--dirichlet-alpha", type=float, default=0.5, metavar="A",
                   help="digits: the Dirichlet concentration; smaller is more skewed (default: 0.5)")
    t = p.add_argument_group("training")
    # default None (read as DEFAULT_ROUNDS): a resume can tell "--rounds 10" from "left out".
    t.add_argument("--rounds", type=int, default=None, metavar="R",
                   help=f"federated rounds (default: {DEFAULT_ROUNDS}); with --resume, a number other than the "
                   "checkpointed run's extends (or shortens) it")
    t.add_argument("--model", type=_model, default="logreg", metavar="logreg|mlp|MODULE:FUNCTION",
                   help="logreg, mlp, or MODULE:FUNCTION: FUNCTION() returns a Keras model taking float32[batch, "
                   "features] and giving logits (default: logreg)")
    t.add_argument("--hidden", type=int, default=64, help="mlp: hidden units (default: 64)")
    local = t.add_mutually_exclusive_group()
    local.add_argument("--local-steps", type=int, default=None, metavar="S",
                       help=f"local SGD steps per client per round (default: {DEFAULT_LOCAL_STEPS})")
    local.add_argument("--local-epochs", type=int, default=None, metavar="E",
                       help="instead of --local-steps: passes over each client's examples per round")
    t.add_argument("--batch-size", type=int, default=10, metavar="B", help="local minibatch size (default: 10)")
    t.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"client learning rate (default: {DEFAULT_LR:g})")
    t.add_argument("--server-optimizer", choices=program.SERVER_OPTIMIZERS, default="sgd",
                   help="the server's optimizer on the clients' mean update: sgd (FedAvg), sgdm (FedAvgM, momentum "
                   "0.9), adam, yogi, adagrad (FedAdam/FedYogi/FedAdagrad, Reddi et al.) (default: sgd)")
    t.add_argument("--server-lr", type=float, default=None, metavar="LR",
                   help="the server learning rate (default: 1.0 for sgd/sgdm, 0.1 for adam/yogi/adagrad)")
    t.add_argument("--clip", type=float, default=None, metavar="C",
                   help="DP-FedAvg: clip each client's update to L2 norm C (the start value with --adaptive-clip); "
                   "clients then weigh equally")
    t.add_argument("--noise-multiplier", type=float, default=0.0, metavar="Z",
                   help="DP-FedAvg: Gaussian noise of std Z x clip on the sum of clipped updates (default: 0)")
    t.add_argument("--adaptive-clip", action="store_true",
                   help="DP-FedAvg: adapt the clip towards the median update norm (Andrew et al. 2021)")
    t.add_argument("--delta", type=float, default=1e-5, help="DP: the delta epsilon is reported at (default: 1e-5)")
    t.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term; 0 = FedAvg (default: 0)")
    t.add_argument("--seed", type=int, default=0, help="seeds the data, the initial model and sampling")
    t.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate the global model every N rounds (and after the last)")
    t.add_argument("--eval-clients", type=_eval_clients, default=None, metavar="K|all",
                   help=f"evaluate on a fixed seeded sample of K clients, or all (default: "
                   f"min(clients, {program.DEFAULT_EVAL_CLIENTS}))")
    r = p.add_argument_group("runtime")
    r.add_argument("--executor", choices=EXECUTORS, default="mp",
                   help="mp: the worker pool; local: in this process; ray: a Ray cluster (default: mp)")
    r.add_argument("--workers", type=_workers, default=None, metavar="auto|N",
                   help="worker processes (mp/ray; default: auto, sized from the clients and the machine)")
    r.add_argument("--threads-per-worker", type=int, default=None, metavar="N",
                   help="TensorFlow threads (and CPUs) per worker (mp)")
    r.add_argument("--memory-per-worker", default=None, metavar="SIZE",
                   help="memory budget per worker, e.g. 2GB or 512MiB (mp/ray; default: 1 GiB): sizes the pool, and "
                   "--workers beyond what the available memory holds at this budget is refused")
    r.add_argument("--oversubscribe", action="store_true",
                   help="start --workers even beyond what the available memory holds (they may run out of memory)")
    r.add_argument("--devices", default="auto", metavar="auto|cpu|gpu|0,1",
                   help="where mp workers run (default: auto)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: runs/<time>-<dataset>-<pid>)")
    o.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="write DIR/checkpoint.npz (atomically) every N rounds and after the last (default: 1)")
    o.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose outputs are in DIR from its checkpoint, with its settings "
                   "(runtime flags such as --executor/--workers may change, --rounds may extend it; others must "
                   "match or be left out)")
    o.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the per-round metrics as TensorBoard scalars to DIR")
    o.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    o.add_argument("-q", "--quiet", action="store_true", help="no per-round lines and no pool log lines")


#: Flags that do not change a run's numbers: free to differ when resuming. Every other flag does.
RUNTIME_FLAGS = frozenset({
    "executor", "workers", "threads_per_worker", "memory_per_worker", "oversubscribe", "devices", "out",
    "no_plots", "quiet", "resume", "checkpoint_every", "tensorboard", "command", "_handler",
})


#: Result flags a resume may change: the round count. The client schedule is drawn round after
#: round from one seeded Generator and every other random number is keyed by (seed, round), never
#: by the total, so an R-round run extended to R' rounds is bitwise the R'-round run.
RESUMABLE_FLAGS = frozenset({"rounds"})


def result_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide a run's numbers (what a checkpoint records and a resume restores)."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}


def _defaults() -> dict[str, Any]:
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return vars(p.parse_args([]))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def restore_args(args: argparse.Namespace, ckpt: checkpoint.Checkpoint) -> None:
    """Fills `args` with the checkpoint's result flags; JobError if the command line asks otherwise."""
    defaults = _defaults()
    saved = ckpt.meta.get("args")
    if not isinstance(saved, dict):
        raise JobError(f"{checkpoint.path_in(args.resume)} has no recorded settings; it cannot be resumed.")
    given = result_flags(args)
    unknown = sorted(set(saved) - set(given))
    if unknown:
        raise JobError(f"{checkpoint.path_in(args.resume)} was written with flags this version does not know "
                       f"({', '.join(_flag(k) for k in unknown)}); resume it with the version that wrote it.")
    for key, value in given.items():
        if key not in saved:
            if value != defaults.get(key):
                raise JobError(f"{_flag(key)} cannot be set when resuming a run made without it.")
            continue
        if key in RESUMABLE_FLAGS and value is not None:
            continue  # checked against the checkpoint's round by resume_point
        if value != defaults.get(key) and value != saved[key]:
            raise JobError(
                f"--resume {args.resume}: the checkpoint was made with {_flag(key)} {saved[key]}, this command "
                f"asks for {value}; a resumed run keeps its settings (leave {_flag(key)} out, or start a new run).")
        setattr(args, key, saved[key])
    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise JobError(f"--out {args.out} with --resume {args.resume}: a resumed run writes to its own folder; "
                       "leave --out out.")
    args.out = args.resume


def resume_point(ckpt: checkpoint.Checkpoint, model: models.ModelSpec, data: datasets.DatasetSpec,
                 cfg: FedAvgConfig, path: Path) -> program.Resume:
    """The Resume a checkpoint gives for this configuration; JobError if it does not fit.

    `cfg.rounds` may differ from the checkpointed run's (extending or shortening it, see
    RESUMABLE_FLAGS) as long as rounds remain after the checkpoint's.
    """
    config = json.loads(json.dumps(program.config_dict(model, data, cfg)))
    saved_rounds = ((ckpt.meta.get("config") or {}).get("fedavg") or {}).get("rounds")
    if isinstance(saved_rounds, int):
        config["fedavg"]["rounds"] = saved_rounds  # the total is not part of what must match
    if ckpt.meta.get("config") != config:
        saved = ckpt.meta.get("config") or {}
        diff = sorted(f"{part}.{k}" for part in config for k in config[part]
                      if (saved.get(part) or {}).get(k, object()) != config[part][k])
        raise JobError(f"{path} does not match this run's configuration (differs in: {', '.join(diff) or 'its layout'}"
                       "; for a PATH.npz dataset, was the file changed?); it cannot be resumed.")
    weights = ckpt.state.get("model")
    expected = None if models.is_keras(model.name) else dict(model.shapes)  # Keras: the digest vouches
    if not isinstance(weights, dict) or (
            expected is not None and {k: tuple(np.shape(v)) for k, v in weights.items()} != expected):
        raise JobError(f"{path}: its model weights do not fit {model.describe()}; it cannot be resumed.")
    try:
        result = program.result_from_json(ckpt.meta["result"], weights)
    except (KeyError, TypeError) as e:
        raise JobError(f"{path}: its metrics are incomplete ({e}); it cannot be resumed.") from None
    if len(result.rounds) != ckpt.round or not isinstance(saved_rounds, int) or ckpt.round > saved_rounds:
        raise JobError(f"{path}: inconsistent (round {ckpt.round} with {len(result.rounds)} rounds of metrics, "
                       f"of {saved_rounds}); it cannot be resumed.")
    if ckpt.round >= cfg.rounds:
        more = f"to continue it, give a larger --rounds (e.g. --rounds {2 * ckpt.round})"
        if cfg.rounds == saved_rounds:
            raise JobError(f"--resume {path.parent}: that run already finished its {cfg.rounds} rounds; nothing to "
                           f"resume ({more}).")
        raise JobError(f"--resume {path.parent} --rounds {cfg.rounds}: its checkpoint already holds {ckpt.round} "
                       f"rounds; a resumed run cannot end before its checkpoint ({more}).")
    return program.Resume(ckpt.state, result)


def specs_from_args(args: argparse.Namespace):
    """(ModelSpec, DatasetSpec, FedAvgConfig) from the flags; JobError on bad values."""
    if args.clients is not None and args.clients < 1:
        raise JobError(f"--clients must be at least 1, got {args.clients}")
    if args.clients_per_round is not None and args.clients is not None and args.clients_per_round > args.clients:
        raise JobError(f"--clients-per-round {args.clients_per_round} is more than --clients {args.clients}")
    try:
        if args.dataset in datasets.DATASETS:
            data = datasets.DatasetSpec(
                args.dataset, DEFAULT_CLIENTS if args.clients is None else args.clients, args.seed,
                alpha=args.alpha, beta=args.beta, max_examples=args.max_examples, partition=args.partition,
                dirichlet_alpha=args.dirichlet_alpha,
            )
        elif args.dataset.endswith(".npz") or Path(args.dataset).is_file():
            data = datasets.open_npz(args.dataset, args.clients, args.seed, args.max_examples)
        else:
            raise JobError(f"unknown dataset {args.dataset!r}; choose synthetic, digits or a PATH.npz")
        if args.clients_per_round is not None and args.clients_per_round > data.num_clients:
            raise JobError(f"--clients-per-round {args.clients_per_round} is more than the "
                           f"{data.num_clients} clients of {args.dataset}")
        model = models.ModelSpec(args.model, data.num_features, data.num_classes, hidden=args.hidden)
        cfg = FedAvgConfig(
            rounds=DEFAULT_ROUNDS if args.rounds is None else args.rounds, clients_per_round=args.clients_per_round,
            local_steps=args.local_steps, local_epochs=args.local_epochs,
            batch_size=args.batch_size, learning_rate=args.lr, mu=args.mu, seed=args.seed,
            eval_every=args.eval_every, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
            clip=args.clip, noise_multiplier=args.noise_multiplier, adaptive_clip=args.adaptive_clip,
            delta=args.delta, eval_clients=_eval_count(args.eval_clients, data.num_clients),
        )
    except datasets.NpzError as e:  # it names the file: no flag renaming in it
        raise JobError(str(e).replace("max_examples", "--max-examples")) from None
    except ValueError as e:
        raise JobError(_flag_names(str(e))) from None
    return model, data, cfg


def _eval_count(value: int | str | None, num_clients: int) -> int | None:
    """--eval-clients as FedAvgConfig.eval_clients (None: every client)."""
    if value is None:  # the default: a sample of DEFAULT_EVAL_CLIENTS, or everyone if fewer
        return program.DEFAULT_EVAL_CLIENTS if num_clients > program.DEFAULT_EVAL_CLIENTS else None
    if value == "all":
        return None
    if value > num_clients:
        raise JobError(f"--eval-clients {value} is more than the {num_clients} clients (use 'all')")
    return None if value == num_clients else int(value)


def _flag_names(message: str) -> str:
    names = ("clients_per_round", "server_optimizer", "server_lr", "noise_multiplier", "adaptive_clip",
             "eval_clients", "local_epochs", "local_steps", "batch_size", "eval_every", "max_examples",
             "rounds", "clip", "delta")
    message = re.sub(r"(?<![-\w])(" + "|".join(names) + r")\b", lambda m: _flag(m.group(1)), message)
    return (message.replace("the learning rate", "--lr").replace("the number of clients", "--clients")
            .replace("the Dirichlet concentration", "--dirichlet-alpha"))


def _sizing(args: argparse.Namespace) -> dict[str, Any]:
    """The pool-sizing flags that were given, as keyword arguments of the mp and ray factories."""
    kwargs: dict[str, Any] = {}
    if args.workers is not None:
        kwargs["num_workers"] = args.workers
    if args.memory_per_worker is not None:
        kwargs["memory_per_worker"] = args.memory_per_worker
    if args.oversubscribe:
        kwargs["oversubscribe"] = True
    return kwargs


def make_factory(args: argparse.Namespace) -> Any:
    """The factory the flags ask for; JobError (argument names as in Python) before any process starts."""
    if args.executor == "local":
        return mpx.local_executor_factory()
    try:
        if args.executor == "ray":
            try:
                return _ray_executor_factory()(**_sizing(args))
            except ImportError as e:  # Ray is an optional extra
                raise JobError(f"--executor ray: {e}") from None
        return mpx.mp_executor_factory(threads_per_worker=args.threads_per_worker, devices=args.devices,
                                       **_sizing(args))
    except ValueError as e:  # sizing: bad values, or more workers than memory holds
        raise JobError(str(e)) from None


def _ray_executor_factory() -> Any:
    """`mpx.ray_executor_factory` (it raises ImportError, saying how to install Ray, without it)."""
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
    if args.checkpoint_every < 1:
        raise JobError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    ckpt = None
    if args.resume is not None:
        try:
            ckpt = checkpoint.load(Path(args.resume))
        except checkpoint.CheckpointError as e:
            raise JobError(str(e)) from None
        restore_args(args, ckpt)
    if args.rounds is None:
        args.rounds = DEFAULT_ROUNDS  # recorded in checkpoints as given
    model, data, cfg = specs_from_args(args)
    if data.name == "digits":
        try:
            datasets._load_digits()  # fail now, with the install hint, not inside a worker
        except ImportError as e:
            raise JobError(str(e)) from None
        data.split_sizes  # noqa: B018 - draws the partition now: its errors are usage errors
    if models.is_keras(model.name):
        try:
            program.keras_function(model.name)  # the user's module: import errors are usage errors
        except ValueError as e:
            raise JobError(f"--model {e}") from None
    resume = None
    if ckpt is not None:
        resume = resume_point(ckpt, model, data, cfg, checkpoint.path_in(Path(args.resume)))
    label = data.name if data.name != "npz" else Path(data.path).stem
    out_dir = Path(args.out) if args.out else outputs.default_out_dir(label)
    # The first line, before anything imports TensorFlow (a factory does: seconds).
    if not args.quiet:
        where = ""
        if resume is not None:
            saved_total = ckpt.meta["config"]["fedavg"]["rounds"]
            where = f"; resuming after round {len(resume.result.rounds)}" + (
                f" (a run of {saved_total} rounds, now {cfg.rounds})" if saved_total != cfg.rounds else "")
        print(f"FedAvg: {data.describe()}; {model.describe()}; {cfg.rounds} rounds of "
              f"{cfg.clients_per_round or data.num_clients} clients; executor {args.executor}{where}", flush=True)
    try:
        # The model, the process and the DP aggregator check their settings here (a Keras model
        # that does not take the data, a DP noise the cohort cannot carry): usage errors.
        training = program.build_training(model, data, cfg)
    except (ValueError, TypeError) as e:
        raise JobError(_flag_names(str(e))) from None
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
    progress = outputs.Progress(cfg.rounds, quiet=args.quiet)
    saved_flags, config = result_flags(args), program.config_dict(model, data, cfg)
    last_checkpoint = [len(resume.result.rounds) if resume is not None else -1]

    board = None

    def on_start():
        nonlocal board
        if args.tensorboard is not None:
            board = outputs.TensorBoardScalars(Path(args.tensorboard))
            if resume is None:
                board.write(0, result_so_far[0].initial if result_so_far[0] else {})
        progress.start()

    result_so_far: list[Any] = [None]

    def on_round(record):
        memory.sample()
        progress(record)
        if board is not None:
            board.write(record.round, record.metrics, {"train_s": record.train_s, "eval_s": record.eval_s})

    def on_checkpoint(result, state):
        result_so_far[0] = result
        done = len(result.rounds)
        checkpoint.save(out_dir, state, {"round": done, "rounds": cfg.rounds, "args": saved_flags,
                                         "config": config, "result": program.result_to_json(result),
                                         "accountant": _accountant_state(data, cfg, done)})
        last_checkpoint[0] = done

    interrupted = None
    memory.start()
    try:
        with factory:
            try:
                result = program.run_fedavg(model, data, cfg, factory, on_round=on_round, on_start=on_start,
                                            resume=resume, on_checkpoint=on_checkpoint, training=training,
                                            checkpoint_every=args.checkpoint_every)
            except program.Interrupted as e:
                interrupted = e.result
                result = e.result
            memory.sample()
            runtime = runtime_info(args, factory)
    finally:
        if board is not None:
            board.close()
        memory.stop()
        progress.close()
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    runtime["memory"] = memory.to_dict()
    runtime["environment"] = outputs.environment()
    if interrupted is not None:
        return _interrupted(args, out_dir, interrupted, model, data, cfg, runtime, started, last_checkpoint[0])
    doc = outputs.build_metrics(
        result, config, {"dataset": data.describe(), "model": model.describe()}, runtime, started,
    )
    notes = []
    privacy = privacy_spent(data, cfg, len(result.rounds))
    if isinstance(privacy, str):
        notes.append(privacy)
    elif privacy is not None:
        doc["metrics"]["privacy"] = privacy
    notes += outputs.write_outputs(out_dir, doc, result, plots=not args.no_plots)
    print()
    print(outputs.summary_table(doc, out_dir))
    for note in notes:
        print(note)
    return 0


def _accountant_state(data: datasets.DatasetSpec, cfg: FedAvgConfig, rounds: int) -> dict | None:
    acc = program.accountant(data, cfg, rounds)
    return None if acc is None else acc.state()


def privacy_spent(data: datasets.DatasetSpec, cfg: FedAvgConfig, rounds: int) -> dict | str | None:
    """{"epsilon", "delta", ...} of a run with noise; a note if dp-accounting is missing; None without noise."""
    acc = program.accountant(data, cfg, rounds)
    if acc is None:
        return None
    try:
        eps = acc.epsilon(cfg.delta)
    except ImportError as e:
        return f"privacy spent not computed: {e}"
    return {"epsilon": eps, "delta": cfg.delta, **acc.state()}


#: The exit code of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def _interrupted(args, out_dir: Path, result: program.RunResult, model, data, cfg, runtime: dict, started: float,
                 checkpointed: int) -> int:
    """Ctrl-C: writes the finished rounds' outputs and prints ONE line (no table, no traceback)."""
    done = len(result.rounds)
    if checkpointed < 0:
        print(f"\ninterrupted before the first round finished (round 0/{cfg.rounds}); nothing to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if done:
        doc = outputs.build_metrics(result, program.config_dict(model, data, cfg),
                                    {"dataset": data.describe(), "model": model.describe()}, runtime, started)
        doc["interrupted_after_round"] = done
        outputs.write_outputs(out_dir, doc, result, plots=not args.no_plots)
    at = "" if checkpointed == done else f" (checkpoint at round {checkpointed})"
    print(f"\ninterrupted after round {done}/{cfg.rounds}{at}; results so far in {out_dir}; "
          f"resume with: mp-executors run --resume {out_dir}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
