"""`mpx.learning`: federated training built on the public API only (no TFF).

    import mp_executors as mpx
    from mp_executors import learning

    model = learning.from_keras_model(
        lambda: keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        input_spec=(tf.TensorSpec([None, 784], tf.float32), tf.TensorSpec([None], tf.int32)),
        metrics=["accuracy"])
    process = learning.fed_avg(model, learning.SGD(0.1), learning.Adam(0.01), local_epochs=1, batch_size=20)
    state = process.initialize()
    for _ in range(10):
        state, metrics = process.next(state, clients)   # clients: mpx.ClientData or a list
    learning.evaluate(model)(state, test_clients)

Modules:
- `models`: the functional `Model`, `from_keras_model`, and the main job's `logreg` / `mlp`.
- `optimizers`: SGD (momentum), Adam, Yogi, Adagrad (Reddi et al.'s names and defaults).
- `fed_avg`: FedAvg / FedProx / FedOpt / DP-FedAvg as an iterative process of our computations.
- `privacy`: `dp(...)`, clipping (fixed, adaptive), Gaussian noise, the privacy accountant (`[dp]` extra).
- `evaluation`: federated evaluation.
- `layout`: the per-client data layout (x, y, mask[, id]) and its checks.
"""

from mp_executors.learning.evaluation import FederatedEvaluation, evaluate
from mp_executors.learning.fed_avg import FedAvgConfig, FedAvgProcess, fed_avg
from mp_executors.learning.models import Model, from_keras_model, logreg, mlp
from mp_executors.learning.optimizers import SGD, Adagrad, Adam, Optimizer, Yogi
from mp_executors.learning.privacy import DPAggregator, PrivacyAccountant, dp, epsilon

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "DPAggregator",
    "FedAvgConfig",
    "FedAvgProcess",
    "FederatedEvaluation",
    "Model",
    "Optimizer",
    "PrivacyAccountant",
    "Yogi",
    "dp",
    "epsilon",
    "evaluate",
    "fed_avg",
    "from_keras_model",
    "logreg",
    "mlp",
]
