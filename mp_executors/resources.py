"""Detecting the machine and planning the worker pool.

This module owns two things:

* **What the machine offers** (`Machine`, `detect_machine`): the CPUs this
  process may run on (affinity mask, further limited by a cgroup CPU quota),
  memory (limited by a cgroup memory limit), and the GPUs, found *without*
  initialising CUDA.
* **How many workers to start and where** (`plan_pool` -> `PoolPlan`): the
  number of workers is the minimum of a few bounds (clients, CPUs, memory,
  GPUs), each overridable and each recorded with a reason so that the plan can
  be printed (`mp-executors info`) and logged. Every worker gets a stable
  `WorkerSlot`: its CPU set, its TensorFlow thread counts, and its GPU, plus
  the environment to apply before TensorFlow is imported in that worker.

It also splits clients into contiguous shards made of whole reduction blocks
(`split_clients`), which is what keeps reductions bitwise independent of the
number of workers.

TensorFlow is deliberately never imported here: planning happens in the
parent, which must neither grab GPUs nor pay TensorFlow's import cost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = [
    "DEFAULT_MEMORY_PER_WORKER",
    "Machine",
    "cgroup_cpu_quota",
    "cgroup_memory_limit",
    "detect_gpus",
    "PoolPlan",
    "WorkerSlot",
    "detect_machine",
    "format_bytes",
    "limit_cpus_by_quota",
    "parse_memory",
    "plan_pool",
    "split_clients",
]

logger = logging.getLogger("mp_executors")

GiB = 1024**3

# A worker that has imported TensorFlow sits at ~540 MB RSS before it holds any
# client data or model (measured, see FACTS.md). 1 GiB leaves room for a
# shard's data, a small model and TF's allocator slack; larger models or
# datasets should pass memory_per_worker explicitly.
DEFAULT_MEMORY_PER_WORKER = 1 * GiB

_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_SELF_CGROUP = "/proc/self/cgroup"
_NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"


# --------------------------------------------------------------------------
# Machine detection
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What this process may use. Build one by hand to plan for a fake machine."""

    usable_cpus: tuple[int, ...]
    logical_cpus: int
    physical_cores: int
    total_memory: int
    available_memory: int
    gpus: tuple[str, ...] = ()
    # Informational: the cgroup limits that were applied (None = no limit found).
    cpu_quota: float | None = None
    memory_limit: int | None = None

    def __post_init__(self) -> None:
        # Normalise so that hand-built machines (lists, ranges, int GPU ids) compare
        # and hash like detected ones.
        object.__setattr__(self, "usable_cpus", tuple(int(c) for c in self.usable_cpus))
        object.__setattr__(self, "gpus", tuple(str(g) for g in self.gpus))
        if not self.usable_cpus:
            raise ValueError("Machine.usable_cpus is empty; a machine needs at least one CPU")

    def describe(self) -> str:
        """A few human-readable lines about this machine."""
        n = len(self.usable_cpus)
        cpu_line = (
            f"CPUs: {n} usable (ids {_format_cpus(self.usable_cpus)}) of "
            f"{self.logical_cpus} logical / {self.physical_cores} physical"
        )
        if self.cpu_quota is not None:
            cpu_line += f"; cgroup quota {self.cpu_quota:g} CPUs"
        mem_line = (
            f"memory: {format_bytes(self.available_memory)} available of "
            f"{format_bytes(self.total_memory)} total"
        )
        if self.memory_limit is not None:
            mem_line += f" (cgroup limit {format_bytes(self.memory_limit)})"
        if self.gpus:
            gpu_line = f"GPUs: {len(self.gpus)} (ids {', '.join(self.gpus)})"
        else:
            gpu_line = "GPUs: none"
        return "\n".join(["Machine", "  " + cpu_line, "  " + mem_line, "  " + gpu_line])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        d["usable_cpus"] = list(self.usable_cpus)
        d["gpus"] = list(self.gpus)
        return d


def detect_machine() -> Machine:
    """Detect the CPUs, memory and GPUs available to this process (no CUDA init)."""
    proc = psutil.Process()
    try:
        affinity = sorted(proc.cpu_affinity())
    except (AttributeError, NotImplementedError, OSError):
        # cpu_affinity is missing on macOS: every CPU is usable.
        affinity = list(range(psutil.cpu_count(logical=True) or 1))
    logical = psutil.cpu_count(logical=True) or len(affinity)
    physical = psutil.cpu_count(logical=False) or logical

    quota = cgroup_cpu_quota()
    usable = limit_cpus_by_quota(affinity, quota)

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, usage = cgroup_memory_limit()
    if limit is not None:
        # In a container psutil reports the host's memory; the cgroup is what the
        # OOM killer enforces.
        total = min(total, limit)
        available = max(0, min(available, limit - (usage or 0)))

    return Machine(
        usable_cpus=tuple(usable),
        logical_cpus=int(logical),
        physical_cores=int(physical),
        total_memory=total,
        available_memory=available,
        gpus=detect_gpus(),
        cpu_quota=quota,
        memory_limit=limit,
    )


def limit_cpus_by_quota(affinity: Sequence[int], quota: float | None) -> tuple[int, ...]:
    """Keep the first ceil(quota) CPU ids when a cgroup quota allows fewer than `affinity`.

    A quota caps CPU *time*, not which CPUs: running more busy threads than the
    quota allows only makes them take turns, so plan for ceil(quota) CPUs.
    """
    cpus = tuple(affinity)
    if quota is not None and quota > 0 and math.ceil(quota) < len(cpus):
        return cpus[: max(1, math.ceil(quota))]
    return cpus


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(controller: str, root: str, proc_self_cgroup: str) -> list[str]:
    """Directories to look for `controller` files in, innermost cgroup first.

    Limits set on an ancestor cgroup apply too, so callers take the minimum over
    all of them. Inside a container the path in /proc/self/cgroup often does not
    exist under the mounted root (cgroup namespaces), hence the root fallbacks.
    """
    dirs: list[str] = []
    text = _read(proc_self_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            bases = [root, os.path.join(root, "unified")]
        elif controller in controllers.split(","):
            bases = [os.path.join(root, controllers), os.path.join(root, controller)]
        else:
            continue
        for base in bases:
            rel = path.strip("/")
            while True:
                d = os.path.join(base, rel) if rel else base
                if d not in dirs:
                    dirs.append(d)
                if not rel:
                    break
                rel = os.path.dirname(rel)
    for d in (root, os.path.join(root, controller), os.path.join(root, "cpu,cpuacct")):
        if d not in dirs:
            dirs.append(d)
    return dirs


def cgroup_cpu_quota(
    root: str = _CGROUP_ROOT, proc_self_cgroup: str = _PROC_SELF_CGROUP
) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 2.5), or None when there is none.

    Reads cgroup v2 `cpu.max` ("max 100000" or "250000 100000") and cgroup v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1 = unlimited).
    """
    quotas: list[float] = []
    for d in _cgroup_dirs("cpu", root, proc_self_cgroup):
        v2 = _read(os.path.join(d, "cpu.max"))
        if v2:
            parts = v2.split()
            if len(parts) == 2 and parts[0] != "max":
                try:
                    q, p = int(parts[0]), int(parts[1])
                    if q > 0 and p > 0:
                        quotas.append(q / p)
                except ValueError:
                    pass
        q1 = _read(os.path.join(d, "cpu.cfs_quota_us"))
        p1 = _read(os.path.join(d, "cpu.cfs_period_us"))
        if q1 and p1:
            try:
                q, p = int(q1), int(p1)
                if q > 0 and p > 0:
                    quotas.append(q / p)
            except ValueError:
                pass
    return min(quotas) if quotas else None


def cgroup_memory_limit(
    root: str = _CGROUP_ROOT, proc_self_cgroup: str = _PROC_SELF_CGROUP
) -> tuple[int | None, int | None]:
    """(limit, current usage) in bytes from the memory cgroup, or (None, None).

    v2: `memory.max` / `memory.current`; v1: `memory.limit_in_bytes` /
    `memory.usage_in_bytes`. v1 reports "no limit" as a huge number (~2**63),
    so limits at or above the physical memory are ignored.
    """
    physical = psutil.virtual_memory().total
    best: tuple[int, int | None] | None = None
    for d in _cgroup_dirs("memory", root, proc_self_cgroup):
        for limit_file, usage_file in (
            ("memory.max", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ):
            raw = _read(os.path.join(d, limit_file))
            if not raw or raw == "max":
                continue
            try:
                limit = int(raw)
            except ValueError:
                continue
            if limit <= 0 or limit >= physical:
                continue
            usage_raw = _read(os.path.join(d, usage_file))
            usage = int(usage_raw) if usage_raw and usage_raw.isdigit() else None
            if best is None or limit < best[0]:
                best = (limit, usage)
    if best is None:
        return None, None
    return best


def detect_gpus(
    environ: Mapping[str, str] | None = None,
    proc_gpus_dir: str = _NVIDIA_PROC_GPUS,
    nvidia_smi: str | None = "nvidia-smi",
) -> tuple[str, ...]:
    """GPU ids visible to this process, as strings, without initialising CUDA.

    Order of evidence: CUDA_VISIBLE_DEVICES if set (empty or "-1" = none; like
    CUDA, stop at the first invalid entry), else the entries of
    /proc/driver/nvidia/gpus/, else `nvidia-smi -L` (5 s timeout; any failure
    means no GPUs). Initialising CUDA in the parent would reserve GPU memory
    and make forked children unable to use the GPU, hence this indirect route.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids: list[str] = []
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break  # CUDA ignores everything from the first invalid id on
            ids.append(entry)
        return tuple(ids)

    if os.path.isdir(proc_gpus_dir):
        try:
            n = len(os.listdir(proc_gpus_dir))
        except OSError:
            n = 0
        return tuple(str(i) for i in range(n))

    exe = shutil.which(nvidia_smi) if nvidia_smi else None
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "-L"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(re.findall(r"^GPU (\d+):", out, flags=re.MULTILINE))


# --------------------------------------------------------------------------
# Small parsing / formatting helpers
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


def format_bytes(n: int) -> str:
    """1610612736 -> '1.5 GiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_cpus(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) -> '0-3,8' (the taskset/cpuset notation)."""
    if not cpus:
        return "-"
    parts: list[str] = []
    start = prev = cpus[0]
    for c in list(cpus[1:]) + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def _positive_int(name: str, value: Any, fix: str) -> int:
    # bool is an int subclass, but num_workers=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer; {fix}")
    return int(value)


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
            "MP_EXECUTORS_WORKER_SLOT": str(self.index),
            "MP_EXECUTORS_WORKER_CPUS": ",".join(str(c) for c in self.cpus),
        }

    def pin(self) -> None:
        """Apply this slot to the calling process: export env() and set CPU affinity.

        Call it first thing in a worker, before importing TensorFlow (TF sizes its
        thread pools from the affinity mask and reads the env at import).
        """
        if "tensorflow" in sys.modules:
            logger.warning(
                "WorkerSlot.pin() called after TensorFlow was imported; thread and GPU "
                "settings will not take effect in this process"
            )
        os.environ.update(self.env())
        try:
            psutil.Process().cpu_affinity(list(self.cpus))
        except (AttributeError, NotImplementedError):
            pass  # no affinity API on this platform (macOS): threads still limited by env

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
                    _format_cpus(s.cpus),
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
    machine: Machine | None = None,
) -> PoolPlan:
    """Size the worker pool for `num_clients` clients on `machine` (default: this one).

    workers = min(clients, CPUs // threads_per_worker, available memory //
    memory_per_worker, GPUs x workers_per_gpu when on GPU), unless num_workers
    is given, which wins (but is still capped at num_clients: a worker without
    clients is useless). Every bad argument raises ValueError saying what to fix.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral):
        raise ValueError(
            f"num_clients={num_clients!r} is invalid: it must be an integer >= 1 "
            "(the number of clients in the federation)"
        )
    if num_clients < 1:
        raise ValueError(
            f"num_clients={num_clients!r} is invalid: it must be >= 1; a pool needs at least "
            "one client to serve"
        )
    num_clients = int(num_clients)
    m = machine if machine is not None else detect_machine()
    n_cpus = len(m.usable_cpus)

    if num_workers is not None:
        num_workers = _positive_int(
            "num_workers",
            num_workers,
            "pass e.g. 4, or leave it unset (None) to size automatically",
        )
    if threads_per_worker is not None:
        threads_per_worker = _positive_int(
            "threads_per_worker",
            threads_per_worker,
            f"pass e.g. 1 (at most {n_cpus}), or leave it unset (None) to size automatically",
        )
        if threads_per_worker > n_cpus:
            raise ValueError(
                f"threads_per_worker={threads_per_worker} is more than the {n_cpus} usable "
                f"CPUs of this machine; use at most {n_cpus}"
            )
    workers_per_gpu = _positive_int(
        "workers_per_gpu", workers_per_gpu, "pass e.g. 1 (one worker per GPU) or 2"
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
    mem_bound = m.available_memory // mem
    if mem_bound < 1:
        logger.warning(
            "only %s memory available but memory_per_worker is %s: planning 1 worker anyway; "
            "it may run out of memory",
            format_bytes(m.available_memory),
            format_bytes(mem),
        )
        notes.append(
            f"available memory ({format_bytes(m.available_memory)}) is less than one worker's "
            f"({format_bytes(mem)}); planned 1 worker anyway"
        )
    mem_reason = f"{format_bytes(m.available_memory)} available / {format_bytes(mem)} per worker"
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
        if workers > bounds["memory"][0]:
            notes.append(
                f"{workers} workers exceed the memory bound ({bounds['memory'][0]}): "
                "they may run out of memory"
            )
            logger.warning(
                "%d workers planned but memory allows only %d at %s each; they may run out of memory",
                workers,
                bounds["memory"][0],
                format_bytes(mem),
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


# --------------------------------------------------------------------------
# Sharding clients over workers
# --------------------------------------------------------------------------


def split_clients(num_clients: int, num_workers: int, block_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) shards of clients, one per worker, made of whole blocks.

    Every shard boundary is a multiple of `block_size` (the last block may be
    short), so each reduction block lives entirely in one worker and reductions
    do not depend on the number of workers. Shards are balanced in number of
    blocks (earlier shards get the extra one) and never empty: with fewer blocks
    than workers, fewer shards are returned (min(num_workers, num_blocks)).
    """
    for name, value in (("num_workers", num_workers), ("block_size", block_size)):
        _positive_int(name, value, "pass an integer >= 1")
    if (
        isinstance(num_clients, bool)
        or not isinstance(num_clients, numbers.Integral)
        or num_clients < 0
    ):
        raise ValueError(f"num_clients={num_clients!r} is invalid: it must be an integer >= 0")
    num_blocks = -(-num_clients // block_size)
    if num_blocks == 0:
        return []
    shards = min(num_workers, num_blocks)
    base, extra = divmod(num_blocks, shards)
    result = []
    block = 0
    for i in range(shards):
        nb = base + (1 if i < extra else 0)
        start = block * block_size
        block += nb
        result.append((start, min(num_clients, block * block_size)))
    return result
