"""Bad input is refused in the parent, before anything is dispatched, with a useful message.

One table per phase in which bad input can be caught:

* CALL_CASES: call-time argument errors (wrong dtype, shape, struct names or arity,
  placement mix-ups, ragged lists, non-finite data, unpicklable values, 0 clients).
  Each runs against a session-scoped `mp_executor_factory(num_workers=2)` (asserting
  that `factory.pool.requests` did not move: nothing was sent to a worker) and
  against `local_executor_factory()`.
* TRACE_CASES: misuse of intrinsics while tracing (plain Python functions or
  closures passed to intrinsics, wrong placements, unknown placements).
* FACTORY_CASES: bad factory arguments (asserting no child process was started).
* CLIENT_DATA_CASES: bad `mpx.ClientData` descriptions.

A case is (id, a callable that provokes the error, the expected exception type, the
substrings the message must contain: the argument's name or path and a hint of what
to fix; compared case-insensitively). Where the runtime falls short, the case keeps the
assertion it should pass and is marked `xfail(strict=True)` with what is wrong.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

import mp_executors as mpx  # noqa: E402
from mp_executors import machine  # noqa: E402

tf = pytest.importorskip("tensorflow")

F32 = np.float32
USABLE_CPUS = len(machine.detect_machine().usable_cpus)
HAS_GPU = bool(machine.detect_gpus())


def at_clients(member: Any) -> mpx.FederatedType:
    return mpx.FederatedType(member, mpx.CLIENTS)


def at_server(member: Any) -> mpx.FederatedType:
    return mpx.FederatedType(member, mpx.SERVER)


# ============================================================================ the table machinery


@dataclass(frozen=True)
class Case:
    id: str
    provoke: Callable[[], Any]
    exc: type[BaseException]
    contains: tuple[str, ...]


def case(id: str, provoke: Callable[[], Any], exc: type[BaseException], contains: list[str],
         xfail: str | None = None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(id, provoke, exc, tuple(contains)), id=id, marks=marks)


def problems_with(c: Case) -> tuple[list[str], BaseException | None]:
    """Runs the case; returns what is wrong with the error it raised (empty if all is well)."""
    try:
        result = c.provoke()
    except Exception as e:  # noqa: BLE001 - the type is checked below
        error = e
    else:
        close = getattr(result, "close", None)
        if callable(close):  # a factory that should not have been made
            close()
        return [f"no error was raised (returned {result!r})"], None
    problems = []
    if not isinstance(error, c.exc):
        problems.append(f"expected {c.exc.__name__}, got {type(error).__module__}.{type(error).__name__}")
    message = str(error)
    missing = [s for s in c.contains if s.lower() not in message.lower()]
    if missing:
        problems.append(f"the message lacks {missing}")
    return problems, error


def describe(problems: list[str], error: BaseException | None) -> str:
    head = "; ".join(problems)
    if error is None:
        return head
    return f"{head}\n  got {type(error).__name__}: {str(error)[:1500]}"


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# ============================================================================ computations


@mpx.tf_computation(F32, F32)
def scale(x, s):
    return x * s


@mpx.tf_computation(F32)
def double(x):
    return x * 2.0


@mpx.tf_computation(np.int32)
def int_identity(x):
    return x


@mpx.federated_computation(at_clients(F32), at_server(F32))
def scaled_mean(xs, factor):
    return mpx.federated_mean(mpx.federated_map(scale, (xs, mpx.federated_broadcast(factor))))


@mpx.federated_computation(at_clients(F32))
def total(xs):
    return mpx.federated_sum(xs)


@mpx.federated_computation(at_clients(F32), at_clients(F32))
def weighted(xs, ws):
    return mpx.federated_mean(xs, ws)


@mpx.tf_computation(mpx.TensorType(F32, [2]))
def pair_sum(v):
    return tf.reduce_sum(v)


@mpx.federated_computation(at_clients(mpx.TensorType(F32, [2])), at_server(np.int32))
def pairs(points, rounds):
    return mpx.federated_sum(mpx.federated_map(pair_sum, points)), rounds


@mpx.federated_computation(at_clients(mpx.TensorType(F32, [2, 3])), at_server(F32))
def grids(grid, lr):
    return mpx.federated_sum(grid), lr


CONFIG = mpx.StructType([("lr", F32), ("w", mpx.TensorType(F32, [3]))])


@mpx.federated_computation(at_server(CONFIG), at_clients(F32))
def configured(config, xs):
    return config, mpx.federated_sum(xs)


@mpx.tf_computation(F32)
def finite_only(x):
    # The computation's declaration that its clients' values must be finite.
    return tf.debugging.check_numerics(x, "xs must be finite")


@mpx.federated_computation(at_clients(F32), at_server(F32))
def finite_mean(xs, bias):
    return mpx.federated_mean(mpx.federated_map(finite_only, xs)), bias


@mpx.tf_computation(mpx.SequenceType(F32))
def sequence_total(ds):
    return ds.reduce(np.float32(0.0), lambda acc, x: acc + x)


@mpx.federated_computation(at_clients(mpx.SequenceType(F32)), at_server(F32))
def data_total(data, bias):
    return mpx.federated_sum(mpx.federated_map(sequence_total, data)), bias


@mpx.federated_computation(at_clients(tf.string), at_server(F32))
def client_names(ids, bias):
    return ids, bias


@mpx.tf_computation
def one():
    return np.float32(1.0)


@mpx.federated_computation
def count_clients():
    return mpx.federated_sum(mpx.federated_eval(one, mpx.CLIENTS))


LOCK = threading.Lock()


def _one_float():
    yield np.float32(1.0)


def generator_dataset():
    return tf.data.Dataset.from_generator(_one_float, output_signature=tf.TensorSpec((), tf.float32))


def vector_client(client_id):
    return np.full(3, client_id, F32)


# ============================================================================ call-time cases

# (id, provoke, exception, substrings, xfail: reason for both factories, or {kind: reason}, kinds)
CALL_TABLE: list[tuple] = [
    # --- dtype
    ("dtype-str-for-float", lambda: scaled_mean([1.0, 2.0], "abc"), TypeError,
     ["scaled_mean", "factor", "float32", "str"]),
    ("dtype-float-for-int", lambda: pairs([[1.0, 2.0]], 1.5), TypeError, ["pairs", "rounds", "int32", "1.5"]),
    ("dtype-bool-for-float", lambda: scaled_mean([1.0], True), TypeError, ["factor", "float32", "bool"]),
    ("dtype-complex-for-float", lambda: scaled_mean([1.0], 1j), TypeError, ["factor", "float32", "complex"]),
    ("dtype-int-out-of-range", lambda: pairs([[1.0, 2.0]], 2**40), TypeError, ["rounds", "int32", "out of range"]),
    ("dtype-str-in-one-client", lambda: scaled_mean([1.0, "two"], 2.0), TypeError,
     ["xs[client 1]", "float32", "str"]),
    ("dtype-dataset-for-tensor", lambda: scaled_mean([1.0], tf.data.Dataset.range(3)), TypeError,
     ["factor", "float32", "dataset"]),
    ("dtype-none-for-tensor", lambda: scaled_mean([1.0], None), TypeError, ["factor", "float32", "None"]),
    # --- shape
    ("shape-vector-too-long", lambda: configured({"lr": 0.1, "w": np.zeros(4)}, [1.0]), TypeError,
     ["config.w", "float32[3]", "(4,)"]),
    ("shape-scalar-for-vector", lambda: configured({"lr": 0.1, "w": 1.0}, [1.0]), TypeError,
     ["config.w", "float32[3]", "shape ()"]),
    ("shape-list-for-server-scalar", lambda: scaled_mean([1.0, 2.0], [2.0, 3.0]), TypeError,
     ["factor", "float32", "(2,)"]),
    ("shape-list-in-one-client", lambda: scaled_mean([1.0, [1.0, 2.0]], 2.0), TypeError,
     ["xs[client 1]", "float32", "(2,)"]),
    ("shape-ragged-clients-fixed-shape", lambda: pairs([[1.0, 2.0], [1.0, 2.0, 3.0]], 1), TypeError,
     ["points[client 1]", "float32[2]", "(3,)"]),
    ("shape-nested-inconsistent-lengths", lambda: grids([np.zeros((2, 3)), [[1, 2, 3], [1, 2]]], 0.1), TypeError,
     ["grid[client 1]", "float32[2,3]", "rectangular"]),
    # --- structs
    ("struct-wrong-names", lambda: configured({"lr": 0.1, "v": np.zeros(3)}, [1.0]), TypeError,
     ["config", "'w'", "'v'"]),
    ("struct-too-many-elements", lambda: configured((0.1, np.zeros(3), 3), [1.0]), TypeError,
     ["config", "2 elements", "3 elements"]),
    ("struct-scalar-for-struct", lambda: configured(0.1, [1.0]), TypeError, ["config", "struct", "float"]),
    # --- placement: CLIENTS values
    ("clients-scalar", lambda: scaled_mean(1.0, 2.0), TypeError, ["xs", "CLIENTS", "one value per client"]),
    ("clients-ndarray", lambda: scaled_mean(np.ones(3, F32), 2.0), TypeError,
     ["xs", "one value per client", "array"]),
    ("clients-dict-by-client-id", lambda: scaled_mean({"a": 1.0, "b": 2.0}, 2.0), TypeError,
     ["xs", "one value per client", "dict"]),
    ("clients-str", lambda: scaled_mean("abc", 2.0), TypeError, ["xs", "one value per client", "str"]),
    ("clients-single-parameter-named", lambda: total(3.0), TypeError, ["total", "xs", "one value per client"]),
    ("clients-counts-disagree", lambda: weighted([1.0, 2.0], [1.0, 2.0, 3.0]), ValueError,
     ["xs", "ws", "2 clients", "3"]),
    ("clients-client-data-of-wrong-type", lambda: scaled_mean(mpx.ClientData(vector_client, [0, 1]), 1.0),
     TypeError, ["xs", "ClientData", "float32[3]"]),
    # --- sequences
    ("sequence-scalar-per-client", lambda: data_total([1.0, 2.0], 0.0), TypeError,
     ["data[client 0]", "sequence", "tf.data.Dataset"]),
    ("sequence-dataset-of-wrong-dtype",
     lambda: data_total([tf.data.Dataset.from_tensor_slices(np.array(["a"]))], 0.0), TypeError,
     ["data[client 0]", "float32", "string"]),
    # --- not data at all
    ("lambda-as-value", lambda: scaled_mean([1.0], lambda: 2.0), TypeError, ["factor", "float32", "function"]),
    ("unpicklable-lock-as-string", lambda: client_names([LOCK, LOCK], 0.0), TypeError,
     ["ids[client 0]", "string", "lock"]),
    # mp only: the local runtime runs such a dataset in-process. The shard layer knows the client,
    # not the parameter's name.
    ("unpicklable-generator-dataset", lambda: data_total([generator_dataset(), generator_dataset()], 0.0),
     TypeError, ["client 0", "from_generator", "ClientData"], None, ("mp",)),
    # --- call shape
    ("too-few-arguments", lambda: scaled_mean([1.0]), TypeError, ["scaled_mean", "2 arguments", "got 1"]),
    ("too-many-arguments", lambda: scaled_mean([1.0], 1.0, 2.0), TypeError,
     ["scaled_mean", "2 arguments", "got 3"]),
    ("unknown-keyword-argument", lambda: scaled_mean([1.0], scale=2.0), TypeError,
     ["scaled_mean", "keyword", "'scale'"]),
    # --- no clients
    ("zero-clients-empty-list", lambda: scaled_mean([], 2.0), ValueError, ["xs", "0", "default_num_clients"]),
    ("zero-clients-no-argument-no-default", count_clients, ValueError,
     ["number of clients is 0", "default_num_clients"]),
]


def _call_params() -> list:
    params = []
    for row in CALL_TABLE:
        id_, provoke, exc, contains = row[:4]
        xfail = row[4] if len(row) > 4 else None
        kinds = row[5] if len(row) > 5 else ("mp", "local")
        for kind in kinds:
            reason = xfail.get(kind) if isinstance(xfail, dict) else xfail
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(kind, Case(id_, provoke, exc, tuple(contains)), id=f"{kind}-{id_}",
                                       marks=marks))
    return params


@pytest.fixture(scope="session")
def mp_factory():
    factory = mpx.mp_executor_factory(num_workers=2)
    # Warm the pool, so that a case that does dispatch shows up in the request counter.
    with mpx.execution_context(factory):
        assert scaled_mean([1.0, 2.0, 3.0], 2.0) == pytest.approx(4.0)
    assert factory.pool.requests > 0, "the request counter does not count"
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def local_factory():
    factory = mpx.local_executor_factory()
    yield factory
    factory.close()


@pytest.mark.parametrize("kind, c", _call_params())
def test_call_time_errors_refused_before_dispatch(kind, c, request):
    factory = request.getfixturevalue(f"{kind}_factory")
    pool = getattr(factory, "pool", None)
    before = pool.requests if pool is not None else None
    with mpx.execution_context(factory):
        problems, error = problems_with(c)
    if pool is not None and pool.requests != before:
        problems.append(f"{pool.requests - before} request(s) were sent to the workers before the error")
    assert not problems, describe(problems, error)


# ============================================================================ trace-time cases


def _trace(*types):
    """`lambda body: federated_computation(*types)(body)`, for one-line cases."""
    return lambda body: mpx.federated_computation(*types)(body)


def _plain_function(x):
    return x


def _closure_over_outer_bound_value():
    @mpx.federated_computation(F32, at_clients(F32))
    def outer(factor, xs):
        doubled = double(factor)  # an unplaced value bound in the outer body

        @mpx.federated_computation(F32)
        def inner(x):
            return scale(x, doubled)

        return mpx.federated_map(inner, xs)

    return outer


def _closure_over_outer_parameter():
    @mpx.federated_computation(F32, at_clients(F32))
    def outer(factor, xs):
        @mpx.federated_computation(F32)
        def inner(x):
            return scale(x, factor)  # the outer computation's parameter

        return mpx.federated_map(inner, xs)

    return outer


def _truth_value_of_a_value(xs):
    if xs:
        return xs
    return xs


def _two_parameters(x, y):
    return x


def _use_struct_member(s):
    return s.b


TRACE_CASES = [
    case("map-python-lambda", lambda: _trace(at_clients(F32))(lambda xs: mpx.federated_map(lambda x: x * 2, xs)),
         TypeError, ["federated_map", "fn", "lambda", "tf_computation"]),
    case("map-plain-python-function", lambda: _trace(at_clients(F32))(lambda xs: mpx.federated_map(_plain_function, xs)),
         TypeError, ["federated_map", "fn", "_plain_function", "decorate"]),
    case("eval-python-lambda", lambda: _trace()(lambda: mpx.federated_eval(lambda: 1.0, mpx.SERVER)),
         TypeError, ["federated_eval", "fn", "decorate"]),
    case("sequence-reduce-python-lambda",
         lambda: _trace(mpx.SequenceType(F32))(lambda s: mpx.sequence_reduce(s, np.float32(0), lambda a, b: a + b)),
         TypeError, ["sequence_reduce", "op", "decorate"]),
    case("closure-over-outer-bound-value", _closure_over_outer_bound_value,
         TypeError, ["federated_map", "fn", "enclosing computation", "argument"]),
    case("closure-over-outer-parameter", _closure_over_outer_parameter,
         TypeError, ["federated_map", "fn", "enclosing computation", "argument"]),
    case("map-federated-computation-with-placements",
         lambda: _trace(at_clients(F32))(lambda xs: mpx.federated_map(_trace(at_clients(F32))(lambda ys: mpx.federated_sum(ys)), xs)),
         TypeError, ["federated_map", "fn", "unplaced"]),
    case("map-fn-parameter-mismatch", lambda: _trace(at_clients(F32))(lambda xs: mpx.federated_map(int_identity, xs)),
         TypeError, ["federated_map", "fn", "int32", "float32"]),
    case("map-unplaced-value", lambda: _trace(F32)(lambda x: mpx.federated_map(double, x)),
         TypeError, ["federated_map", "value", "federated value"]),
    case("sum-of-server-value", lambda: _trace(at_server(F32))(lambda s: mpx.federated_sum(s)),
         TypeError, ["federated_sum", "@CLIENTS", "float32@SERVER"]),
    case("mean-of-ints", lambda: _trace(at_clients(np.int32))(lambda xs: mpx.federated_mean(xs)),
         TypeError, ["federated_mean", "floating-point", "int32"]),
    case("broadcast-of-clients-value", lambda: _trace(at_clients(F32))(lambda xs: mpx.federated_broadcast(xs)),
         TypeError, ["federated_broadcast", "@SERVER", "{float32}@CLIENTS"]),
    case("zip-mixed-placements", lambda: _trace(at_clients(F32), at_server(F32))(lambda a, b: mpx.federated_zip((a, b))),
         TypeError, ["federated_zip", "all at CLIENTS or all at SERVER"]),
    case("aggregate-merge-mismatch",
         lambda: _trace(at_clients(F32))(
             lambda xs: mpx.federated_aggregate(xs, np.float32(0), scale, int_identity, double)),
         TypeError, ["federated_aggregate", "merge", "int32"]),
    case("tf-computation-on-federated-value", lambda: _trace(at_clients(F32))(lambda xs: double(xs)),
         TypeError, ["double", "float32", "{float32}@CLIENTS"]),
    case("unknown-placement-string", lambda: _trace()(lambda: mpx.federated_eval(one, "EVERYWHERE")),
         TypeError, ["federated_eval", "EVERYWHERE", "mpx.CLIENTS"]),
    case("unknown-placement-none", lambda: _trace()(lambda: mpx.federated_value(1.0, None)),
         TypeError, ["federated_value", "None", "mpx.SERVER"]),
    case("unknown-placement-in-type", lambda: mpx.FederatedType(F32, "EDGE"),
         TypeError, ["FederatedType", "EDGE", "mpx.CLIENTS"]),
    case("intrinsic-outside-a-trace", lambda: mpx.federated_map(double, [1.0]),
         RuntimeError, ["federated_map", "federated_computation"]),
    case("body-returns-none", lambda: _trace(at_clients(F32))(lambda xs: None),
         TypeError, ["returned None", "return a value"]),
    case("truth-value-of-a-value", lambda: _trace(at_clients(F32))(_truth_value_of_a_value),
         TypeError, ["truth value", "tf_computation"]),
    case("select-missing-struct-element", lambda: _trace(at_server(mpx.StructType([("a", F32)])))(_use_struct_member),
         AttributeError, ["'b'", "'a'"]),
    case("tf-computation-arity", lambda: mpx.tf_computation(F32)(_two_parameters),
         TypeError, ["tf_computation", "_two_parameters", "2 parameter", "1 type"]),
    case("federated-computation-arity", lambda: mpx.federated_computation(F32)(_two_parameters),
         TypeError, ["federated_computation", "_two_parameters", "2 parameter", "1 type"]),
    case("not-a-type", lambda: mpx.federated_computation("floaty")(_plain_function),
         TypeError, ["'floaty'", "type"]),
]


@pytest.mark.parametrize("c", TRACE_CASES)
def test_trace_time_errors(c, mp_factory):
    before = mp_factory.pool.requests
    with mpx.execution_context(mp_factory):
        problems, error = problems_with(c)
    if mp_factory.pool.requests != before:
        problems.append(f"{mp_factory.pool.requests - before} request(s) were sent to the workers")
    assert not problems, describe(problems, error)


# ============================================================================ factory construction


def _mp(**kwargs):
    return lambda: mpx.mp_executor_factory(**kwargs)


def _local(**kwargs):
    return lambda: mpx.local_executor_factory(**kwargs)


FACTORY_CASES = [
    case("mp-num_workers=0", _mp(num_workers=0), ValueError, ["num_workers=0", "positive integer"]),
    case("mp-num_workers=-1", _mp(num_workers=-1), ValueError, ["num_workers=-1", "positive integer"]),
    case("mp-num_workers=1.5", _mp(num_workers=1.5), ValueError, ["num_workers=1.5", "positive integer"]),
    case("mp-num_workers=x", _mp(num_workers="x"), ValueError, ["num_workers='x'", "positive integer"]),
    case("mp-num_workers=True", _mp(num_workers=True), ValueError, ["num_workers=True", "positive integer"]),
    case("mp-threads_per_worker>cpus", _mp(threads_per_worker=USABLE_CPUS + 1), ValueError,
         [f"threads_per_worker={USABLE_CPUS + 1}", f"at most {USABLE_CPUS}"]),
    case("mp-threads_per_worker=0", _mp(threads_per_worker=0), ValueError, ["threads_per_worker=0", "positive"]),
    case("mp-devices=[9]", _mp(devices=["9"]), ValueError, ["devices", "'9'", "available GPUs"]),
    case("mp-devices=tpu", _mp(devices="tpu"), ValueError, ["devices='tpu'", "'cpu'"]),
    case("mp-devices=[]", _mp(devices=[]), ValueError, ["devices=[]", "'cpu'"]),
    pytest.param(Case("mp-devices=gpu-without-gpu", _mp(devices="gpu"), ValueError, ("devices='gpu'", "'cpu'")),
                 id="mp-devices=gpu-without-gpu", marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")),
    case("mp-workers_per_gpu=0", _mp(workers_per_gpu=0), ValueError, ["workers_per_gpu=0", "positive"]),
    case("mp-memory_per_worker=0", _mp(memory_per_worker=0), ValueError, ["memory_per_worker=0", "'2GB'"]),
    case("mp-memory_per_worker=lots", _mp(memory_per_worker="lots"), ValueError,
         ["memory_per_worker='lots'", "'2GB'"]),
    case("mp-max_retries=-1", _mp(max_retries=-1), ValueError, ["max_retries", ">= 0", "-1"]),
    case("mp-max_fanout=1", _mp(max_fanout=1), ValueError, ["max_fanout", ">= 2"]),
    case("mp-default_num_clients=-1", _mp(default_num_clients=-1), ValueError, ["default_num_clients", ">= 0"]),
    case("mp-start_method=fork", _mp(start_method="fork"), ValueError, ["start_method", "'fork'", "'loky'"]),
    case("mp-client_devices=str", _mp(client_devices="/CPU:0"), ValueError, ["client_devices", "sequence"]),
    case("local-max_fanout=1", _local(max_fanout=1), ValueError, ["max_fanout", ">= 2"]),
    case("local-default_num_clients=-1", _local(default_num_clients=-1), ValueError,
         ["default_num_clients", ">= 0"]),
    case("local-server_device=3", _local(server_device=3), ValueError, ["server_device", "'/CPU:0'"]),
    case("set_mp_execution_context-num_workers=0", lambda: mpx.set_mp_execution_context(num_workers=0),
         ValueError, ["num_workers=0", "positive integer"]),
    case("execution-context-of-a-string", lambda: mpx.ExecutionContext("local"), TypeError,
         ["ExecutorFactory", "local_executor_factory", "str"]),
]


@pytest.mark.parametrize("c", FACTORY_CASES)
def test_factory_construction_errors_start_no_process(c):
    before = child_pids()
    problems, error = problems_with(c)
    started = child_pids() - before
    if started:
        problems.append(f"child processes were started: {sorted(started)}")
    assert not problems, describe(problems, error)


# ============================================================================ ClientData


def _closure_over_a_lock():
    lock = threading.Lock()

    def build(client_id):
        with lock:
            return np.float32(client_id)

    return build


CLIENT_DATA_CASES = [
    case("client-data-unpicklable-fn", lambda: mpx.ClientData(_closure_over_a_lock(), [0, 1]), TypeError,
         ["ClientData", "fn", "build", "lock", "module-level function"]),
    case("client-data-empty-client-ids", lambda: mpx.ClientData(vector_client, []), ValueError,
         ["ClientData", "client_ids", "at least one"]),
    case("client-data-non-callable-fn", lambda: mpx.ClientData([1.0, 2.0], [0, 1]), TypeError,
         ["ClientData", "fn", "callable", "list"]),
    case("client-data-client-ids-not-a-sequence", lambda: mpx.ClientData(vector_client, 5), TypeError,
         ["ClientData", "client_ids", "int"]),
    case("client-data-bad-element-type", lambda: mpx.ClientData(vector_client, [0], element_type="floaty"),
         TypeError, ["ClientData", "element_type", "'floaty'"]),
    case("client-data-fn-returns-non-data", lambda: mpx.ClientData(lambda i: object(), [0]), TypeError,
         ["ClientData", "fn", "element_type"]),
]


@pytest.mark.parametrize("c", CLIENT_DATA_CASES)
def test_client_data_errors(c):
    problems, error = problems_with(c)
    assert not problems, describe(problems, error)


def test_the_table_is_big_enough():
    n = len(CALL_TABLE) + len(TRACE_CASES) + len(FACTORY_CASES) + len(CLIENT_DATA_CASES)
    assert n >= 30, n
