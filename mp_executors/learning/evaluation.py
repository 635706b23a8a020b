"""Federated evaluation: a model's loss and metrics over clients, as one federated computation.

`evaluate(model, split=None)` returns a `FederatedEvaluation`; calling it with model weights
(a dict, or a FedAvg state) and client data gives
`{"loss", <each metric>, "num_examples", "num_clients"}`: example-weighted over every real
(mask 1) row of every client. The computation is

    weights@SERVER ──broadcast──► each client: (loss sum, metric sums, examples) on its rows
                   ◄──federated_sum── one stacked vector per client; ratios at the end

one TensorFlow call per shard, fixed shapes, and the runtime's fixed-order sum: the same bits
on any runtime and worker count.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.learning import layout as layout_lib
from mp_executors.learning.models import Model
from mp_executors.learning.models import no_autograph as _no_autograph

__all__ = ["FederatedEvaluation", "evaluate"]


def evaluate(model: Model, *, split: str | None = None) -> FederatedEvaluation:
    """A federated evaluation of `model`; `split` names the member holding the examples (e.g. "test")."""
    if not isinstance(model, Model):
        raise TypeError(f"evaluate: model must be an mpx.learning Model (from_keras_model, logreg, mlp), "
                        f"got {type(model).__name__}.")
    return FederatedEvaluation(model, split)


@dataclass
class FederatedEvaluation:
    model: Model
    split: str | None = None
    _computations: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, weights: Any, client_data: Any) -> dict[str, float]:
        """The metrics of `weights` (a weights dict or a FedAvg state) over `client_data`."""
        if isinstance(weights, dict) and "model" in weights and isinstance(weights["model"], dict):
            weights = weights["model"]
        self.model.check_weights(weights, "evaluate: weights")
        comp = self.computation(layout_lib.element_type_of(client_data, "evaluate"))
        sums = [float(v) for v in comp(weights, client_data)]
        loss_sum, count, n_clients = sums[0], sums[-2], sums[-1]
        denom = max(count, 1.0)
        out = {"loss": loss_sum / denom}
        out.update({m: s / denom for m, s in zip(self.model.metric_names, sums[1:-2])})
        out.update(num_examples=count, num_clients=n_clients)
        return out

    def computation(self, element_type: Any) -> mpx.Computation:
        """(SERVER weights, CLIENTS data) -> SERVER float32[k]: [loss sum, metric sums..., examples, clients]."""
        key = str(element_type)
        with self._lock:
            comp = self._computations.get(key)
            if comp is None:
                layout = layout_lib.layout_for(self.model, element_type, self.split, "evaluate")
                comp = self._computations[key] = _build(self.model, layout)
        return comp


def _build(model: Model, layout: layout_lib.Layout) -> mpx.Computation:
    names = list(model.names)

    @mpx.tf_computation(model.weights_type, layout.element_type)
    @_no_autograph
    def client_eval(weights, element):
        x, y, mask = layout.examples(element)
        total, count, metric_sums = model.masked_sums([weights[n] for n in names], x, y, mask)
        return tf.stack([total, *metric_sums, count, tf.constant(1.0)])

    @mpx.federated_computation(mpx.FederatedType(model.weights_type, mpx.SERVER),
                               mpx.FederatedType(layout.element_type, mpx.CLIENTS))
    def federated_eval(weights, clients):
        return mpx.federated_sum(mpx.federated_map(client_eval, (mpx.federated_broadcast(weights), clients)))

    return federated_eval
