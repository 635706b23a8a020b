"""`ExecutorFactory`: builds executors lazily, once the number of clients is known.

A factory is handed the cardinalities ({CLIENTS: n}) inferred from the
argument of each call; it builds (or reuses) an executor for them. Executors
are cached per cardinalities in a small LRU, so that alternating between a
few client counts does not rebuild stacks.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
from typing import Any

from mp_executors.core import types as t
from mp_executors.executors.executor_base import Executor

logger = logging.getLogger("mp_executors")

Cardinalities = dict  # {Placement: int}


def _key(cardinalities: Cardinalities) -> tuple:
    return tuple(sorted((str(p), int(n)) for p, n in (cardinalities or {}).items()))


class ExecutorFactory(abc.ABC):
    """Creates executors for given cardinalities; see the module docstring."""

    @abc.abstractmethod
    def create_executor(self, cardinalities: Cardinalities) -> Executor: ...

    @abc.abstractmethod
    def clean_up_executor(self, cardinalities: Cardinalities) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CachingExecutorFactory(ExecutorFactory):
    """Shared machinery: defaults the client count and keeps an LRU of stacks."""

    cache_size = 3

    def __init__(self, default_num_clients: int = 0):
        if not isinstance(default_num_clients, int) or isinstance(default_num_clients, bool) or default_num_clients < 0:
            raise ValueError(
                f"default_num_clients must be an int >= 0, got {default_num_clients!r}."
            )
        self.default_num_clients = default_num_clients
        self._executors: collections.OrderedDict[tuple, Executor] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._closed = False

    def resolve_cardinalities(self, cardinalities: Cardinalities) -> Cardinalities:
        n = (cardinalities or {}).get(t.CLIENTS)
        if n is None:
            n = self.default_num_clients
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of clients must be an int >= 0, got {n!r}.")
        return {t.CLIENTS: n}

    def create_executor(self, cardinalities: Cardinalities) -> Executor:
        cardinalities = self.resolve_cardinalities(cardinalities)
        key = _key(cardinalities)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed; create a new factory.")
            executor = self._executors.get(key)
            if executor is not None:
                self._executors.move_to_end(key)
                return executor
            executor = self._build(cardinalities[t.CLIENTS])
            self._executors[key] = executor
            while len(self._executors) > self.cache_size:
                _, old = self._executors.popitem(last=False)
                old.close()
            return executor

    def clean_up_executor(self, cardinalities: Cardinalities) -> None:
        key = _key(self.resolve_cardinalities(cardinalities))
        with self._lock:
            executor = self._executors.pop(key, None)
        if executor is not None:
            executor.close()

    def close(self) -> None:
        with self._lock:
            executors, self._executors = list(self._executors.values()), collections.OrderedDict()
            self._closed = True
        for executor in executors:
            executor.close()

    @abc.abstractmethod
    def _build(self, num_clients: int) -> Executor:
        """Composes the stack for `num_clients` clients."""
