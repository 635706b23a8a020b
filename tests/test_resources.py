"""Tests for mp_executors.resources: machine detection, pool planning, client sharding."""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mp_executors.resources import (
    DEFAULT_MEMORY_PER_WORKER,
    Machine,
    PoolPlan,
    WorkerSlot,
    cgroup_cpu_quota,
    cgroup_memory_limit,
    detect_gpus,
    detect_machine,
    limit_cpus_by_quota,
    parse_memory,
    plan_pool,
    split_clients,
)

GiB = 1024**3
REPO = Path(__file__).resolve().parents[1]


def fake_machine(cpus: int = 8, available: int = 64 * GiB, gpus=(), total: int | None = None):
    """A hand-built machine: the intended way to plan for hardware we do not have."""
    return Machine(
        usable_cpus=tuple(range(cpus)),
        logical_cpus=cpus,
        physical_cores=cpus,
        total_memory=total if total is not None else max(available, 1),
        available_memory=available,
        gpus=tuple(gpus),
    )


# --------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("clients", [1, 2, 5, 100, 10_000])
@pytest.mark.parametrize("available_gib", [0.5, 1, 3, 1000])
def test_plan_never_exceeds_clients_cpus_or_memory(cpus, clients, available_gib):
    m = fake_machine(cpus=cpus, available=int(available_gib * GiB))
    plan = plan_pool(clients, machine=m)
    assert 1 <= plan.num_workers <= clients
    assert plan.num_workers <= cpus // plan.threads_per_worker
    assert plan.num_workers <= max(1, m.available_memory // DEFAULT_MEMORY_PER_WORKER)
    assert plan.num_workers == min(v for v, _ in plan.bounds.values())
    assert len(plan.slots) == plan.num_workers
    assert [s.index for s in plan.slots] == list(range(plan.num_workers))
    assert plan.device_kind == "cpu"
    assert plan.threads_per_worker == 1
    assert plan.bounds[plan.binding][0] == plan.num_workers
    for name, (value, reason) in plan.bounds.items():
        assert isinstance(value, int) and value >= 1, name
        assert isinstance(reason, str) and reason, name


def test_bounds_values_and_binding():
    m = fake_machine(cpus=16, available=5 * GiB)
    plan = plan_pool(100, machine=m, memory_per_worker="2GiB")
    assert plan.bounds["clients"][0] == 100
    assert plan.bounds["cpu"][0] == 16
    assert plan.bounds["memory"][0] == 2  # 5 GiB // 2 GiB
    assert "gpu" not in plan.bounds
    assert plan.binding == "memory"
    assert plan.num_workers == 2
    assert plan.memory_per_worker == 2 * GiB

    plan = plan_pool(3, machine=m)
    assert plan.binding == "clients" and plan.num_workers == 3

    plan = plan_pool(100, machine=fake_machine(cpus=4))
    assert plan.binding == "cpu" and plan.num_workers == 4


def test_memory_below_one_worker_plans_one_and_warns(caplog):
    m = fake_machine(cpus=8, available=GiB // 2)
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = plan_pool(10, machine=m)
    assert plan.num_workers == 1
    assert plan.bounds["memory"][0] == 1
    assert any("memory" in r.getMessage() for r in caplog.records)
    assert any("memory" in n for n in plan.notes)


def test_zero_available_memory_still_plans_one_worker(caplog):
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = plan_pool(10, machine=fake_machine(cpus=4, available=0, total=GiB))
    assert plan.num_workers == 1
    assert caplog.records


# --------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------


def test_num_workers_override_wins_and_spreads_threads():
    m = fake_machine(cpus=8)
    plan = plan_pool(100, num_workers=3, machine=m)
    assert plan.num_workers == 3
    assert plan.binding == "num_workers"
    assert plan.threads_per_worker == 8 // 3
    assert plan.bounds["num_workers"][0] == 3
    assert all(len(s.cpus) == 2 for s in plan.slots)


def test_num_workers_override_beyond_cpus_wraps_and_says_so():
    m = fake_machine(cpus=2)
    plan = plan_pool(100, num_workers=5, machine=m)
    assert plan.num_workers == 5
    assert plan.threads_per_worker == 1
    assert [s.cpus for s in plan.slots] == [(0,), (1,), (0,), (1,), (0,)]
    assert any("share CPUs" in n for n in plan.notes)


def test_num_workers_override_capped_at_clients():
    plan = plan_pool(3, num_workers=10, machine=fake_machine(cpus=16))
    assert plan.num_workers == 3
    assert plan.binding == "clients"
    assert any("capped" in n for n in plan.notes)
    # Threads are shared among the workers that actually run.
    assert plan.threads_per_worker == 16 // 3


def test_num_workers_override_beyond_memory_warns(caplog):
    m = fake_machine(cpus=8, available=2 * GiB)
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = plan_pool(100, num_workers=6, machine=m)
    assert plan.num_workers == 6
    assert any("memory" in n for n in plan.notes)
    assert caplog.records


def test_threads_per_worker_override():
    m = fake_machine(cpus=8)
    plan = plan_pool(100, threads_per_worker=4, machine=m)
    assert plan.threads_per_worker == 4
    assert plan.num_workers == 2
    assert plan.bounds["cpu"][0] == 2
    assert [s.cpus for s in plan.slots] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [s.intra_op_threads for s in plan.slots] == [4, 4]
    assert [s.inter_op_threads for s in plan.slots] == [2, 2]

    # threads that do not divide the CPUs: leftover CPUs stay free, sets disjoint
    plan = plan_pool(100, threads_per_worker=3, machine=m)
    assert plan.num_workers == 2
    assert [s.cpus for s in plan.slots] == [(0, 1, 2), (3, 4, 5)]


def test_both_overrides():
    plan = plan_pool(100, num_workers=4, threads_per_worker=2, machine=fake_machine(cpus=8))
    assert plan.num_workers == 4
    assert [s.cpus for s in plan.slots] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert not any("share" in n for n in plan.notes)


def test_cpu_slots_are_disjoint_when_they_fit():
    for cpus in (1, 2, 3, 7, 8, 12):
        m = Machine(
            usable_cpus=tuple(range(100, 100 + 2 * cpus, 2)),  # non-contiguous ids
            logical_cpus=256,
            physical_cores=128,
            total_memory=512 * GiB,
            available_memory=512 * GiB,
        )
        for threads in range(1, cpus + 1):
            plan = plan_pool(1000, threads_per_worker=threads, machine=m)
            seen: list[int] = []
            for s in plan.slots:
                assert len(s.cpus) == threads
                assert s.intra_op_threads == threads
                assert s.inter_op_threads == max(1, min(2, threads))
                assert set(s.cpus) <= set(m.usable_cpus)
                seen.extend(s.cpus)
            assert len(seen) == len(set(seen)), (cpus, threads)
            assert not any("share" in n for n in plan.notes)


@pytest.mark.parametrize(
    "kwargs, argname",
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": -5}, "num_clients"),
        ({"num_clients": 2.5}, "num_clients"),
        ({"num_clients": "10"}, "num_clients"),
        ({"num_clients": True}, "num_clients"),
        ({"num_clients": None}, "num_clients"),
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 2.0}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"num_workers": True}, "num_workers"),
        ({"num_workers": "4"}, "num_workers"),
        ({"num_workers": "many"}, "num_workers"),
        ({"threads_per_worker": 0}, "threads_per_worker"),
        ({"threads_per_worker": -2}, "threads_per_worker"),
        ({"threads_per_worker": 1.0}, "threads_per_worker"),
        ({"threads_per_worker": "2"}, "threads_per_worker"),
        ({"threads_per_worker": 9}, "threads_per_worker"),  # > 8 usable CPUs
        ({"workers_per_gpu": 0}, "workers_per_gpu"),
        ({"workers_per_gpu": -1}, "workers_per_gpu"),
        ({"workers_per_gpu": 1.5}, "workers_per_gpu"),
        ({"memory_per_worker": 0}, "memory_per_worker"),
        ({"memory_per_worker": -1}, "memory_per_worker"),
        ({"memory_per_worker": "0GB"}, "memory_per_worker"),
        ({"memory_per_worker": "lots"}, "memory_per_worker"),
        ({"memory_per_worker": "2XB"}, "memory_per_worker"),
        ({"memory_per_worker": 1.5}, "memory_per_worker"),
        ({"memory_per_worker": True}, "memory_per_worker"),
        ({"devices": "tpu"}, "devices"),
        ({"devices": ""}, "devices"),
        ({"devices": "gpu"}, "devices"),  # the fake machine has no GPU
        ({"devices": ["0"]}, "devices"),
        ({"devices": []}, "devices"),
        ({"devices": None}, "devices"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argname):
    args = {"num_clients": 10, "machine": fake_machine(cpus=8)}
    args.update(kwargs)
    num_clients = args.pop("num_clients")
    with pytest.raises(ValueError) as exc:
        plan_pool(num_clients, **args)
    msg = str(exc.value)
    assert argname in msg
    assert "\n" not in msg
    # names the bad value (empty list / None show up as their repr)
    bad = kwargs[argname]
    if isinstance(bad, list) and bad:
        assert all(repr(item) in msg for item in bad), msg
    else:
        assert repr(bad) in msg, msg


# --------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------


def test_gpu_auto_gives_each_slot_one_gpu():
    m = fake_machine(cpus=8, gpus=("0", "1"))
    plan = plan_pool(100, machine=m)
    assert plan.device_kind == "gpu"
    assert plan.num_workers == 2
    assert plan.binding == "gpu"
    assert plan.bounds["gpu"][0] == 2
    assert sorted(s.gpu for s in plan.slots) == ["0", "1"]
    for s in plan.slots:
        assert s.env()["CUDA_VISIBLE_DEVICES"] == s.gpu
    # Each GPU worker gets a fair share of the CPUs to feed its GPU.
    assert plan.threads_per_worker == 4
    assert [s.cpus for s in plan.slots] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_two_workers_per_gpu():
    m = fake_machine(cpus=8, gpus=("0", "1"))
    plan = plan_pool(100, machine=m, workers_per_gpu=2)
    assert plan.num_workers == 4
    assert len(plan.slots) == 4
    assert collections.Counter(s.gpu for s in plan.slots) == {"0": 2, "1": 2}
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in plan.slots] == [s.gpu for s in plan.slots]
    assert plan.threads_per_worker == 2
    all_cpus = [c for s in plan.slots for c in s.cpus]
    assert len(all_cpus) == len(set(all_cpus))


def test_gpu_fewer_clients_than_gpu_slots_spreads_over_gpus():
    m = fake_machine(cpus=8, gpus=("0", "1"))
    plan = plan_pool(2, machine=m, workers_per_gpu=2)
    assert [s.gpu for s in plan.slots] == ["0", "1"]


def test_gpu_selection_by_ids():
    m = fake_machine(cpus=8, gpus=("0", "1", "2"))
    for devices in (["1"], [1], "1", ("2", "0"), "2,0", [2, 0]):
        plan = plan_pool(100, machine=m, devices=devices)
        expected = [str(d) for d in (devices.split(",") if isinstance(devices, str) else devices)]
        assert plan.device_kind == "gpu"
        assert list(plan.gpus) == expected
        assert [s.gpu for s in plan.slots] == expected
        assert plan.bounds["gpu"][0] == len(expected)


def test_unknown_gpu_id_names_it_and_the_available_ones():
    m = fake_machine(cpus=8, gpus=("0", "1"))
    with pytest.raises(ValueError, match=r"'7'.*0, 1"):
        plan_pool(10, machine=m, devices=["7"])
    with pytest.raises(ValueError, match=r"'3'.*0, 1"):
        plan_pool(10, machine=m, devices="0,3")
    with pytest.raises(ValueError, match="twice"):
        plan_pool(10, machine=m, devices=["0", 0])


def test_gpu_requested_without_gpus():
    with pytest.raises(ValueError, match="devices='gpu'.*no visible GPU"):
        plan_pool(10, machine=fake_machine(), devices="gpu")


def test_cpu_on_a_gpu_machine_hides_gpus():
    m = fake_machine(cpus=4, gpus=("0", "1"))
    plan = plan_pool(100, machine=m, devices="cpu")
    assert plan.device_kind == "cpu"
    assert "gpu" not in plan.bounds
    assert plan.num_workers == 4
    for s in plan.slots:
        assert s.gpu is None
        assert s.env()["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_override_beyond_gpu_bound_notes_sharing():
    m = fake_machine(cpus=8, gpus=("0", "1"))
    plan = plan_pool(100, machine=m, num_workers=3)
    assert [s.gpu for s in plan.slots] == ["0", "1", "0"]
    assert any("per GPU" in n for n in plan.notes)


# --------------------------------------------------------------------------
# Slots and their environment
# --------------------------------------------------------------------------


def test_slot_env():
    s = WorkerSlot(index=3, cpus=(4, 5), intra_op_threads=2, inter_op_threads=2, gpu=None)
    env = s.env()
    assert env == {
        "CUDA_VISIBLE_DEVICES": "",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "MP_EXECUTORS_WORKER_SLOT": "3",
        "MP_EXECUTORS_WORKER_CPUS": "4,5",
    }
    g = WorkerSlot(index=0, cpus=(0,), intra_op_threads=1, inter_op_threads=1, gpu="1")
    assert g.env()["CUDA_VISIBLE_DEVICES"] == "1"


def test_slot_pin_in_a_fresh_process():
    cpu = sorted(psutil.Process().cpu_affinity())[-1]
    code = f"""
import json, os, sys, psutil
from mp_executors.resources import WorkerSlot
WorkerSlot(index=1, cpus=({cpu},), intra_op_threads=1, inter_op_threads=1).pin()
print(json.dumps({{"aff": psutil.Process().cpu_affinity(),
                   "slot": os.environ["MP_EXECUTORS_WORKER_SLOT"],
                   "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
                   "tf": "tensorflow" in sys.modules}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env_with_repo(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    got = json.loads(out)
    assert got == {"aff": [cpu], "slot": "1", "cuda": "", "tf": False}


def _env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_planning_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "import mp_executors.resources as r, mp_executors.cli\n"
        "print(r.plan_pool(10).num_workers)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env_with_repo(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert int(out[0]) >= 1
    assert out[1] == "False"


# --------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------


def test_plan_str_and_to_dict():
    m = fake_machine(cpus=4, gpus=("0", "1"))
    plan = plan_pool(50, machine=m, workers_per_gpu=2, memory_per_worker="2GB")
    text = str(plan)
    assert "4 workers" in text and "GPU" in text
    for name, (_value, reason) in plan.bounds.items():
        assert name in text and reason in text
    binding_lines = [line for line in text.splitlines() if "<- binding" in line]
    assert len(binding_lines) == 1 and plan.binding in binding_lines[0]
    assert text.count("\n") >= len(plan.slots) + len(plan.bounds)

    d = json.loads(json.dumps(plan.to_dict()))
    assert d["num_workers"] == plan.num_workers
    assert d["device_kind"] == "gpu"
    assert d["memory_per_worker"] == 2_000_000_000
    assert d["bounds"]["gpu"]["value"] == 4
    assert [s["gpu"] for s in d["slots"]] == [s.gpu for s in plan.slots]
    assert d["machine"]["gpus"] == ["0", "1"]
    assert isinstance(plan, PoolPlan)
    # Plans are values: equal for equal inputs, and hashable (e.g. as cache keys).
    again = plan_pool(50, machine=m, workers_per_gpu=2, memory_per_worker="2GB")
    assert again == plan and hash(again) == hash(plan)


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
# Memory parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (1024, 1024),
        ("1024", 1024),
        ("1024B", 1024),
        ("512MiB", 512 * 2**20),
        ("512mib", 512 * 2**20),
        ("512Mi", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("2 GB", 2 * 10**9),
        ("2GiB", 2 * 2**30),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("1.5G", 3 * 2**29),
        ("1.5GiB", 3 * 2**29),
        (".5G", 2**29),
        ("100K", 102_400),
        ("100KB", 100_000),
        ("1T", 2**40),
        ("1TB", 10**12),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "G",
        "GB",
        "lots",
        "2XB",
        "-1G",
        "0",
        "0.0G",
        "1.5",
        "1.5B",
        "2iB",
        "1e9",
        0,
        -5,
        1.5,
        None,
        True,
    ],
)
def test_parse_memory_rejects(bad):
    with pytest.raises(ValueError, match="memory_per_worker"):
        parse_memory(bad)


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
    # And planning for it works with the real machine.
    plan = plan_pool(1000)
    assert 1 <= plan.num_workers <= len(plan.machine.usable_cpus)


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


# --------------------------------------------------------------------------
# split_clients
# --------------------------------------------------------------------------


def _check_split(n: int, w: int, b: int) -> None:
    shards = split_clients(n, w, b)
    num_blocks = -(-n // b)
    assert len(shards) == min(w, num_blocks), (n, w, b, shards)
    if n == 0:
        assert shards == []
        return
    # contiguous, covering [0, n), never empty
    assert shards[0][0] == 0 and shards[-1][1] == n
    for (_, e0), (s1, _) in zip(shards, shards[1:]):
        assert e0 == s1
    assert all(start < stop for start, stop in shards)
    # every boundary is on a block boundary (the final stop is n)
    for start, stop in shards:
        assert start % b == 0
        assert stop == n or stop % b == 0
    # balanced in blocks, earlier shards get the extra block
    blocks = [-(-(stop - start) // b) for start, stop in shards]
    assert sum(blocks) == num_blocks
    assert max(blocks) - min(blocks) <= 1
    assert blocks == sorted(blocks, reverse=True)


def test_split_clients_properties():
    for n in range(0, 70):
        for w in range(1, 12):
            for b in range(1, 12):
                _check_split(n, w, b)
    for n, w, b in [
        (10_000, 7, 64),
        (10_001, 64, 1),
        (1000, 3, 1000),
        (999, 1000, 1),
        (12345, 17, 10),
    ]:
        _check_split(n, w, b)


def test_split_clients_examples():
    assert split_clients(10, 2, 1) == [(0, 5), (5, 10)]
    assert split_clients(10, 3, 1) == [(0, 4), (4, 7), (7, 10)]
    assert split_clients(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]  # last block short
    assert split_clients(10, 2, 4) == [(0, 8), (8, 10)]  # 3 blocks: 2 + 1
    assert split_clients(10, 5, 4) == [(0, 4), (4, 8), (8, 10)]  # fewer blocks than workers
    assert split_clients(3, 8, 1) == [(0, 1), (1, 2), (2, 3)]
    assert split_clients(5, 1, 2) == [(0, 5)]
    assert split_clients(0, 4, 2) == []


@pytest.mark.parametrize(
    "args",
    [
        (10, 0, 1),
        (10, -1, 1),
        (10, 2, 0),
        (10, 2, -3),
        (-1, 2, 1),
        (10, 2.0, 1),
        (10.0, 2, 1),
        (10, True, 1),
    ],
)
def test_split_clients_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        split_clients(*args)
