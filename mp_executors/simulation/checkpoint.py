"""Checkpoints of the main job: what `mp-executors run --resume DIR` continues from.

One file, ``DIR/checkpoint.npz``, written after every `--checkpoint-every` rounds (and after the
initial evaluation, round 0) atomically: the new checkpoint is written to
``checkpoint.npz.tmp``, flushed to disk, then renamed over the old one (`os.replace`), so a
crash or Ctrl-C at any moment leaves either the previous checkpoint or the new one, never half
of one. It holds

- ``state/<path>``: the training state's arrays (the model's weights, the server optimizer's
  state, the round, the DP clip ...), a nested dict flattened, <path> its keys as a JSON list;
- ``meta``: one JSON string: the format version, the round reached and the total, the flags
  that decide the numbers (``args``) and the resulting ``config`` (`program.config_dict`), the
  metrics so far (round 0 and one record per finished round), the DP accountant's state (if
  any), and the sha256 of the state's bytes.

The client-sampling schedule is a pure function of (seed, round), and so are all of the
program's random numbers (drawn from RNGs keyed by the seed and the round, never from a
stateful generator), so the round reached IS the random state. Loading
verifies the file (a zip with both parts, the right version, the digest of the state) and
refuses anything else with a `CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.npz"
FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from: missing, corrupt, or made by another run."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state's arrays and the metadata (see the module docstring)."""

    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.meta["round"])


def flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """{"a": {"b/c": x}} -> {'["a", "b/c"]': x}: keys are JSON paths (weight names may hold "/")."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[json.dumps(list(path))] = np.asarray(value)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = json.loads(key)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def state_digest(flat: dict[str, np.ndarray]) -> str:
    """sha256 over the state's names, dtypes, shapes and bytes (in sorted name order)."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def path_in(out_dir: Path) -> Path:
    return Path(out_dir) / FILENAME


def save(out_dir: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Writes DIR/checkpoint.npz atomically (write to .tmp, fsync, rename); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = flatten(state)
    meta = {**meta, "format": FORMAT, "state_sha256": state_digest(flat)}
    arrays = {f"state/{k}": v for k, v in flat.items()}
    arrays["meta"] = np.array(json.dumps(meta))
    final = path_in(out_dir)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def load(out_dir: Path) -> Checkpoint:
    """The checkpoint in `out_dir`; CheckpointError (saying what is wrong) if it cannot be used."""
    path = path_in(out_dir)
    if not Path(out_dir).is_dir():
        raise CheckpointError(f"--resume {out_dir}: no such directory (give the output folder of an earlier run).")
    if not path.is_file():
        raise CheckpointError(f"--resume {out_dir}: there is no {FILENAME} in it: nothing to resume (it is written "
                              "after the first evaluation; was the run started with this folder as --out?).")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if "meta" not in files:
                raise CheckpointError(f"{path} is not a checkpoint of mp-executors run (no metadata); "
                                      "it cannot be resumed.")
            meta = json.loads(str(z["meta"]))
            flat = {k[len("state/"):]: z[k] for k in files if k.startswith("state/")}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated/garbled zip raises many kinds of errors
        raise CheckpointError(f"{path} is corrupt and cannot be resumed ({type(e).__name__}: {e}); "
                              "start the run again, or restore the file.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has checkpoint format {got!r}; this version of mp-executors reads "
                              f"format {FORMAT}.")
    if state_digest(flat) != meta.get("state_sha256"):
        raise CheckpointError(f"{path} is corrupt: its model/optimizer state does not match the digest written "
                              "with it; start the run again, or restore the file.")
    return Checkpoint(unflatten(flat), meta)
