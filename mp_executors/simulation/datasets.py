"""Federated datasets for the simulation: what each client holds, built inside the workers.

A dataset is described by a small, hashable `DatasetSpec`; `client_data(spec, ids)` wraps it
in an `mpx.ClientData` whose builder (`make_client`, module level, so it pickles by
reference) each worker calls for its own clients. Nothing but the spec crosses a process
boundary, and generated data is memoized per process, so per-round sampling (a new
ClientData over the sampled ids) rebuilds nothing.

Every client has the same structure and shapes (the element type depends on the spec only):

    <id=int32, train=<x=float32[T,F], y=int32[T], mask=float32[T]>,
               test=<x=float32[E,F], y=int32[E], mask=float32[E]>>

Real examples come first, padding (zeros, mask 0) after. Equal shapes keep a shard's
clients on the runtime's fast path (one TensorFlow call per shard, `tf.map_fn`); ragged
clients would cost one call each (~3-5x slower). The model code honours the mask.

Datasets:

- ``synthetic``: Synthetic(alpha, beta) of FedProx (Li et al., 2020, sec. 5.1): per client,
  W ~ N(u, 1), b ~ N(u, 1) with u ~ N(0, alpha); x ~ N(v, diag(j^-1.2)) with v ~ N(B, 1),
  B ~ N(0, beta); y = argmax(softmax(W x + b)); 60 features, 10 classes. Client sizes follow
  FedProx's power law, lognormal(4, 2) + 50, **capped at `max_examples` (default 250)**: the
  tail is heavy (~25% of clients exceed 250) and one huge client would make every client pay
  for its padding. Each client is split 80/20 into train/test. Client `i` depends only on
  (seed, i, alpha, beta, max_examples), not on the number of clients.
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 64 features, 10 classes;
  ships with scikit-learn, nothing is downloaded). Partitions: ``dirichlet`` (the default;
  non-IID as in Hsu et al. 2019: for each label, its images are shared out over the clients
  in proportions drawn from Dirichlet(`dirichlet_alpha` = 0.5), seeded; every image is used
  exactly once, and a client left with fewer than 5 takes images from the largest clients;
  clients are padded to the largest one, or to `max_examples` when that is set, the surplus
  then being left out), ``shards`` (McMahan et al. 2017: sorted by label, cut into 2N equal
  shards, two per client) or ``iid``; with these two every client gets the same number of
  examples (the remainder, < 2N images, is left out). Split 80/20. Needs the `digits` extra
  (`pip install "mp_executors[digits]"`).
- ``npz``: the user's own arrays, ``x`` (one row per example; trailing dimensions are
  flattened), ``y`` (integer labels >= 0) and ``client_ids`` (which client each example
  belongs to; integers or strings). Clients are the distinct ids in sorted order; the spec
  takes the first `num_clients` of them. `open_npz` checks the file in the parent and records
  its shapes; every worker loads the file once (memoized by path and mtime) and builds its
  own clients: each client's examples shuffled (seeded), capped at `max_examples`, split
  80/20, padded to the largest (capped) client.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np

import mp_executors as mpx

DATASETS = ("synthetic", "digits")  # and a PATH.npz (name "npz"; see open_npz)
DIGITS_PARTITIONS = ("dirichlet", "shards", "iid")
SYNTHETIC_MAX_EXAMPLES = 250
#: Synthetic clients memoized per process (LRU): ~60 KB each at the default size, ~250 MB.
SYNTHETIC_CACHE_CLIENTS = 4096
#: Arrays a user's npz must hold.
NPZ_ARRAYS = ("x", "y", "client_ids")
SYNTHETIC_FEATURES, NUM_CLASSES = 60, 10
DIGITS_FEATURES, DIGITS_IMAGES = 64, 1797
TEST_FRACTION = 0.2
#: The smallest client `digits` allows: 5 examples, i.e. 4 to train on and 1 to test.
DIGITS_MIN_EXAMPLES = 5


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a federated dataset (hashable: it keys the memo caches)."""

    name: str = "synthetic"
    num_clients: int = 100
    seed: int = 0
    alpha: float = 1.0  # synthetic only
    beta: float = 1.0  # synthetic only
    # The cap on a client's size (train + test). synthetic: None means 250; digits
    # (dirichlet) and npz: None means no cap (clients are padded to the largest one).
    max_examples: int | None = None
    partition: str = "dirichlet"  # digits only
    dirichlet_alpha: float = 0.5  # digits, dirichlet partition only
    # npz only (filled in by `open_npz`): the file, its mtime (it keys the workers' memo and
    # catches a file changed mid-run), and the shapes read from it.
    path: str | None = None
    mtime_ns: int = 0
    npz_features: int = 0
    npz_classes: int = 0
    npz_size: int = 0

    def __post_init__(self) -> None:
        if self.name not in (*DATASETS, "npz"):
            raise ValueError(f"unknown dataset {self.name!r}; choose {', '.join(DATASETS)} or a PATH.npz.")
        if self.num_clients < 1:
            raise ValueError(f"the number of clients must be at least 1, got {self.num_clients}.")
        if self.name == "synthetic" and self.max_examples is None:
            object.__setattr__(self, "max_examples", SYNTHETIC_MAX_EXAMPLES)
        if self.max_examples is not None and self.max_examples < (5 if self.name == "synthetic" else 2):
            raise ValueError(f"max_examples must be at least {5 if self.name == 'synthetic' else 2} "
                             f"(examples to train on and to test), got {self.max_examples}.")
        if self.name == "synthetic" and (self.alpha < 0 or self.beta < 0):
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}.")
        if self.name == "npz" and (self.path is None or self.npz_size < 2):
            raise ValueError("an npz dataset is made by datasets.open_npz(path, ...).")
        if self.name == "digits":
            if self.partition not in DIGITS_PARTITIONS:
                raise ValueError(f"unknown digits partition {self.partition!r}; choose {', '.join(DIGITS_PARTITIONS)}.")
            if not self.dirichlet_alpha > 0:
                raise ValueError(f"the Dirichlet concentration must be > 0, got {self.dirichlet_alpha}.")
            if DIGITS_IMAGES // self.num_clients < DIGITS_MIN_EXAMPLES or self.partition == "shards" and (
                2 * (DIGITS_IMAGES // (2 * self.num_clients)) < DIGITS_MIN_EXAMPLES
            ):
                raise ValueError(
                    f"digits has {DIGITS_IMAGES} images: at most {max_digits_clients(self.partition)} clients "
                    f"with the {self.partition!r} partition ({DIGITS_MIN_EXAMPLES}+ examples each), got "
                    f"{self.num_clients}; use --dataset synthetic for more clients."
                )

    @property
    def num_features(self) -> int:
        if self.name == "npz":
            return self.npz_features
        return SYNTHETIC_FEATURES if self.name == "synthetic" else DIGITS_FEATURES

    @property
    def num_classes(self) -> int:
        return self.npz_classes if self.name == "npz" else NUM_CLASSES

    @property
    def client_size(self) -> int:
        """Every client's padded size, train + test."""
        if self.name == "synthetic":
            return self.max_examples
        if self.name == "npz":
            return self.npz_size
        return _digits_client_size(self)

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(train, test) padded sizes: the same for every client."""
        total = self.client_size
        test = max(1, int(round(total * TEST_FRACTION)))
        return total - test, test

    def describe(self) -> str:
        train, test = self.split_sizes
        if self.name == "synthetic":
            return (f"synthetic({self.alpha:g},{self.beta:g}) of FedProx, {self.num_clients} clients, "
                    f"sizes capped at {self.max_examples} ({train} train + {test} test), seed {self.seed}")
        if self.name == "npz":
            return (f"{self.path}: {self.num_clients} clients, {self.num_features} features, {self.num_classes} "
                    f"classes, padded to {train} train + {test} test, seed {self.seed}")
        part = self.partition + (f"({self.dirichlet_alpha:g})" if self.partition == "dirichlet" else "")
        sizes = "padded to " if self.partition == "dirichlet" else ""
        return (f"sklearn digits, {part} partition, {self.num_clients} clients x "
                f"({sizes}{train} train + {test} test), seed {self.seed}")


def max_digits_clients(partition: str) -> int:
    if partition == "shards":
        return DIGITS_IMAGES // (2 * math.ceil(DIGITS_MIN_EXAMPLES / 2))
    return DIGITS_IMAGES // DIGITS_MIN_EXAMPLES


def split_type(size: int, features: int) -> mpx.StructType:
    return mpx.StructType([
        ("x", mpx.TensorType(np.float32, (size, features))),
        ("y", mpx.TensorType(np.int32, (size,))),
        ("mask", mpx.TensorType(np.float32, (size,))),
    ])


def element_type(spec: DatasetSpec) -> mpx.StructType:
    """One client's type; it depends on the spec only (no data is generated)."""
    train, test = spec.split_sizes
    return mpx.StructType([
        ("id", mpx.TensorType(np.int32, ())),
        ("train", split_type(train, spec.num_features)),
        ("test", split_type(test, spec.num_features)),
    ])


def make_client(spec: DatasetSpec, client_id: int) -> dict:
    """Client `client_id`'s data (memoized per process; arrays are shared, treat as read-only)."""
    if not 0 <= client_id < spec.num_clients:
        raise ValueError(f"client id {client_id} out of range for {spec.num_clients} clients.")
    if spec.name == "synthetic":
        # The client does not depend on num_clients: key the cache without it.
        return _synthetic_client(spec.seed, spec.alpha, spec.beta, spec.max_examples, int(client_id))
    if spec.name == "npz":
        return _npz_client(spec, int(client_id))
    return _digits_dataset(spec)[int(client_id)]


def client_data(spec: DatasetSpec, client_ids: list[int] | None = None) -> mpx.ClientData:
    """An `mpx.ClientData` over `client_ids` (default: all clients) of `spec`."""
    ids = list(range(spec.num_clients)) if client_ids is None else [int(i) for i in client_ids]
    return mpx.ClientData(functools.partial(make_client, spec), ids, element_type(spec))


def example_counts(spec: DatasetSpec) -> np.ndarray:
    """Real (unpadded) examples per client, train + test (builds the data in this process)."""
    return np.array([int(c["train"]["mask"].sum() + c["test"]["mask"].sum())
                     for c in (make_client(spec, i) for i in range(spec.num_clients))])


# --------------------------------------------------------------------------- helpers


def _pack(client_id: int, x: np.ndarray, y: np.ndarray, train_size: int, test_size: int) -> dict:
    """Splits one client's examples 80/20 and pads each split to its fixed size."""
    n = min(len(y), train_size + test_size)  # a cap (max_examples) leaves the surplus out
    x, y = x[:n], y[:n]
    n_test = max(1, int(round(n * TEST_FRACTION)))
    n_train = n - n_test

    def padded(xs: np.ndarray, ys: np.ndarray, size: int) -> dict:
        px = np.zeros((size, x.shape[1]), np.float32)
        py = np.zeros(size, np.int32)
        mask = np.zeros(size, np.float32)
        k = len(ys)
        px[:k], py[:k], mask[:k] = xs, ys, 1.0
        for a in (px, py, mask):
            a.flags.writeable = False  # shared by every round's ClientData: never mutate
        return {"x": px, "y": py, "mask": mask}

    return {
        "id": np.int32(client_id),
        "train": padded(x[:n_train], y[:n_train], train_size),
        "test": padded(x[n_train:], y[n_train:], test_size),
    }


@functools.lru_cache(maxsize=SYNTHETIC_CACHE_CLIENTS)
def _synthetic_client(seed: int, alpha: float, beta: float, max_examples: int, client_id: int) -> dict:
    # Bounded: with a population far larger than a cohort (1,000,000 clients, 100 a round), a
    # long run samples ever new clients, and an unbounded memo would grow by a cohort every
    # round. The evaluation sample and recent cohorts stay (the runtime's ClientData cache keeps
    # references to these very arrays, not copies); an evicted client is regenerated, the same.
    rng = np.random.default_rng([seed, client_id])
    d, k = SYNTHETIC_FEATURES, NUM_CLASSES
    n = min(int(rng.lognormal(4, 2)) + 50, max_examples)
    u = rng.normal(0, alpha) if alpha > 0 else 0.0
    big_b = rng.normal(0, beta) if beta > 0 else 0.0
    v = rng.normal(big_b, 1, d)
    w = rng.normal(u, 1, (d, k))
    b = rng.normal(u, 1, k)
    # diag(j^-1.2) covariance: scale independent standard normals by the standard deviations.
    std = np.power(np.arange(1, d + 1, dtype=np.float64), -0.6)
    x = v + rng.standard_normal((n, d)) * std
    y = np.argmax(x @ w + b, axis=1)  # argmax of softmax == argmax of the logits
    spec_sizes = DatasetSpec("synthetic", 1, seed, alpha, beta, max_examples).split_sizes
    return _pack(client_id, x.astype(np.float32), y.astype(np.int32), *spec_sizes)


def _digits_client_size(spec: DatasetSpec) -> int:
    if spec.partition == "shards":
        return 2 * (DIGITS_IMAGES // (2 * spec.num_clients))
    if spec.partition == "iid":
        return DIGITS_IMAGES // spec.num_clients
    largest = max(len(p) for p in _digits_partition(spec.seed, spec.num_clients, spec.partition,
                                                     spec.dirichlet_alpha))
    return largest if spec.max_examples is None else min(largest, spec.max_examples)


@functools.lru_cache(maxsize=8)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional extra
    except ImportError as e:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'mp_executors[digits]' "
            "(or use --dataset synthetic)"
        ) from e
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                        min_size: int = DIGITS_MIN_EXAMPLES) -> list[np.ndarray]:
    """Indices of `labels` per client: each label's examples shared out in Dirichlet(alpha) proportions.

    Every example goes to exactly one client. A client left with fewer than `min_size`
    examples then takes random examples from the largest client, one at a time (this barely
    changes the skew: with 1,797 images and 100 clients it moves a few dozen).
    """
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each.")
    pieces: list[list[int]] = [[] for _ in range(num_clients)]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            pieces[client].extend(part.tolist())
    sizes = np.array([len(p) for p in pieces])
    while sizes.min() < min_size:
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        moved = pieces[large].pop(int(rng.integers(len(pieces[large]))))
        pieces[small].append(moved)
        sizes[small] += 1
        sizes[large] -= 1
    # Shuffled within the client, or its train/test split would be by label.
    return [rng.permutation(np.array(p, dtype=np.int64)) for p in pieces]


@functools.lru_cache(maxsize=8)
def _digits_partition(seed: int, num_clients: int, partition: str, dirichlet_alpha: float) -> tuple[np.ndarray, ...]:
    """Image indices per client (the order within a client is its train-then-test order)."""
    _, y = _load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    if partition == "dirichlet":
        return tuple(dirichlet_partition(y, num_clients, dirichlet_alpha, rng))
    if partition == "shards":
        # Sorted by label (stable, so ties keep the random order), cut into 2N shards,
        # shards dealt to clients in a random order: most clients see two labels.
        size = 2 * (DIGITS_IMAGES // (2 * num_clients))
        order = order[np.argsort(y[order], kind="stable")]
        shard = size // 2
        shards = rng.permutation(2 * num_clients)
        pieces = [np.concatenate([order[s * shard:(s + 1) * shard] for s in shards[2 * i:2 * i + 2]])
                  for i in range(num_clients)]
        # Shuffle within the client, or its train/test split would be by label.
        return tuple(rng.permutation(p) for p in pieces)
    size = DIGITS_IMAGES // num_clients
    return tuple(order[i * size:(i + 1) * size] for i in range(num_clients))


@functools.lru_cache(maxsize=8)
def _digits_dataset(spec: DatasetSpec) -> list[dict]:
    x, y = _load_digits()
    pieces = _digits_partition(spec.seed, spec.num_clients, spec.partition, spec.dirichlet_alpha)
    train, test = spec.split_sizes
    return [_pack(i, x[p], y[p], train, test) for i, p in enumerate(pieces)]


# --------------------------------------------------------------------------- npz


class NpzError(ValueError):
    """The user's npz file cannot be used (the message says why, in one line)."""


@dataclass(frozen=True)
class NpzData:
    x: np.ndarray  # float32 [examples, features]
    y: np.ndarray  # int32 [examples]
    client_keys: np.ndarray  # the distinct client ids, sorted
    rows: tuple[np.ndarray, ...]  # per client (in client_keys order): its row indices, in file order


def _file_mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        raise NpzError(f"{path}: no such file") from None
    except OSError as e:
        raise NpzError(f"{path}: {e.strerror or e}") from None


@functools.lru_cache(maxsize=4)
def load_npz(path: str, mtime_ns: int) -> NpzData:
    """Loads and checks a user's npz once per process (keyed by path and mtime); NpzError if unusable."""
    if _file_mtime(path) != mtime_ns:
        raise NpzError(f"{path} changed since the run started")
    if os.path.isdir(path):
        raise NpzError(f"{path} is a directory, not an npz file")
    if not zipfile.is_zipfile(path):
        raise NpzError(f"{path} is not an npz file (np.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_ARRAYS if k not in f.files]
            if missing:
                raise NpzError(f"{path} has no array {' or '.join(repr(k) for k in missing)} (it needs x, y and "
                               f"client_ids; it has {', '.join(f.files) or 'none'})")
            x, y, ids = (f[k] for k in NPZ_ARRAYS)
    except NpzError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged zip, pickled objects, ...: one line
        raise NpzError(f"{path} cannot be read as an npz: {' '.join(str(e).split()) or type(e).__name__}") from None
    n = len(y) if y.ndim else 0
    if x.ndim < 2 or y.ndim != 1 or ids.ndim != 1:
        raise NpzError(f"{path}: x must have one row per example (2 or more dimensions) and y and client_ids "
                       f"one entry per example (1 dimension); got x{list(x.shape)}, y{list(y.shape)}, "
                       f"client_ids{list(ids.shape)}")
    if not (len(x) == n == len(ids)):
        raise NpzError(f"{path}: x, y and client_ids must have the same length, got {len(x)}, {n} and {len(ids)}")
    if n == 0:
        raise NpzError(f"{path} has no examples")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise NpzError(f"{path}: x must be numbers, got dtype {x.dtype}")
    x = x.reshape(n, -1).astype(np.float32)
    if not np.isfinite(x).all():
        raise NpzError(f"{path}: x has NaN or infinite values")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        labels = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.array_equal(y, np.round(y)):
        labels = y.astype(np.int64)  # float labels with whole values (0.0, 1.0, ...) are fine
    else:
        bad = next((i for i, v in enumerate(y.tolist()) if not isinstance(v, (int, bool))
                    and not (isinstance(v, float) and float(v).is_integer())), 0)
        raise NpzError(f"{path}: labels y must be integers (class indices), got dtype {y.dtype} "
                       f"(y[{bad}] = {y[bad]!r})")
    if labels.min() < 0:
        raise NpzError(f"{path}: labels y must be >= 0 (class indices), got {labels.min()}")
    if labels.max() >= 2**31:
        raise NpzError(f"{path}: labels y must be class indices, got {labels.max()}")
    if ids.dtype.kind not in "iub" + "US":
        raise NpzError(f"{path}: client_ids must be integers or strings, got dtype {ids.dtype}")
    keys, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    rows = tuple(np.split(order, np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1]))
    for a in (x, labels):
        a.flags.writeable = False
    return NpzData(x, labels.astype(np.int32), keys, rows)


def open_npz(path: str | os.PathLike, num_clients: int | None = None, seed: int = 0,
             max_examples: int | None = None) -> DatasetSpec:
    """The DatasetSpec of a user's npz (x, y, client_ids), checked in this process.

    `num_clients` takes the first that many distinct client ids in sorted order (None: all).
    Raises NpzError (a ValueError) with a one-line message if the file cannot be used.
    """
    path = os.path.abspath(os.fspath(path))
    data = load_npz(path, _file_mtime(path))
    available = len(data.client_keys)
    if num_clients is None:
        num_clients = available
    if num_clients < 1:
        raise NpzError(f"the number of clients must be at least 1, got {num_clients}")
    if num_clients > available:
        raise NpzError(f"--clients {num_clients} is more than the {available} distinct client ids in {path}")
    if max_examples is not None and max_examples < 2:
        raise NpzError(f"max_examples must be at least 2 (1 to train, 1 to test), got {max_examples}")
    sizes = np.array([len(r) for r in data.rows[:num_clients]])
    if sizes.min() < 2:
        i = int(np.argmin(sizes))
        raise NpzError(f"{path}: client {data.client_keys[i].item()!r} has {sizes[i]} example(s); every client needs at "
                       f"least 2 (1 to train, 1 to test)")
    largest = int(sizes.max())
    size = largest if max_examples is None else min(largest, max_examples)
    return DatasetSpec("npz", num_clients, seed, max_examples=max_examples, path=path,
                       mtime_ns=_file_mtime(path), npz_features=int(data.x.shape[1]),
                       npz_classes=max(2, int(data.y.max()) + 1), npz_size=size)


@functools.lru_cache(maxsize=100_000)
def _npz_client(spec: DatasetSpec, client_id: int) -> dict:
    data = load_npz(spec.path, spec.mtime_ns)
    rows = np.random.default_rng([spec.seed, client_id]).permutation(data.rows[client_id])
    train, test = spec.split_sizes
    return _pack(client_id, data.x[rows], data.y[rows], train, test)
