"""Tests for mp_executors.planning: pool bounds, overrides, the memory refusal, slots, memory sizes."""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import mp_executors as mpx
from mp_executors import cli, planning
from mp_executors.machine import Machine, detect_machine
from mp_executors.planning import (
    DEFAULT_MEMORY_PER_WORKER,
    PoolPlan,
    WorkerSlot,
    parse_memory,
    plan_pool,
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


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # Each sizing warning is logged once per process; every test starts afresh.
    monkeypatch.setattr(planning, "_warned", set())


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
        "MP_EXECUTORS_VECTORIZE": os.environ.get("MP_EXECUTORS_VECTORIZE", "auto"),
        # tests/conftest.py sets the session's plan cache directory; slots forward it.
        "MP_EXECUTORS_CACHE_DIR": os.environ["MP_EXECUTORS_CACHE_DIR"],
    }
    g = WorkerSlot(index=0, cpus=(0,), intra_op_threads=1, inter_op_threads=1, gpu="1")
    assert g.env()["CUDA_VISIBLE_DEVICES"] == "1"


def _env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_planning_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "import mp_executors.planning as p, mp_executors.cli\n"
        "print(p.plan_pool(10).num_workers)\n"
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


def test_planning_this_machine():
    plan = plan_pool(1000)
    assert 1 <= plan.num_workers <= len(plan.machine.usable_cpus)


# --------------------------------------------------------------------------
# Memory is a hard bound for explicit choices (issue 9, item 7)
# --------------------------------------------------------------------------


def test_num_workers_beyond_memory_is_refused_naming_the_bound_and_the_overrides():
    m = fake_machine(cpus=8, available=2 * GiB)
    with pytest.raises(ValueError) as exc:
        plan_pool(100, num_workers=6, machine=m)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "num_workers=6" in msg and "at most 2 workers" in msg  # the bound
    assert "2.0 GiB available / 1.0 GiB per worker" in msg and "6.0 GiB" in msg  # its numbers
    assert "num_workers=2 or fewer" in msg and "memory_per_worker" in msg and "oversubscribe=True" in msg
    # The ways out it names do work.
    assert plan_pool(100, num_workers=2, machine=m).num_workers == 2
    assert plan_pool(100, num_workers=6, memory_per_worker="300MiB", machine=m).num_workers == 6
    # A bound of clients comes first: 6 workers for 2 clients is 2 workers, which fit.
    assert plan_pool(2, num_workers=6, machine=m).num_workers == 2


def test_oversubscribe_plans_beyond_memory_with_a_note_and_one_warning(caplog):
    m = fake_machine(cpus=8, available=2 * GiB)
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = plan_pool(100, num_workers=6, oversubscribe=True, machine=m)
        again = plan_pool(100, num_workers=6, oversubscribe=True, machine=m)
    assert plan.num_workers == again.num_workers == 6 and len(plan.slots) == 6
    assert any("oversubscribe=True" in n and "memory bound (2)" in n for n in plan.notes)
    warnings = [r.getMessage() for r in caplog.records if "memory allows only 2" in r.getMessage()]
    assert len(warnings) == 1  # a factory re-plans on every call: said once


def test_memory_per_worker_above_available_memory_is_refused():
    m = fake_machine(cpus=8, available=2 * GiB)
    with pytest.raises(ValueError, match=r"memory_per_worker='4GiB' \(4.0 GiB\) is more than the 2.0 GiB") as exc:
        plan_pool(10, memory_per_worker="4GiB", machine=m)
    assert "oversubscribe=True" in str(exc.value) and "at most 2.0 GiB" in str(exc.value)
    plan = plan_pool(10, memory_per_worker="4GiB", oversubscribe=True, machine=m)
    assert plan.num_workers == 1


def test_cpu_oversubscription_stays_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = plan_pool(100, num_workers=5, machine=fake_machine(cpus=2))
    assert plan.num_workers == 5
    assert any("share CPUs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_oversubscribe_must_be_a_bool(bad):
    with pytest.raises(ValueError, match=f"oversubscribe={bad!r} is invalid"):
        plan_pool(10, oversubscribe=bad, machine=fake_machine())


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _beyond_this_machine() -> int:
    """A worker count well beyond what this machine's available memory holds."""
    return 2 * (detect_machine().available_memory // DEFAULT_MEMORY_PER_WORKER) + 10


def test_factories_refuse_num_workers_beyond_memory_before_any_process_starts():
    before = _children()
    n = _beyond_this_machine()
    with pytest.raises(ValueError, match=rf"num_workers={n} is more than this machine's memory holds") as exc:
        mpx.mp_executor_factory(num_workers=n)
    assert "oversubscribe=True" in str(exc.value)
    assert _children() == before
    # Deliberately: the factory is made (its pool starts on the first call only).
    with mpx.mp_executor_factory(num_workers=n, oversubscribe=True) as factory:
        assert factory.plan(1).num_workers == n
    assert _children() == before


def test_a_running_pool_counts_its_own_workers_memory_when_re_planned(monkeypatch):
    # A pool at its memory bound holds memory once it runs, which the next machine
    # reading no longer sees as available: its own workers must not make it refuse itself.
    import mp_executors.factories.mp as mp_factory

    real = detect_machine()
    readings = {"available": 2 * GiB}  # memory for exactly 2 workers of 1 GiB, when the pool starts

    def reading() -> Machine:
        return Machine(usable_cpus=real.usable_cpus, logical_cpus=real.logical_cpus,
                       physical_cores=real.physical_cores, total_memory=64 * GiB,
                       available_memory=readings["available"])

    monkeypatch.setattr(mp_factory, "detect_machine", reading)
    f32 = mpx.TensorType("float32")

    @mpx.federated_computation(mpx.FederatedType(f32, mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(xs)

    with mpx.mp_executor_factory(num_workers=2, memory_per_worker="1GiB") as factory:
        factory.MACHINE_READING_SECONDS = 0.0  # read the machine at every call
        with mpx.execution_context(factory):
            assert total([1.0, 2.0, 3.0]) == 6.0
            pids = factory.pool.pids()
            assert len(pids) == 2
            # What a reading now sees: the workers' memory is no longer available.
            held = sum(psutil.Process(pid).memory_info().rss for pid in pids)
            readings["available"] = 2 * GiB - held
            assert factory.plan(3).num_workers == 2
            assert total([1.0, 2.0, 3.0, 4.0]) == 10.0
            assert sorted(factory.pool.pids()) == sorted(pids)  # the same workers served it
    # Without a running pool of its own, the bound is what the reading says: 3 workers are refused.
    readings["available"] = 2 * GiB
    with pytest.raises(ValueError, match="at most 2 workers"):
        mpx.mp_executor_factory(num_workers=3, memory_per_worker="1GiB")


@pytest.mark.parametrize("command", ["run", "info"])
def test_cli_refuses_workers_beyond_memory_in_one_line(command, tmp_path, capsys):
    before = _children()
    n = _beyond_this_machine()
    extra = ["--rounds", "1", "--clients", "4", "--no-plots", "--out", str(tmp_path / "o")] if command == "run" else []
    assert cli.main([command, "--workers", str(n), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--workers={n} is more than this machine's memory holds" in err
    assert "--oversubscribe" in err and "--memory-per-worker" in err and "Traceback" not in err
    assert _children() == before
    assert not (tmp_path / "o").exists()


def test_info_oversubscribe_prints_the_plan(capsys):
    n = _beyond_this_machine()
    assert cli.main(["info", "--clients", str(n), "--workers", str(n), "--oversubscribe", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_workers"] == n and any("oversubscribe=True" in note for note in plan["notes"])
