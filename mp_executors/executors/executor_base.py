"""The abstract interfaces every executor implements (TFF's executor contract).

An `Executor` turns values and computations into `ExecutorValue`s it owns:
`create_value`, `create_call`, `create_struct` and `create_selection` are
async and return ExecutorValues; `compute()` on an ExecutorValue brings its
value back to the caller. Executors compose: a stack is a chain of
executors, each delegating what it does not handle to its target; only the
factories (`mp_executors.factories`) know how a stack is composed.
"""

from __future__ import annotations

import abc
from collections.abc import Coroutine
from typing import Any

from mp_executors.core import types as t


class ExecutorValue(abc.ABC):
    """A value owned by an executor, with a type and an async `compute()`."""

    @property
    @abc.abstractmethod
    def type_signature(self) -> t.Type: ...

    @abc.abstractmethod
    async def compute(self) -> Any:
        """Returns the value's representation (numpy values, Structs, lists per client)."""


class Executor(abc.ABC):
    """Creates and combines ExecutorValues; see the module docstring."""

    @abc.abstractmethod
    async def create_value(self, value: Any, type_spec: Any = None) -> ExecutorValue: ...

    @abc.abstractmethod
    async def create_call(self, comp: ExecutorValue, arg: ExecutorValue | None = None) -> ExecutorValue: ...

    @abc.abstractmethod
    async def create_struct(self, elements: Any) -> ExecutorValue: ...

    @abc.abstractmethod
    async def create_selection(self, source: ExecutorValue, index: int | str) -> ExecutorValue: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Releases what the executor holds; it must not be used afterwards."""


def run_sync(coro: Coroutine) -> Any:
    """Runs a coroutine that never suspends, without an event loop.

    The in-process leaf stack (ReferenceResolvingExecutor over
    EagerTFExecutor) awaits nothing that blocks, so a worker can drive it
    with one `send` per call instead of an event loop per client.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: the coroutine suspended; run it on an event loop instead.")


def element_items(value: Any) -> list[tuple[str | None, Any]]:
    """(name, value) pairs of a Struct, dict, or sequence passed to create_struct."""
    from mp_executors.core import structure  # noqa: PLC0415

    as_struct = structure.from_container(value)
    if as_struct is None:
        raise TypeError(f"create_struct expects a list, dict or Struct of ExecutorValues, got {type(value).__name__}.")
    return list(as_struct.items())
