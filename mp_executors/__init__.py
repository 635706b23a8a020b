"""mp_executors: a fast multi-process runtime for federated computations.

    import mp_executors as mpx

    @mpx.tf_computation(np.float32)
    def add_one(x):
        return x + 1.0

    @mpx.federated_computation(mpx.FederatedType(np.float32, mpx.CLIENTS))
    def mean_plus_one(xs):
        return mpx.federated_mean(mpx.federated_map(add_one, xs))

    mean_plus_one([1.0, 2.0, 3.0])  # 3.0, on an auto-sized worker pool

Swap the runtime by changing one word: `mpx.set_local_execution_context()`,
`mpx.set_mp_execution_context(num_workers=4)`, or
`with mpx.execution_context(mpx.mp_executor_factory()): ...`.
"""

import importlib as _importlib
import logging as _logging

from mp_executors import _tf as _quiet_tf
from mp_executors.core import context_stack as _context_stack

# Types and placements are cheap; everything else imports TensorFlow, so it is
# loaded on first use (PEP 562): `mp-executors info` and worker planning stay
# free of TensorFlow's import cost.
from mp_executors.core.types import (
    CLIENTS,
    SERVER,
    FederatedType,
    FunctionType,
    Placement,
    SequenceType,
    StructType,
    TensorType,
    Type,
)
from mp_executors.workers import fork_server as _fork_server

_quiet_tf.install_import_hook()
# The worker pool's fork server is forked from this process right after its TensorFlow import.
_fork_server.fork_at_tensorflow_import()


def _create_default_context():
    # The language (core) never imports a runtime: the package, which sits above
    # both, tells it how to make the default context. Imported on first use, as
    # everything below: the runtime imports TensorFlow.
    return _importlib.import_module("mp_executors.context").create_default_context()


_context_stack.set_default_maker(_create_default_context)

_LAZY = {
    "executors": "mp_executors.executors",
    # Federated training (Keras models, FedAvg/FedOpt/DP, evaluation): imports TensorFlow.
    "learning": "mp_executors.learning",
    "ExecutionContext": "mp_executors.context",
    "execution_context": "mp_executors.context",
    "get_execution_context": "mp_executors.context",
    "set_execution_context": "mp_executors.context",
    "set_local_execution_context": "mp_executors.context",
    "set_mp_execution_context": "mp_executors.context",
    "ClientData": "mp_executors.core.client_data",
    "Computation": "mp_executors.core.computation",
    "Value": "mp_executors.core.computation",
    "federated_computation": "mp_executors.core.computation",
    "tf_computation": "mp_executors.core.computation",
    "federated_aggregate": "mp_executors.core.intrinsics",
    "federated_broadcast": "mp_executors.core.intrinsics",
    "federated_eval": "mp_executors.core.intrinsics",
    "federated_map": "mp_executors.core.intrinsics",
    "federated_max": "mp_executors.core.intrinsics",
    "federated_mean": "mp_executors.core.intrinsics",
    "federated_min": "mp_executors.core.intrinsics",
    "federated_sum": "mp_executors.core.intrinsics",
    "federated_value": "mp_executors.core.intrinsics",
    "federated_zip": "mp_executors.core.intrinsics",
    "sequence_map": "mp_executors.core.intrinsics",
    "sequence_reduce": "mp_executors.core.intrinsics",
    "sequence_sum": "mp_executors.core.intrinsics",
    "Struct": "mp_executors.core.structure",
    "infer_cardinalities": "mp_executors.core.values",
    "infer_type": "mp_executors.core.type_inference",
    "ExecutorFactory": "mp_executors.factories.base",
    "WorkerCrashedError": "mp_executors.errors",
    "ClientWorkError": "mp_executors.errors",
    "local_executor_factory": "mp_executors.factories.local",
    "mp_executor_factory": "mp_executors.factories.mp",
    # Ray is an optional extra: imported only when one of these is used.
    "ray_executor_factory": "mp_executors.factories.ray",
    "set_ray_execution_context": "mp_executors.context",
}


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mp_executors' has no attribute {name!r}")
    module = _importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


_logging.getLogger("mp_executors").addHandler(_logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "CLIENTS",
    "SERVER",
    "ClientData",
    "ClientWorkError",
    "WorkerCrashedError",
    "Computation",
    "ExecutionContext",
    "ExecutorFactory",
    "FederatedType",
    "FunctionType",
    "Placement",
    "SequenceType",
    "Struct",
    "StructType",
    "TensorType",
    "Type",
    "Value",
    "execution_context",
    "executors",
    "federated_aggregate",
    "federated_broadcast",
    "federated_computation",
    "federated_eval",
    "federated_map",
    "federated_max",
    "federated_mean",
    "federated_min",
    "federated_sum",
    "federated_value",
    "federated_zip",
    "get_execution_context",
    "infer_cardinalities",
    "infer_type",
    "learning",
    "local_executor_factory",
    "mp_executor_factory",
    "ray_executor_factory",
    "sequence_map",
    "sequence_reduce",
    "sequence_sum",
    "set_execution_context",
    "set_local_execution_context",
    "set_mp_execution_context",
    "set_ray_execution_context",
    "tf_computation",
]
