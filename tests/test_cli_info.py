"""Tests for the `mp-executors info` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mp_executors import cli
from mp_executors.machine import detect_machine

REPO = Path(__file__).resolve().parents[1]


def test_info_in_process(capsys):
    assert cli.main(["info", "--clients", "1000"]) == 0
    out, err = capsys.readouterr()
    assert "Machine" in out
    assert "CPUs:" in out and "memory:" in out and "GPUs:" in out
    assert "Worker pool plan" in out and "1000 clients" in out
    assert "<- binding" in out
    for bound in ("clients", "cpu", "memory"):
        assert bound in out
    assert "slots:" in out
    assert "Traceback" not in err


def test_info_overrides_reach_the_plan(capsys):
    assert (
        cli.main(
            [
                "info",
                "--clients",
                "5",
                "--workers",
                "3",
                "--devices",
                "cpu",
                "--memory-per-worker",
                "512MiB",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_workers"] == 3
    assert plan["device_kind"] == "cpu"
    assert plan["memory_per_worker"] == 512 * 2**20
    assert plan["num_clients"] == 5
    assert len(plan["slots"]) == 3
    assert all(s["gpu"] is None for s in plan["slots"])


def test_info_json_respects_bounds(capsys):
    assert cli.main(["info", "--clients", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_workers"] == 1
    assert plan["binding"] == "clients"


def _cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    """`python -m mp_executors.cli ARGS` in a fresh interpreter, from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "mp_executors.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )


def test_info_as_a_module_subprocess():
    proc = _cli_subprocess("info", "--clients", "10")
    assert proc.returncode == 0, proc.stderr
    assert "Worker pool plan" in proc.stdout
    assert "10 clients" in proc.stdout
    assert "Traceback" not in proc.stderr


def _no_gpu_devices_args() -> list[str]:
    # '--devices gpu' is only an error on a machine without GPUs.
    return (
        ["info", "--devices", "gpu"] if not detect_machine().gpus else ["info", "--devices", "999"]
    )


@pytest.mark.parametrize(
    "argv, mentions",
    [
        (["info", "--clients", "0"], "--clients"),
        (["info", "--clients", "-3"], "--clients"),
        (["info", "--clients", "many"], "--clients"),
        (["info", "--workers", "0"], "--workers"),
        (["info", "--workers", "-1"], "--workers"),
        (["info", "--workers", "1.5"], "--workers"),
        (["info", "--threads-per-worker", "0"], "--threads-per-worker"),
        (["info", "--threads-per-worker", "100000"], "--threads-per-worker"),
        (["info", "--workers-per-gpu", "0"], "--workers-per-gpu"),
        (["info", "--devices", "tpu"], "--devices"),
        (["info", "--devices", "999"], "999"),
        (None, "--devices"),  # --devices gpu without GPUs (or an unknown GPU id)
        (["info", "--memory-per-worker", "lots"], "--memory-per-worker"),
        (["info", "--memory-per-worker", "0"], "--memory-per-worker"),
        (["info", "--no-such-flag"], "--no-such-flag"),
        (["bogus"], "bogus"),
        ([], "COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, mentions, capsys):
    if argv is None:
        argv = _no_gpu_devices_args()
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert mentions in lines[0]
    assert "Traceback" not in err


def test_bad_arguments_subprocess_exit_2():
    proc = _cli_subprocess("info", "--workers", "0")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--workers" in proc.stderr and "Traceback" not in proc.stderr


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "info" in capsys.readouterr().out
    assert cli.main(["info", "--help"]) == 0
    assert "--memory-per-worker" in capsys.readouterr().out


def test_subcommands_are_pluggable(monkeypatch, capsys):
    # How `run` / `bench` will be added: one entry in SUBCOMMANDS.
    def add(p):
        p.add_argument("--n", type=int, default=1)

    def handler(args):
        print(f"echo {args.n}")
        return 7

    monkeypatch.setitem(cli.SUBCOMMANDS, "echo", cli.Subcommand("test command", add, handler))
    assert cli.main(["echo", "--n", "4"]) == 7
    assert capsys.readouterr().out == "echo 4\n"
