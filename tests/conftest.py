"""Shared pytest fixtures for the mp_executors test suite.

Every execution test takes the ``factory`` fixture, which is parametrized over
the executor-factory kinds listed in ``FACTORY_BUILDERS``.  To run the whole
suite against a new runtime, add one entry there (e.g. the multi-process
factories ``"mp-1"``, ``"mp-2"``, ``"mp-3"``).

Set ``MPX_TEST_FACTORIES=local,mp-2`` to restrict a run to some kinds.

When Ray is installed (the ``ray`` extra), the kind ``"ray-2"`` runs the suite
on ``ray_executor_factory`` (2 actors) over ONE local Ray instance shared by
the whole session (``shared_ray()``: loopback, 2 CPUs, no dashboard), stopped
when the session ends.

Tests that need non-default factory settings (``default_num_clients``,
``max_fanout``, ...) take ``make_factory`` and call ``make_factory(**kwargs)``;
it builds a factory of the same kind as ``factory``, caches it for the session
and closes it at the end.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The persistent plan cache (executors/plan_cache.py) in a directory of this session only,
# set before any factory or pool exists (workers take the parent's environment when they
# start): tests never load a developer's cached plans, yet reuse the ones converted earlier
# in the same run. Removed at exit.
_PLAN_CACHE_DIR = tempfile.mkdtemp(prefix="mpx-test-plans-")
os.environ["MP_EXECUTORS_CACHE_DIR"] = _PLAN_CACHE_DIR
atexit.register(shutil.rmtree, _PLAN_CACHE_DIR, ignore_errors=True)

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

import mp_executors as mpx  # noqa: E402
from mp_executors.core import context_stack  # noqa: E402

# name -> constructor taking the keyword arguments of `local_executor_factory`
# (default_num_clients, max_fanout, server_device, client_devices).
FACTORY_BUILDERS: dict[str, Callable[..., Any]] = {
    "local": lambda **kwargs: mpx.local_executor_factory(**kwargs),
    "mp-1": lambda **kwargs: mpx.mp_executor_factory(num_workers=1, **kwargs),
    "mp-2": lambda **kwargs: mpx.mp_executor_factory(num_workers=2, **kwargs),
    "mp-3": lambda **kwargs: mpx.mp_executor_factory(num_workers=3, **kwargs),
}

_shared_ray_started: list[bool] = []


def shared_ray() -> None:
    """Starts the session's one local Ray instance (loopback, 2 CPUs, no dashboard) once."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        from mp_executors.factories.ray import init_local_ray  # noqa: PLC0415

        init_local_ray(num_cpus=2)
        _shared_ray_started.append(True)


def _ray_factory(**kwargs):
    shared_ray()
    # Up to three factories of a kind are alive at once (make_factory caches one per
    # setting), more actors than the 2 CPUs: place them without reserving CPUs.
    return mpx.ray_executor_factory(num_workers=2, actor_options={"num_cpus": 0}, **kwargs)


if importlib.util.find_spec("ray") is not None:
    FACTORY_BUILDERS["ray-2"] = _ray_factory


@pytest.fixture(autouse=True)
def _restore_default_context():
    """Each test leaves the process default as it found it.

    A test that sets a default (often to a session factory that is closed later)
    must not leave later tests calling into it; a default the library made for
    the test (`set_local_execution_context()`, ...) is closed here.
    """
    previous = context_stack.default()
    yield
    current = context_stack.set_default(previous)
    if current is not None and current is not previous and getattr(current, "owns_factory", False):
        current.close()


@pytest.fixture(scope="session")
def ray_instance():
    """The session's shared local Ray instance (tests/test_ray.py)."""
    shared_ray()


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray():
    """Stops the shared Ray instance after every factory of the session is closed."""
    yield
    if _shared_ray_started:
        import ray  # noqa: PLC0415

        ray.shutdown()
        _shared_ray_started.clear()


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
