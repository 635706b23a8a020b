"""How a shard runs `federated_map` over stacked clients: vectorized over fixed groups, or looped.

A shard's map of a tf_computation over Batched/Broadcast columns is ONE TensorFlow call.
Inside it, the per-client function runs either

    vectorized   `tf.vectorized_map` (pfor) over groups of `GROUP_SIZE` consecutive clients
                 of the shard: every op runs once per group on a [G, ...] tensor, instead of
                 once per client (for small models the per-op cost, not FLOPs, is the wall:
                 FACTS.md, ~5x at 1,000 clients of the main job's shape);
    looped       a `tf.while_loop` over the clients, one client per iteration, the same
                 kernels on the same shapes as a per-client call (today's path).

Which one is a `MapPlan`, decided once per (computation digest, which columns are
stacked, leaf shapes, mode) and cached by a `MapPlans` whose owner is explicit: a worker
process's `Worker` (for every shard it hosts), or the local factory (for its in-process
shards). The decision is logged at DEBUG, with the reason when it falls back to the loop.
Deciding costs ~0.2-2.5 s per computation (pfor's conversion, mostly) in every process that
runs shards, so a `MapPlans` also keeps what it decided on disk (`plan_cache`: the vectorized
run function's GraphDef, keyed by everything that decides it): a later process (the next
pool's workers, a rerun) loads it in place of converting, and runs the same graph.

Bitwise results. A per-client result of the vectorized path differs from the looped one in
the last bits (other kernels), so what decides must not depend on how clients are split:
  - the decision depends only on the computation, the stacked mask and the mode (never on
    the shard's size, its data, or the number of workers), so every shard of every stack
    takes the same path;
  - the group size is a constant of the runtime, a multiple of the reduction `BLOCK_SIZE`
    (lowered, for a computation whose traced per-client working set is large, to a size
    that depends on that computation only); groups start at the shard's first client and
    the last one is padded by repeating the shard's last client (its outputs dropped), so
    every vectorized call sees the same [G, ...] shapes and picks the same kernels whatever
    the shard size; what a client's result could still depend on is its position in the
    group and its neighbours' values, which the per-client kernels do not read
    (tests/test_vectorized_map.py checks bitwise equality across local, mp-1, mp-2, mp-3);
  - what would make a client's shapes depend on its neighbours is refused at plan time:
    data-dependent control flow (a `tf.while_loop` trip count or a `tf.cond` predicate
    that depends on the client's values: pfor would split the group by value, so kernel
    shapes would vary with the neighbours), stateful ops (random ops, datasets, prints:
    pfor would change what they produce), and ops pfor cannot convert
    (`fallback_to_while_loop=False`, the error caught). Those run on the loop.

Stateless random ops with per-client seeds (a client's own minibatch order) have no pfor
converter in TensorFlow; `vectorized_random` adds them (bitwise the per-client numbers).

A vectorized call that fails at run time although every client, run alone, succeeds (not
seen so far: the plan-time checks are meant to exclude it) is looped from then on in that
process, with a WARNING that results may then differ in the last bits between stacks.

Memory (and cache): a vectorized group materializes every intermediate tensor for G
clients at once. G is lowered (to BLOCK_SIZE x a power of two) so that G x the per-client
working set (the static sizes of every tensor in the traced per-client graph, loop bodies
counted once) stays under `GROUP_BUDGET`; a computation whose working set exceeds it even
for BLOCK_SIZE clients is looped. At most two groups are alive at a time, so a shard of
10,000 FedAvg clients costs its outputs plus two groups, not 10,000 clients' intermediates.

`MP_EXECUTORS_VECTORIZE` (read when a plan is made, in the process that runs the shard;
worker processes get the parent's value when the pool starts, `planning.WorkerSlot.env`):
`auto` (default) as above; `off` always loops; `on` vectorizes every stacked map, skipping
the safety checks (stateful ops, data-dependent control flow, working set), and fails with
pfor's error when it cannot convert the function. On a TensorFlow whose pfor lacks what
this needs (TF 2.14 has no TopKV2 converter, for one), maps simply loop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from mp_executors._tf import tf
from mp_executors.core import structure
from mp_executors.core import tensorflow_computation as tfc
from mp_executors.core import types as t
from mp_executors.executors import plan_cache, vectorized_random
from mp_executors.executors.reduction_blocks import BLOCK_SIZE

logger = logging.getLogger("mp_executors")

ENV_VAR = "MP_EXECUTORS_VECTORIZE"
MODES = ("auto", "on", "off")

#: Clients vectorized together at most. A constant of the runtime and a multiple of
#: BLOCK_SIZE, never derived from a shard's size, so that a client's result does not depend
#: on how clients are split into shards; lowered per computation by GROUP_BUDGET below.
#: Measured here (1 TF thread, one group; bench numbers in README "Vectorized shards"):
#: the small model (the main job's shape: logreg 60->10, 10 steps of batch 10) costs 98 us
#: per client at G=8, 69 at 32, 58 at 64, 49 at 128, 49 at 256, 47 at 512 (the loop: ~250-
#: 400 us): a group pays ~0.3 ms of per-op cost, so gains flatten past 128, while a larger
#: G pads more of a shard's last group (the local stack's shards hold ~100 clients).
#: FedAvg's client (784->10, 100 full-batch examples, ~1 MB per client) costs the same as
#: the loop (~430-530 us) up to G=64, and MORE from G=128 on (625-700 us: its group no
#: longer fits in cache). Hence a cap of 128 and a working-set budget.
GROUP_SIZE = 128

#: A group's working set (G x the per-client estimate) stays under this: 32 MiB leaves
#: small models at G=128 and FedAvg's clients at G=32 (cache-sized). It also bounds memory:
#: at most two groups are alive at a time (a shard's cost is its outputs plus two groups),
#: so a shard of 10,000 FedAvg clients needs no more working memory than a shard of 100. A runtime
#: constant, not a share of this machine's memory, so G never depends on the pool.
GROUP_BUDGET = 32 * 2**20

#: How many map plans one owner (a worker process, the local factory) keeps (`MapPlans`).
PLANS_PER_OWNER = 64

if GROUP_SIZE % BLOCK_SIZE:
    raise AssertionError("GROUP_SIZE must be a multiple of BLOCK_SIZE")

#: Stateful ops that vectorize without changing what they do: control flow and calls
#: (their bodies are checked op by op) and assertions.
_STATEFUL_BUT_SAFE = frozenset({"While", "If", "Case", "StatefulPartitionedCall", "PartitionedCall", "Assert"})


def vectorize_mode() -> str:
    """The `MP_EXECUTORS_VECTORIZE` mode: 'auto' (default), 'on' or 'off'."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a mode; use one of {', '.join(MODES)} "
                         "(auto: vectorize where it is safe; on: always; off: never).")
    return mode


@dataclasses.dataclass(frozen=True)
class MapPlan:
    """How a shard runs one computation over stacked columns.

    `run(mapped, fixed)` takes the stacked tensors (leading client axis) and the shared
    (Broadcast) tensors, in the order of the parameter's leaves, and returns the stacked
    result leaves. `group_size` is 0 for the loop; `reason` says why this path was taken;
    `cached` whether the decision (and a vectorized run function) came from the plan cache.
    """

    name: str
    digest: str
    vectorized: bool
    group_size: int
    reason: str
    run: Callable[[list, list], list]
    cached: bool = False

    def describe(self) -> str:
        path = f"vectorized in groups of {self.group_size}" if self.vectorized else "looped over clients"
        source = "; from the plan cache" if self.cached else ""
        return f"{self.name} ({self.digest[:12]}): {path} ({self.reason}{source})"


class MapPlans:
    """The map plans of one owner (a worker process's `Worker`, or the local factory).

    Keyed by (computation digest, stacked mask, leaf shapes, mode); built on first use
    (tracing, and for a vectorized plan pfor's conversion, happen once) and kept as long
    as the owner, at most `capacity` of them (least recently used dropped first: a program
    that makes a new computation every round cannot grow a worker without bound). Shards
    of calls made from several threads may share one.

    `cache`: the persistent plan cache consulted before converting and written after
    (`plan_cache`); default `PlanCache.from_env()` (`MP_EXECUTORS_CACHE_DIR`, read now).
    """

    def __init__(self, cache: plan_cache.PlanCache | None = None, capacity: int = PLANS_PER_OWNER):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"MapPlans capacity must be an int >= 1, got {capacity!r}.")
        self.capacity = capacity
        self._plans: collections.OrderedDict[tuple, MapPlan] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.cache = cache if cache is not None else plan_cache.PlanCache.from_env()

    def get(self, function: tfc.TensorFlowFunction, mask: tuple[bool, ...]) -> MapPlan:
        mode = vectorize_mode()
        key = _plan_key(function, mask, mode)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = self._make(function, mask, mode)
                logger.debug("map plan: %s", plan.describe())
                self._plans[key] = plan
                while len(self._plans) > self.capacity:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(key)
        return plan

    def _make(self, function: tfc.TensorFlowFunction, mask: tuple[bool, ...], mode: str) -> MapPlan:
        """The plan from the persistent cache, or decided (and then stored there when worth it)."""
        if mode == "off" or not self.cache.enabled:
            return make_plan(function, mask, mode)
        key, components = cache_key(function, mask, mode)
        plan, found = self._cached(function, mask, key)
        if plan is not None:
            return plan
        # One process converts a key at a time (the workers of a pool get it together); the
        # others wait, then load what it stored (`plan_cache`, "One converter per key").
        with self.cache.lock(key):
            if not found:
                plan, _ = self._cached(function, mask, key)
                if plan is not None:
                    return plan
            decision = _decide(function, mask, mode)
            if decision.worth_caching:
                self.cache.store(key, components, _entry(decision, key))
            return decision.plan

    def _cached(self, function: tfc.TensorFlowFunction, mask: tuple[bool, ...], key: str) -> tuple[MapPlan | None, bool]:
        """(the plan stored under `key` or None, whether an entry was there, even one refused)."""
        entry = self.cache.load(key)
        if entry is None:
            return None, self.cache.path(key).exists()
        try:
            return _plan_from_entry(function, mask, entry), True
        except Exception as e:  # noqa: BLE001 - a stored graph TF cannot import: convert instead
            logger.warning("plan cache: the entry for %s (%s) cannot be loaded (%s); converting again and "
                           "replacing it.", function.name, self.cache.path(key), _first_line(e))
            return None, True

    def demote(self, function: tfc.TensorFlowFunction, mask: tuple[bool, ...], reason: str) -> MapPlan:
        """Replaces a vectorized plan that failed at run time (but whose clients all run alone) by the loop."""
        key = _plan_key(function, mask, vectorize_mode())
        with self._lock:
            plan = _loop_plan(function, mask, f"the vectorized call failed at run time: {reason}")
            self._plans[key] = plan
        logger.warning(
            "%s: vectorizing it failed at run time although every client runs alone (%s); it is looped "
            "from now on in this process. Its results may now differ in the last bits from a run where it "
            "stayed vectorized; set %s=off to loop everywhere.", function.name, reason, ENV_VAR)
        return plan

    def describe(self) -> list[str]:
        """One line per plan (for reports and logs)."""
        with self._lock:
            return [p.describe() for p in self._plans.values()]

    def __len__(self) -> int:
        return len(self._plans)


def cache_key(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], mode: str) -> tuple[str, dict[str, Any]]:
    """The plan cache's key for this plan, and its components (`plan_cache.key_components`)."""
    components = plan_cache.key_components(plan_cache.computation_digest(function), mask, _leaf_shapes(function),
                                           mode, GROUP_SIZE, GROUP_BUDGET, BLOCK_SIZE)
    return plan_cache.cache_key(components), components


def _plan_key(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], mode: str) -> tuple:
    return function.digest, mask, _leaf_shapes(function), mode


def _leaf_shapes(function: tfc.TensorFlowFunction) -> tuple:
    fn_type = function.type_signature
    return tuple(tuple(lt.shape) for lt in _leaves(fn_type.parameter) + _leaves(fn_type.result))


def _leaves(type_spec: t.Type | None) -> list:
    return [] if type_spec is None else structure.flatten_type(type_spec)


# --------------------------------------------------------------------------- planning


def make_plan(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], mode: str) -> MapPlan:
    """Decides (and builds) how to run `function` over stacked columns; see the module docstring."""
    return _decide(function, mask, mode).plan


@dataclasses.dataclass(frozen=True)
class _Decision:
    """A plan as `_decide` made it: for a vectorized one, its run function's GraphDef (for the cache).

    `worth_caching`: deciding it took a conversion attempt (a vectorized plan, or a loop
    decided only after trying), so that a later process would rather load it.
    """

    plan: MapPlan
    worth_caching: bool = False
    graph_def: Any = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()


def _decide(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], mode: str) -> _Decision:
    if mode == "off":
        return _Decision(_loop_plan(function, mask, f"{ENV_VAR}=off"))
    group, per_client = GROUP_SIZE, 0
    graph_def = tf.compat.v1.GraphDef.FromString(function.graph_def)
    if mode == "auto":
        reason = _stateful_reason(graph_def)
        if reason:
            return _Decision(_loop_plan(function, mask, reason))
    try:
        vectorized_random.register()
        library = _rebuild_library(graph_def)
        if mode == "auto":
            per_client = _working_set_bytes(function, library)
            group = _bounded_group(per_client)
            if group == 0:
                return _Decision(_loop_plan(
                    function, mask, f"per-client working set ~{per_client / 2**20:.1f} MiB: a group of "
                    f"{BLOCK_SIZE} would exceed the {GROUP_BUDGET / 2**20:.0f} MiB budget"), worth_caching=True)
        with _quiet_pfor():
            run = _make_vectorized_map(function, graph_def, library, mask, group)
            concrete = run.get_concrete_function()
    except Exception as e:  # noqa: BLE001 - any conversion failure means "loop", with its reason
        message = _first_line(e)
        if mode == "on":
            raise ValueError(f"{ENV_VAR}=on, but {function.name!r} cannot be vectorized: {message}") from e
        return _Decision(_loop_plan(function, mask, f"pfor cannot vectorize it: {message}"), worth_caching=True)
    # One GraphDef of the whole run function (its library holds the converted group
    # function): checked here, and what the plan cache stores.
    run_graph_def = concrete.graph.as_graph_def()
    if mode == "auto":
        reason = _data_dependent_reason(run_graph_def)
        if reason:
            return _Decision(_loop_plan(function, mask, reason), worth_caching=True)
    why = f"{ENV_VAR}=on" if mode == "on" else "no stateful ops or data-dependent control flow"
    if group < GROUP_SIZE:
        why += f"; lowered from {GROUP_SIZE}: ~{per_client / 2**20:.2f} MiB per client, budget {GROUP_BUDGET / 2**20:.0f} MiB"
    plan = MapPlan(function.name, function.digest, True, group, why, concrete)
    if concrete.captured_inputs:  # not expected (the inputs are the only tensors): then not portable
        return _Decision(plan)
    return _Decision(plan, True, run_graph_def, tuple(x.name for x in concrete.inputs),
                     tuple(x.name for x in concrete.outputs))


def _entry(decision: _Decision, key: str) -> plan_cache.Entry:
    """The cache entry of a decision; a vectorized run function's library renamed for this key.

    The stored function names (`while_body_155`, `__inference_run_88`) come from the process
    that converted; another process importing them may already hold functions of those
    names (its own traces). Suffixing them with the key makes them unique per plan (two
    loads of one key define identical functions, which TensorFlow accepts).
    """
    plan = decision.plan
    if not plan.vectorized:
        return plan_cache.Entry(False, 0, plan.reason)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.CopyFrom(decision.graph_def)
    renames = {f.signature.name: f"{f.signature.name}_plan_{key[:16]}" for f in graph_def.library.function}
    for fdef in graph_def.library.function:
        fdef.signature.name = renames[fdef.signature.name]
        for node in fdef.node_def:
            _rename_refs(node, renames)
    for node in graph_def.node:
        _rename_refs(node, renames)
    return plan_cache.Entry(True, plan.group_size, plan.reason, graph_def.SerializeToString(),
                            decision.input_names, decision.output_names)


def _plan_from_entry(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], entry: plan_cache.Entry) -> MapPlan:
    if not entry.vectorized:
        return dataclasses.replace(_loop_plan(function, mask, entry.reason), cached=True)
    pruned = tfc.import_graph(entry.graph_def, entry.input_names, entry.output_names)

    def run(mapped: list, fixed: list) -> list:
        return pruned(*mapped, *fixed)

    return MapPlan(function.name, function.digest, True, entry.group_size, entry.reason, run, cached=True)


def _loop_plan(function: tfc.TensorFlowFunction, mask: tuple[bool, ...], reason: str) -> MapPlan:
    return MapPlan(function.name, function.digest, False, 0, reason, make_loop_map(tfc.load(function), mask))


def _first_line(e: BaseException) -> str:
    while isinstance(e, TypeError) and (e.__cause__ or e.__context__) is not None:
        # pfor's error report itself fails on ops imported from a GraphDef (their traceback is
        # None: "'NoneType' object is not iterable"), once per nested loop, hiding the
        # conversion error it reported (e.g. a per-client Conv2D filter): report that one.
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("File ")]
    text = next((ln for ln in lines if "pfor" in ln or "expected to be loop invariant" in ln), None)
    text = text or (lines[-1] if lines else type(e).__name__)
    return f"{type(e).__name__}: {text[:300]}"


def _all_nodes(graph_def) -> list:
    nodes = list(graph_def.node)
    for fdef in graph_def.library.function:
        nodes += list(fdef.node_def)
    return nodes


def _stateful_reason(graph_def) -> str | None:
    """Why the function must not be vectorized because of a stateful op, or None."""
    from tensorflow.python.framework import op_def_registry  # noqa: PLC0415 - TF internals, only here

    for node in _all_nodes(graph_def):
        op_def = op_def_registry.get(node.op)
        if op_def is not None and op_def.is_stateful and node.op not in _STATEFUL_BUT_SAFE:
            return f"stateful op {node.op} ({node.name})"
    return None


def _data_dependent_reason(graph_def) -> str | None:
    """Whether pfor split the group by value (a data-dependent loop trip count or cond)."""
    # pfor converts a while loop whose condition, or a cond whose predicate, depends on the
    # client into a partition of the group's indices by value (DynamicPartition): the body
    # then runs on however many clients are still active, shapes that depend on the
    # neighbours. A user's own dynamic_partition is refused too (data-dependent shapes).
    for node in _all_nodes(graph_def):
        if node.op == "DynamicPartition":
            return ("data-dependent control flow (a tf.while_loop trip count or tf.cond predicate "
                    "depends on the client's values)")
    return None


def _bounded_group(per_client_bytes: int) -> int:
    """The largest of BLOCK_SIZE x 1, 2, 4, ... up to GROUP_SIZE that fits GROUP_BUDGET; 0 if none does.

    Powers of two (times BLOCK_SIZE): a handful of possible group shapes, each a divisor of
    the larger ones, so groups tile shards (multiples of BLOCK_SIZE) with little padding.
    """
    fits = GROUP_BUDGET // max(1, per_client_bytes)
    group = 0
    while group * 2 <= GROUP_SIZE and max(group * 2, BLOCK_SIZE) <= fits:
        group = max(group * 2, BLOCK_SIZE)
    return group


def _working_set_bytes(function: tfc.TensorFlowFunction, library: _Library) -> int:
    """Static sizes of every tensor of the per-client graph (loop bodies once; unknown dims as 1)."""
    graphs = [tfc.load(function).pruned.graph] + [fn.graph for fn in library.functions.values()]
    total = 0
    for graph in graphs:
        for op in graph.get_operations():
            for out in op.outputs:
                if out.dtype in (tf.variant, tf.resource, tf.string):
                    continue
                dims = out.shape.as_list() if out.shape.rank is not None else []
                total += int(np.prod([d or 1 for d in dims], dtype=np.int64)) * out.dtype.size
    return total


# --------------------------------------------------------------------------- the per-client graph for pfor


@dataclasses.dataclass
class _Library:
    """The function library of a traced graph, rebuilt as FuncGraph-backed functions.

    `wrap_function` + `import_graph_def` (how `tensorflow_computation.load` imports a graph)
    registers library functions (while-loop bodies, conds) in a legacy form pfor cannot
    read (no FuncGraph). pfor needs each as a ConcreteFunction over a FuncGraph with its
    function type, as tracing makes them: rebuilt here from their FunctionDefs, in
    dependency order, each under a fresh name (`renames`) so that two computations'
    `while_body_53` never collide.
    """

    functions: dict[str, Any]
    renames: dict[str, str]


def _rename_refs(node, renames: dict[str, str]) -> None:
    if node.op in renames:
        node.op = renames[node.op]
    for value in node.attr.values():
        kind = value.WhichOneof("value")
        if kind == "func" and value.func.name in renames:
            value.func.name = renames[value.func.name]
        elif kind == "list":
            for f in value.list.func:
                if f.name in renames:
                    f.name = renames[f.name]


def _rebuild_library(graph_def) -> _Library:
    # TensorFlow internals (what SavedModel loading uses), imported only where needed.
    from tensorflow.core.framework import function_pb2  # noqa: PLC0415
    from tensorflow.core.function.polymorphism import function_type as function_type_lib  # noqa: PLC0415
    from tensorflow.python.eager.polymorphic_function import concrete_function  # noqa: PLC0415
    from tensorflow.python.framework import function_def_to_graph  # noqa: PLC0415

    fdefs = {f.signature.name: f for f in graph_def.library.function}
    deps = {name: {r for n in f.node_def for r in tfc.function_refs(n) if r in fdefs} for name, f in fdefs.items()}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"the function library has a cycle through {name}")
        for dep in sorted(deps[name]):
            visit(dep, path + (name,))
        order.append(name)

    for name in sorted(fdefs):
        visit(name, ())
    functions: dict[str, Any] = {}
    renames: dict[str, str] = {}
    scratch = tf.Graph()
    for name in order:
        fdef = function_pb2.FunctionDef()
        fdef.CopyFrom(fdefs[name])
        for node in fdef.node_def:
            _rename_refs(node, renames)
        with scratch.as_default():
            graph = function_def_to_graph.function_def_to_graph(fdef)
        for dep in deps[name]:
            functions[dep].add_to_graph(graph)
        graph.structured_input_signature = (tuple(tf.TensorSpec.from_tensor(x) for x in graph.inputs), {})
        graph.structured_outputs = list(graph.outputs)
        fn_type = function_type_lib.from_structured_signature(
            graph.structured_input_signature, graph.structured_outputs, graph.function_captures.capture_types)
        attrs = {k: v for k, v in fdef.attr.items() if k != "_input_shapes"}
        fn = concrete_function.ConcreteFunction.from_func_graph(graph, fn_type, attrs=attrs)
        fn.add_to_graph(scratch)
        functions[name] = fn
        renames[name] = fn.name.decode() if isinstance(fn.name, bytes) else fn.name
    return _Library(functions, renames)


def _make_vectorized_map(function: tfc.TensorFlowFunction, graph_def, library: _Library,
                         mask: tuple[bool, ...], group: int):
    """A tf.function (mapped, fixed) -> stacked outputs, vectorized over groups of `group` clients."""
    top = tf.compat.v1.GraphDef()
    top.CopyFrom(graph_def)
    del top.library.function[:]
    for node in top.node:
        _rename_refs(node, library.renames)
    fn_type = function.type_signature
    leaves = _leaves(fn_type.parameter)
    mapped_specs = [tf.TensorSpec([None, *lt.shape], tfc.tf_dtype(lt.dtype)) for lt, m in zip(leaves, mask) if m]
    fixed_specs = [tf.TensorSpec(lt.shape, tfc.tf_dtype(lt.dtype)) for lt, m in zip(leaves, mask) if not m]
    out_leaves = _leaves(fn_type.result)
    out_specs = [(tfc.tf_dtype(lt.dtype), [group, *lt.shape]) for lt in out_leaves]

    def one_client(mapped_one, fixed):
        it_m, it_f = iter(mapped_one), iter(fixed)
        # identity: captures the shared (outer) tensors into pfor's loop graph, which
        # import_graph_def's input_map does not do by itself.
        args = [next(it_m) if m else tf.identity(next(it_f)) for m in mask]
        for fn in library.functions.values():
            fn.add_to_graph()
        return tf.graph_util.import_graph_def(
            top, input_map=dict(zip(function.input_names, args)),
            return_elements=list(function.output_names), name="client")

    group_specs = [tf.TensorSpec([group, *spec.shape[1:]], spec.dtype) for spec in mapped_specs]

    @tf.function(autograph=False)
    def vectorized_group(members, fixed):
        return tf.vectorized_map(lambda ms: one_client(ms, fixed), members, fallback_to_while_loop=False, warn=False)

    # Traced (and converted by pfor) here, once, for exactly [group, ...] shapes. Calling
    # it from the loop below as a function of its own measured ~2x faster than inlining
    # the vectorized_map into the loop body. (It is in the run function's library.)
    group_fn = vectorized_group.get_concrete_function(group_specs, fixed_specs)

    @tf.function(input_signature=[mapped_specs, fixed_specs], autograph=False)
    def run(mapped, fixed):
        n = tf.shape(mapped[0])[0]
        groups = (n + group - 1) // group
        arrays = tuple(tf.TensorArray(dtype, size=groups, element_shape=shape) for dtype, shape in out_specs)

        def full_group(begin):
            # A slice on the leading axis shares the column's buffer (no copy of client data).
            return [tf.ensure_shape(m[begin:begin + group], spec.shape) for m, spec in zip(mapped, group_specs)]

        def padded_group(begin):
            # Past the shard's end, its last client again (outputs dropped below), so the
            # last group has the same shape as every other.
            index = tf.minimum(tf.range(begin, begin + group), n - 1)
            return [tf.gather(m, index) for m in mapped]

        def body(g, arrays):
            begin = g * group
            members = tf.cond(begin + group <= n, lambda: full_group(begin), lambda: padded_group(begin))
            outputs = group_fn(members, fixed)
            return g + 1, tuple(a.write(g, o) for a, o in zip(arrays, outputs))

        # Two groups in flight: a process with several TF threads overlaps them (measured
        # ~1.3x on a 1,000-client in-process shard, 2 threads); memory is then at most
        # 2 x GROUP_BUDGET of working set, whatever the shard's size.
        _, arrays = tf.while_loop(lambda g, _: g < groups, body, (tf.constant(0), arrays), parallel_iterations=2)
        return [a.concat()[:n] for a in arrays]

    return run


class _quiet_pfor:
    """Drops pfor's ERROR dumps of a conversion that failed (the plan reports the reason at DEBUG)."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = str(record.msg)
            # (and its warning that a per-client Conv2D filter gradient would loop: the
            # conversion then fails on the Conv2D itself, and the plan says so)
            return not (msg.startswith("Got error while pfor") or msg.startswith("%s\ncreated at:")
                        or msg.startswith("Conv2DBackpropFilter uses a while_loop"))

    def __enter__(self):
        self._filter = self._Filter()
        logging.getLogger("tensorflow").addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tensorflow").removeFilter(self._filter)
        return False


# --------------------------------------------------------------------------- the loop


def make_loop_map(loaded: tfc.LoadedFunction, mask: tuple[bool, ...]):
    """One tf.function that applies `loaded` to every client inside the graph, one at a time.

    A while loop that slices client i out of each stacked input (`x[i]` on the
    leading axis does not copy) and writes each output into a TensorArray.
    Unlike `tf.map_fn`, the stacked inputs are not first unstacked into a
    TensorList, which would copy every byte of client data on every call.
    Each iteration runs the same kernels on the same shapes as a single
    client's call, so the results are bitwise those of per-client calls.
    """
    out_specs = [(tfc.tf_dtype(lt.dtype), lt.shape) for lt in loaded.result_leaves]

    @tf.function(reduce_retracing=True)
    def run(mapped, fixed):
        n = tf.shape(mapped[0])[0]
        arrays = tuple(tf.TensorArray(dtype, size=n, element_shape=shape) for dtype, shape in out_specs)

        def body(i, arrays):
            it_m, it_f = iter(mapped), iter(fixed)
            args = [next(it_m)[i] if m else next(it_f) for m in mask]
            outputs = loaded.pruned(*args)
            return i + 1, tuple(a.write(i, o) for a, o in zip(arrays, outputs))

        _, arrays = tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), arrays))
        return [a.stack() for a in arrays]

    return run
