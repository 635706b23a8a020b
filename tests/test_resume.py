"""Checkpoints of the main job: Ctrl-C (a real SIGINT to a real `mp-executors run` process), resume,
bitwise the same as an uninterrupted run; corrupt or mismatched checkpoints are refused."""

from __future__ import annotations

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


def interrupt_after(out, round_number: int, *extra: str) -> tuple[int, str, str]:
    """Starts the job in a subprocess, sends SIGINT once it printed `round_number`; (rc, stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mp_executors.cli", "run", *JOB, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"round {round_number:>{len(str(ROUNDS))}d}/"):
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


@pytest.mark.parametrize("executor, training", [
    (["--executor", "local"], []),
    (["--executor", "mp", "--workers", "1"], DP_ADAM),
], ids=["local", "mp-1-adam-dp"])
def test_interrupted_and_resumed_run_is_bitwise_an_uninterrupted_one(tmp_path, capsys, executor, training):
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt_after(out, 5, *executor, *training)
    assert rc == 130, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted after round ") and f"resume with: mp-executors run --resume {out}" in last
    done = int(last.split("interrupted after round ")[1].split("/")[0])
    assert 5 <= done < ROUNDS
    # The finished rounds' outputs are there, and the checkpoint of the last of them.
    partial = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in partial["metrics"]["rounds"]] == list(range(1, done + 1))
    assert checkpoint.load(out).round == done
    assert (out / "model.npz").exists() and (out / "metrics.csv").exists()

    # Resume (here on the in-process runtime: runtime flags may change) ...
    assert cli.main(["run", "--resume", str(out), "--executor", "local"]) == 0
    # ... and compare with a run that was never interrupted.
    ref = tmp_path / "ref"
    assert cli.main(["run", *JOB, *training, "--out", str(ref), "--executor", "local"]) == 0
    capsys.readouterr()
    assert deterministic_part(out) == deterministic_part(ref)
    a, b = np.load(out / "model.npz"), np.load(ref / "model.npz")
    assert set(a.files) == set(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert checkpoint.load(out).round == ROUNDS
    if training:
        assert set(checkpoint.load(out).state["optimizer"]) == {"step", "m", "v"}
        assert "clip" in checkpoint.load(out).state["aggregator"]
        assert deterministic_part(out)["metrics"]["rounds"][-1]["clip"] != 0.5  # adapted
    # A finished run has nothing to resume.
    assert cli.main(["run", "--resume", str(out)]) == 2
    assert "already finished" in capsys.readouterr().err


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
