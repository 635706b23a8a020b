"""Run TensorFlow Federated's own computations (tff.learning included) on our executors.

The drop-in: a TFF program keeps its code and changes its context only.

    import mp_executors.tff
    mp_executors.tff.set_sync_execution_context()        # was: tff.backends.native.
                                                          #      set_sync_local_cpp_execution_context()
    process = tff.learning.algorithms.build_weighted_fed_avg(model_fn, ...)
    state = process.initialize()
    result = process.next(state, client_datasets)         # runs on the worker pool

    # or, explicitly, with any of our factories:
    ctx = tff.framework.SyncExecutionContext(
        executor_fn=mp_executors.tff.executor_factory(mpx.mp_executor_factory(num_workers=2)))

What this package owns: the public functions below; `converter` (TFF's
computation protos and types -> our AST and types, cached by digest) and
`executor` (TFF's ExecutorFactory/Executor interfaces over our factories).

TensorFlow Federated is never a dependency of mp_executors: `import
mp_executors` does not import it, and this package needs it installed (see the
README, "Running existing TFF code": it installs in its own virtual
environment with `benchmarks/peers/setup_tff_venv.sh`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# Checked without importing TFF: the workers import `mp_executors.tff.datasets`
# (to rebuild client datasets) and must not pay for importing TFF itself.
if importlib.util.find_spec("tensorflow_federated") is None:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mp_executors.tff needs TensorFlow Federated, which is not installed here. TFF 0.87 installs "
        "only in its own Python 3.11 virtual environment: run `bash benchmarks/peers/setup_tff_venv.sh` "
        "(creates ~/.cache/mp_executors/tff-venv), then `~/.cache/mp_executors/tff-venv/bin/pip install "
        "--no-deps -e . loky cloudpickle psutil` from this repository, and run your program with that "
        "venv's python."
    )

from mp_executors.factories.base import ExecutorFactory

_LAZY = {
    "TffComputation": "mp_executors.tff.executor",
    "TffExecutorFactory": "mp_executors.tff.executor",
    "from_tff": "mp_executors.tff.executor",
    "cache_info": "mp_executors.tff.converter",
    "convert": "mp_executors.tff.converter",
    "convert_type": "mp_executors.tff.converter",
}


def __getattr__(name: str) -> Any:
    # The parts that import TFF load on first use (PEP 562).
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mp_executors.tff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def _tff():
    import tensorflow_federated  # noqa: PLC0415 - TFF is imported only when a context is made

    return tensorflow_federated


def executor_factory(factory: ExecutorFactory | None = None) -> Any:
    """An object implementing TFF's `ExecutorFactory`, backed by one of our factories.

    `factory`: `mpx.local_executor_factory(...)`, `mpx.mp_executor_factory(...)`
    or `mpx.ray_executor_factory(...)`; default: an auto-sized
    `mp_executor_factory()` (its pool starts on the first call with clients),
    which the returned object owns and closes in `close()`.
    """
    from mp_executors.tff.executor import TffExecutorFactory  # noqa: PLC0415 - imports TFF

    if factory is None:
        from mp_executors.factories.mp import mp_executor_factory  # noqa: PLC0415 - only when defaulted

        return TffExecutorFactory(mp_executor_factory(), owns_factory=True)
    return TffExecutorFactory(factory)


def create_sync_execution_context(factory: ExecutorFactory | None = None) -> Any:
    """`tff.framework.SyncExecutionContext` running on `factory` (see `executor_factory`)."""
    return _tff().framework.SyncExecutionContext(executor_fn=executor_factory(factory))


def set_sync_execution_context(factory: ExecutorFactory | None = None) -> Any:
    """Installs `create_sync_execution_context(factory)` as TFF's default context; returns it.

    The one-line change for programs that called
    `tff.backends.native.set_sync_local_cpp_execution_context()`.
    """
    context = create_sync_execution_context(factory)
    _tff().framework.set_default_context(context)
    return context


__all__ = [
    "TffComputation",
    "TffExecutorFactory",
    "cache_info",
    "convert",
    "convert_type",
    "create_sync_execution_context",
    "executor_factory",
    "from_tff",
    "set_sync_execution_context",
]
