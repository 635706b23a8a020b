"""How many workers to start, and where: `plan_pool` -> `PoolPlan`.

The number of workers is the minimum of a few bounds (clients, CPUs, memory,
GPUs), each overridable and each recorded with a reason, so that the plan can
be printed (`mp-executors info`) and logged. Every worker gets a stable
`WorkerSlot`: its CPU set, its TensorFlow thread counts and its GPU, plus the
environment to apply before TensorFlow is imported in that worker.

An explicit override the machine's memory cannot hold (`num_workers` beyond
the memory bound, a `memory_per_worker` above the available memory) is a
`ValueError` naming the bound, unless the caller says `oversubscribe=True`:
a plan is made before any process starts, so this is where an out-of-memory
pool is stopped. Running more threads than CPUs only makes them take turns,
so CPU oversubscription is allowed, with a warning.

What the machine offers comes from `machine`; TensorFlow is never imported
here (planning happens in the parent).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mp_executors.checks import check_int
from mp_executors.machine import Machine, detect_machine, format_bytes, format_cpus

__all__ = [
    "DEFAULT_MEMORY_PER_WORKER",
    "PoolPlan",
    "WorkerSlot",
    "parse_memory",
    "plan_pool",
]

logger = logging.getLogger("mp_executors")

GiB = 1024**3

# A worker that has imported TensorFlow sits at ~540 MB RSS before it holds any
# client data or model (measured, see FACTS.md). 1 GiB leaves room for a
# shard's data, a small model and TF's allocator slack; larger models or
# datasets should pass memory_per_worker explicitly.
DEFAULT_MEMORY_PER_WORKER = 1 * GiB


# --------------------------------------------------------------------------
# Memory sizes
# --------------------------------------------------------------------------

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_memory(value: int | str, name: str = "memory_per_worker") -> int:
    """Parse a memory size into bytes.

    Accepts an int (bytes) or a string: "1073741824", "512MiB", "2GB", "1.5G".
    Units: KiB/MiB/GiB/TiB (and Ki/Mi/...) are powers of 1024; KB/MB/GB/TB are
    powers of 1000 (SI); a bare K/M/G/T is taken as a power of 1024, as Docker
    and the JVM do. Raises ValueError (naming `name`) for anything else or <= 0.
    """
    how = "give bytes as an int or a string like '2GB', '512MiB' or '1.5G'"
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a memory size; {how}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if not m:
            raise ValueError(f"{name}={value!r} is not a memory size; {how}")
        number, prefix, binary, b = m.groups()
        power = _POWERS[prefix.lower()]
        if binary and not prefix:
            raise ValueError(f"{name}={value!r} is not a memory size; {how}")
        base = 1000 if (b and not binary and prefix) else 1024
        scaled = float(number) * base**power
        if power == 0 and scaled != int(scaled):
            raise ValueError(f"{name}={value!r}: a byte count must be whole; {how}")
        n = int(scaled)
    else:
        raise ValueError(f"{name}={value!r} is not a memory size; {how}")
    if n <= 0:
        raise ValueError(f"{name}={value!r} must be a positive memory size; {how}")
    return n


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSlot:
    """A worker's stable place on the machine: its CPUs, thread counts, GPU."""

    index: int
    cpus: tuple[int, ...]
    intra_op_threads: int
    inter_op_threads: int
    gpu: str | None = None

    def env(self) -> dict[str, str]:
        """Environment to apply in the worker BEFORE TensorFlow is imported.

        TensorFlow reads its thread counts and visible GPUs once, at import /
        first op, so these must be in place before then (e.g. loky's `env=`).
        """
        return {
            # "" hides every GPU from CPU workers, so that they do not each
            # initialise CUDA and grab memory on GPU 0.
            "CUDA_VISIBLE_DEVICES": self.gpu if self.gpu is not None else "",
            "TF_NUM_INTRAOP_THREADS": str(self.intra_op_threads),
            "TF_NUM_INTEROP_THREADS": str(self.inter_op_threads),
            "OMP_NUM_THREADS": str(self.intra_op_threads),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            # Several workers may share one GPU: without growth, the first takes it all.
            "TF_FORCE_GPU_ALLOW_GROWTH": "true",
            # The parent's vectorized-map mode (executors/vectorized_map.py) when the pool
            # starts, so every worker decides as the parent's in-process shards would.
            "MP_EXECUTORS_VECTORIZE": os.environ.get("MP_EXECUTORS_VECTORIZE", "auto"),
            # The parent's plan cache directory (executors/plan_cache.py), when it chose one:
            # a Ray actor does not inherit the driver's environment.
            **({"MP_EXECUTORS_CACHE_DIR": os.environ["MP_EXECUTORS_CACHE_DIR"]}
               if "MP_EXECUTORS_CACHE_DIR" in os.environ else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        d["cpus"] = list(self.cpus)
        return d


@dataclass(frozen=True)
class PoolPlan:
    """How many workers to start, with which resources, and why."""

    num_workers: int
    threads_per_worker: int
    device_kind: str  # 'cpu' | 'gpu'
    memory_per_worker: int
    slots: tuple[WorkerSlot, ...]
    # name -> (value, reason); excluded from hash() (a dict), still compared.
    bounds: dict[str, tuple[int, str]] = field(hash=False)
    machine: Machine
    num_clients: int
    binding: str = ""  # the name in `bounds` that decided num_workers
    notes: tuple[str, ...] = ()  # further reasons: overrides capped, CPUs shared, ...
    gpus: tuple[str, ...] = field(default=())  # the GPUs used (device_kind 'gpu')

    def __str__(self) -> str:
        t = self.threads_per_worker
        head = (
            f"Worker pool plan: {self.num_workers} worker{'s' if self.num_workers != 1 else ''}"
            f" x {t} thread{'s' if t != 1 else ''} on {self.device_kind.upper()}"
            f" for {self.num_clients} client{'s' if self.num_clients != 1 else ''}"
        )
        lines = [head, f"  memory per worker: {format_bytes(self.memory_per_worker)}"]
        if self.gpus:
            lines.append(f"  GPUs used: {', '.join(self.gpus)}")
        lines.append("  bounds (workers = min of these; an override wins):")
        width = max(len(k) for k in self.bounds)
        vwidth = max(len(str(v)) for v, _ in self.bounds.values())
        for name, (value, reason) in self.bounds.items():
            mark = "*" if name == self.binding else " "
            tail = "   <- binding" if name == self.binding else ""
            lines.append(f"   {mark} {name:<{width}}  {value:>{vwidth}}  {reason}{tail}")
        if self.notes:
            lines.append("  notes:")
            lines.extend(f"    - {note}" for note in self.notes)
        lines.append("  slots:")
        rows = [("slot", "cpus", "intra", "inter", "gpu")]
        for s in self.slots:
            rows.append(
                (
                    str(s.index),
                    format_cpus(s.cpus),
                    str(s.intra_op_threads),
                    str(s.inter_op_threads),
                    s.gpu if s.gpu is not None else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (bounds as {name: {"value", "reason"}})."""
        return {
            "num_workers": self.num_workers,
            "threads_per_worker": self.threads_per_worker,
            "device_kind": self.device_kind,
            "memory_per_worker": self.memory_per_worker,
            "num_clients": self.num_clients,
            "binding": self.binding,
            "bounds": {k: {"value": v, "reason": r} for k, (v, r) in self.bounds.items()},
            "notes": list(self.notes),
            "gpus": list(self.gpus),
            "slots": [s.to_dict() for s in self.slots],
            "machine": self.machine.to_dict(),
        }


def _resolve_devices(devices: Any, machine: Machine) -> tuple[str, tuple[str, ...]]:
    """-> ('cpu', ()) or ('gpu', gpu ids to use)."""
    available = ", ".join(machine.gpus) if machine.gpus else "none"
    if isinstance(devices, str):
        word = devices.strip().lower()
        if word == "auto":
            return ("gpu", machine.gpus) if machine.gpus else ("cpu", ())
        if word == "cpu":
            return "cpu", ()
        if word == "gpu":
            if not machine.gpus:
                raise ValueError(
                    "devices='gpu' but this machine has no visible GPU "
                    "(CUDA_VISIBLE_DEVICES, /proc/driver/nvidia/gpus, nvidia-smi); "
                    "use devices='cpu' or 'auto'"
                )
            return "gpu", machine.gpus
        # A comma list of ids ("0,1", as typed on the command line) or one id.
        pieces = [p.strip() for p in devices.split(",")]
        looks_like_ids = all(
            p and (p.isdigit() or p.upper().startswith(("GPU-", "MIG-"))) for p in pieces
        )
        if not looks_like_ids:
            raise ValueError(
                f"devices={devices!r} is not understood; use 'auto', 'cpu', 'gpu', "
                f"or GPU ids such as '0,1' (available GPUs: {available})"
            )
        ids: list[Any] = pieces
    elif isinstance(devices, bool):
        raise ValueError(
            f"devices={devices!r} is not understood; use 'auto', 'cpu', 'gpu', or a list of GPU ids"
        )
    elif isinstance(devices, numbers.Integral):
        ids = [devices]
    elif isinstance(devices, Sequence):
        ids = list(devices)
    else:
        raise ValueError(
            f"devices={devices!r} is not understood; use 'auto', 'cpu', 'gpu', or a list of GPU ids"
        )

    if not ids:
        raise ValueError(
            f"devices={devices!r} lists no GPU; use 'cpu', 'auto', or GPU ids from: {available}"
        )
    chosen: list[str] = []
    for raw in ids:
        if isinstance(raw, bool) or not isinstance(raw, (str, numbers.Integral)):
            raise ValueError(f"devices: GPU id {raw!r} must be a string or an int")
        gid = str(raw).strip()
        if gid not in machine.gpus:
            raise ValueError(f"devices: unknown GPU id {gid!r}; available GPUs: {available}")
        if gid in chosen:
            raise ValueError(f"devices: GPU id {gid!r} is listed twice; list each GPU once")
        chosen.append(gid)
    return "gpu", tuple(chosen)


def plan_pool(
    num_clients: int,
    *,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    devices: str | Sequence[str | int] = "auto",
    workers_per_gpu: int = 1,
    memory_per_worker: int | str | None = None,
    oversubscribe: bool = False,
    machine: Machine | None = None,
) -> PoolPlan:
    """Size the worker pool for `num_clients` clients on `machine` (default: this one).

    workers = min(clients, CPUs // threads_per_worker, available memory //
    memory_per_worker, GPUs x workers_per_gpu when on GPU), unless num_workers
    is given, which wins (but is still capped at num_clients: a worker without
    clients is useless). Every bad argument raises ValueError saying what to fix.

    Memory is a hard bound for explicit choices: a `num_workers` above the memory
    bound, or a `memory_per_worker` above the available memory, raises ValueError
    naming the bound and the ways out (fewer workers, a smaller explicit
    `memory_per_worker`, or `oversubscribe=True`, which plans them anyway with a
    warning). More workers x threads than CPUs is allowed, with a warning: their
    CPU sets wrap around. The defaults alone never raise: with less memory than
    one default worker's, one worker is planned, with a warning.
    """
    num_clients = check_int(
        "num_clients", num_clients, fix="the number of clients in the federation, at least one to serve"
    )
    if not isinstance(oversubscribe, bool):
        raise ValueError(
            f"oversubscribe={oversubscribe!r} is invalid: it must be True (plan workers beyond the "
            "memory bound anyway) or False"
        )
    m = machine if machine is not None else detect_machine()
    n_cpus = len(m.usable_cpus)

    if num_workers is not None:
        num_workers = check_int(
            "num_workers", num_workers, fix="pass e.g. 4, or leave it unset (None) to size automatically"
        )
    if threads_per_worker is not None:
        threads_per_worker = check_int(
            "threads_per_worker",
            threads_per_worker,
            fix=f"pass e.g. 1 (at most {n_cpus}), or leave it unset (None) to size automatically",
        )
        if threads_per_worker > n_cpus:
            raise ValueError(
                f"threads_per_worker={threads_per_worker} is more than the {n_cpus} usable "
                f"CPUs of this machine; use at most {n_cpus}"
            )
    workers_per_gpu = check_int(
        "workers_per_gpu", workers_per_gpu, fix="pass e.g. 1 (one worker per GPU) or 2"
    )
    mem = (
        DEFAULT_MEMORY_PER_WORKER if memory_per_worker is None else parse_memory(memory_per_worker)
    )
    kind, gpus = _resolve_devices(devices, m)

    notes: list[str] = []
    if isinstance(devices, str) and devices.strip().lower() == "auto" and kind == "cpu":
        notes.append("devices='auto': no GPU visible, running on CPU")

    # --- bounds that do not depend on threads_per_worker -------------------
    bounds: dict[str, tuple[int, str]] = {}
    bounds["clients"] = (num_clients, f"{num_clients} clients: a worker without clients is useless")
    available = format_bytes(m.available_memory)
    mem_bound = m.available_memory // mem
    if mem_bound < 1:
        if memory_per_worker is not None and not oversubscribe:
            raise ValueError(
                f"memory_per_worker={memory_per_worker!r} ({format_bytes(mem)}) is more than the "
                f"{available} of memory available on this machine: not even one worker fits. "
                f"Pass a memory_per_worker of at most {available}, or oversubscribe=True to start "
                "one worker anyway (it may run out of memory)"
            )
        _warn_once(
            f"only {available} of memory available but memory_per_worker is {format_bytes(mem)}: "
            "planning 1 worker anyway; it may run out of memory"
        )
        notes.append(
            f"available memory ({available}) is less than one worker's "
            f"({format_bytes(mem)}); planned 1 worker anyway"
        )
    mem_reason = f"{available} available / {format_bytes(mem)} per worker"
    gpu_bound = len(gpus) * workers_per_gpu if kind == "gpu" else None

    # --- threads per worker ------------------------------------------------
    if threads_per_worker is None:
        if num_workers is not None:
            # Share the CPUs among the workers that will really run.
            expected = min(num_workers, num_clients)
            threads_per_worker = max(1, n_cpus // expected)
        elif kind == "gpu":
            # The GPU does the math; give each GPU worker a fair share of CPUs to
            # feed it (input pipelines, host ops).
            assert gpu_bound is not None
            expected = min(num_clients, gpu_bound, max(1, mem_bound))
            threads_per_worker = max(1, n_cpus // expected)
        else:
            # On CPU many single-threaded workers beat few multi-threaded ones for
            # small per-client models (no intra-op sync), so one thread each.
            threads_per_worker = 1

    cpu_bound = max(1, n_cpus // threads_per_worker)
    bounds["cpu"] = (
        cpu_bound,
        f"{n_cpus} usable CPUs / {threads_per_worker} thread"
        f"{'s' if threads_per_worker != 1 else ''} per worker",
    )
    bounds["memory"] = (max(1, mem_bound), mem_reason)
    if gpu_bound is not None:
        bounds["gpu"] = (
            gpu_bound,
            f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} x {workers_per_gpu} "
            f"worker{'s' if workers_per_gpu != 1 else ''} per GPU",
        )

    # --- the decision --------------------------------------------------------
    if num_workers is not None:
        bounds["num_workers"] = (num_workers, "override given by the caller")
        if num_workers > num_clients:
            workers, binding = num_clients, "clients"
            notes.append(
                f"num_workers={num_workers} capped at {num_clients}: only {num_clients} "
                f"client{'s' if num_clients != 1 else ''} to serve"
            )
        else:
            workers, binding = num_workers, "num_workers"
        allowed = bounds["memory"][0]
        if workers > allowed:
            if not oversubscribe:
                raise ValueError(_beyond_memory(num_workers, workers, allowed, mem, m.available_memory))
            notes.append(
                f"{workers} workers exceed the memory bound ({allowed}) (oversubscribe=True): "
                "they may run out of memory"
            )
            _warn_once(
                f"{workers} workers planned (oversubscribe=True) but memory allows only {allowed} at "
                f"{format_bytes(mem)} each; they may run out of memory"
            )
        if gpu_bound is not None and workers > gpu_bound:
            notes.append(
                f"{workers} workers exceed the gpu bound ({gpu_bound}): more than "
                f"{workers_per_gpu} worker{'s' if workers_per_gpu != 1 else ''} per GPU"
            )
    else:
        # The smallest bound; ties go to the more fundamental one (on GPU the cpu
        # bound is derived from the number of GPU workers, so the GPU binds).
        tie_order = ["clients", "gpu", "memory", "cpu"]
        binding = min(bounds, key=lambda k: (bounds[k][0], tie_order.index(k)))
        workers = bounds[binding][0]

    # --- slots -------------------------------------------------------------
    if workers * threads_per_worker > n_cpus:
        notes.append(
            f"{workers} workers x {threads_per_worker} thread{'s' if threads_per_worker != 1 else ''}"
            f" exceed the {n_cpus} usable CPUs: "
            "CPU sets wrap around and some workers share CPUs"
        )
        _warn_once(
            f"{workers} workers x {threads_per_worker} thread(s) on {n_cpus} usable CPUs: "
            "some workers share CPUs and take turns on them"
        )
    slots = []
    for i in range(workers):
        # Consecutive blocks of CPUs: with the usual numbering these are distinct
        # physical cores first, hyperthread siblings later.
        cpus = tuple(
            m.usable_cpus[(i * threads_per_worker + j) % n_cpus] for j in range(threads_per_worker)
        )
        # Round-robin over GPUs so that fewer workers than GPU slots still spread out.
        gpu = gpus[i % len(gpus)] if kind == "gpu" else None
        slots.append(
            WorkerSlot(
                index=i,
                cpus=cpus,
                intra_op_threads=len(cpus),
                # One inter-op thread would serialise independent ops; more than two
                # only oversubscribes a worker's small CPU set.
                inter_op_threads=max(1, min(2, len(cpus))),
                gpu=gpu,
            )
        )

    plan = PoolPlan(
        num_workers=workers,
        threads_per_worker=threads_per_worker,
        device_kind=kind,
        memory_per_worker=mem,
        slots=tuple(slots),
        bounds=bounds,
        machine=m,
        num_clients=num_clients,
        binding=binding,
        notes=tuple(notes),
        gpus=gpus if kind == "gpu" else (),
    )
    logger.debug("%s", plan)
    return plan




def _beyond_memory(num_workers: int, workers: int, allowed: int, mem: int, available: int) -> str:
    """The refusal of an explicit num_workers that the machine's memory cannot hold (one line)."""
    smaller = available // workers
    smaller_hint = (
        f" (at most {format_bytes(smaller)} each for {workers} workers)" if smaller >= 2**20 else ""
    )
    return (
        f"num_workers={num_workers} is more than this machine's memory holds: "
        f"{format_bytes(available)} available / {format_bytes(mem)} per worker (memory_per_worker) "
        f"allows at most {allowed} worker{'s' if allowed != 1 else ''}, and {workers} would need "
        f"{format_bytes(workers * mem)}. Use num_workers={allowed} or fewer, a smaller explicit "
        f"memory_per_worker if your workers need less{smaller_hint}, or oversubscribe=True to "
        "start them anyway (they may run out of memory)"
    )


# Each distinct sizing warning is logged once per process: a factory re-plans on
# every call, and the same warning on every round says nothing new. A set of
# short strings, kept for the life of the process.
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)
