"""The AST of federated computations (TFF's "building blocks").

Nodes are plain, immutable, picklable objects: an AST can be sent to a worker
process and evaluated there. Every node carries its `type_signature`.

    Reference(name)              a name bound by a Lambda or a Block
    Selection(source, index)     the index-th element of a struct
    Struct([(name, node)...])    a struct of nodes
    Call(fn, arg)                apply a function (Lambda, Intrinsic, TF) to an argument
    Lambda(name, type, body)     a function of one parameter
    Block([(name, node)...], r)  sequential local bindings, then a result
    Intrinsic(uri)               a federated operator such as federated_sum
    Data(value)                  a constant (numpy values, structs, client data descriptions)
    PlacementLiteral(p)          CLIENTS or SERVER
    CompiledComputation(fn)      a serialized TensorFlow graph (`TensorFlowFunction`)
"""

from __future__ import annotations

from typing import Any

from mp_executors.core import types as t


class BuildingBlock:
    __slots__ = ("type_signature",)

    def children(self) -> list[BuildingBlock]:
        return []

    def free_references(self) -> frozenset[str]:
        """Names this node refers to that it does not itself bind."""
        free: set[str] = set()
        for c in self.children():
            free |= c.free_references()
        return frozenset(free)

    def __repr__(self) -> str:
        return f"{type(self).__name__}: {self.type_signature}"


class Reference(BuildingBlock):
    __slots__ = ("name",)

    def __init__(self, name: str, type_signature: t.Type):
        self.name = name
        self.type_signature = type_signature

    def free_references(self):
        return frozenset([self.name])

    def __repr__(self):
        return self.name


class Selection(BuildingBlock):
    __slots__ = ("source", "index")

    def __init__(self, source: BuildingBlock, index: int):
        src_type = source.type_signature
        if not isinstance(src_type, t.StructType):
            raise TypeError(f"cannot select element {index!r} from a value of type {src_type} (not a struct).")
        self.source = source
        self.index = src_type.index_of(index)
        self.type_signature = src_type[self.index]

    def children(self):
        return [self.source]

    def __repr__(self):
        return f"{self.source!r}[{self.index}]"


class Struct(BuildingBlock):
    __slots__ = ("elements",)

    def __init__(self, elements: list[tuple[str | None, BuildingBlock]], container_type: type | None = None):
        self.elements = tuple(elements)
        self.type_signature = t.StructType([(n, e.type_signature) for n, e in self.elements], container_type)

    def children(self):
        return [e for _, e in self.elements]

    def __repr__(self):
        return "<" + ",".join(f"{n}={e!r}" if n else repr(e) for n, e in self.elements) + ">"


class Call(BuildingBlock):
    __slots__ = ("function", "argument")

    def __init__(self, function: BuildingBlock, argument: BuildingBlock | None = None):
        fn_type = function.type_signature
        if not isinstance(fn_type, t.FunctionType):
            raise TypeError(f"cannot call a value of type {fn_type}: it is not a function.")
        if (fn_type.parameter is None) != (argument is None):
            raise TypeError(f"function of type {fn_type} called with {'no argument' if argument is None else argument.type_signature}.")
        if argument is not None and not fn_type.parameter.is_assignable_from(argument.type_signature):
            raise TypeError(
                f"function of type {fn_type} expects an argument of type {fn_type.parameter}, got {argument.type_signature}."
            )
        self.function = function
        self.argument = argument
        self.type_signature = fn_type.result

    def children(self):
        return [self.function] + ([self.argument] if self.argument is not None else [])

    def __repr__(self):
        return f"{self.function!r}({'' if self.argument is None else repr(self.argument)})"


class Lambda(BuildingBlock):
    __slots__ = ("parameter_name", "parameter_type", "body", "_free")

    def __init__(self, parameter_name: str | None, parameter_type: t.Type | None, body: BuildingBlock):
        self.parameter_name = parameter_name
        self.parameter_type = parameter_type
        self.body = body
        self.type_signature = t.FunctionType(parameter_type, body.type_signature)
        self._free = None

    def children(self):
        return [self.body]

    def free_references(self):
        if self._free is None:
            self._free = self.body.free_references() - {self.parameter_name}
        return self._free

    def __getstate__(self):
        return (self.parameter_name, self.parameter_type, self.body, self.type_signature)

    def __setstate__(self, state):
        self.parameter_name, self.parameter_type, self.body, self.type_signature = state
        self._free = None

    def __repr__(self):
        return f"(\\{self.parameter_name or ''} -> {self.body!r})"


class Block(BuildingBlock):
    __slots__ = ("locals", "result")

    def __init__(self, local_bindings: list[tuple[str, BuildingBlock]], result: BuildingBlock):
        self.locals = tuple(local_bindings)
        self.result = result
        self.type_signature = result.type_signature

    def children(self):
        return [v for _, v in self.locals] + [self.result]

    def free_references(self):
        free: set[str] = set()
        bound: set[str] = set()
        for name, value in self.locals:
            free |= value.free_references() - bound
            bound.add(name)
        return frozenset(free | (self.result.free_references() - bound))

    def __repr__(self):
        return "(let " + ", ".join(f"{n}={v!r}" for n, v in self.locals) + f" in {self.result!r})"


class Intrinsic(BuildingBlock):
    __slots__ = ("uri",)

    def __init__(self, uri: str, type_signature: t.Type):
        self.uri = uri
        self.type_signature = type_signature

    def __repr__(self):
        return self.uri


class Data(BuildingBlock):
    __slots__ = ("value",)

    def __init__(self, value: Any, type_signature: t.Type):
        self.value = value
        self.type_signature = type_signature

    def __repr__(self):
        return f"data<{self.type_signature}>"


class PlacementLiteral(BuildingBlock):
    __slots__ = ("placement",)

    def __init__(self, placement: t.Placement):
        self.placement = placement
        self.type_signature = t.PlacementType()

    def __repr__(self):
        return str(self.placement)


class CompiledComputation(BuildingBlock):
    """A TensorFlow function serialized as a graph (see `tensorflow_computation`)."""

    __slots__ = ("function",)

    def __init__(self, function: Any):
        self.function = function
        self.type_signature = function.type_signature

    def __repr__(self):
        return f"tf<{self.function.name}:{self.function.digest[:8]}>"
