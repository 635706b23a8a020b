"""Differentially private aggregation for FedAvg (DP-FedAvg), and the privacy it spends.

`dp(noise_multiplier, clients_per_round, clip=..., adaptive=...)` describes the aggregator
`fed_avg(..., aggregator=dp(...))` builds in (McMahan et al. 2018, "Learning differentially
private recurrent language models"; adaptive clipping from Andrew et al. 2021, "Differentially
private learning with adaptive clipping"), with the names and defaults of TFF's
`DifferentiallyPrivateFactory.gaussian_fixed / gaussian_adaptive`:

- each client clips its update Δ_i (all tensors together) to L2 norm at most C:
  Δ_i · min(1, C / ||Δ_i||), inside the client's computation;
- the server sums the clipped updates (`federated_sum`), adds Gaussian noise N(0, (z_Δ C)²) to
  every coordinate, and divides by `clients_per_round` (a fixed denominator, as TFF does: the
  cohort's actual size is not used, so the noise's scale does not depend on the data);
- adaptive clipping: each client also reports b_i = [||Δ_i|| <= C]; the server estimates the
  unclipped fraction b̄ = (Σ b_i + N(0, σ_b²)) / clients_per_round and moves the clip
  geometrically towards the target quantile γ: C ← C · exp(-η_C (b̄ - γ)). The two releases
  together are a Gaussian mechanism of noise multiplier z when
  z_Δ = (z⁻² - (2 σ_b)⁻²)^(-1/2) (Andrew et al., Theorem 1), so the accountant sees z.
  σ_b defaults to clients_per_round / 20.

All noise is drawn from stateless RNGs keyed by (the process's seed, the round), at the server,
so a run is bitwise the same on any runtime and any number of workers.

The privacy spent: `epsilon(noise_multiplier, sampling_probability, rounds, delta)` composes
`rounds` Poisson-subsampled Gaussian mechanisms with `dp-accounting` (RDP by default, or PLD);
`PrivacyAccountant` keeps that count across rounds (and in checkpoints). `dp-accounting` is an
optional extra: `pip install "mp_executors[dp]"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mp_executors._tf import tf

__all__ = ["DPAggregator", "PrivacyAccountant", "adaptive_noise_limit", "dp", "epsilon"]

ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class DPAggregator:
    """What `dp(...)` returns; `fed_avg(aggregator=...)` builds the math from it."""

    noise_multiplier: float
    clients_per_round: int
    clip: float
    adaptive: bool = False
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None

    def __post_init__(self) -> None:
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not (z >= 0 and math.isfinite(z)):
            raise ValueError(f"dp: noise_multiplier={z!r} is invalid: it must be a number >= 0 (0: no noise).")
        if isinstance(self.clients_per_round, bool) or not isinstance(self.clients_per_round, int) \
                or self.clients_per_round < 1:
            raise ValueError(f"dp: clients_per_round={self.clients_per_round!r} is invalid: it must be a "
                             "positive integer (the cohort size the sum is divided by).")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"dp: clip={self.clip!r} is invalid: it must be a number > 0 "
                             "(the L2 norm each client's update is clipped to; the initial one if adaptive).")
        if not 0 < self.target_unclipped_quantile < 1:
            raise ValueError(f"dp: target_unclipped_quantile={self.target_unclipped_quantile!r} must be in (0, 1).")
        if not self.clip_learning_rate > 0:
            raise ValueError(f"dp: clip_learning_rate={self.clip_learning_rate!r} must be > 0.")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev >= 0:
            raise ValueError(f"dp: clipped_count_stddev={self.clipped_count_stddev!r} must be >= 0.")
        if self.adaptive and z > 0 and not 2 * self.count_stddev > z:
            default = self.clipped_count_stddev is None
            raise ValueError(
                f"dp: adaptive clipping needs 2 * clipped_count_stddev > noise_multiplier, got 2 * "
                f"{self.count_stddev:g} <= {z:g}"
                + (f" (clipped_count_stddev defaults to clients_per_round / 20 = {self.clients_per_round} / 20)"
                   if default else "")
                + f"; lower noise_multiplier below {2 * self.count_stddev:g}, raise clipped_count_stddev= above "
                f"{z / 2:g}" + (f" (or clients_per_round= above {math.floor(10 * z)})" if default else "")
                + ", or clip at a fixed norm (adaptive=False).")

    @property
    def count_stddev(self) -> float:
        """σ_b: the noise on the count of unclipped clients (adaptive clipping only)."""
        if not self.adaptive:
            return 0.0
        if self.clipped_count_stddev is not None:
            return float(self.clipped_count_stddev)
        return adaptive_noise_limit(self.clients_per_round) / 2.0 if self.noise_multiplier > 0 else 0.0

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: the noise multiplier applied to the sum of clipped updates."""
        z = float(self.noise_multiplier)
        if not self.adaptive or z == 0 or self.count_stddev == 0:
            return z
        return (z**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5

    def initial_state(self) -> dict[str, Any]:
        return {"clip": np.float32(self.clip)}


def adaptive_noise_limit(clients_per_round: int) -> float:
    """The noise multipliers adaptive clipping can carry at its default clipped-count noise: below this.

    σ_b = clients_per_round / 20 by default, and the pair of releases needs z < 2 σ_b
    (`DPAggregator`); callers that phrase the error in their own terms (the main job) check it
    with this before calling `dp`.
    """
    return 2.0 * clients_per_round / 20.0


def dp(
    noise_multiplier: float,
    clients_per_round: int,
    *,
    clip: float | None = None,
    adaptive: bool = False,
    target_unclipped_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> DPAggregator:
    """A DP-FedAvg aggregator: fixed clipping at `clip`, or adaptive from `clip` (default 0.1).

    `noise_multiplier` z: the noise's standard deviation over the clip norm (the z the
    accountant sees). `clients_per_round`: the expected cohort size (the sum's denominator).
    """
    if clip is None:
        if not adaptive:
            raise ValueError("dp: give clip= (the L2 norm every client's update is clipped to), "
                             "or adaptive=True to estimate it (starting from 0.1).")
        clip = 0.1
    return DPAggregator(float(noise_multiplier) if not isinstance(noise_multiplier, bool) else noise_multiplier,
                        clients_per_round, clip, bool(adaptive), target_unclipped_quantile,
                        clip_learning_rate, clipped_count_stddev)


# --------------------------------------------------------------------------- the math (TensorFlow)


def global_norm(tensors: list) -> Any:
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def clip_update(update: list, clip) -> tuple[list, Any]:
    """(the update scaled to L2 norm <= clip, 1.0 if it was within the clip else 0.0)."""
    norm = global_norm(update)
    scale = tf.minimum(1.0, clip / tf.maximum(norm, 1e-30))
    return [u * scale for u in update], tf.cast(norm <= clip, tf.float32)


def noised_mean(agg: DPAggregator, summed: list, clip, key) -> list:
    """(Σ clipped updates + N(0, (z_Δ clip)²) per coordinate) / clients_per_round."""
    z = agg.update_noise_multiplier
    keys = tf.random.experimental.stateless_split(key, max(len(summed), 1))
    out = []
    for i, s in enumerate(summed):
        if z > 0:
            s = s + tf.random.stateless_normal(tf.shape(s), seed=keys[i], stddev=z * clip)
        out.append(s / float(agg.clients_per_round))
    return out


def next_clip(agg: DPAggregator, clip, unclipped_sum, key) -> tuple[Any, Any]:
    """(the next round's clip, the noised unclipped fraction b̄) for adaptive clipping."""
    count = unclipped_sum
    if agg.count_stddev > 0:
        count = count + tf.random.stateless_normal([], seed=key, stddev=agg.count_stddev)
    fraction = count / float(agg.clients_per_round)
    new_clip = clip * tf.exp(-agg.clip_learning_rate * (fraction - agg.target_unclipped_quantile))
    return new_clip, fraction


# --------------------------------------------------------------------------- accounting


def _dp_accounting():
    try:
        import dp_accounting  # noqa: PLC0415 - optional extra, only needed to compute epsilon
    except ImportError:
        raise ImportError(
            "computing the privacy spent needs dp-accounting: pip install \"mp_executors[dp]\" "
            "(or pip install dp-accounting).") from None
    return dp_accounting


def epsilon(
    noise_multiplier: float,
    sampling_probability: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε at `delta` after `steps` Poisson-subsampled Gaussian mechanisms (dp-accounting).

    `sampling_probability` q: each client's chance of being in a round's cohort (clients per
    round / population). `accountant`: "rdp" (Rényi DP, TFF's default) or "pld" (privacy
    loss distributions, tighter).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"epsilon: unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}.")
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"epsilon: sampling_probability={sampling_probability!r} must be in (0, 1].")
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta={delta!r} must be in (0, 1).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"epsilon: steps={steps!r} must be an integer >= 0.")
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dpa = _dp_accounting()
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sampling_probability, dpa.GaussianDpEvent(noise_multiplier)), steps)
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyAccountant:
    """The privacy spent by a run so far: the rounds done at (noise multiplier, sampling rate).

    Its `state()` is a small dict a checkpoint keeps; `PrivacyAccountant(**state)` restores it.
    """

    noise_multiplier: float
    sampling_probability: float
    rounds: int = 0
    accountant: str = "rdp"

    def record_round(self, count: int = 1) -> None:
        self.rounds += count

    def epsilon(self, delta: float) -> float:
        return epsilon(self.noise_multiplier, self.sampling_probability, self.rounds, delta, self.accountant)

    def state(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sampling_probability": self.sampling_probability,
                "rounds": self.rounds, "accountant": self.accountant}
