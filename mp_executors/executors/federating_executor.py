"""`FederatingExecutor`: placements and intrinsics; the thin layer over shards.

It owns where every federated value lives. SERVER and unplaced values live in
the parent, in its `EagerTFExecutor`. A CLIENTS value lives in the shards
(`ClientShard`s, in this process or in worker processes): the parent only
holds a handle, and each intrinsic is ONE request per shard:

    broadcast      the server value is sent once per shard
    map / eval     run inside each shard over its clients
    zip / select   column bookkeeping inside each shard
    sum / mean / min / max / aggregate
                   each shard returns per-block partials; the parent folds
                   them in client order (`client_shard.merge_partials`)
    compute()      the only time client values travel back to the parent

Each request is one of the named types of `shard_requests` (Put, Map,
Reduce, ...). The shards are given as `ShardTarget`s (the protocol below):
`in_process_shard.InProcessShard`, the worker pool's `RemoteShard` proxies in
`mp_executors.workers`. An intrinsic's requests are prepared for every shard
(which may set resources aside, e.g. shared memory) and then sent, with no
await in between; whatever was prepared for a request that is not sent (bad
input, an exception, Ctrl-C) is given back at once, and whatever a sent
request holds is given back by its shard when it completes. Intrinsics are
dispatched through an explicit table (`_INTRINSICS`).
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from mp_executors.core import building_blocks as bb
from mp_executors.core import structure, type_inference, uris, values
from mp_executors.core import types as t
from mp_executors.core.client_data import ClientData
from mp_executors.core.structure import Struct
from mp_executors.executors import shard_requests as rq
from mp_executors.executors.client_shard import merge_partials
from mp_executors.executors.eager_tf_executor import EagerTFExecutor, EagerValue
from mp_executors.executors.executor_base import Executor, ExecutorValue, element_items
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor


class ShardTarget(Protocol):
    """Where a FederatingExecutor's CLIENTS values of clients [start, stop) live."""

    start: int
    stop: int

    def prepare(self, request: rq.ShardRequest) -> rq.ShardRequest:
        """Turns a request into what `send` sends; raises on what cannot be sent.

        May set resources aside for it (shared memory): `send` or `discard`
        gives them back.
        """

    def discard(self, request: rq.ShardRequest) -> None:
        """Gives back what `prepare` set aside for `request`, which will not be sent."""

    def send(self, releases: tuple[int, ...], request: rq.ShardRequest) -> Awaitable[Any]:
        """Sends `request` now (first dropping the `releases` handles); the reply is awaited later.

        Cancelling the awaitable abandons the reply, not the request.
        """

    def close(self) -> None: ...


class FederatedValue(ExecutorValue):
    """kind: 'clients' (a handle), 'eager' (an EagerValue), 'struct', 'function'."""

    __slots__ = ("_type", "kind", "payload", "_executor")

    def __init__(self, type_signature: t.Type, kind: str, payload: Any, executor: FederatingExecutor | None = None):
        self._type = type_signature
        self.kind = kind
        self.payload = payload
        if kind == "clients" and executor is not None:
            weakref.finalize(self, executor._release_later, payload)
        self._executor = executor

    @property
    def type_signature(self) -> t.Type:
        return self._type

    async def compute(self) -> Any:
        if self._executor is not None:
            await self._executor._drain()
        if self.kind == "clients":
            return await self._executor._gather(self)
        if self.kind == "eager":
            return await self.payload.compute()
        if self.kind == "struct":
            return Struct([(n, await v.compute()) for n, v in self.payload])
        raise TypeError(f"a function value ({self._type}) cannot be computed; call it instead.")


class FederatingExecutor(Executor):
    """Runs intrinsics over SERVER values (in `server`) and CLIENTS shards."""

    def __init__(self, server: EagerTFExecutor, shards: list[ShardTarget], num_clients: int):
        if shards and (shards[0].start != 0 or shards[-1].stop != num_clients):
            raise ValueError("the shards must cover clients [0, num_clients) contiguously.")
        self._server = server
        self._server_stack = ReferenceResolvingExecutor(server)
        self._shards = list(shards)
        self._num_clients = num_clients
        self._handles = itertools.count(1)
        self._pending_release: list[int] = []
        self._inflight: list[asyncio.Future] = []  # requests sent with wait=False

    @property
    def num_clients(self) -> int:
        return self._num_clients

    @property
    def shards(self) -> list[ShardTarget]:
        return self._shards

    # ------------------------------------------------------------------ shard plumbing

    async def _each(self, request: rq.ShardRequest | None = None, *,
                    per_shard: Callable[[ShardTarget], rq.ShardRequest] | None = None,
                    wait: bool = True) -> list[Any] | None:
        """One request per shard, concurrently; `per_shard(shard)` gives a shard's own request.

        With `wait=False` (requests whose reply is only an acknowledgement:
        put, broadcast, map, zip, ...) the requests are sent and not awaited:
        a worker runs its requests in order, so the next intrinsic can be sent
        at once, and the parent spends one round-trip latency per call instead
        of one per intrinsic. Their outcome is collected by `_drain()` before
        any reply is read, and before any value is computed, so an error (or a
        dead worker) is still reported, in order. A request whose reply is
        awaited is sent before that drain too (it runs after them in the worker
        anyway; if one of them failed, its own outcome is never read), so a
        round's reduce travels with the map it reduces.
        """
        if not self._shards:
            raise ValueError(
                "this computation has CLIENTS-placed values but the number of clients is 0; pass a "
                "CLIENTS argument with one value per client, or set default_num_clients on the factory."
            )
        # Prepare every shard's request first (this may refuse bad input, e.g. a
        # dataset that cannot leave this process), so nothing is sent unless all
        # can be; then send them all. There is no await from the first prepare to
        # the last send, so a cancellation cannot land in between; an exception
        # (or a Ctrl-C on this thread) can, and then what was prepared for the
        # requests not sent is given back here.
        # A tuple: handles freed from now on go to the next request, never into this one.
        releases, self._pending_release = tuple(self._pending_release), []
        prepared: list[rq.ShardRequest] = []
        replies: list[Awaitable[Any]] = []
        try:
            for s in self._shards:
                prepared.append(s.prepare(per_shard(s) if per_shard else request))
            for s, r in zip(self._shards, prepared):
                replies.append(s.send(releases, r))
        except BaseException:
            unsent = len(replies)
            for s, r in zip(self._shards[unsent:], prepared[unsent:]):
                s.discard(r)
            # Releasing twice is harmless, never releasing leaks: the shards this
            # request did not reach get these handles with the next one.
            self._pending_release[:0] = releases
            for reply in replies:  # sent: their outcome no longer matters
                if isinstance(reply, asyncio.Future):
                    reply.cancel()
            raise
        gathered = asyncio.gather(*replies, return_exceptions=True)
        if not wait:
            self._inflight.append(gathered)
            return None
        await self._drain()
        return _first_error_or(await gathered)

    async def _drain(self) -> None:
        """Waits for every request sent without waiting; raises the first failure."""
        while self._inflight:
            inflight, self._inflight = self._inflight, []
            outcomes = [await f for f in inflight]
            for results in outcomes:
                _first_error_or(results)

    def _release_later(self, handle: int) -> None:
        """A CLIENTS value was dropped: its handle is freed with the next request."""
        self._pending_release.append(handle)

    def _new_clients(self, member: t.Type, all_equal: bool, handle: int) -> FederatedValue:
        return FederatedValue(t.FederatedType(member, t.CLIENTS, all_equal), "clients", handle, self)

    async def _gather(self, value: FederatedValue) -> Any:
        if value.type_signature.all_equal:
            return await self._shards[0].send((), rq.GetFirst(value.payload))
        parts = await self._each(rq.Get(value.payload))
        return [v for part in parts for v in part]

    def _eager(self, rep: Any, type_spec: t.Type) -> FederatedValue:
        return FederatedValue(type_spec, "eager", EagerValue(rep, _unplaced(type_spec)), self)

    async def _rep(self, value: FederatedValue) -> Any:
        if value.kind == "eager":
            return value.payload.rep
        if value.kind == "struct":
            return Struct([(n, await self._rep(v)) for n, v in value.payload])
        raise TypeError(f"expected an unplaced or SERVER value, got {value.type_signature}.")

    async def _apply(self, fn: bb.BuildingBlock, arg_rep: Any) -> Any:
        """Applies an unplaced function in the parent (SERVER side); returns a rep."""
        stack = self._server_stack
        fn_value = await stack.create_value(fn)
        arg_value = None if arg_rep is None else await stack.create_value(arg_rep, fn.type_signature.parameter)
        result = await stack.create_call(fn_value, arg_value)
        return await result.compute()

    # ------------------------------------------------------------------ Executor API

    async def create_value(self, value: Any, type_spec: Any = None) -> FederatedValue:
        if isinstance(value, FederatedValue):
            return value
        if isinstance(value, (bb.Intrinsic, bb.CompiledComputation, bb.Lambda)):
            return FederatedValue(value.type_signature, "function", value, self)
        if isinstance(value, bb.PlacementLiteral):
            return FederatedValue(value.type_signature, "function", value, self)
        type_spec = type_inference.infer_type(value) if type_spec is None else t.to_type(type_spec)
        if isinstance(type_spec, t.FederatedType):
            return await self._place(value, type_spec)
        if isinstance(type_spec, t.StructType) and t.is_federated(type_spec):
            items = structure.from_container(value).items()
            parts = [(n, await self.create_value(v, et)) for (n, v), et in zip(items, type_spec)]
            return FederatedValue(t.StructType([(n, p.type_signature) for n, p in parts]), "struct", parts, self)
        eager = await self._server.create_value(value, type_spec)
        return FederatedValue(type_spec, "eager", eager, self)

    async def _place(self, value: Any, type_spec: t.FederatedType) -> FederatedValue:
        if type_spec.placement == t.SERVER:
            eager = await self._server.create_value(value, type_spec.member)
            return FederatedValue(type_spec, "eager", eager, self)
        handle = next(self._handles)
        if type_spec.all_equal:
            rep = values.to_representation(value, type_spec.member, "value")
            await self._each(rq.PutAllEqual(handle, type_spec.member, rep), wait=False)
            return self._new_clients(type_spec.member, True, handle)
        if len(value) != self._num_clients:
            raise ValueError(
                f"a CLIENTS value has {len(value)} clients but this executor was built for "
                f"{self._num_clients}; every CLIENTS value of one call must have the same number of clients."
            )

        def part(shard: ShardTarget) -> rq.Put:
            if isinstance(value, ClientData):
                return rq.Put(handle, type_spec.member, value.subset(shard.start, shard.stop))
            return rq.Put(handle, type_spec.member, list(value[shard.start : shard.stop]))

        await self._each(per_shard=part, wait=False)
        return self._new_clients(type_spec.member, False, handle)

    async def create_struct(self, elements: Any) -> FederatedValue:
        items = element_items(elements)
        return FederatedValue(t.StructType([(n, v.type_signature) for n, v in items]), "struct", items, self)

    async def create_selection(self, source: ExecutorValue, index: int | str) -> FederatedValue:
        ts = source.type_signature
        if source.kind == "struct":
            return source.payload[ts.index_of(index)][1]
        if source.kind == "eager":
            eager = await self._server.create_selection(source.payload, index)
            return FederatedValue(eager.type_signature, "eager", eager, self)
        raise TypeError(f"cannot select {index!r} from a value of type {ts}.")

    async def create_call(self, comp: ExecutorValue, arg: ExecutorValue | None = None) -> FederatedValue:
        if comp.kind != "function":
            raise TypeError(f"cannot call a value of type {comp.type_signature}.")
        fn = comp.payload
        if isinstance(fn, bb.Intrinsic):
            handler = _INTRINSICS.get(fn.uri)
            if handler is None:
                raise NotImplementedError(
                    f"intrinsic {fn.uri!r} is not implemented by the FederatingExecutor "
                    f"(it implements: {', '.join(sorted(_INTRINSICS))})."
                )
            if handler is _SEQUENCE:
                return await self._sequence_intrinsic(fn, arg)
            operands = [arg] if fn.type_signature.parameter is None or not _is_operand_struct(fn) else [v for _, v in arg.payload]
            return await handler(self, fn.type_signature, *operands)
        rep = await self._apply(fn, None if arg is None else await self._rep(arg))
        return self._eager(rep, fn.type_signature.result)

    async def _sequence_intrinsic(self, fn: bb.Intrinsic, arg: FederatedValue) -> FederatedValue:
        """sequence_* on unplaced sequences: the server's eager executor runs them."""
        eager = await self._server.create_call(await self._server.create_value(fn), await self._to_eager(arg))
        return FederatedValue(fn.type_signature.result, "eager", eager, self)

    async def _to_eager(self, value: FederatedValue) -> EagerValue:
        if value.kind == "eager":
            return value.payload
        if value.kind == "struct":
            parts = [(n, await self._to_eager(v)) for n, v in value.payload]
            return await self._server.create_struct(Struct(parts))
        if value.kind == "function":
            return await self._server.create_value(value.payload)
        raise TypeError(f"expected an unplaced value, got {value.type_signature}.")

    def close(self) -> None:
        for shard in self._shards:
            shard.close()
        self._server.close()

    # ------------------------------------------------------------------ intrinsics

    async def _federated_value_at_clients(self, fn_type, value):
        handle = next(self._handles)
        await self._each(rq.PutAllEqual(handle, value.type_signature, await self._rep(value)), wait=False)
        return self._new_clients(value.type_signature, True, handle)

    async def _federated_value_at_server(self, fn_type, value):
        return self._eager(await self._rep(value), fn_type.result)

    async def _federated_eval_at_clients(self, fn_type, fn):
        handle = next(self._handles)
        await self._each(rq.Eval(handle, fn.payload), wait=False)
        return self._new_clients(fn_type.result.member, False, handle)

    async def _federated_eval_at_server(self, fn_type, fn):
        return self._eager(await self._apply(fn.payload, None), fn_type.result)

    async def _federated_broadcast(self, fn_type, value):
        handle = next(self._handles)
        await self._each(rq.PutAllEqual(handle, fn_type.result.member, await self._rep(value)), wait=False)
        return self._new_clients(fn_type.result.member, True, handle)

    async def _federated_map(self, fn_type, fn, value):
        handle = next(self._handles)
        await self._each(rq.Map(handle, fn.payload, value.payload), wait=False)
        return self._new_clients(fn_type.result.member, False, handle)

    async def _federated_apply(self, fn_type, fn, value):
        return self._eager(await self._apply(fn.payload, await self._rep(value)), fn_type.result)

    async def _federated_zip_at_clients(self, fn_type, value):
        handle = next(self._handles)
        if value.kind != "struct" or any(v.kind != "clients" for _, v in value.payload):
            raise TypeError(f"federated_zip expects a struct of CLIENTS values, got {value.type_signature}.")
        parts = tuple((n, v.payload) for n, v in value.payload)
        await self._each(rq.Zip(handle, parts, fn_type.result.member.container_type), wait=False)
        return self._new_clients(fn_type.result.member, fn_type.result.all_equal, handle)

    async def _federated_zip_at_server(self, fn_type, value):
        return self._eager(await self._rep(value), fn_type.result)

    async def _federated_select_member(self, fn_type, value, index):
        i = int(await self._rep(index))
        if value.kind == "clients":
            handle = next(self._handles)
            await self._each(rq.Select(handle, value.payload, i), wait=False)
            return self._new_clients(fn_type.result.member, fn_type.result.all_equal, handle)
        return self._eager((await self._rep(value))[i], fn_type.result)

    async def _reduce(self, op: str, value: FederatedValue, weight: int | None = None) -> Any:
        return await self._each(rq.Reduce(op, value.payload, weight))

    async def _federated_sum(self, fn_type, value):
        return self._eager(merge_partials(await self._reduce("sum", value), np.add), fn_type.result)

    async def _federated_min(self, fn_type, value):
        return self._eager(merge_partials(await self._reduce("min", value), np.minimum), fn_type.result)

    async def _federated_max(self, fn_type, value):
        return self._eager(merge_partials(await self._reduce("max", value), np.maximum), fn_type.result)

    async def _federated_mean(self, fn_type, value):
        total = merge_partials(await self._reduce("sum", value), np.add)
        n = self._num_clients
        return self._eager(structure.map_structure(lambda x: np.divide(x, np.asarray(n, x.dtype)), total), fn_type.result)

    async def _federated_weighted_mean(self, fn_type, value, weight):
        partials = await self._reduce("weighted_sum", value, weight.payload)
        sums = merge_partials([p[0] for p in partials], np.add)
        weights = merge_partials([p[1] for p in partials], np.add)
        mean = structure.map_structure(lambda x: np.divide(x, weights.astype(x.dtype)), sums)
        return self._eager(mean, fn_type.result)

    async def _federated_aggregate(self, fn_type, value, zero, accumulate, merge, report):
        zero_rep = await self._rep(zero)
        parts = await self._each(rq.Aggregate(value.payload, zero_rep, accumulate.payload))
        partials = [p for part in parts for p in part]
        acc = partials[0]
        for partial in partials[1:]:
            acc = await self._apply(merge.payload, Struct.unnamed(acc, partial))
        return self._eager(await self._apply(report.payload, acc), fn_type.result)


#: Marks the sequence_* intrinsics in `_INTRINSICS`: run by the server's executor.
_SEQUENCE = object()

#: The intrinsics this executor implements: uri -> handler(executor, fn_type, *operands).
_INTRINSICS: dict[str, Any] = {
    uris.FEDERATED_VALUE_CLIENTS: FederatingExecutor._federated_value_at_clients,
    uris.FEDERATED_VALUE_SERVER: FederatingExecutor._federated_value_at_server,
    uris.FEDERATED_EVAL_CLIENTS: FederatingExecutor._federated_eval_at_clients,
    uris.FEDERATED_EVAL_SERVER: FederatingExecutor._federated_eval_at_server,
    uris.FEDERATED_BROADCAST: FederatingExecutor._federated_broadcast,
    uris.FEDERATED_MAP: FederatingExecutor._federated_map,
    uris.FEDERATED_APPLY: FederatingExecutor._federated_apply,
    uris.FEDERATED_ZIP_CLIENTS: FederatingExecutor._federated_zip_at_clients,
    uris.FEDERATED_ZIP_SERVER: FederatingExecutor._federated_zip_at_server,
    uris.FEDERATED_SELECT_MEMBER: FederatingExecutor._federated_select_member,
    uris.FEDERATED_SUM: FederatingExecutor._federated_sum,
    uris.FEDERATED_MIN: FederatingExecutor._federated_min,
    uris.FEDERATED_MAX: FederatingExecutor._federated_max,
    uris.FEDERATED_MEAN: FederatingExecutor._federated_mean,
    uris.FEDERATED_WEIGHTED_MEAN: FederatingExecutor._federated_weighted_mean,
    uris.FEDERATED_AGGREGATE: FederatingExecutor._federated_aggregate,
    uris.SEQUENCE_MAP: _SEQUENCE,
    uris.SEQUENCE_REDUCE: _SEQUENCE,
    uris.SEQUENCE_SUM: _SEQUENCE,
}


def _first_error_or(results: list[Any]) -> list[Any]:
    # Every shard has answered; report the failure of the lowest clients first,
    # so that which error wins does not depend on timing.
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _is_operand_struct(fn: bb.Intrinsic) -> bool:
    """Intrinsics with several operands receive them as an unnamed struct."""
    return fn.uri not in (
        uris.FEDERATED_VALUE_CLIENTS, uris.FEDERATED_VALUE_SERVER, uris.FEDERATED_EVAL_CLIENTS,
        uris.FEDERATED_EVAL_SERVER, uris.FEDERATED_BROADCAST, uris.FEDERATED_ZIP_CLIENTS,
        uris.FEDERATED_ZIP_SERVER, uris.FEDERATED_SUM, uris.FEDERATED_MEAN, uris.FEDERATED_MIN,
        uris.FEDERATED_MAX,
    )


def _unplaced(type_spec: t.Type) -> t.Type:
    return type_spec.member if isinstance(type_spec, t.FederatedType) else type_spec
