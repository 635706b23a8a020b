"""TFF's executor interface, backed by one of our factories.

What it owns: the objects TFF's execution context talks to.

    tff.framework.SyncExecutionContext(executor_fn=TffExecutorFactory(our_factory))
        create_executor(cardinalities) -> TffExecutor   (cheap; one per cardinalities)
        TffExecutor.create_value(comp)  -> the computation, converted (converter.convert)
        TffExecutor.create_value(value) -> the value, held as it is (nothing is sent yet)
        create_struct / create_selection -> bookkeeping on those
        create_call(comp, arg)          -> ONE invocation of our runtime:
                                           mpx.ExecutionContext(our_factory).invoke(...)

So a TFF call is exactly one call of ours: the argument is checked and
converted, the number of clients inferred, an executor leased from our
factory, a crashed worker retried, all by our `ExecutionContext`; client
values go to the worker that holds their shard with one request per worker
per intrinsic. Nothing is sent until `create_call`, after the computation was
converted, so an unsupported intrinsic is reported before any work starts
(TFF's context ingests the argument before it embeds the computation).

Values cross the boundary in TFF's representation: `structure.Struct` for
structs (TFF's context then restores the user's containers), a list per
CLIENTS value, numpy arrays for tensors, `tf.data.Dataset`s for sequences.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from tensorflow_federated.python.common_libs import structure as tff_structure
from tensorflow_federated.python.core.impl.executors import executor_base as tff_executor_base
from tensorflow_federated.python.core.impl.executors import executor_factory as tff_executor_factory
from tensorflow_federated.python.core.impl.executors import executor_value_base as tff_value_base

from mp_executors.context import ExecutionContext
from mp_executors.core import structure
from mp_executors.core import types as t
from mp_executors.core.computation import Computation
from mp_executors.core.structure import Struct
from mp_executors.factories.base import ExecutorFactory
from mp_executors.factories.local import LocalExecutorFactory
from mp_executors.tff import converter, datasets

# --------------------------------------------------------------------------- values in and out


def to_mpx_value(value: Any) -> Any:
    """A value as TFF hands it over -> what our runtime accepts (TFF Structs -> ours)."""
    if isinstance(value, tff_structure.Struct):
        return Struct((n, to_mpx_value(v)) for n, v in tff_structure.iter_elements(value))
    if isinstance(value, list):
        return [to_mpx_value(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(to_mpx_value(v) for v in value)
    if isinstance(value, dict):
        items = [(k, to_mpx_value(v)) for k, v in value.items()]
        try:
            return type(value)(items)  # dict, OrderedDict: the names' order is kept
        except TypeError:
            return dict(items)
    if hasattr(value, "_fields") or hasattr(type(value), "__attrs_attrs__"):
        names = value._fields if hasattr(value, "_fields") else [a.name for a in type(value).__attrs_attrs__]
        return Struct((n, to_mpx_value(getattr(value, n))) for n in names)
    return value


def to_tff_value(value: Any) -> Any:
    """Our Python result -> TFF's representation (our Structs -> TFF's)."""
    if isinstance(value, Struct):
        return tff_structure.Struct([(n, to_tff_value(v)) for n, v in value.items()])
    if isinstance(value, list):
        return [to_tff_value(v) for v in value]
    return value


class TffValue(tff_value_base.ExecutorValue):
    """A value of a TffExecutor: a computation, an argument held as it is, a struct, or a result."""

    __slots__ = ("_type", "kind", "payload")

    def __init__(self, type_signature: Any, kind: str, payload: Any):
        self._type = type_signature
        self.kind = kind  # 'computation' | 'value' | 'struct' | 'result'
        self.payload = payload

    @property
    def type_signature(self):
        return self._type

    @property
    def reference(self):
        raise NotImplementedError("mp_executors.tff values have no TFF reference.")

    async def compute(self) -> Any:
        if self.kind == "computation":
            raise TypeError("a computation cannot be computed; call it.")
        if self.kind == "struct":
            return tff_structure.Struct([(n, await v.compute()) for n, v in self.payload])
        return self.payload

    def as_argument(self) -> Any:
        """This value as the argument of one of our calls."""
        if self.kind == "struct":
            return Struct((n, v.as_argument()) for n, v in self.payload)
        if self.kind == "computation":
            raise TypeError("passing a computation as an argument is not supported by mp_executors.tff.")
        return to_mpx_value(self.payload)


# --------------------------------------------------------------------------- computations


class TffComputation(Computation):
    """A TFF computation converted to ours: callable under any of our contexts.

    Called with several arguments it packs them into its struct parameter (as
    TFF does); TFF's `structure.Struct` values are accepted anywhere.
    """

    def pack_arguments(self, args: tuple, kwargs: dict) -> Any:
        parameter = self.type_signature.parameter
        args = tuple(to_mpx_value(a) for a in args)
        kwargs = {k: to_mpx_value(v) for k, v in kwargs.items()}
        if parameter is None or (len(args) == 1 and not kwargs):
            return super().pack_arguments(args, kwargs)
        if not isinstance(parameter, t.StructType):
            raise TypeError(f"{self.name} takes one argument of type {parameter}, got {len(args) + len(kwargs)}.")
        names = parameter.names()
        values = list(args) + [None] * (len(parameter) - len(args))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{self.name}: unexpected keyword argument {key!r} (parameters: {names}).")
            values[names.index(key)] = value
        return Struct(zip(names, values))


def _proto_of(comp: Any):
    """The Computation proto of a TFF computation object (or a proto as it is)."""
    if isinstance(comp, converter.pb.Computation):
        return comp
    get_proto = getattr(comp, "get_proto", None)
    if get_proto is not None:
        return get_proto(comp)
    to_bb = getattr(comp, "to_building_block", None)
    if to_bb is not None:
        return to_bb().proto
    proto = getattr(comp, "proto", None)
    if isinstance(proto, converter.pb.Computation):
        return proto
    raise TypeError(
        f"expected a TFF computation (e.g. a tff.federated_computation or a tff.learning process's "
        f"next), got {type(comp).__name__}."
    )


def from_tff(comp: Any, name: str | None = None) -> TffComputation:
    """A TFF computation as an `mpx.Computation`, runnable under any of our contexts."""
    proto = _proto_of(comp)
    name = name or getattr(comp, "__name__", None) or "tff_computation"
    block = converter.convert(proto, name)
    return TffComputation(block, name, unpack=False)


# --------------------------------------------------------------------------- executor and factory


class TffExecutor(tff_executor_base.Executor):
    """TFF's Executor interface; every `create_call` is one call of our runtime."""

    def __init__(self, owner: TffExecutorFactory):
        self._owner = owner

    async def create_value(self, value: Any, type_spec: Any = None) -> TffValue:
        if isinstance(value, TffValue):
            return value
        if _looks_like_computation(value):
            return TffValue(type_spec if type_spec is not None else value.type_signature, "computation",
                            from_tff(value))
        return TffValue(type_spec, "value", value)

    async def create_struct(self, elements: Any) -> TffValue:
        items = list(tff_structure.iter_elements(elements)) if isinstance(elements, tff_structure.Struct) else (
            list(elements.items()) if isinstance(elements, dict) else [(None, e) for e in elements])
        return TffValue(None, "struct", items)

    async def create_selection(self, source: TffValue, index: int | str) -> TffValue:
        if source.kind == "struct":
            if isinstance(index, str):
                for n, v in source.payload:
                    if n == index:
                        return v
                raise AttributeError(f"no element named {index!r}.")
            return source.payload[index][1]
        if source.kind in ("value", "result"):
            value = source.payload
            element = getattr(value, index) if isinstance(index, str) else value[index]
            return TffValue(None, source.kind, element)
        raise TypeError("cannot select from a computation.")

    async def create_call(self, comp: TffValue, arg: TffValue | None = None) -> TffValue:
        if comp.kind != "computation":
            raise TypeError(f"mp_executors.tff can only call computations, got a {comp.kind}.")
        mpx_comp: TffComputation = comp.payload
        argument = None if arg is None else arg.as_argument()
        result = await self._owner.invoke(mpx_comp, argument)
        result_type = comp.type_signature.result if comp.type_signature is not None else None
        return TffValue(result_type, "result", result)

    def close(self) -> None:
        pass


def _looks_like_computation(value: Any) -> bool:
    if isinstance(value, converter.pb.Computation):
        return True
    return hasattr(value, "get_proto") and hasattr(value, "type_signature") and callable(value)


def _datasets_as_client_data(value: Any, type_spec: t.Type | None, shipped: set[str], keys: list[str]) -> Any:
    """Replaces every list of client datasets in an argument by a ClientData (see `tff.datasets`).

    Datasets whose ClientData key is in `shipped` go as digests; every key used is added to `keys`.
    """
    if isinstance(type_spec, t.FederatedType):
        if (type_spec.placement == t.CLIENTS and not type_spec.all_equal
                and isinstance(type_spec.member, t.SequenceType) and datasets.is_dataset_list(value)):
            data = datasets.as_client_data(list(value), type_spec.member, shipped)
            keys.append(data.key)
            return data
        return value
    if isinstance(type_spec, t.StructType) and t.is_federated(type_spec):
        as_struct = structure.from_container(value)
        if as_struct is None or len(as_struct) != len(type_spec):
            return value  # our argument checks report what is wrong
        return Struct((n, _datasets_as_client_data(v, e, shipped, keys))
                      for (n, v), e in zip(as_struct.items(), type_spec))
    return value


class TffExecutorFactory(tff_executor_factory.ExecutorFactory):
    """TFF's `ExecutorFactory` interface over one of our factories.

    It owns an `mpx.ExecutionContext` over `factory` (which does the work) and
    a thread that runs its blocking calls off TFF's event loop. It closes the
    factory on `close()` only when it created it (`owns_factory`).
    """

    def __init__(self, factory: ExecutorFactory, *, owns_factory: bool = False):
        if not isinstance(factory, ExecutorFactory):
            raise TypeError(
                "mp_executors.tff.executor_factory expects one of our factories (mpx.local_executor_factory(), "
                f"mpx.mp_executor_factory(), mpx.ray_executor_factory()), got {type(factory).__name__}."
            )
        self.factory = factory
        self.owns_factory = owns_factory
        self._context = ExecutionContext(factory)
        # Client datasets cross to worker processes as cached descriptions
        # (`tff.datasets`); in-process stacks take them as they are.
        self._ship_datasets = not isinstance(factory, LocalExecutorFactory)
        #: ClientData keys of client datasets the workers received in a call that succeeded.
        self._shipped: set[str] = set()
        #: Calls whose client datasets had to be sent again (a worker lacked them).
        self.datasets_resent = 0
        self._threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="mpx-tff")
        self._lock = threading.Lock()

    async def invoke(self, comp: TffComputation, argument: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self._ship_datasets or argument is None:
            return to_tff_value(await loop.run_in_executor(self._threads, self._context.invoke, comp, argument))
        with self._lock:
            shipped = set(self._shipped)
        keys: list[str] = []
        converted = _datasets_as_client_data(argument, comp.type_signature.parameter, shipped, keys)
        try:
            result = await loop.run_in_executor(self._threads, self._context.invoke, comp, converted)
        except Exception as error:
            if not (set(keys) & shipped and datasets.is_missing_dataset(error)):
                raise
            # A worker lacks datasets sent by digest (restarted, evicted): send the graphs again.
            with self._lock:
                self._shipped.difference_update(keys)
                self.datasets_resent += 1
            converted = _datasets_as_client_data(argument, comp.type_signature.parameter, set(), [])
            result = await loop.run_in_executor(self._threads, self._context.invoke, comp, converted)
        with self._lock:
            self._shipped.update(keys)
        return to_tff_value(result)

    def create_executor(self, cardinalities: Any) -> TffExecutor:
        # Our context infers the number of clients from the argument itself (and
        # checks it); TFF's inference only decides which executor TFF asks for.
        return TffExecutor(self)

    def clean_up_executor(self, cardinalities: Any) -> None:
        # TFF calls this after any failed call; our factory already dropped
        # what a crashed worker held (and retried), so nothing is left to do.
        pass

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        if self.owns_factory:
            self.factory.close()


__all__ = ["TffComputation", "TffExecutor", "TffExecutorFactory", "TffValue", "from_tff", "to_mpx_value",
           "to_tff_value"]
