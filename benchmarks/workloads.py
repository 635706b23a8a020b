"""The benchmark workloads (see ../shared/FACTS.md), for the scripts in this folder.

They live in the package (`mp_executors.simulation.workloads`) so that
`mp-executors bench` runs from an install; this module re-exports them.
"""

from mp_executors.simulation.workloads import (  # noqa: F401
    CLASSES,
    DATA_TYPE,
    EXAMPLES,
    FEATURES,
    LR,
    MODEL_TYPE,
    STEPS,
    client_update,
    fedavg_round,
    floor_round_fn,
    initial_model,
    make_client,
    make_clients,
    overhead_sum,
    softmax_steps,
)
