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

try:
    import tensorflow_federated as tff
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mp_executors.tff needs TensorFlow Federated, which is not installed here "
        f"({e}). TFF 0.87 installs only in its own Python 3.11 virtual environment: run "
        "`bash benchmarks/peers/setup_tff_venv.sh` (creates ~/.cache/mp_executors/tff-venv), then "
        "`~/.cache/mp_executors/tff-venv/bin/pip install --no-deps -e . loky cloudpickle psutil` from this "
        "repository, and run your program with that venv's python."
    ) from None

from typing import Any

from mp_executors.factories.base import ExecutorFactory
from mp_executors.tff.converter import cache_info, convert, convert_type
from mp_executors.tff.executor import TffComputation, TffExecutorFactory, from_tff


def executor_factory(factory: ExecutorFactory | None = None) -> TffExecutorFactory:
    """An object implementing TFF's `ExecutorFactory`, backed by one of our factories.

    `factory`: `mpx.local_executor_factory(...)`, `mpx.mp_executor_factory(...)`
    or `mpx.ray_executor_factory(...)`; default: an auto-sized
    `mp_executor_factory()` (its pool starts on the first call with clients),
    which the returned object owns and closes in `close()`.
    """
    if factory is None:
        from mp_executors.factories.mp import mp_executor_factory  # noqa: PLC0415 - only when defaulted

        return TffExecutorFactory(mp_executor_factory(), owns_factory=True)
    return TffExecutorFactory(factory)


def create_sync_execution_context(factory: ExecutorFactory | None = None) -> Any:
    """`tff.framework.SyncExecutionContext` running on `factory` (see `executor_factory`)."""
    return tff.framework.SyncExecutionContext(executor_fn=executor_factory(factory))


def set_sync_execution_context(factory: ExecutorFactory | None = None) -> Any:
    """Installs `create_sync_execution_context(factory)` as TFF's default context; returns it.

    The one-line change for programs that called
    `tff.backends.native.set_sync_local_cpp_execution_context()`.
    """
    context = create_sync_execution_context(factory)
    tff.framework.set_default_context(context)
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
