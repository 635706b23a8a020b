"""`mp_executors.tff`: TFF 0.87's own computations on our executors, checked against TFF's runtime.

Runs only where TensorFlow Federated is installed (its own virtual environment:
`benchmarks/peers/setup_tff_venv.sh`; the main suite's `tests/test_tff_venv.py`
runs this module there). Every case runs once on TFF's native C++ runtime and
on our local stack, the worker pool with 1 worker and with 2 workers; the
results must be allclose. The native runtime's C++ `worker_binary` is stopped
when the module ends.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import numpy as np
import pytest

tff = pytest.importorskip(
    "tensorflow_federated",
    reason="TensorFlow Federated is not installed here; tests/test_tff_venv.py runs this module in the TFF venv",
)
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
import tree  # noqa: E402  (dm-tree, a TFF dependency)
from tensorflow_federated.python.core.impl.compiler import building_blocks  # noqa: E402
from tensorflow_federated.python.core.impl.context_stack import set_default_context  # noqa: E402
from tensorflow_federated.python.core.impl.types import computation_types, placements  # noqa: E402

import mp_executors as mpx  # noqa: E402
import mp_executors.tff as mtff  # noqa: E402
from mp_executors.workers.faults import FAULT_FILE_VARIABLE  # noqa: E402

NUM_CLIENTS = 12  # two reduction blocks (8 + 4): the 2-worker pool really has two shards
KINDS = ["local", "mp-1", "mp-2"]


# --------------------------------------------------------------------------- runtimes


def _stop_native_workers() -> None:
    """TFF's native context starts a C++ worker_binary that outlives Python: stop it."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "worker_binary" in child.name() or any("worker_binary" in a for a in child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def native():
    context = tff.backends.native.create_sync_local_cpp_execution_context()
    yield context
    _stop_native_workers()


@pytest.fixture(scope="module")
def factories():
    made = {
        "local": mpx.local_executor_factory(),
        "mp-1": mpx.mp_executor_factory(num_workers=1),
        "mp-2": mpx.mp_executor_factory(num_workers=2),
    }
    yield made
    for factory in made.values():
        factory.close()


@pytest.fixture(scope="module")
def contexts(factories):
    return {kind: mtff.create_sync_execution_context(f) for kind, f in factories.items()}


def run_in(context, fn, *args):
    with tff.framework.get_context_stack().install(context):
        return fn(*args)


_native_results: dict[str, object] = {}


def native_result(native, key: str, fn, *args):
    """The native runtime's answer for a case, computed once per module."""
    if key not in _native_results:
        _native_results[key] = run_in(native, fn, *args)
    return _native_results[key]


def assert_close(actual, expected, rtol=1e-5, atol=1e-6) -> None:
    tree.assert_same_structure(actual, expected, check_types=False)
    for a, e in zip(tree.flatten(actual), tree.flatten(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- plain federated computations

CLIENT_FLOATS = tff.FederatedType(np.float32, tff.CLIENTS)


@tff.tensorflow.computation(np.float32, np.float32)
def add(a, b):
    return a + b


@tff.federated_computation(CLIENT_FLOATS, CLIENT_FLOATS)
def sums_and_means(xs, ws):
    return (
        tff.federated_sum(xs),
        tff.federated_mean(xs),
        tff.federated_mean(xs, ws),
        tff.federated_min(xs),
        tff.federated_max(xs),
    )


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER), CLIENT_FLOATS)
def broadcast_map_zip(s, xs):
    shifted = tff.federated_map(add, tff.federated_zip((tff.federated_broadcast(s), xs)))
    return shifted, tff.federated_sum(shifted)


STATE = collections.OrderedDict(w=tff.TensorType(np.float32, [3]), step=np.int32)


@tff.tensorflow.computation(STATE)
def advance(state):
    return collections.OrderedDict(w=state["w"] * 2.0 + 1.0, step=state["step"] + 1)


@tff.federated_computation(tff.FederatedType(STATE, tff.SERVER))
def apply_at_server(state):
    return tff.federated_map(advance, state)


ACC = collections.OrderedDict(total=np.float32, count=np.int32, largest=np.float32)


@tff.tensorflow.computation
def zero():
    return collections.OrderedDict(total=np.float32(0), count=np.int32(0), largest=np.float32(-1e9))


@tff.tensorflow.computation(ACC, np.float32)
def accumulate(acc, x):
    return collections.OrderedDict(total=acc["total"] + x, count=acc["count"] + 1,
                                   largest=tf.maximum(acc["largest"], x))


@tff.tensorflow.computation(ACC, ACC)
def merge(a, b):
    return collections.OrderedDict(total=a["total"] + b["total"], count=a["count"] + b["count"],
                                   largest=tf.maximum(a["largest"], b["largest"]))


@tff.tensorflow.computation(ACC)
def report(acc):
    return acc["total"] / tf.cast(acc["count"], tf.float32), acc["largest"]


@tff.federated_computation(CLIENT_FLOATS)
def aggregate(xs):
    return tff.federated_aggregate(xs, zero(), accumulate, merge, report)


SEQ = tff.SequenceType(tff.TensorType(np.float32, [2]))


@tff.tensorflow.computation(SEQ)
def dataset_total(ds):
    return ds.reduce(tf.zeros([2], tf.float32), lambda acc, x: acc + x * x)


@tff.tensorflow.computation(tff.TensorType(np.float32, [2]))
def double(x):
    return x * 2.0


@tff.tensorflow.computation(tff.TensorType(np.float32, [2]), tff.TensorType(np.float32, [2]))
def add2(a, b):
    return a + b


@tff.federated_computation(tff.FederatedType(SEQ, tff.CLIENTS))
def datasets_reduced(datasets):
    return tff.federated_sum(tff.federated_map(dataset_total, datasets))


@tff.federated_computation(SEQ)
def with_sequence_intrinsics(ds):
    mapped = tff.sequence_map(double, ds)
    return tff.sequence_sum(mapped), tff.sequence_reduce(ds, np.zeros([2], np.float32), add2)


@tff.federated_computation(tff.FederatedType(SEQ, tff.CLIENTS))
def sequence_intrinsics(datasets):
    return tff.federated_map(with_sequence_intrinsics, datasets)


def client_floats(n=NUM_CLIENTS, seed=0):
    rng = np.random.default_rng(seed)
    return [np.float32(v) for v in rng.normal(size=n)], [np.float32(v) for v in rng.uniform(0.5, 2, size=n)]


def client_datasets(n=NUM_CLIENTS):
    return [tf.data.Dataset.from_tensor_slices(np.arange(2 * (i + 1), dtype=np.float32).reshape(-1, 2) + i)
            for i in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_sums_and_means(native, contexts, kind):
    xs, ws = client_floats()
    expected = native_result(native, "sums", sums_and_means, xs, ws)
    assert_close(run_in(contexts[kind], sums_and_means, xs, ws), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_map_zip(native, contexts, kind):
    xs, _ = client_floats()
    expected = native_result(native, "bmz", broadcast_map_zip, np.float32(3.5), xs)
    actual = run_in(contexts[kind], broadcast_map_zip, np.float32(3.5), xs)
    assert isinstance(actual[0], list) and len(actual[0]) == NUM_CLIENTS
    assert_close(actual, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_federated_apply(native, contexts, kind):
    state = collections.OrderedDict(w=np.array([1, 2, 3], np.float32), step=np.int32(4))
    expected = native_result(native, "apply", apply_at_server, state)
    actual = run_in(contexts[kind], apply_at_server, state)
    assert isinstance(actual, collections.OrderedDict) and list(actual) == ["w", "step"]
    assert_close(actual, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_federated_aggregate_with_struct_accumulators(native, contexts, kind):
    xs, _ = client_floats(seed=3)
    expected = native_result(native, "aggregate", aggregate, xs)
    assert_close(run_in(contexts[kind], aggregate, xs), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_client_datasets_reduced_in_tensorflow(native, contexts, kind):
    expected = native_result(native, "datasets", datasets_reduced, client_datasets())
    assert_close(run_in(contexts[kind], datasets_reduced, client_datasets()), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_intrinsics(contexts, kind):
    # TFF's native runtime refuses these ("Cant embed a Sequence which is not
    # proto-backed"): checked against numpy instead.
    actual = run_in(contexts[kind], sequence_intrinsics, client_datasets())
    assert len(actual) == NUM_CLIENTS
    for i, (mapped_sum, reduced) in enumerate(actual):
        rows = np.arange(2 * (i + 1), dtype=np.float32).reshape(-1, 2) + i
        np.testing.assert_allclose(mapped_sum, 2 * rows.sum(axis=0), rtol=1e-6)
        np.testing.assert_allclose(reduced, rows.sum(axis=0), rtol=1e-6)


# --------------------------------------------------------------------------- secure sums (emulated in the clear)

CLIENT_INTS = tff.FederatedType(np.int32, tff.CLIENTS)


@tff.federated_computation(CLIENT_INTS)
def secure_sums(xs):
    return (
        tff.federated_secure_sum(xs, 100),
        tff.federated_secure_sum_bitwidth(xs, 8),
        tff.backends.mapreduce.federated_secure_modular_sum(xs, 7),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_secure_sums_are_emulated_in_the_clear(contexts, kind):
    xs = [np.int32(3 * i + 1) for i in range(NUM_CLIENTS)]
    total = sum(int(x) for x in xs)
    assert tuple(int(v) for v in run_in(contexts[kind], secure_sums, xs)) == (total, total, total % 7)


# --------------------------------------------------------------------------- tff.learning

FEATURES = 20
CLASSES = 3


def model_fn():
    keras_model = tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(FEATURES,)),
        tf.keras.layers.Dense(CLASSES, kernel_initializer="zeros"),
        tf.keras.layers.Softmax(),
    ])
    return tff.learning.models.from_keras_model(
        keras_model,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        input_spec=collections.OrderedDict(x=tf.TensorSpec([None, FEATURES], tf.float32),
                                           y=tf.TensorSpec([None, 1], tf.int32)),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
    )


def learning_data(n=NUM_CLIENTS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        examples = 10 + i  # unequal clients: the weighted and unweighted means differ
        x = rng.normal(size=(examples, FEATURES)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=(examples, 1)).astype(np.int32)
        out.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(5).repeat(2))
    return out


def two_rounds(process, data=None):
    data = learning_data() if data is None else data
    state = process.initialize()
    out = None
    for _ in range(2):
        out = process.next(state, data)
        state = out.state
    return process.get_model_weights(state), out.metrics


_processes: dict[str, object] = {}


def process(name: str):
    """Each learning process is built once (building traces its graphs: seconds)."""
    if name not in _processes:
        sgd = tff.learning.optimizers.build_sgdm(learning_rate=0.1)
        builders = {
            "weighted_sgdm": lambda: tff.learning.algorithms.build_weighted_fed_avg(
                model_fn, client_optimizer_fn=sgd,
                server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9)),
            "unweighted_adam": lambda: tff.learning.algorithms.build_unweighted_fed_avg(
                model_fn, client_optimizer_fn=sgd,
                server_optimizer_fn=tff.learning.optimizers.build_adam(learning_rate=0.01)),
            "dp_zero_noise": lambda: tff.learning.algorithms.build_unweighted_fed_avg(
                model_fn, client_optimizer_fn=sgd,
                server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
                model_aggregator=tff.learning.dp_aggregator(noise_multiplier=0.0, clients_per_round=NUM_CLIENTS)),
            "fed_prox": lambda: tff.learning.algorithms.build_weighted_fed_prox(
                model_fn, proximal_strength=0.5, client_optimizer_fn=sgd,
                server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0)),
            "fed_sgd": lambda: tff.learning.algorithms.build_fed_sgd(
                model_fn, server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.5)),
            "mime_lite": lambda: tff.learning.algorithms.build_weighted_mime_lite(
                model_fn, base_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1, momentum=0.9)),
            "robust_aggregator": lambda: tff.learning.algorithms.build_weighted_fed_avg(
                model_fn, client_optimizer_fn=sgd, model_aggregator=tff.learning.robust_aggregator()),
            # Secure sums (bitwidth) with quantization: TFF's test runtime (its native runtime
            # with the secure intrinsics replaced by plain ones) is the reference here.
            "secure_aggregator": lambda: tff.learning.algorithms.build_weighted_fed_avg(
                model_fn, client_optimizer_fn=sgd, model_aggregator=tff.learning.secure_aggregator()),
        }
        _processes[name] = builders[name]()
    return _processes[name]


@pytest.fixture(scope="module")
def native_test_backend():
    """TFF's native runtime with secure intrinsics replaced by plain ones (it refuses them otherwise)."""
    context = tff.backends.test.create_sync_test_cpp_execution_context()
    yield context
    _stop_native_workers()


@pytest.mark.parametrize("name", ["weighted_sgdm", "unweighted_adam", "dp_zero_noise", "fed_prox", "fed_sgd",
                                  "mime_lite", "robust_aggregator", "secure_aggregator"])
@pytest.mark.parametrize("kind", KINDS)
def test_tff_learning_matches_native(native, native_test_backend, contexts, kind, name):
    proc = process(name)
    reference = native_test_backend if name == "secure_aggregator" else native
    expected = native_result(reference, name, two_rounds, proc)
    weights, metrics = run_in(contexts[kind], two_rounds, proc)
    assert_close(weights.trainable, expected[0].trainable, rtol=1e-4)
    assert_close(metrics, expected[1], rtol=1e-4)
    # It learned something: the model moved from its zero initialization.
    assert np.abs(np.asarray(weights.trainable[0])).sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_fed_eval_matches_native(native, contexts, kind):
    evaluation = _processes.get("eval") or tff.learning.algorithms.build_fed_eval(model_fn)
    _processes["eval"] = evaluation
    rng = np.random.default_rng(7)
    weights = tff.learning.models.ModelWeights(
        trainable=[rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), np.zeros(CLASSES, np.float32)],
        non_trainable=[])

    def evaluate():
        state = evaluation.set_model_weights(evaluation.initialize(), weights)
        return evaluation.next(state, learning_data(seed=5)).metrics

    expected = native_result(native, "eval", evaluate)
    actual = run_in(contexts[kind], evaluate)
    assert_close(actual, expected, rtol=1e-4)
    assert actual["client_work"]["eval"]["current_round_metrics"]["num_examples"] > 0


# --------------------------------------------------------------------------- federated_select

KEYS = tff.TensorType(np.int32, [2])


@tff.tensorflow.computation(tff.TensorType(np.float32, [6]), np.int32)
def select_slice(table, key):
    return tf.gather(table, key) * 10.0


@tff.tensorflow.computation(tff.SequenceType(np.float32))
def dataset_sum_scalar(ds):
    return ds.reduce(np.float32(0), lambda a, x: a + x)


@tff.federated_computation(tff.FederatedType(KEYS, tff.CLIENTS), tff.FederatedType(np.int32, tff.SERVER),
                           tff.FederatedType(tff.TensorType(np.float32, [6]), tff.SERVER))
def select_and_sum(keys, max_key, table):
    selected = tff.federated_select(keys, max_key, table, select_slice)
    return tff.federated_sum(tff.federated_map(dataset_sum_scalar, selected))


@pytest.mark.parametrize("kind", KINDS)
def test_federated_select(contexts, kind):
    keys = [np.array([i % 6, (2 * i + 1) % 6], np.int32) for i in range(NUM_CLIENTS)]
    table = np.arange(6, dtype=np.float32) + 0.5
    expected = sum(10.0 * (table[k[0]] + table[k[1]]) for k in keys)
    actual = run_in(contexts[kind], select_and_sum, keys, np.int32(6), table)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


# --------------------------------------------------------------------------- intrinsics the public API rarely emits


def _from_building_block(block):
    return tff.framework.ConcreteComputation.from_building_block(block)


def _binary_intrinsic(uri: str, operand_type):
    pair = computation_types.StructType([operand_type, operand_type])
    ref = building_blocks.Reference("pair", pair)
    call = building_blocks.Call(building_blocks.Intrinsic(uri, computation_types.FunctionType(pair, operand_type)), ref)
    return _from_building_block(building_blocks.Lambda("pair", pair, call))


@pytest.mark.parametrize("kind", ["local", "mp-2"])
def test_generic_operators_and_zero(contexts, kind):
    vector = computation_types.TensorType(np.float32, [2])
    a, b = np.array([1.0, 2.0], np.float32), np.array([4.0, 8.0], np.float32)
    expected = {"generic_plus": a + b, "generic_multiply": a * b, "generic_divide": a / b}
    for uri, value in expected.items():
        for operand in (vector, computation_types.FederatedType(vector, placements.SERVER)):
            np.testing.assert_allclose(run_in(contexts[kind], _binary_intrinsic(uri, operand), a, b), value)
    zero_type = computation_types.FederatedType(
        computation_types.StructType([("w", vector), ("n", np.int32)]), placements.SERVER)
    zero = _from_building_block(building_blocks.Lambda(None, None, building_blocks.Intrinsic("generic_zero", zero_type)))
    result = run_in(contexts[kind], zero)
    np.testing.assert_array_equal(result["w"], [0.0, 0.0])
    assert result["n"] == 0


def test_federated_map_all_equal():
    x_type = computation_types.FederatedType(np.float32, placements.SERVER)
    x = building_blocks.Reference("x", x_type)
    at_clients = computation_types.FederatedType(np.float32, placements.CLIENTS, all_equal=True)
    broadcast = building_blocks.Call(building_blocks.Intrinsic(
        "federated_broadcast", computation_types.FunctionType(x_type, at_clients)), x)
    add_one_block = add_one_tf.to_building_block()
    mapped = building_blocks.Call(building_blocks.Intrinsic(
        "federated_map_all_equal",
        computation_types.FunctionType([add_one_block.type_signature, at_clients], at_clients)),
        building_blocks.Struct([add_one_block, broadcast]))
    summed = building_blocks.Call(building_blocks.Intrinsic(
        "federated_sum", computation_types.FunctionType(
            computation_types.FederatedType(np.float32, placements.CLIENTS), x_type)), mapped)
    comp = _from_building_block(building_blocks.Lambda("x", x_type, summed))
    factory = mpx.local_executor_factory(default_num_clients=3)
    assert run_in(mtff.create_sync_execution_context(factory), comp, np.float32(2.0)) == pytest.approx(9.0)


@tff.tensorflow.computation(np.float32)
def add_one_tf(x):
    return x + 1.0


# --------------------------------------------------------------------------- errors and the API around it


def test_conflicting_cardinalities_are_an_error(contexts):
    xs, _ = client_floats(5)
    ws, _ = client_floats(6)
    with pytest.raises(ValueError, match="(?i)cardinalit|clients"):
        run_in(contexts["mp-2"], sums_and_means, xs, ws)


def test_unsupported_intrinsic_is_named_before_any_work(factories):
    proto = tff.framework.ConcreteComputation.get_proto(sums_and_means)
    bad = type(proto)()
    bad.CopyFrom(proto)

    def rename(message):
        if isinstance(message, type(proto)) and message.WhichOneof("computation") == "intrinsic":
            if message.intrinsic.uri == "federated_max":
                message.intrinsic.uri = "federated_median"
        for field, value in message.ListFields():
            if field.message_type is not None:
                for inner in (value if field.label == field.LABEL_REPEATED else [value]):
                    rename(inner)

    rename(bad)
    comp = tff.framework.ConcreteComputation(computation_proto=bad, context_stack=tff.framework.get_context_stack())
    pool = factories["mp-2"].pool
    requests_before = pool.requests
    context = mtff.create_sync_execution_context(factories["mp-2"])
    xs, ws = client_floats()
    with pytest.raises(NotImplementedError, match="federated_median"):
        run_in(context, comp, xs, ws)
    assert pool.requests == requests_before, "work was dispatched before the error"


def test_from_tff_runs_under_our_contexts(native, factories):
    xs, ws = client_floats()
    expected = native_result(native, "sums", sums_and_means, xs, ws)
    ours = mtff.from_tff(sums_and_means)
    assert isinstance(ours, mpx.Computation)
    with mpx.execution_context(factories["local"]):
        actual = ours(xs, ws)
    assert_close(tuple(actual), expected)


def test_conversion_is_cached_by_digest():
    first = mtff.from_tff(broadcast_map_zip).building_block
    again = mtff.from_tff(broadcast_map_zip).building_block
    assert first is again


def test_set_sync_execution_context_installs_it_as_tff_default(factories):
    context = mtff.set_sync_execution_context(factories["local"])
    try:
        assert tff.framework.get_context_stack().current is context
        xs, ws = client_floats()
        assert np.isclose(sums_and_means(xs, ws)[0], np.sum(xs), rtol=1e-5)
    finally:
        set_default_context.set_no_default_context()


def test_importing_mp_executors_does_not_import_tff():
    code = "import sys, mp_executors as mpx; mpx.local_executor_factory; assert 'tensorflow_federated' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- worker faults


def test_worker_killed_during_a_learning_round_is_retried(native, tmp_path):
    fault = str(tmp_path / "fault")
    os.environ[FAULT_FILE_VARIABLE] = fault
    # Spawned workers: they read the fault file's variable from this process's environment
    # (a fork server started by an earlier test would not have it).
    factory = mpx.mp_executor_factory(num_workers=2, max_retries=1, start_method="spawn")
    try:
        context = mtff.create_sync_execution_context(factory)
        proc = process("weighted_sgdm")
        # The same dataset objects in both calls, as in a training loop: after the warm call
        # they travel as digests, so the fresh worker must ask for them again.
        data = learning_data()
        run_in(context, two_rounds, proc, data)  # warm: the pool exists before the fault is armed
        with open(fault, "w") as f:
            f.write("map 1 sigkill")
        weights, metrics = run_in(context, two_rounds, proc, data)
        assert os.path.exists(fault + ".fired"), "the fault did not fire: the test would prove nothing"
        # The fresh worker had none of the datasets sent by digest: their graphs were sent again.
        assert context.executor_factory.datasets_resent >= 1
        expected = native_result(native, "weighted_sgdm", two_rounds, proc)
        assert_close(weights.trainable, expected[0].trainable, rtol=1e-4)
        assert_close(metrics, expected[1], rtol=1e-4)
    finally:
        os.environ.pop(FAULT_FILE_VARIABLE, None)
        factory.close()


def test_no_worker_left_after_close():
    factory = mpx.mp_executor_factory(num_workers=2)
    context = mtff.create_sync_execution_context(factory)
    xs, ws = client_floats()
    run_in(context, sums_and_means, xs, ws)
    pids = set(factory.pool.pids())
    assert len(pids) == 2
    factory.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

