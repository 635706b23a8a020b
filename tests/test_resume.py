"""Checkpoints of the main job: Ctrl-C (a real SIGINT to a real `mp-executors run` process), resume
(on local, 1 and 2 workers), bitwise the same as an uninterrupted run; a finished run extended with
a larger --rounds is bitwise the longer run; corrupt or mismatched checkpoints are refused."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mp_executors import cli
from mp_executors.simulation import checkpoint

ROUNDS = 80
# Small and fast (local: ~20-40 ms a round), long enough to be interrupted in the middle.
JOB = ["--rounds", str(ROUNDS), "--clients", "24", "--clients-per-round", "8", "--max-examples", "40",
       "--local-steps", "3", "--no-plots"]
RUNTIME_KEYS = {"timing", "runtime", "interrupted_after_round"}


def deterministic_part(out) -> dict:
    doc = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in doc.items() if k not in RUNTIME_KEYS}


def csv_without_timings(out) -> list[list[str]]:
    """metrics.csv without its two timing columns (train_s, eval_s: seconds differ run to run)."""
    rows = list(csv.reader((out / "metrics.csv").read_text().splitlines()))
    assert rows[0][-2:] == ["train_s", "eval_s"]
    return [row[:-2] for row in rows]


def assert_bitwise_equal_runs(a, b) -> None:
    """The two output folders hold the same model (bit for bit), metrics.json numbers and metrics.csv."""
    assert deterministic_part(a) == deterministic_part(b)
    assert csv_without_timings(a) == csv_without_timings(b)
    wa, wb = np.load(a / "model.npz"), np.load(b / "model.npz")
    assert set(wa.files) == set(wb.files) and all(np.array_equal(wa[k], wb[k]) for k in wa.files)


def interrupt_after(out, round_number: int, *extra: str, job=JOB, rounds=ROUNDS) -> tuple[int, str, str]:
    """Starts the job in a subprocess, sends SIGINT once it printed `round_number`; (rc, stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mp_executors.cli", "run", *job, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"round {round_number:>{len(str(rounds))}d}/"):
                proc.send_signal(signal.SIGINT)
                break
        out_rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + out_rest, err


# The second case also checkpoints a server optimizer's state (Adam's m, v) and DP's adaptive clip.
DP_ADAM = ["--server-optimizer", "adam", "--server-lr", "0.05", "--clip", "0.5", "--noise-multiplier", "0.3",
           "--adaptive-clip"]


# 2 workers: fewer rounds (a pool's rounds are slower than local ones; SIGINT after 5 of 16 still
# lands mid-run), resumed and compared on 2 workers, with FedAvgM's momentum in the state.
MP2_ROUNDS = 16
MP2_JOB = ["--rounds", str(MP2_ROUNDS), *JOB[2:]]
MP2 = ["--executor", "mp", "--workers", "2"]
LOCAL = ["--executor", "local"]


@pytest.mark.parametrize("job, executor, training, resume_on", [
    (JOB, LOCAL, [], LOCAL),
    (JOB, ["--executor", "mp", "--workers", "1"], DP_ADAM, LOCAL),
    (MP2_JOB, MP2, ["--server-optimizer", "sgdm"], MP2),
], ids=["local", "mp-1-adam-dp-resumed-on-local", "mp-2-sgdm"])
def test_interrupted_and_resumed_run_is_bitwise_an_uninterrupted_one(tmp_path, capsys, job, executor, training,
                                                                     resume_on):
    rounds = int(job[job.index("--rounds") + 1])
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt_after(out, 5, *executor, *training, job=job, rounds=rounds)
    assert rc == 130, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted after round ") and f"resume with: mp-executors run --resume {out}" in last
    done = int(last.split("interrupted after round ")[1].split("/")[0])
    assert 5 <= done < rounds
    # The finished rounds' outputs are there, and the checkpoint of the last of them.
    partial = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in partial["metrics"]["rounds"]] == list(range(1, done + 1))
    assert checkpoint.load(out).round == done
    assert (out / "model.npz").exists() and (out / "metrics.csv").exists()

    # Resume (runtime flags may change: the mp-1 run resumes in-process) ...
    assert cli.main(["run", "--resume", str(out), *resume_on]) == 0
    # ... and compare with a run that was never interrupted.
    ref = tmp_path / "ref"
    assert cli.main(["run", *job, *training, "--out", str(ref), *resume_on]) == 0
    capsys.readouterr()
    assert_bitwise_equal_runs(out, ref)
    assert checkpoint.load(out).round == rounds
    if training == DP_ADAM:
        assert set(checkpoint.load(out).state["optimizer"]) == {"step", "m", "v"}
        assert "clip" in checkpoint.load(out).state["aggregator"]
        assert deterministic_part(out)["metrics"]["rounds"][-1]["clip"] != 0.5  # adapted
    elif training:
        assert set(checkpoint.load(out).state["optimizer"]) == {"step", "momentum"}
    # A finished run has nothing to resume (unless given more rounds).
    assert cli.main(["run", "--resume", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"already finished its {rounds} rounds" in err and f"--rounds {2 * rounds}" in err


# Evaluated every 4 rounds and after the last: the 6-round run evaluates round 6 for being the
# last, the 9-round run does not.
EXTEND_JOB = ["--clients", "12", "--clients-per-round", "5", "--max-examples", "30", "--local-steps", "2",
              "--eval-every", "4", "--executor", "local", "--no-plots", *DP_ADAM]


def test_a_finished_run_extended_with_more_rounds_is_bitwise_the_longer_run(tmp_path, capsys):
    out, ref = tmp_path / "run", tmp_path / "ref"
    assert cli.main(["run", *EXTEND_JOB, "-q", "--rounds", "6", "--out", str(out)]) == 0
    assert "test_accuracy" in deterministic_part(out)["metrics"]["rounds"][5]
    capsys.readouterr()
    # Fewer rounds than the checkpoint holds: refused, saying how to continue.
    assert cli.main(["run", "--resume", str(out), "--rounds", "4"]) == 2
    err = _one_line_error(capsys)
    assert "--rounds 4" in err and "already holds 6 rounds" in err and "--rounds 12" in err
    # The other flags that decide the numbers still must match.
    assert cli.main(["run", "--resume", str(out), "--rounds", "9", "--seed", "3"]) == 2
    assert "made with --seed 0" in _one_line_error(capsys)

    assert cli.main(["run", "--resume", str(out), "--rounds", "9", "--no-plots"]) == 0
    assert "resuming after round 6 (a run of 6 rounds, now 9)" in capsys.readouterr().out
    ckpt = checkpoint.load(out)
    assert ckpt.round == 9 and ckpt.meta["args"]["rounds"] == 9 and ckpt.meta["config"]["fedavg"]["rounds"] == 9
    assert cli.main(["run", *EXTEND_JOB, "-q", "--rounds", "9", "--out", str(ref)]) == 0
    capsys.readouterr()
    assert_bitwise_equal_runs(out, ref)
    evaluated = [("test_accuracy" in r) for r in deterministic_part(out)["metrics"]["rounds"]]
    assert evaluated == [False, False, False, True, False, False, False, True, True]


@pytest.fixture
def short_run(tmp_path, capsys):
    out = tmp_path / "short"
    assert cli.main(["run", "--rounds", "2", "--clients", "8", "--max-examples", "30", "--executor", "local",
                     "--no-plots", "-q", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _rewrite_meta(out, **changes):
    path = checkpoint.path_in(out)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in changes.items():
        node = meta
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_checkpoint_is_written_atomically_and_verified(short_run):
    ckpt = checkpoint.load(short_run)
    assert ckpt.round == 2 and set(ckpt.state) == {"model", "optimizer", "round"}
    assert int(ckpt.state["round"]) == 2
    assert not (short_run / "checkpoint.npz.tmp").exists()
    assert ckpt.meta["args"]["rounds"] == 2 and len(ckpt.meta["result"]["rounds"]) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is corrupt"),
    (lambda p: p.write_text("garbage"), "is corrupt"),
    (lambda p: p.unlink(), "there is no checkpoint.npz"),
])
def test_corrupt_checkpoint_is_refused(short_run, capsys, damage, message):
    _rewrite_meta(short_run, round=1)  # make it resumable first (as if 1 of 2 rounds were done) ...
    damage(checkpoint.path_in(short_run))  # ... then damage it
    assert cli.main(["run", "--resume", str(short_run)]) == 2
    assert message in _one_line_error(capsys)


def test_checkpoint_whose_weights_were_changed_is_refused(short_run, capsys):
    path = checkpoint.path_in(short_run)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = 'state/["model", "w"]'
    arrays[key] = arrays[key] + 1.0  # the digest no longer matches
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert cli.main(["run", "--resume", str(short_run)]) == 2
    assert "does not match the digest" in _one_line_error(capsys)


def test_mismatched_checkpoint_is_refused(short_run, capsys):
    # Flags that change the numbers must match the checkpoint's (or be left out) ...
    assert cli.main(["run", "--resume", str(short_run), "--lr", "0.05"]) == 2
    err = _one_line_error(capsys)
    assert "made with --lr 0.2" in err and "asks for 0.05" in err
    # ... a checkpoint whose recorded configuration does not fit what its flags build is refused ...
    _rewrite_meta(short_run, **{"config.fedavg.learning_rate": 0.5, "round": 1})
    assert cli.main(["run", "--resume", str(short_run)]) == 2
    assert "does not match this run's configuration (differs in: fedavg.learning_rate" in _one_line_error(capsys)
    # ... and one that is not a checkpoint at all.
    with zipfile.ZipFile(checkpoint.path_in(short_run), "w") as z:
        z.writestr("x.npy", b"")
    assert cli.main(["run", "--resume", str(short_run)]) == 2
    assert "is not a checkpoint" in _one_line_error(capsys)


def test_resume_of_a_folder_without_checkpoint_and_bad_flags(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such directory" in _one_line_error(capsys)
    assert cli.main(["run", "--checkpoint-every", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint-every must be at least 1" in _one_line_error(capsys)
