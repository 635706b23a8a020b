"""Execution contexts: what runs a computation called from Python.

`ExecutionContext(factory).invoke(comp, arg)` converts and checks the
argument (TypeError naming the parameter), infers the number of clients from
it, leases an executor for that many clients from the factory, runs the
computation on it, and converts the result back to Python.

This is the runtime's side of the language's context stack
(`core.context_stack`): the functions below install contexts into it.

    with execution_context(factory):   this thread / asyncio task only
    set_execution_context(...)         the process default, for every thread
    set_local_execution_context(...)   a default the library creates (and owns)
    set_mp_execution_context(...)
    set_ray_execution_context(...)

Ownership:

- A context owns its factory when the library created that factory
  (`set_*_execution_context(**kwargs)`, the auto-sized default): replacing
  such a default closes it, and so does interpreter exit. A factory the user
  made and passed in stays the user's to close.
- A call leases its executor (`ExecutorFactory.lease`) until it returns, so
  another thread's call never closes it underneath (cache eviction, idle
  shrink and `close()` wait for or skip leased executors).
- Invocations run on one event loop in a background thread shared by all
  contexts, so calling a computation works the same from plain Python, from
  many threads at once, and from inside a running asyncio loop (Jupyter).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from mp_executors.core import context_stack, values
from mp_executors.core import types as t
from mp_executors.errors import WorkerCrashedError
from mp_executors.factories.base import ExecutorFactory
from mp_executors.factories.local import local_executor_factory
from mp_executors.factories.mp import mp_executor_factory
from mp_executors.factories.ray import ray_executor_factory

logger = logging.getLogger("mp_executors")


class ExecutionContext:
    """Runs computations on executors made by `executor_factory`.

    `owns_factory`: close the factory when this context is closed (and when
    it is replaced as the default); True only for factories the library made.
    """

    def __init__(self, executor_factory: ExecutorFactory, *, owns_factory: bool = False):
        if not isinstance(executor_factory, ExecutorFactory):
            raise TypeError(
                f"ExecutionContext expects an ExecutorFactory (e.g. mpx.local_executor_factory()), "
                f"got {type(executor_factory).__name__}."
            )
        self.executor_factory = executor_factory
        self.owns_factory = owns_factory
        if owns_factory:
            _owned_contexts.add(self)

    def invoke(self, comp: Any, arg: Any) -> Any:
        fn_type: t.FunctionType = comp.type_signature
        if fn_type.parameter is None:
            rep, cardinalities = None, {}
        else:
            rep, cardinalities = values.convert_argument(arg, fn_type.parameter, comp.argument_path())
        attempts = 0
        while True:
            try:
                with self.executor_factory.lease(cardinalities) as executor:
                    result = self._wait(self._run(executor, comp, rep), executor)
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

    def _wait(self, coro, executor) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, _event_loop())
        try:
            return future.result()
        except KeyboardInterrupt:
            # Stop this call in the parent, then the workers still busy with it
            # (only this executor's: other threads' calls go on).
            future.cancel()
            interrupt = getattr(self.executor_factory, "interrupt", None)
            if interrupt is not None:
                interrupt(executor)
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
        """Closes the factory (and its workers); it waits for calls still running on it."""
        _owned_contexts.discard(self)
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


#: Contexts whose factory the library created and that are not closed yet:
#: closed at interpreter exit.
_owned_contexts: set[ExecutionContext] = set()


def _as_context(context_or_factory: Any) -> ExecutionContext:
    if isinstance(context_or_factory, ExecutionContext):
        return context_or_factory
    return ExecutionContext(context_or_factory)


def create_default_context() -> ExecutionContext:
    """The context used when none is set: an auto-sized `mp_executor_factory`.

    Its pool starts lazily, on the first call that has clients. The language
    layer calls this once per process (under a lock) through
    `core.context_stack`.
    """
    return ExecutionContext(mp_executor_factory(), owns_factory=True)


def get_execution_context() -> ExecutionContext:
    """The innermost `execution_context(...)` of this thread/task, else the default one."""
    return context_stack.current()


def set_execution_context(context_or_factory: Any) -> ExecutionContext:
    """Sets the process default (an ExecutionContext or an ExecutorFactory).

    The default it replaces is closed when the library created it (its pool
    stops, after any call still running on it); a context or factory you
    created yourself is left for you to close.
    """
    context = _as_context(context_or_factory)
    previous = context_stack.set_default(context)
    if previous is not None and previous is not context and getattr(previous, "owns_factory", False):
        logger.info("mp_executors: closing the replaced default context's %s",
                    type(previous.executor_factory).__name__)
        previous.close()
    return context


@contextlib.contextmanager
def execution_context(context_or_factory: Any) -> Iterator[ExecutionContext]:
    """`with mpx.execution_context(factory):` runs this thread's (or task's) calls on that factory."""
    with context_stack.install(_as_context(context_or_factory)) as context:
        yield context


def set_local_execution_context(**kwargs: Any) -> ExecutionContext:
    """Sets an in-process `local_executor_factory(**kwargs)` as the default (replacing one the library made)."""
    return set_execution_context(ExecutionContext(local_executor_factory(**kwargs), owns_factory=True))


def set_mp_execution_context(**kwargs: Any) -> ExecutionContext:
    """Sets a worker-pool `mp_executor_factory(**kwargs)` as the default (replacing one the library made)."""
    return set_execution_context(ExecutionContext(mp_executor_factory(**kwargs), owns_factory=True))


def set_ray_execution_context(address: str | None = None, **kwargs: Any) -> ExecutionContext:
    """Sets a `ray_executor_factory(address, **kwargs)` as the default (Ray is imported only now)."""
    return set_execution_context(ExecutionContext(ray_executor_factory(address, **kwargs), owns_factory=True))


@atexit.register
def _close_owned_contexts() -> None:
    for context in list(_owned_contexts):
        with contextlib.suppress(Exception):
            context.close()
