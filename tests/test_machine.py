"""Tests for mp_executors.machine: detecting CPUs, cgroup limits, memory and GPUs; describing them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest

from mp_executors.machine import (
    Machine,
    cgroup_cpu_quota,
    cgroup_memory_limit,
    detect_gpus,
    detect_machine,
    format_bytes,
    format_cpus,
    limit_cpus_by_quota,
)

GiB = 1024**3


def fake_machine(cpus: int = 8, available: int = 64 * GiB, gpus=()):
    return Machine(
        usable_cpus=tuple(range(cpus)),
        logical_cpus=cpus,
        physical_cores=cpus,
        total_memory=available,
        available_memory=available,
        gpus=tuple(gpus),
    )


def test_machine_describe():
    text = fake_machine(cpus=4, gpus=("0",)).describe()
    assert "4 usable" in text and "0-3" in text and "GPUs: 1" in text
    assert "GPUs: none" in fake_machine(cpus=2).describe()


def test_machine_normalises_hand_built_values():
    m = Machine(
        usable_cpus=range(3),
        logical_cpus=3,
        physical_cores=3,
        total_memory=GiB,
        available_memory=GiB,
        gpus=[0, 1],
    )
    assert m.usable_cpus == (0, 1, 2) and m.gpus == ("0", "1")
    with pytest.raises(ValueError):
        Machine(
            usable_cpus=(), logical_cpus=1, physical_cores=1, total_memory=1, available_memory=1
        )


# --------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------


def test_detect_machine_on_this_machine():
    m = detect_machine()
    assert m.usable_cpus
    assert set(m.usable_cpus) <= set(psutil.Process().cpu_affinity())
    assert len(m.usable_cpus) <= m.logical_cpus
    assert 1 <= m.physical_cores <= m.logical_cpus
    assert 0 <= m.available_memory <= m.total_memory
    assert m.total_memory > 0
    assert all(isinstance(g, str) for g in m.gpus)
    assert isinstance(m.describe(), str) and "CPUs" in m.describe()


def test_limit_cpus_by_quota():
    aff = (0, 1, 2, 3, 4, 5, 6, 7)
    assert limit_cpus_by_quota(aff, None) == aff
    assert limit_cpus_by_quota(aff, 8.0) == aff
    assert limit_cpus_by_quota(aff, 16.0) == aff
    assert limit_cpus_by_quota(aff, 2.0) == (0, 1)
    assert limit_cpus_by_quota(aff, 2.5) == (0, 1, 2)
    assert limit_cpus_by_quota(aff, 0.1) == (0,)
    assert limit_cpus_by_quota((3, 9), 1.0) == (3,)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_cpu_quota(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/user.slice/job\n")
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "cpu.max", "250000 100000\n")  # an ancestor's limit applies
    assert cgroup_cpu_quota(str(root), str(proc)) == 2.5
    _write(root / "user.slice" / "job" / "cpu.max", "100000 100000\n")
    assert cgroup_cpu_quota(str(root), str(proc)) == 1.0
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(str(root), str(proc)) is None


def test_cgroup_v1_cpu_quota(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(str(root), str(proc)) is None
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    assert cgroup_cpu_quota(str(root), str(proc)) == 3.0


def test_cgroup_missing_files(tmp_path):
    assert cgroup_cpu_quota(str(tmp_path / "nothing"), str(tmp_path / "nope")) is None
    assert cgroup_memory_limit(str(tmp_path / "nothing"), str(tmp_path / "nope")) == (None, None)


def test_cgroup_memory_limit(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/job\n")
    _write(root / "job" / "memory.max", f"{2 * GiB}\n")
    _write(root / "job" / "memory.current", f"{GiB // 2}\n")
    assert cgroup_memory_limit(str(root), str(proc)) == (2 * GiB, GiB // 2)
    _write(root / "job" / "memory.max", "max\n")
    assert cgroup_memory_limit(str(root), str(proc)) == (None, None)
    # cgroup v1 says "unlimited" with a huge number
    _write(proc, "4:memory:/\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory_limit(str(root), str(proc)) == (None, None)


@pytest.mark.parametrize(
    "visible, expected",
    [
        ("", ()),
        ("-1", ()),
        ("0", ("0",)),
        ("0,1", ("0", "1")),
        (" 2 , 3 ", ("2", "3")),
        ("2,-1,3", ("2",)),  # CUDA stops at the first invalid id
        ("GPU-8c1b4f2e", ("GPU-8c1b4f2e",)),
    ],
)
def test_detect_gpus_honours_cuda_visible_devices(visible, expected, tmp_path):
    # A /proc dir with 4 GPUs is present but CUDA_VISIBLE_DEVICES wins.
    proc = tmp_path / "gpus"
    for i in range(4):
        (proc / f"0000:0{i}:00.0").mkdir(parents=True)
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": visible}, str(proc), None) == expected


def test_detect_gpus_from_proc(tmp_path):
    proc = tmp_path / "gpus"
    for bus in ("0000:3b:00.0", "0000:af:00.0"):
        (proc / bus).mkdir(parents=True)
    assert detect_gpus({}, str(proc), None) == ("0", "1")
    assert detect_gpus({}, str(tmp_path / "missing"), None) == ()


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_detect_gpus_from_nvidia_smi(tmp_path):
    missing = str(tmp_path / "missing")
    smi = _script(
        tmp_path / "nvidia-smi",
        "echo 'GPU 0: NVIDIA A100 (UUID: GPU-aaa)'\necho 'GPU 1: NVIDIA A100 (UUID: GPU-bbb)'\n",
    )
    assert detect_gpus({}, missing, smi) == ("0", "1")
    failing = _script(tmp_path / "smi-fails", "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert detect_gpus({}, missing, failing) == ()
    assert detect_gpus({}, missing, str(tmp_path / "no-such-binary")) == ()


def test_detect_gpus_this_machine_matches_environment():
    gpus = detect_gpus()
    assert isinstance(gpus, tuple) and all(isinstance(g, str) for g in gpus)
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        assert gpus == ()


def test_format_bytes_and_cpus():
    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(int(1.5 * GiB)) == "1.5 GiB"
    assert format_bytes(3 * 1024**5) == "3072.0 TiB"
    assert format_cpus((0, 1, 2, 3, 8)) == "0-3,8" and format_cpus((5,)) == "5" and format_cpus(()) == "-"


def test_reclaiming_counts_the_given_processes_memory_as_available():
    m = fake_machine(available=GiB)
    m = Machine(usable_cpus=m.usable_cpus, logical_cpus=8, physical_cores=8, total_memory=1024 * GiB,
                available_memory=GiB)
    me = os.getpid()
    rss = psutil.Process(me).memory_info().rss
    assert m.reclaiming([me]).available_memory == GiB + rss
    assert m.reclaiming([]) is m
    # Never more than the machine has.
    small = Machine(usable_cpus=(0,), logical_cpus=1, physical_cores=1, total_memory=GiB, available_memory=GiB)
    assert small.reclaiming([me]).available_memory == GiB
