"""The current execution context: what runs a computation called from Python.

The language layer needs exactly one thing from a runtime: "the context to run
this call in". This module keeps it, and knows nothing of executors, factories
or worker pools (TFF's `ContextStackImpl` is the model: the language owns the
stack, backends install into it).

    install(ctx)           a `with` block: ctx is current in THIS thread / asyncio task
    set_default(ctx)       the process-wide context used where nothing is installed
    set_default_maker(fn)  how to create that default on first use (the package wires
                           the auto-sized worker pool here; see `mp_executors.__init__`)
    current()              the innermost installed context, else the default

Ownership and lifetimes:

- The stack of installed contexts is a `contextvars.ContextVar` holding an
  immutable tuple. A new thread starts with an empty stack, and an asyncio task
  works on a copy of its creator's: a context installed in one thread or task
  is never seen by another (a process-wide list, as before, let two threads run
  half of their calls on each other's factory).
- The default context is process-wide (set once in `main`, used by every
  thread) and created at most once, under `_default_lock`, however many threads
  make their first call at the same moment.
- This module never closes anything: it holds contexts, their owner (the
  runtime's `mp_executors.context`) decides what replacing one means.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Context(Protocol):
    """What the language needs of a runtime: run `comp` on `arg`, return Python values."""

    def invoke(self, comp: Any, arg: Any) -> Any: ...


_installed: contextvars.ContextVar[tuple[Context, ...]] = contextvars.ContextVar(
    "mp_executors_installed_contexts", default=()
)
_default: Context | None = None
_default_maker: Callable[[], Context] | None = None
_default_lock = threading.Lock()


def current() -> Context:
    """The innermost context installed in this thread/task, else the process default.

    The default is made on first use by the registered maker, exactly once.
    """
    stack = _installed.get()
    if stack:
        return stack[-1]
    default = _default
    if default is not None:
        return default
    return _make_default()


def _make_default() -> Context:
    global _default
    with _default_lock:
        if _default is None:
            if _default_maker is None:
                raise RuntimeError(
                    "no execution context: install one with mpx.set_execution_context(...) or "
                    "`with mpx.execution_context(factory):`."
                )
            _default = _default_maker()
        return _default


def default() -> Context | None:
    """The process default if one has been set or made (None otherwise); never makes one."""
    return _default


def set_default(context: Context | None) -> Context | None:
    """Makes `context` the process default; returns the one it replaces (or None)."""
    global _default
    with _default_lock:
        previous, _default = _default, context
    return previous


def set_default_maker(maker: Callable[[], Context] | None) -> None:
    """Registers how the default context is created when first needed."""
    global _default_maker
    with _default_lock:
        _default_maker = maker


@contextlib.contextmanager
def install(context: Context) -> Iterator[Context]:
    """Makes `context` current in this thread (or asyncio task) for the `with` block."""
    token = _installed.set(_installed.get() + (context,))
    try:
        yield context
    finally:
        _installed.reset(token)


def installed() -> tuple[Context, ...]:
    """The contexts installed in this thread/task, outermost first."""
    return _installed.get()
