"""`ReferenceResolvingExecutor`: evaluates the AST's structure.

It owns lambdas (as closures over their scope), blocks, references,
selections and structs; everything else (intrinsics, TensorFlow, data) is
delegated to its target executor. A closed lambda (no free references) that
is passed to an intrinsic is handed to the target as an AST node, so the
target can ship it to a worker and apply it there.
"""

from __future__ import annotations

from typing import Any

from mp_executors.core import building_blocks as bb
from mp_executors.core import types as t
from mp_executors.core.structure import Struct
from mp_executors.executors.executor_base import Executor, ExecutorValue, element_items


class _Scope:
    __slots__ = ("name", "value", "parent")

    def __init__(self, name: str | None, value: Any, parent: _Scope | None):
        self.name, self.value, self.parent = name, value, parent

    def resolve(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if scope.name == name:
                return scope.value
            scope = scope.parent
        raise NameError(f"unbound reference {name!r} in the computation.")


class RRValue(ExecutorValue):
    """A target value, a struct of RRValues, or a closure (lambda + scope)."""

    __slots__ = ("target_value", "elements", "closure", "_type")

    def __init__(self, type_signature: t.Type, target_value=None, elements=None, closure=None):
        self._type = type_signature
        self.target_value = target_value
        self.elements = elements  # list of (name, RRValue)
        self.closure = closure  # (bb.Lambda, _Scope | None)

    @property
    def type_signature(self) -> t.Type:
        return self._type

    async def compute(self) -> Any:
        if self.target_value is not None:
            return await self.target_value.compute()
        if self.elements is not None:
            return Struct([(n, await v.compute()) for n, v in self.elements])
        raise TypeError("a function value cannot be computed; call it instead.")


class ReferenceResolvingExecutor(Executor):
    """Evaluates lambdas, blocks and references; delegates the rest to `target`."""

    def __init__(self, target: Executor):
        self._target = target

    @property
    def target(self) -> Executor:
        return self._target

    async def create_value(self, value: Any, type_spec: Any = None) -> RRValue:
        if isinstance(value, RRValue):
            return value
        if isinstance(value, bb.BuildingBlock):
            return await self._evaluate(value, None)
        if hasattr(value, "building_block") and hasattr(value, "type_signature"):  # a Computation
            return await self._evaluate(value.building_block, None)
        target_value = await self._target.create_value(value, type_spec)
        return RRValue(target_value.type_signature, target_value=target_value)

    async def create_call(self, comp: ExecutorValue, arg: ExecutorValue | None = None) -> RRValue:
        if comp.closure is not None:
            fn, scope = comp.closure
            inner = scope if fn.parameter_name is None else _Scope(fn.parameter_name, arg, scope)
            return await self._evaluate(fn.body, inner)
        target_fn = await self._to_target(comp)
        target_arg = None if arg is None else await self._to_target(arg)
        result = await self._target.create_call(target_fn, target_arg)
        return RRValue(result.type_signature, target_value=result)

    async def create_struct(self, elements: Any) -> RRValue:
        items = element_items(elements)
        return RRValue(t.StructType([(n, v.type_signature) for n, v in items]), elements=items)

    async def create_selection(self, source: ExecutorValue, index: int | str) -> RRValue:
        ts = source.type_signature
        if not isinstance(ts, t.StructType):
            raise TypeError(f"cannot select {index!r} from a value of type {ts}.")
        i = ts.index_of(index)
        if source.elements is not None:
            return source.elements[i][1]
        result = await self._target.create_selection(source.target_value, i)
        return RRValue(result.type_signature, target_value=result)

    def close(self) -> None:
        self._target.close()

    # ------------------------------------------------------------------ internals

    async def _to_target(self, value: RRValue) -> ExecutorValue:
        if value.target_value is not None:
            return value.target_value
        if value.elements is not None:
            parts = [(n, await self._to_target(v)) for n, v in value.elements]
            value.target_value = await self._target.create_struct(Struct(parts))
            return value.target_value
        fn, scope = value.closure
        free = fn.free_references()
        if free:
            raise TypeError(
                f"a computation that refers to values outside itself ({sorted(free)}) cannot be passed to an "
                "intrinsic; pass those values as arguments (e.g. federated_zip them with the data) instead."
            )
        value.target_value = await self._target.create_value(fn, fn.type_signature)
        return value.target_value

    async def _evaluate(self, node: bb.BuildingBlock, scope: _Scope | None) -> RRValue:
        if isinstance(node, bb.Reference):
            return scope.resolve(node.name) if scope is not None else _unbound(node)
        if isinstance(node, bb.Lambda):
            # A closed lambda needs no scope: dropping it lets the value be shipped.
            return RRValue(node.type_signature, closure=(node, scope if node.free_references() else None))
        if isinstance(node, bb.Block):
            for name, local in node.locals:
                scope = _Scope(name, await self._evaluate(local, scope), scope)
            return await self._evaluate(node.result, scope)
        if isinstance(node, bb.Call):
            fn = await self._evaluate(node.function, scope)
            arg = None if node.argument is None else await self._evaluate(node.argument, scope)
            return await self.create_call(fn, arg)
        if isinstance(node, bb.Struct):
            items = [(n, await self._evaluate(e, scope)) for n, e in node.elements]
            return RRValue(node.type_signature, elements=items)
        if isinstance(node, bb.Selection):
            return await self.create_selection(await self._evaluate(node.source, scope), node.index)
        if isinstance(node, (bb.Intrinsic, bb.CompiledComputation, bb.PlacementLiteral)):
            target_value = await self._target.create_value(node, node.type_signature)
            return RRValue(node.type_signature, target_value=target_value)
        if isinstance(node, bb.Data):
            target_value = await self._target.create_value(node.value, node.type_signature)
            return RRValue(node.type_signature, target_value=target_value)
        raise NotImplementedError(f"cannot evaluate {type(node).__name__} nodes.")


def _unbound(node: bb.Reference):
    raise NameError(f"unbound reference {node.name!r} in the computation.")
