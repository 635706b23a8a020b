"""The persistent cache of map plans: a vectorized plan converted once is loaded, not converted, later.

Deciding how a shard runs a computation (`vectorized_map.make_plan`: rebuild the function
library, trace, convert with pfor, check for data-dependent control flow) costs ~0.2-2.5 s
per computation, and it happens in EVERY process that runs shards (each worker of a pool,
the local factory), on the first round. Like XLA's and JAX's persistent compilation caches,
this module keeps the outcome on disk, so later processes (a rerun of the program, the
workers of the next pool) load it in ~20-50 ms instead:

    <dir>/<key>.plan    one file per plan:
                        MAGIC, sha256 of the rest, header length (u32), header (JSON: the key
                        and its components, vectorized or not, group size, reason, the run
                        function's input and output tensor names), the run function's
                        GraphDef (with its function library; empty for a loop decision)

Where: `MP_EXECUTORS_CACHE_DIR`, default `$XDG_CACHE_HOME/mp_executors/plans`
(`~/.cache/mp_executors/plans`); `off` (or `0`, `none`, `false`, `no`, empty) disables it.
Read when a `MapPlans` is created (a worker's when the worker starts: workers get the
parent's environment as it is when the pool starts them).

The key is a sha256 over everything that decides a plan: this format's version, the
TensorFlow version, the package version, a digest of the planning code (this module,
`vectorized_map`, `vectorized_random`: an edited converter in a development tree must not
load an old plan), the computation (`computation_digest`: its GraphDef with its library
functions renamed by position, so two traces of one computation match although TensorFlow
numbers their functions per process), which columns are stacked, the leaf shapes, the mode
(`MP_EXECUTORS_VECTORIZE`), GROUP_SIZE, GROUP_BUDGET and BLOCK_SIZE.

What is cached: vectorized plans (their run function), and loop decisions reached only after
trying to convert (pfor could not, data-dependent control flow, a working set over budget),
which are as costly to re-decide. Decisions that cost nothing (stateful ops, `off`) are not.

One converter per key: the workers of a pool get the same computation at the same moment;
converting it in each of them costs the machine a conversion per worker (on 2 busy cores,
measured: round 1 of the default job ~2x slower on the pool than in-process). So a process
that finds no entry takes an exclusive lock on the key (`flock` on `<dir>/locks/<key>.lock`;
the kernel releases it if the process dies) before converting, and looks again once it has
it: the first converts and stores, the others wait and load. A wait over
`LOCK_TIMEOUT_S` (a stuck converter), or a file system without locks, means converting
without the lock, as with no cache.

Robustness: a write goes to a temporary file in the same directory, then `os.replace`, so a
reader sees a whole entry or none, and concurrent writers of one key (two processes that
converted the same computation) leave one valid entry. A read checks the magic, the checksum, the
format and that the header's key is the one asked for; an entry that fails (truncated,
corrupt, unreadable, or one TensorFlow then cannot import) is ignored with a WARNING and the
plan is rebuilt and rewritten. A directory that cannot be created or written means no caching
in this process (one log line: WARNING when the directory was chosen with the variable,
DEBUG for the default). Entries are never read as pickles. Nothing evicts entries: remove the
directory to reclaim its space (a plan is ~10-500 KB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from mp_executors._tf import tf
from mp_executors.core import tensorflow_computation as tfc

try:
    import fcntl
except ImportError:  # not on Windows: conversions there are not serialized across processes
    fcntl = None

logger = logging.getLogger("mp_executors")

ENV_VAR = "MP_EXECUTORS_CACHE_DIR"
DISABLED_VALUES = ("", "0", "off", "none", "false", "no")

#: Bump when the entry layout or what a stored run function looks like changes.
FORMAT_VERSION = 1
MAGIC = b"MPXPLAN\n"
_HEADER_LEN = struct.Struct("<I")
_CHECKSUM_BYTES = 32

#: How long a process waits for another one converting the same key before converting itself.
LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.01

#: The modules whose code decides what a plan is (see the module docstring).
_PLANNING_MODULES = ("plan_cache.py", "vectorized_map.py", "vectorized_random.py")


def default_directory() -> pathlib.Path:
    """`$XDG_CACHE_HOME/mp_executors/plans`, or `~/.cache/mp_executors/plans`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mp_executors" / "plans"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached plan: the decision, and for a vectorized plan its run function in portable form.

    `graph_def` is the serialized GraphDef of the run function (`run(mapped, fixed)`: the
    stacked tensors then the shared ones, in parameter order), its library functions named
    uniquely for this entry; `input_names` / `output_names` are its flat inputs and outputs.
    """

    vectorized: bool
    group_size: int
    reason: str
    graph_def: bytes = b""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()


class PlanCache:
    """The plan cache in one directory (None: disabled); see the module docstring."""

    def __init__(self, directory: str | os.PathLike | None, *, explicit: bool = True):
        self.directory = None if directory is None else pathlib.Path(directory)
        # Whether the user chose the directory (an unwritable one is then worth a WARNING).
        self._explicit = explicit
        self._unwritable_logged = False
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> PlanCache:
        """The cache `MP_EXECUTORS_CACHE_DIR` names (the default directory when unset; None when disabled)."""
        value = os.environ.get(ENV_VAR)
        if value is None:
            return cls(default_directory(), explicit=False)
        if value.strip().lower() in DISABLED_VALUES:
            return cls(None)
        return cls(os.path.expanduser(value.strip()))

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, key: str) -> pathlib.Path:
        if self.directory is None:
            raise ValueError("the plan cache is disabled")
        return self.directory / f"{key}.plan"

    def load(self, key: str) -> Entry | None:
        """The entry stored under `key`, or None (absent, disabled, or refused with a WARNING)."""
        if self.directory is None:
            return None
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("plan cache: cannot read %s (%s); converting instead.", path, e)
            return None
        try:
            return _decode(blob, key)
        except ValueError as e:
            logger.warning("plan cache: ignoring %s (%s); converting again and replacing it.", path, e)
            return None

    def store(self, key: str, components: dict[str, Any], entry: Entry) -> bool:
        """Writes `entry` under `key` atomically; False (and no error) when the directory is unusable."""
        if self.directory is None:
            return False
        blob = _encode(key, components, entry)
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path(key))
            tmp = None
            return True
        except OSError as e:
            self._log_unwritable(e)
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
        """Holds the exclusive cross-process lock of `key` (yields True), or yields False without one.

        Without one: the cache is disabled, the platform or file system has no `flock`,
        the directory is unusable, or another process held the lock for over `timeout` s.
        """
        if self.directory is None or fcntl is None:
            yield False
            return
        try:
            locks = self.directory / "locks"
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._log_unwritable(e)
            yield False
            return
        try:
            yield self._acquire(fd, key, timeout)
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _acquire(fd: int, key: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning("plan cache: another process has been converting plan %s for over %.0f s; "
                                   "converting it here too.", key[:16], timeout)
                    return False
                time.sleep(_LOCK_POLL_S)
            except OSError:  # a file system without locks
                return False

    def _log_unwritable(self, error: OSError) -> None:
        with self._lock:
            if self._unwritable_logged:
                return
            self._unwritable_logged = True
        level = logging.WARNING if self._explicit else logging.DEBUG
        logger.log(level, "plan cache: cannot write to %s (%s); plans are not cached in this process (set %s to a "
                   "writable directory, or to 'off').", self.directory, error, ENV_VAR)


def _encode(key: str, components: dict[str, Any], entry: Entry) -> bytes:
    header = json.dumps({
        "format": FORMAT_VERSION, "key": key, "components": components, "vectorized": entry.vectorized,
        "group_size": entry.group_size, "reason": entry.reason, "input_names": list(entry.input_names),
        "output_names": list(entry.output_names),
    }, sort_keys=True).encode()
    body = _HEADER_LEN.pack(len(header)) + header + entry.graph_def
    return MAGIC + hashlib.sha256(body).digest() + body


def _decode(blob: bytes, key: str) -> Entry:
    """The entry in `blob`; ValueError saying what is wrong with it."""
    start = len(MAGIC) + _CHECKSUM_BYTES
    if not blob.startswith(MAGIC):
        raise ValueError("not a plan file (bad magic)")
    body = blob[start:]
    if len(blob) < start + _HEADER_LEN.size or hashlib.sha256(body).digest() != blob[len(MAGIC):start]:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    (n,) = _HEADER_LEN.unpack_from(body)
    try:
        header = json.loads(body[_HEADER_LEN.size:_HEADER_LEN.size + n])
        if header["format"] != FORMAT_VERSION:
            raise ValueError(f"format {header['format']}, expected {FORMAT_VERSION}")
        if header["key"] != key:
            raise ValueError("written for another key")
        entry = Entry(bool(header["vectorized"]), int(header["group_size"]), str(header["reason"]),
                      body[_HEADER_LEN.size + n:], tuple(header["input_names"]), tuple(header["output_names"]))
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable header ({type(e).__name__}: {e})") from None
    if entry.vectorized and not (entry.graph_def and entry.input_names and entry.output_names):
        raise ValueError("a vectorized entry without its run function")
    return entry


# --------------------------------------------------------------------------- keys

_versions: dict[str, str] = {}


def _environment_versions() -> dict[str, str]:
    """TensorFlow's and this package's versions, and a digest of the planning code (once per process)."""
    if not _versions:
        try:
            package = importlib.metadata.version("mp_executors")
        except importlib.metadata.PackageNotFoundError:
            package = "unknown"
        code = hashlib.sha256()
        here = pathlib.Path(__file__).resolve().parent
        for name in _PLANNING_MODULES:
            code.update(name.encode() + b"\0" + (here / name).read_bytes())
        _versions.update(tensorflow=f"{tf.__version__} ({tf.version.GIT_VERSION})", package=package,
                         code=code.hexdigest())
    return _versions


def key_components(computation: str, mask: tuple[bool, ...], shapes: tuple, mode: str,
                   group_size: int, group_budget: int, block_size: int) -> dict[str, Any]:
    """Everything that decides a plan, as a JSON-able dict (stored in the entry's header, for inspection)."""
    return {"format": FORMAT_VERSION, **_environment_versions(), "computation": computation,
            "mask": [bool(m) for m in mask], "shapes": [[-1 if d is None else int(d) for d in s] for s in shapes],
            "mode": mode, "group_size": int(group_size), "group_budget": int(group_budget),
            "block_size": int(block_size)}


def cache_key(components: dict[str, Any]) -> str:
    """The hex sha256 of `components` (a file name)."""
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


_digests: dict[str, str] = {}
_digests_lock = threading.Lock()


def computation_digest(function: Any) -> str:
    """A digest of a `TensorFlowFunction` that does not depend on how TensorFlow named its functions.

    TensorFlow names a traced graph's library functions with a per-process counter
    (`while_body_155` in one trace, `while_body_4124` in the next trace of the same
    function) and lists them in no fixed order, so `function.digest` differs between two
    traces of one computation made after different amounts of earlier tracing. Here the
    library is put in the order the graph first refers to its functions (walking the
    nodes, and each function's nodes when first met), and each function's name is replaced,
    everywhere in the GraphDef's text form, by its position in that order (a consistent
    renaming, so the meaning is kept); the inputs, outputs and type are hashed as in
    `function.digest`. Cached per `function.digest`.
    """
    digest = _digests.get(function.digest)
    if digest is not None:
        return digest
    graph_def = tf.compat.v1.GraphDef.FromString(function.graph_def)
    names = _library_in_reference_order(graph_def)
    canonical = tf.compat.v1.GraphDef()
    canonical.CopyFrom(graph_def)
    by_name = {f.signature.name: f for f in graph_def.library.function}
    del canonical.library.function[:]
    canonical.library.function.extend(by_name[n] for n in names)
    text = str(canonical)
    if names:
        position = {name: i for i, name in enumerate(names)}
        # Longest first so that `f_1` never matches inside `f_12`; `(?!\d)` keeps `f_1`
        # from matching `f_12` when only `f_1` is a function.
        pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r"(?!\d)")
        text = pattern.sub(lambda m: f"__library_function_{position[m.group(0)]}__", text)
    h = hashlib.sha256(text.encode())
    h.update(repr((function.input_names, function.output_names, str(function.type_signature))).encode())
    digest = h.hexdigest()
    with _digests_lock:
        _digests[function.digest] = digest
    return digest


def _library_in_reference_order(graph_def) -> list[str]:
    """The library's function names in the order the graph first refers to them (then any unreferenced, by name)."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    order: list[str] = []
    seen: set[str] = set()

    def visit(nodes) -> None:  # depth-first; libraries nest a few levels, not hundreds
        for node in nodes:
            for ref in tfc.function_refs(node):
                if ref in functions and ref not in seen:
                    seen.add(ref)
                    order.append(ref)
                    visit(functions[ref].node_def)

    visit(graph_def.node)
    order.extend(sorted(set(functions) - seen))
    return order
