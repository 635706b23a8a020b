"""placeholder, replaced by the worker-pool factory."""
from mp_executors.factories.local import local_executor_factory as mp_executor_factory  # noqa: F401
