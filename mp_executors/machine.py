"""What the machine offers: CPUs, memory and GPUs, as this process may use them.

`detect_machine()` reads the CPUs this process may run on (affinity mask,
further limited by a cgroup CPU quota), its memory (limited by a cgroup memory
limit) and the visible GPUs, found *without* initialising CUDA, into a
`Machine`. Build a `Machine` by hand to plan for hardware you do not have.
How many workers to start on it is `planning`'s business.

TensorFlow is deliberately never imported here: detection happens in the
parent, which must neither grab GPUs nor pay TensorFlow's import cost.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = [
    "Machine",
    "cgroup_cpu_quota",
    "cgroup_memory_limit",
    "detect_gpus",
    "detect_machine",
    "format_bytes",
    "format_cpus",
    "limit_cpus_by_quota",
]

_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_SELF_CGROUP = "/proc/self/cgroup"
_NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"


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
            f"CPUs: {n} usable (ids {format_cpus(self.usable_cpus)}) of "
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

    def reclaiming(self, pids: Iterable[int]) -> Machine:
        """This machine with the memory (RSS) of the processes `pids` counted as available.

        A running pool is re-planned on a machine reading taken while its own
        workers hold memory: those workers are part of the plan, not competitors
        for it, so their memory must not shrink the memory bound (an explicit
        `num_workers` that fitted when the pool started would otherwise be refused
        once it runs).
        """
        held = 0
        for pid in pids:
            try:
                held += psutil.Process(pid).memory_info().rss
            except psutil.Error:  # gone meanwhile: it holds nothing
                pass
        if not held:
            return self
        return dataclasses.replace(self, available_memory=min(self.total_memory, self.available_memory + held))


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
# Formatting
# --------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """1610612736 -> '1.5 GiB' (whole bytes below 1 KiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_cpus(cpus: Sequence[int]) -> str:
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
