"""The persistent plan cache (executors/plan_cache.py): loaded plans give the converted plans' bits.

- a plan loaded from the cache gives bitwise the results of a fresh conversion, for the
  learning layer's FedAvg round (a client while loop) and its evaluation, on the local
  factory and on a real 2-worker pool (whose two workers convert and store the same keys
  at the same time, then a second pool loads them);
- a corrupt entry (bad checksum, truncated, or a graph TensorFlow cannot import) is refused
  with a WARNING, the plan is converted again and the entry replaced;
- a key differing in any component misses;
- concurrent writers of one key leave one valid entry (and no temporary files);
- a disabled cache writes nothing; an unwritable directory only means no caching.

Each test uses its own cache directory (tmp_path); the session's (tests/conftest.py) is
not touched.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx
from mp_executors import learning
from mp_executors.executors import plan_cache
from mp_executors.executors import vectorized_map as vm

NUM_CLIENTS = 12
ROW_T = mpx.TensorType(np.float32, [5])


def _clients() -> list[dict]:
    rng = np.random.default_rng(11)
    return [{"x": rng.standard_normal((20, 60)).astype(np.float32),
             "y": rng.integers(0, 10, 20).astype(np.int32)} for _ in range(NUM_CLIENTS)]


CLIENTS = _clients()
MODEL = learning.logreg(60, 10, seed=0)
PROCESS = learning.fed_avg(MODEL, learning.SGD(0.1), batch_size=5, local_steps=4, seed=0)
EVALUATE = learning.evaluate(MODEL)


@mpx.tf_computation(ROW_T)
def squash(x):
    return tf.tanh(x) * tf.reduce_sum(x)


def _function(comp) -> tuple:
    """The TensorFlowFunction of a tf_computation, and the mask of mapping it over one stacked column."""
    return comp.building_block.function, (True,)


def _round(factory) -> list[np.ndarray]:
    """One FedAvg round and an evaluation on `factory`: every result leaf, as numpy."""
    with mpx.execution_context(factory):
        state, metrics = PROCESS.next(PROCESS.initialize(), CLIENTS)
        evaluation = EVALUATE(state, CLIENTS)
    return ([np.asarray(state["model"][k]) for k in sorted(state["model"])]
            + [np.float64(metrics[k]) for k in sorted(metrics)] + [np.float64(evaluation[k]) for k in sorted(evaluation)])


def _plans(factory) -> list[str]:
    if hasattr(factory, "map_plans"):
        return factory.map_plans.describe()
    return [line for report in factory.pool.reports() for line in report["map_plans"]]


def _entries(directory) -> list:
    """The plan files (the `locks` directory aside)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def _assert_bitwise(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y), (x, y)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The round on a local factory that converts every plan (into an empty cache): (results, cache dir)."""
    directory = tmp_path_factory.mktemp("plans")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(plan_cache.ENV_VAR, str(directory))
        factory = mpx.local_executor_factory()
    try:
        results, plans = _round(factory), _plans(factory)
    finally:
        factory.close()
    assert plans and all("vectorized" in p and "plan cache" not in p for p in plans), plans
    assert len(_entries(directory)) == len(plans) and all(n.endswith(".plan") for n in _entries(directory))
    return results, directory


def test_local_loaded_plans_give_the_converted_bits(monkeypatch, converted):
    fresh_results, directory = converted
    stored = _entries(directory)
    monkeypatch.setenv(plan_cache.ENV_VAR, str(directory))
    warm = mpx.local_executor_factory()
    try:
        warm_results, warm_plans = _round(warm), _plans(warm)
    finally:
        warm.close()
    assert len(warm_plans) == len(stored)
    assert all("vectorized" in p and "from the plan cache" in p for p in warm_plans), warm_plans
    assert _entries(directory) == stored
    _assert_bitwise(warm_results, fresh_results)


def test_pool_workers_store_then_load_the_same_bits(tmp_path, monkeypatch, converted):
    fresh_results = converted[0]
    monkeypatch.setenv(plan_cache.ENV_VAR, str(tmp_path))
    cold = mpx.mp_executor_factory(num_workers=2)
    try:
        cold_results, cold_plans = _round(cold), _plans(cold)
    finally:
        cold.close()
    # Both workers got the same computations at once: for each, one converted (holding its
    # key's lock) and stored it, the other waited and loaded it.
    assert cold_plans and len(cold_plans) % 2 == 0
    by_digest: dict[str, list[bool]] = {}
    for line in cold_plans:
        by_digest.setdefault(line.split("(")[1].split(")")[0], []).append("from the plan cache" in line)
    assert all(sorted(loaded) == [False, True] for loaded in by_digest.values()), cold_plans
    stored = _entries(tmp_path)
    assert len(stored) == len(cold_plans) // 2 and all(n.endswith(".plan") for n in stored), stored
    for name in stored:
        assert plan_cache.PlanCache(tmp_path).load(name[: -len(".plan")]) is not None

    warm = mpx.mp_executor_factory(num_workers=2)
    try:
        warm_results, warm_plans = _round(warm), _plans(warm)
    finally:
        warm.close()
    assert len(warm_plans) == len(cold_plans)
    assert all("from the plan cache" in p for p in warm_plans), warm_plans
    _assert_bitwise(cold_results, fresh_results)
    _assert_bitwise(warm_results, fresh_results)


# ---------------------------------------------------------------- entries


def _stacked(n: int = 9) -> tuple[list, list]:
    return [tf.constant(np.linspace(-2, 2, n * 5, dtype=np.float32).reshape(n, 5))], []


def _only_entry(directory):
    (name,) = _entries(directory)
    return directory / name


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "not a plan", "graph TF cannot import"])
def test_a_corrupt_entry_is_refused_and_rebuilt(tmp_path, caplog, damage):
    function, mask = _function(squash)
    expected = vm.MapPlans(plan_cache.PlanCache(None)).get(function, mask).run(*_stacked())
    vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)
    path = _only_entry(tmp_path)
    blob = path.read_bytes()
    key = path.name[: -len(".plan")]
    if damage == "flip a byte":
        path.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    elif damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "not a plan":
        path.write_bytes(b"hello")
    else:  # a well-formed entry whose graph is garbage: caught when TensorFlow imports it
        entry = plan_cache.PlanCache(tmp_path).load(key)
        bad = plan_cache.Entry(True, entry.group_size, entry.reason, b"\x0a\x03garbage", entry.input_names,
                               entry.output_names)
        plan_cache.PlanCache(tmp_path).store(key, {"test": "bad graph"}, bad)

    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        plan = vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)
    assert not plan.cached and plan.vectorized
    assert any("plan cache" in r.getMessage() and "again" in r.getMessage() for r in caplog.records), caplog.text
    for got, want in zip(plan.run(*_stacked()), expected):
        assert np.array_equal(got.numpy(), want.numpy())
    # Replaced by a valid entry, which the next owner loads.
    assert _entries(tmp_path) == [path.name]
    reloaded = vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)
    assert reloaded.cached
    for got, want in zip(reloaded.run(*_stacked()), expected):
        assert np.array_equal(got.numpy(), want.numpy())


def test_an_entry_under_another_key_is_refused(tmp_path, caplog):
    cache = plan_cache.PlanCache(tmp_path)
    cache.store("a" * 64, {}, plan_cache.Entry(False, 0, "looped"))
    (tmp_path / ("a" * 64 + ".plan")).rename(tmp_path / ("b" * 64 + ".plan"))
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        assert cache.load("b" * 64) is None
    assert "another key" in caplog.text


BASE = dict(computation="c" * 64, mask=(True, False), shapes=((3, 4), (), (None, 2)), mode="auto",
            group_size=128, group_budget=32 * 2**20, block_size=8)


@pytest.mark.parametrize("component, value", [
    ("computation", "d" * 64), ("mask", (True, True)), ("shapes", ((3, 5), (), (None, 2))),
    ("shapes", ((3, 4), (), (1, 2))), ("mode", "on"), ("group_size", 64), ("group_budget", 16 * 2**20),
    ("block_size", 16), ("tensorflow", "0.0.1"), ("package", "9.9"), ("code", "0" * 64), ("format", 0),
])
def test_a_key_differing_in_any_component_misses(tmp_path, monkeypatch, component, value):
    cache = plan_cache.PlanCache(tmp_path)
    base = plan_cache.key_components(**BASE)
    key = plan_cache.cache_key(base)
    cache.store(key, base, plan_cache.Entry(False, 0, "looped"))
    assert cache.load(key) == plan_cache.Entry(False, 0, "looped")
    if component in BASE:
        other = plan_cache.key_components(**{**BASE, component: value})
    elif component == "format":
        monkeypatch.setattr(plan_cache, "FORMAT_VERSION", value)
        other = plan_cache.key_components(**BASE)
    else:  # what the process runs on: TensorFlow, this package, the planning code
        monkeypatch.setitem(plan_cache._environment_versions(), component, value)
        other = plan_cache.key_components(**BASE)
    assert other[component] != base[component]
    assert plan_cache.cache_key(other) != key
    assert cache.load(plan_cache.cache_key(other)) is None


def test_the_key_holds_tensorflow_package_and_code_versions():
    components = plan_cache.key_components(**BASE)
    assert tf.__version__ in components["tensorflow"]
    assert components["package"] == mpx.__version__
    assert len(components["code"]) == 64


def test_two_traces_of_one_computation_share_a_computation_digest():
    def body(x):
        return tf.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, tf.sin(a) + x), (0, x))[1]

    first = mpx.tf_computation(ROW_T)(body)
    second = mpx.tf_computation(ROW_T)(body)  # TensorFlow numbers this trace's while functions anew
    f1, f2 = first.building_block.function, second.building_block.function
    assert f1.digest != f2.digest
    assert plan_cache.computation_digest(f1) == plan_cache.computation_digest(f2)
    assert plan_cache.computation_digest(f1) != plan_cache.computation_digest(squash.building_block.function)


def test_one_converts_a_key_while_the_others_wait_then_load(tmp_path):
    function, mask = _function(squash)
    key, _ = vm.cache_key(function, mask, "auto")
    scratch = tmp_path / "scratch"
    vm.MapPlans(plan_cache.PlanCache(scratch)).get(function, mask)  # the entry another process would store
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)))
    with plan_cache.PlanCache(tmp_path).lock(key) as held:  # "another process" is converting this key
        assert held
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # waiting for the lock, not converting
        (scratch / f"{key}.plan").rename(tmp_path / f"{key}.plan")  # ... which it then stores
    waiter.join(60)
    assert got and got[0].cached and got[0].vectorized


def test_a_lock_held_too_long_means_converting_anyway(tmp_path, caplog):
    cache = plan_cache.PlanCache(tmp_path)
    with cache.lock("k" * 64) as first, caplog.at_level(logging.WARNING, logger="mp_executors"):
        with cache.lock("k" * 64, timeout=0.1) as second:
            assert first and not second
    assert "converting it here too" in caplog.text
    with cache.lock("k" * 64) as again:  # released
        assert again
    with plan_cache.PlanCache(None).lock("k" * 64) as disabled:
        assert not disabled


def test_concurrent_writers_leave_one_valid_entry(tmp_path, caplog):
    key = "e" * 64
    entries = [plan_cache.Entry(True, 8 * (i + 1), f"writer {i}", bytes([i]) * (1000 + 50_000 * i), ("in:0",),
                                ("out:0",)) for i in range(6)]
    start = threading.Barrier(len(entries) + 1)
    bad_reads: list = []

    def write(entry):
        cache = plan_cache.PlanCache(tmp_path)
        start.wait()
        for _ in range(30):
            assert cache.store(key, {"writer": entry.reason}, entry)

    def read():
        cache = plan_cache.PlanCache(tmp_path)
        start.wait()
        for _ in range(200):
            got = cache.load(key)
            if got is not None and got not in entries:
                bad_reads.append(got)

    threads = [threading.Thread(target=write, args=(e,)) for e in entries] + [threading.Thread(target=read)]
    with caplog.at_level(logging.WARNING, logger="mp_executors"):
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not bad_reads
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # never a torn read
    assert _entries(tmp_path) == [key + ".plan"]  # no temporary file left behind
    assert plan_cache.PlanCache(tmp_path).load(key) in entries


def test_a_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("off", "0", ""):
        monkeypatch.setenv(plan_cache.ENV_VAR, value)
        assert not plan_cache.PlanCache.from_env().enabled
    monkeypatch.setenv(plan_cache.ENV_VAR, "off")
    factory = mpx.local_executor_factory()
    try:
        with mpx.execution_context(factory):
            out = mpx.federated_computation(mpx.FederatedType(ROW_T, mpx.CLIENTS))(
                lambda xs: mpx.federated_map(squash, xs))([np.ones(5, np.float32)] * 3)
        assert len(out) == 3
        assert factory.map_plans.describe() and "plan cache" not in factory.map_plans.describe()[0]
    finally:
        factory.close()
    assert list(tmp_path.rglob("*")) == []
    assert plan_cache.PlanCache(None).store("f" * 64, {}, plan_cache.Entry(False, 0, "x")) is False


def test_default_directory_and_unset_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(plan_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plan_cache.PlanCache.from_env().directory == tmp_path / "mp_executors" / "plans"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert plan_cache.PlanCache.from_env().directory == tmp_path / "home" / ".cache" / "mp_executors" / "plans"


def test_an_unwritable_directory_means_no_caching(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = plan_cache.PlanCache(blocker / "plans")
    function, mask = _function(squash)
    with caplog.at_level(logging.DEBUG, logger="mp_executors"):
        first = vm.MapPlans(cache).get(function, mask)
        vm.MapPlans(cache).get(function, mask)
    assert first.vectorized and not first.cached
    assert [r.levelno for r in caplog.records if "cannot write" in r.getMessage()] == [logging.WARNING]  # once
    x = _stacked()[0][0].numpy()
    np.testing.assert_allclose(first.run(*_stacked())[0].numpy(), np.tanh(x) * x.sum(axis=1, keepdims=True),
                               rtol=1e-5)


def test_loop_decisions_reached_by_trying_are_cached(tmp_path):
    @mpx.tf_computation(ROW_T)
    def data_dependent(x):
        n = tf.cast(tf.abs(x[0]) * 3.0, tf.int32) % 4 + 1
        return tf.while_loop(lambda i, a: i < n, lambda i, a: (i + 1, a * 0.5 + x), (0, x))[1]

    function, mask = _function(data_dependent)
    first = vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)
    assert not first.vectorized and "data-dependent" in first.reason
    second = vm.MapPlans(plan_cache.PlanCache(tmp_path)).get(function, mask)
    assert not second.vectorized and second.cached and second.reason == first.reason
    for got, want in zip(second.run(*_stacked()), first.run(*_stacked())):
        assert np.array_equal(got.numpy(), want.numpy())
