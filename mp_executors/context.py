"""Execution contexts: what runs a computation called from Python.

`ExecutionContext(factory).invoke(comp, arg)` converts and checks the
argument (TypeError naming the parameter), infers the number of clients from
it, asks the factory for an executor for that many clients, runs the
computation on the executor, and converts the result back to Python.

Invocations run on one event loop in a background thread shared by all
contexts, so calling a computation works the same from plain Python and from
inside a running asyncio loop (Jupyter).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from mp_executors.core import types as t
from mp_executors.core import values
from mp_executors.errors import WorkerCrashedError
from mp_executors.factories.base import ExecutorFactory

logger = logging.getLogger("mp_executors")


class ExecutionContext:
    """Runs computations on executors made by `executor_factory`."""

    def __init__(self, executor_factory: ExecutorFactory):
        if not isinstance(executor_factory, ExecutorFactory):
            raise TypeError(
                f"ExecutionContext expects an ExecutorFactory (e.g. mpx.local_executor_factory()), "
                f"got {type(executor_factory).__name__}."
            )
        self.executor_factory = executor_factory

    def invoke(self, comp: Any, arg: Any) -> Any:
        fn_type: t.FunctionType = comp.type_signature
        if fn_type.parameter is None:
            rep, cardinalities = None, {}
        else:
            rep, cardinalities = values.convert_argument(arg, fn_type.parameter, comp.argument_path())
        attempts = 0
        while True:
            executor = self.executor_factory.create_executor(cardinalities)
            try:
                result = self._wait(self._run(executor, comp, rep))
                break
            except WorkerCrashedError as crash:
                # Computations are functional: on a fresh pool the retry gives the same bits.
                self.executor_factory.clean_up_executor(cardinalities)
                attempts += 1
                if attempts > getattr(self.executor_factory, "max_retries", 0):
                    crash.attempts = attempts
                    raise
                logger.warning("mp_executors: retrying %s on a fresh worker (retry %d)", comp.name, attempts)
        return values.to_python(result, fn_type.result)

    def _wait(self, coro) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, _event_loop())
        try:
            return future.result()
        except KeyboardInterrupt:
            # Stop the call in the parent, then the workers still busy with it.
            future.cancel()
            interrupt = getattr(self.executor_factory, "interrupt", None)
            if interrupt is not None:
                interrupt()
            raise
        except BaseException:
            future.cancel()
            raise

    @staticmethod
    async def _run(executor, comp: Any, rep: Any) -> Any:
        fn_type = comp.type_signature
        fn_value = await executor.create_value(comp.building_block, fn_type)
        arg_value = None if rep is None else await executor.create_value(rep, fn_type.parameter)
        result = await executor.create_call(fn_value, arg_value)
        return await result.compute()

    def close(self) -> None:
        """Closes the factory (and its workers)."""
        self.executor_factory.close()


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The one event loop, in a daemon thread, that runs every invocation.

    Shared by all contexts: a `with execution_context(factory)` block costs
    no thread or file descriptor of its own.
    """
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="mp_executors-loop", daemon=True).start()
        return _loop


_default: ExecutionContext | None = None
_stack: list[ExecutionContext] = []
_owned: list[ExecutionContext] = []


def _as_context(context_or_factory: Any) -> ExecutionContext:
    if isinstance(context_or_factory, ExecutionContext):
        return context_or_factory
    return ExecutionContext(context_or_factory)


def get_execution_context() -> ExecutionContext:
    """The innermost `execution_context(...)`, else the default one.

    With nothing set, the default is an auto-sized `mp_executor_factory`; its
    pool starts lazily on the first call that needs clients.
    """
    global _default
    if _stack:
        return _stack[-1]
    if _default is None:
        from mp_executors.factories.mp import mp_executor_factory  # noqa: PLC0415 - cycle

        _default = ExecutionContext(mp_executor_factory())
        _owned.append(_default)
    return _default


def set_execution_context(context_or_factory: Any) -> ExecutionContext:
    """Sets the default context (an ExecutionContext or an ExecutorFactory)."""
    global _default
    _default = _as_context(context_or_factory)
    return _default


@contextlib.contextmanager
def execution_context(context_or_factory: Any) -> Iterator[ExecutionContext]:
    """`with mpx.execution_context(factory):` runs calls inside on that factory."""
    context = _as_context(context_or_factory)
    _stack.append(context)
    try:
        yield context
    finally:
        _stack.remove(context)


def set_local_execution_context(**kwargs: Any) -> ExecutionContext:
    """Sets an in-process `local_executor_factory(**kwargs)` as the default."""
    from mp_executors.factories.local import local_executor_factory  # noqa: PLC0415

    context = ExecutionContext(local_executor_factory(**kwargs))
    _owned.append(context)
    return set_execution_context(context)


def set_mp_execution_context(**kwargs: Any) -> ExecutionContext:
    """Sets a worker-pool `mp_executor_factory(**kwargs)` as the default."""
    from mp_executors.factories.mp import mp_executor_factory  # noqa: PLC0415

    context = ExecutionContext(mp_executor_factory(**kwargs))
    _owned.append(context)
    return set_execution_context(context)


@atexit.register
def _close_owned_contexts() -> None:
    for context in _owned:
        with contextlib.suppress(Exception):
            context.close()
