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
  ships with scikit-learn, nothing is downloaded). Partitions: ``shards`` (non-IID, as in
  McMahan et al. 2017: sorted by label, cut into 2N equal shards, two per client) or
  ``iid``. Every client gets the same number of examples (the remainder, < 2N images, is
  left out), split 80/20. Needs the `digits` extra (`pip install "mp_executors[digits]"`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

import mp_executors as mpx

DATASETS = ("synthetic", "digits")
DIGITS_PARTITIONS = ("shards", "iid")
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
    max_examples: int = 250  # synthetic only: the cap on a client's size (train + test)
    partition: str = "shards"  # digits only

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}.")
        if self.num_clients < 1:
            raise ValueError(f"the number of clients must be at least 1, got {self.num_clients}.")
        if self.name == "synthetic" and self.max_examples < 5:
            raise ValueError(f"max_examples must be at least 5 (4 to train, 1 to test), got {self.max_examples}.")
        if self.name == "synthetic" and (self.alpha < 0 or self.beta < 0):
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}.")
        if self.name == "digits":
            if self.partition not in DIGITS_PARTITIONS:
                raise ValueError(f"unknown digits partition {self.partition!r}; choose {' or '.join(DIGITS_PARTITIONS)}.")
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
        return SYNTHETIC_FEATURES if self.name == "synthetic" else DIGITS_FEATURES

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(train, test) padded sizes: the same for every client."""
        total = self.max_examples if self.name == "synthetic" else _digits_client_size(self)
        test = max(1, int(round(total * TEST_FRACTION)))
        return total - test, test

    def describe(self) -> str:
        if self.name == "synthetic":
            train, test = self.split_sizes
            return (f"synthetic({self.alpha:g},{self.beta:g}) of FedProx, {self.num_clients} clients, "
                    f"sizes capped at {self.max_examples} ({train} train + {test} test), seed {self.seed}")
        train, test = self.split_sizes
        return (f"sklearn digits, {self.partition} partition, {self.num_clients} clients x "
                f"({train} train + {test} test), seed {self.seed}")


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
    return _digits_dataset(spec.seed, spec.num_clients, spec.partition)[int(client_id)]


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
    n = len(y)
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


@functools.cache
def _synthetic_client(seed: int, alpha: float, beta: float, max_examples: int, client_id: int) -> dict:
    # Unbounded on purpose: each client is generated at most once per process, so memory is
    # bounded by the clients this process ever holds (and the runtime's ClientData cache
    # keeps references to these very arrays, not copies).
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
    return DIGITS_IMAGES // spec.num_clients


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


@functools.lru_cache(maxsize=8)
def _digits_dataset(seed: int, num_clients: int, partition: str) -> list[dict]:
    spec = DatasetSpec("digits", num_clients, seed, partition=partition)
    x, y = _load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    size = _digits_client_size(spec)
    if partition == "shards":
        # Sorted by label (stable, so ties keep the random order), cut into 2N shards,
        # shards dealt to clients in a random order: most clients see two labels.
        order = order[np.argsort(y[order], kind="stable")]
        shard = size // 2
        shards = rng.permutation(2 * num_clients)
        pieces = [np.concatenate([order[s * shard:(s + 1) * shard] for s in shards[2 * i:2 * i + 2]])
                  for i in range(num_clients)]
        # Shuffle within the client, or its train/test split would be by label.
        pieces = [rng.permutation(p) for p in pieces]
    else:
        pieces = [order[i * size:(i + 1) * size] for i in range(num_clients)]
    train, test = spec.split_sizes
    return [_pack(i, x[p], y[p], train, test) for i, p in enumerate(pieces)]
