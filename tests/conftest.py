"""Shared pytest fixtures for the mp_executors test suite.

Every execution test takes the ``factory`` fixture, which is parametrized over
the executor-factory kinds listed in ``FACTORY_BUILDERS``.  To run the whole
suite against a new runtime, add one entry there (e.g. the multi-process
factories ``"mp-1"``, ``"mp-2"``, ``"mp-3"``).

Set ``MPX_TEST_FACTORIES=local,mp-2`` to restrict a run to some kinds.

Tests that need non-default factory settings (``default_num_clients``,
``max_fanout``, ...) take ``make_factory`` and call ``make_factory(**kwargs)``;
it builds a factory of the same kind as ``factory``, caches it for the session
and closes it at the end.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

import mp_executors as mpx  # noqa: E402

# name -> constructor taking the keyword arguments of `local_executor_factory`
# (default_num_clients, max_fanout, server_device, client_devices).
FACTORY_BUILDERS: dict[str, Callable[..., Any]] = {
    "local": lambda **kwargs: mpx.local_executor_factory(**kwargs),
    "mp-1": lambda **kwargs: mpx.mp_executor_factory(num_workers=1, **kwargs),
    "mp-2": lambda **kwargs: mpx.mp_executor_factory(num_workers=2, **kwargs),
    "mp-3": lambda **kwargs: mpx.mp_executor_factory(num_workers=3, **kwargs),
}


def _selected_kinds() -> list[str]:
    wanted = os.environ.get("MPX_TEST_FACTORIES")
    if not wanted:
        return list(FACTORY_BUILDERS)
    kinds = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FACTORY_BUILDERS]
    if unknown:
        raise pytest.UsageError(
            f"MPX_TEST_FACTORIES names unknown factory kinds {unknown}; "
            f"known: {sorted(FACTORY_BUILDERS)}"
        )
    return kinds


@pytest.fixture(scope="session", params=_selected_kinds())
def factory_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def make_factory(factory_kind):
    """Returns `make(**kwargs)` building (and caching) a factory of this kind."""
    builder = FACTORY_BUILDERS[factory_kind]
    cache: dict[tuple, Any] = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = builder(**kwargs)
        return cache[key]

    yield make

    errors = []
    for f in cache.values():
        try:
            f.close()
        except Exception as e:  # close every factory even if one fails
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def factory(make_factory):
    """A session-scoped executor factory with default settings."""
    return make_factory()
