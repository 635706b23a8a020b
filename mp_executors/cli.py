"""The `mp-executors` command line.

Subcommands are registered in `SUBCOMMANDS` (name -> `Subcommand`): each has a
help line, a function adding its arguments to its sub-parser, and a handler
`(args) -> exit code`. To add one (e.g. `run`, `bench`), write those two
functions and add an entry; import anything heavy (TensorFlow, the executors)
inside the handler, not at the top of this module, so that `info` stays fast
and never touches a GPU. (The main job's module, `simulation.job`, is imported
here: it and what it imports are TensorFlow-free until a computation runs.)

Argument errors print one line to stderr and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

from mp_executors.machine import detect_machine, format_bytes
from mp_executors.planning import DEFAULT_MEMORY_PER_WORKER, plan_pool
from mp_executors.simulation import job

PROG = "mp-executors"


class UsageError(Exception):
    """A bad command-line argument: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and do not exit the interpreter."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


#: Python argument names in planning's and the factories' messages -> this CLI's flags.
_FLAGS = {
    "num_clients": "--clients",
    "num_workers": "--workers",
    "threads_per_worker": "--threads-per-worker",
    "workers_per_gpu": "--workers-per-gpu",
    "memory_per_worker": "--memory-per-worker",
    "devices": "--devices",
}
_FLAG_RE = re.compile(r"(?<![-\w])(oversubscribe=True|" + "|".join(_FLAGS) + r")\b")


def flag_names(message: str) -> str:
    """A planning / factory error message with its argument names as this CLI's flags."""
    return _FLAG_RE.sub(lambda m: _FLAGS.get(m.group(1), "--oversubscribe"), message)


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clients",
        type=int,
        default=1000,
        metavar="N",
        help="number of clients to plan for (default: 1000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="number of workers (overrides the automatic sizing)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        metavar="N",
        help="TensorFlow intra-op threads (and CPUs) per worker",
    )
    p.add_argument(
        "--devices",
        default="auto",
        metavar="auto|cpu|gpu|0,1",
        help="where workers run: auto (GPUs if any), cpu, gpu, or a list of GPU ids",
    )
    p.add_argument(
        "--workers-per-gpu",
        type=int,
        default=1,
        metavar="N",
        help="workers sharing one GPU (default: 1)",
    )
    p.add_argument(
        "--memory-per-worker",
        default=None,
        metavar="SIZE",
        help="memory budget per worker, e.g. 2GB, 512MiB, 1.5G "
        f"(default: {format_bytes(DEFAULT_MEMORY_PER_WORKER)})",
    )
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="plan --workers even beyond what the available memory holds (refused otherwise)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead")


def _info(args: argparse.Namespace) -> int:
    machine = detect_machine()
    try:
        plan = plan_pool(
            args.clients,
            num_workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            devices=args.devices,
            workers_per_gpu=args.workers_per_gpu,
            memory_per_worker=args.memory_per_worker,
            oversubscribe=args.oversubscribe,
            machine=machine,
        )
    except ValueError as e:
        raise UsageError(f"{PROG} info: error: {flag_names(str(e))}") from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(machine.describe())
        print()
        print(plan)
    return 0


# --------------------------------------------------------------------------
# run (the main job, mp_executors.simulation) and bench (the scaling suite,
# mp_executors.benchmarking): TensorFlow is imported only inside the handlers.
# --------------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    job.add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    try:
        return job.run(args)
    except job.JobError as e:
        raise UsageError(f"{PROG} run: error: {flag_names(str(e))}") from None
    except KeyboardInterrupt:  # before the first round (start-up) or while shutting down: one line
        print(f"\n{PROG} run: interrupted", file=sys.stderr, flush=True)
        return job.EXIT_INTERRUPTED


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a tiny sweep (8 and 32 clients, 3 rounds, no peer): a smoke test, < 1 min")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="where bench.json, bench.md and the plots go (default: bench-results)")
    p.add_argument("--rounds", type=int, default=None, metavar="R",
                   help="rounds per configuration, the first is warm-up (default: 6; 3 with --quick)")
    p.add_argument("--peer", choices=("auto", "off"), default="auto",
                   help="auto: also measure TFF 0.87 if its venv exists (default: auto)")
    p.add_argument("--ray", choices=("auto", "off"), default="auto",
                   help="auto: also measure a 2-actor Ray executor at the two smallest client counts when "
                   "ray is installed (a note says so when it is not); off: skip it (default: auto)")
    p.add_argument("--peer-venv", default=None, metavar="DIR",
                   help="the TFF venv (default: $MP_EXECUTORS_TFF_VENV or ~/.cache/mp_executors/tff-venv)")
    p.add_argument("--flower", choices=("auto", "off"), default="auto",
                   help="auto: also measure Flower's simulation engine on FedAvg at 100 and 1,000 clients if its "
                   "venv exists (a note says so when not; bash benchmarks/peers/setup_flower_venv.sh); "
                   "off: skip it (default: auto)")
    p.add_argument("--flower-venv", default=None, metavar="DIR",
                   help="the Flower venv (default: $MP_EXECUTORS_FLOWER_VENV or ~/.cache/mp_executors/flower-venv)")


def _bench(args: argparse.Namespace) -> int:
    if args.rounds is not None and args.rounds < 2:
        raise UsageError(f"{PROG} bench: error: --rounds must be at least 2 (the first is warm-up), got {args.rounds}")
    if args.flower_venv and args.flower != "off" and not (Path(args.flower_venv) / "bin" / "python").exists():
        # An explicit venv that is not one would only become a note at the end of a long run.
        raise UsageError(f"{PROG} bench: error: --flower-venv {args.flower_venv} is not a virtual environment "
                         "(no bin/python); create it with bash benchmarks/peers/setup_flower_venv.sh "
                         f"{args.flower_venv}, or use --flower off")
    # Imports TensorFlow (the workloads are traced at import): only once the flags are good.
    from mp_executors.benchmarking import suite  # noqa: PLC0415

    command = " ".join([PROG, "bench", *(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else [])])
    out = Path(args.out)
    doc = suite.run_suite(out, quick=args.quick, rounds=args.rounds, peer=args.peer,
                          peer_venv=Path(args.peer_venv) if args.peer_venv else None, command=command,
                          log=lambda line: print(line, flush=True), ray=args.ray, flower=args.flower,
                          flower_venv=Path(args.flower_venv) if args.flower_venv else None)
    print()
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots in {doc['duration_s']:.0f} s")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand(
        "show this machine's resources and the worker pool that would be planned",
        _add_info_arguments,
        _info,
    ),
    "run": Subcommand(
        "the main job: federated averaging on a federated dataset (writes metrics, plots)",
        _add_run_arguments,
        _run,
    ),
    "bench": Subcommand(
        "the scaling suite: FedAvg and overhead vs clients and workers (JSON, plots, tables)",
        _add_bench_arguments,
        _bench,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per entry of SUBCOMMANDS."""
    parser = _Parser(prog=PROG, description="Multi-process runtime for federated computations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args._handler(args))
    except UsageError as e:
        print(" ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        return 2
    except SystemExit as e:  # --help / --version exit through argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
