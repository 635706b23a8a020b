"""Functional models for federated training: weights as tensors, a pure forward pass.

A `Model` is what the computations of `mpx.learning` trace: an ordered set of named weight
tensors (a dict `{name: array}` travels in the process state), a forward pass
`predict(weights, x)` that reads nothing but its arguments (no `tf.Variable`, so it traces into
a portable graph and runs in any worker, inside a client's `tf.while_loop` and under
`tf.vectorized_map`), a per-example loss and per-example metrics. Every sum it returns honours
a padding mask (`masked_sums`): clients of one shard have the same shapes, padded rows have
mask 0 and count for nothing.

Three ways to get one:

- `from_keras_model(keras_model_or_fn, loss, input_spec, metrics=())`: a Keras 3 model (the
  `keras` package, or `tf.keras` on TensorFlow 2.16+), run through `Model.stateless_call` with
  the given weight tensors. The forward pass runs in inference mode (`training=False`): dropout
  is off and batch-norm statistics are not updated during local training; non-trainable
  weights are carried unchanged.
- `logreg(...)` and `mlp(...)`: the main job's two built-in models
  (`mp_executors.simulation.models`: the same math, weights and initial values).
- `Model(...)` directly, from any TensorFlow function of (weights, x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.simulation import models as sim_models

__all__ = ["Model", "from_keras_model", "logreg", "mlp"]

#: A per-example function of (y_true, y_pred) -> a tensor with one value per example.
PerExample = Callable[[Any, Any], Any]

#: For the bodies of our tf_computations: they use tf.while_loop / tf.where explicitly and
#: Python `if` only on Python values, so AutoGraph has nothing to convert, and converting
#: (every function they call, Keras included) cost ~5 s per process build here.
no_autograph = tf.autograph.experimental.do_not_convert


@dataclass(frozen=True, eq=False)  # identity semantics: its weights are arrays
class Model:
    """A functional model (see the module docstring).

    `forward(weights, x)` takes the weights as a list in `names` order. `x_spec` and `y_spec`
    are `mpx.TensorType`s of ONE batch (leading dimension the batch, None allowed).
    """

    names: tuple[str, ...]
    initial: tuple[np.ndarray, ...] = field(repr=False)
    trainable: tuple[bool, ...]
    forward: Callable[[list, Any], Any] = field(repr=False)
    loss_fn: PerExample = field(repr=False)
    x_spec: mpx.TensorType
    y_spec: mpx.TensorType
    metrics: tuple[tuple[str, PerExample], ...] = ()
    description: str = "model"

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.initial) == len(self.trainable)):
            raise ValueError("Model: names, initial and trainable must have one entry per weight.")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Model: weight names must be unique, got {list(self.names)}.")
        if not any(self.trainable):
            raise ValueError("Model: it has no trainable weights; there is nothing to train.")
        metric_names = [n for n, _ in self.metrics]
        if len(set(metric_names)) != len(metric_names) or {"loss", "num_examples"} & set(metric_names):
            raise ValueError(f"Model: metric names must be unique and not 'loss' or 'num_examples', got {metric_names}.")

    # ------------------------------------------------------------------ weights

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(n for n, tr in zip(self.names, self.trainable) if tr)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.metrics)

    def initial_weights(self) -> dict[str, np.ndarray]:
        """A fresh copy of the initial weights, `{name: float32 array}` in `names` order."""
        return {n: np.array(w, copy=True) for n, w in zip(self.names, self.initial)}

    @property
    def weights_type(self) -> mpx.StructType:
        """The type of the weights dict (what `initial_weights()` returns)."""
        return mpx.StructType(
            [(n, mpx.TensorType(w.dtype, w.shape)) for n, w in zip(self.names, self.initial)], dict)

    def weight_list(self, weights: Any) -> list:
        """The weights (a dict, or a Struct inside a computation) as a list in `names` order."""
        if isinstance(weights, dict):
            return [weights[n] for n in self.names]
        return [weights[n] for n in self.names]

    def check_weights(self, weights: Any, what: str = "weights") -> None:
        """A clear error unless `weights` is a dict with this model's names, shapes and dtypes."""
        if not isinstance(weights, dict) or set(weights) != set(self.names):
            got = sorted(weights) if isinstance(weights, dict) else type(weights).__name__
            raise ValueError(f"{what}: expected a dict of this model's weights {list(self.names)}, got {got}.")
        for n, w0 in zip(self.names, self.initial):
            w = np.asarray(weights[n])
            if w.shape != w0.shape or w.dtype != w0.dtype:
                raise ValueError(f"{what}: weight {n!r} is {w.dtype}{list(w.shape)}, expected {w0.dtype}{list(w0.shape)}.")

    # ------------------------------------------------------------------ math (TensorFlow)

    def predict(self, weights: list, x) -> Any:
        return self.forward(list(weights), x)

    def masked_sums(self, weights: list, x, y, mask, with_metrics: bool = True) -> tuple[Any, Any, list]:
        """(sum of losses, number of examples, [sum of each metric]) over rows with mask 1.

        `with_metrics=False` leaves the metrics out (an empty list): local training steps
        need only the loss, and every op counts in a step for a small model.
        """
        out = self.predict(weights, x)
        sums = [tf.reduce_sum(mask * _per_example(self.loss_fn(y, out), "the loss"))]
        for name, fn in self.metrics if with_metrics else ():
            sums.append(tf.reduce_sum(mask * _per_example(fn(y, out), f"metric {name!r}")))
        return sums[0], tf.reduce_sum(mask), sums[1:]


def _per_example(values, what: str):
    """One float32 value per example: extra axes (e.g. per time step) are averaged."""
    values = tf.cast(values, tf.float32)
    if values.shape.rank == 0:
        raise ValueError(
            f"{what} returned a scalar; it must return one value per example (e.g. a Keras loss's "
            "`.call`, or keras.losses.sparse_categorical_crossentropy), not a batch mean.")
    if values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


def _sparse_accuracy(y, logits):
    return tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)


# --------------------------------------------------------------------------- built-in models


def _builtin(spec: sim_models.ModelSpec, seed: int) -> Model:
    params = sim_models.initial_params(spec, np.random.default_rng([seed, 0]))

    def forward(weights, x):
        return sim_models.logits(spec, weights, x)

    def loss(y, out):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)

    return Model(
        names=tuple(spec.names),
        initial=tuple(params[n] for n in spec.names),
        trainable=(True,) * len(spec.names),
        forward=forward,
        loss_fn=loss,
        x_spec=mpx.TensorType(np.float32, (None, spec.num_features)),
        y_spec=mpx.TensorType(np.int32, (None,)),
        metrics=(("accuracy", _sparse_accuracy),),
        description=spec.describe(),
    )


def logreg(num_features: int = 60, num_classes: int = 10, seed: int = 0) -> Model:
    """Multinomial logistic regression softmax(x W + b), from zeros: the main job's `logreg`.

    Labels are int32 class ids; metrics: accuracy. (`seed` is unused: the start is zeros.)
    """
    return _builtin(sim_models.ModelSpec("logreg", num_features, num_classes), seed)


def mlp(num_features: int = 60, num_classes: int = 10, hidden: int = 64, seed: int = 0) -> Model:
    """One hidden ReLU layer, Glorot-uniform from a numpy Generator seeded [seed, 0]: the main job's `mlp`."""
    return _builtin(sim_models.ModelSpec("mlp", num_features, num_classes, hidden), seed)


# --------------------------------------------------------------------------- Keras


def _as_tensor_type(spec: Any, what: str) -> mpx.TensorType:
    if isinstance(spec, mpx.TensorType):
        result = spec
    elif isinstance(spec, tf.TensorSpec):
        result = mpx.TensorType(spec.dtype.as_numpy_dtype, tuple(spec.shape.as_list()))
    elif isinstance(spec, tuple) and len(spec) == 2:
        result = mpx.TensorType(spec[0], spec[1])
    else:
        raise TypeError(
            f"from_keras_model: input_spec {what} must be a tf.TensorSpec (or mpx.TensorType, or a "
            f"(dtype, shape) pair) whose first dimension is the batch, got {spec!r}.")
    if len(result.shape) < 1:
        raise ValueError(f"from_keras_model: input_spec {what} {result} has no batch dimension; "
                         "give the shape of a batch, e.g. tf.TensorSpec([None, 784], tf.float32).")
    return result


def _input_specs(input_spec: Any) -> tuple[mpx.TensorType, mpx.TensorType]:
    if isinstance(input_spec, dict):
        if set(input_spec) != {"x", "y"}:
            raise ValueError(f"from_keras_model: an input_spec dict must have keys 'x' and 'y', got {sorted(input_spec)}.")
        x, y = input_spec["x"], input_spec["y"]
    elif isinstance(input_spec, (tuple, list)) and len(input_spec) == 2 and not isinstance(input_spec[0], (np.dtype, type)):
        x, y = input_spec
    else:
        raise TypeError(
            "from_keras_model: input_spec must be (x_spec, y_spec) or {'x': x_spec, 'y': y_spec}, e.g. "
            f"(tf.TensorSpec([None, 784], tf.float32), tf.TensorSpec([None], tf.int32)); got {input_spec!r}.")
    return _as_tensor_type(x, "x"), _as_tensor_type(y, "y")


def _keras_loss(loss: Any) -> PerExample:
    # Keras is imported with TensorFlow (tf.keras is Keras 3 on TF 2.16+).
    keras = tf.keras
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # the per-example values, before the Loss's batch reduction
    if callable(loss):
        return loss
    raise TypeError(f"from_keras_model: loss must be a Keras loss, a loss name or a function "
                    f"(y_true, y_pred) -> per-example losses, got {loss!r}.")


def _keras_metric(metric: Any, y_spec: mpx.TensorType, out_shape: tuple) -> tuple[str, PerExample]:
    keras = tf.keras
    if isinstance(metric, str):
        name = metric
        if metric in ("accuracy", "acc"):
            out_last = out_shape[-1] if out_shape else None
            if len(y_spec.shape) == len(out_shape) - 1 or (y_spec.shape[-1:] == (1,) and out_last not in (1, None)):
                fn = keras.metrics.sparse_categorical_accuracy
            elif out_last == 1:
                fn = keras.metrics.binary_accuracy
            else:
                fn = keras.metrics.categorical_accuracy
            return name, fn
        metric = keras.metrics.get(metric)
        if isinstance(metric, type):
            metric = metric()
    else:
        name = getattr(metric, "name", None) or getattr(metric, "__name__", None)
    fn = getattr(metric, "_fn", None)  # a Keras MeanMetricWrapper: its per-example function
    if fn is not None:
        kwargs = dict(getattr(metric, "_fn_kwargs", {}) or {})
        return name, (lambda y, p, _fn=fn, _kw=kwargs: _fn(y, p, **_kw))
    if isinstance(metric, keras.metrics.Metric) or not callable(metric):
        raise TypeError(
            f"from_keras_model: metric {metric!r} is not a per-example function; give a name "
            "('accuracy', 'mse', ...), a function (y_true, y_pred) -> per-example values, or a Keras "
            "mean metric such as keras.metrics.SparseCategoricalAccuracy().")
    return name, metric


def from_keras_model(
    keras_model_or_fn: Any,
    loss: Any,
    input_spec: Any,
    metrics: Sequence[Any] = (),
) -> Model:
    """A functional `Model` from a Keras 3 model (or a function returning one).

    `loss`: a Keras loss (object or name) or a function (y_true, y_pred) -> per-example
    losses. `input_spec`: the (x, y) specs of one batch, e.g.
    `(tf.TensorSpec([None, 784], tf.float32), tf.TensorSpec([None], tf.int32))`.
    `metrics`: names ('accuracy', 'mse', ...), per-example functions, or Keras mean metrics.
    The model's current weights are the initial weights.
    """
    keras = tf.keras
    model = keras_model_or_fn
    if not isinstance(model, keras.Model) and callable(model):
        model = model()
    if not hasattr(model, "stateless_call") or not hasattr(model, "trainable_variables"):
        raise TypeError(
            f"from_keras_model: expected a Keras 3 model (keras >= 3, or tf.keras on TensorFlow >= 2.16) "
            f"or a function returning one, got {type(model).__module__}.{type(model).__name__}. Keras 2 "
            "models (tf_keras, tf.keras before TF 2.16) have no stateless call and are not supported.")
    x_spec, y_spec = _input_specs(input_spec)
    try:
        model_inputs = list(model.inputs or [])
    except (AttributeError, ValueError):  # a subclassed model has no symbolic inputs
        model_inputs = []
    if len(model_inputs) == 1 and len(model_inputs[0].shape) != len(x_spec.shape):
        raise ValueError(
            f"from_keras_model: input_spec x is {x_spec} but the model takes inputs of shape "
            f"{tuple(model_inputs[0].shape)}; give the shape of a batch, first dimension the batch "
            f"(e.g. tf.TensorSpec({[None, *model_inputs[0].shape[1:]]}, ...)).")
    if not model.built or not model.trainable_variables:
        # Build the variables with one example batch (outside any trace: they must exist before).
        model(tf.zeros([1, *[d or 1 for d in x_spec.shape[1:]]], x_spec.dtype))
    trainable, fixed = list(model.trainable_variables), list(model.non_trainable_variables)
    variables = trainable + fixed
    names = []
    for v in variables:
        name = getattr(v, "path", None) or v.name
        while name in names:  # unique, in a stable order
            name += "_"
        names.append(name)
    n_trainable = len(trainable)

    def forward(weights, x):
        out, _ = model.stateless_call(weights[:n_trainable], weights[n_trainable:], x, training=False)
        return out

    out_shape = tuple(model.compute_output_spec(
        tf.keras.KerasTensor((None, *x_spec.shape[1:]), dtype=x_spec.dtype.name)).shape) \
        if hasattr(model, "compute_output_spec") else ()
    return Model(
        names=tuple(names),
        initial=tuple(np.asarray(v.numpy()) for v in variables),
        trainable=(True,) * n_trainable + (False,) * len(fixed),
        forward=forward,
        loss_fn=_keras_loss(loss),
        x_spec=x_spec,
        y_spec=y_spec,
        metrics=tuple(_keras_metric(m, y_spec, out_shape) for m in metrics),
        description=f"Keras model {model.name!r} ({sum(int(np.prod(v.shape)) for v in trainable)} trainable parameters)",
    )
