"""DP-FedAvg: clipping bounds each update, the noise has the promised variance, adaptive
clipping follows Andrew et al.'s rule, and ε is dp-accounting's."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import tensorflow as tf

import mp_executors as mpx
from mp_executors import learning
from mp_executors.learning import privacy

F, K, N = 12, 5, 10


def make_clients(seed=0, sizes=(10, 6, 3)):
    rng = np.random.default_rng(seed)
    clients = []
    for i, n in enumerate(sizes):
        mask = np.zeros(N, np.float32)
        mask[:n] = 1.0
        clients.append({"id": np.int32(i), "x": rng.normal(0, 1 + 2 * i, (N, F)).astype(np.float32),
                        "y": rng.integers(0, K, N).astype(np.int32), "mask": mask})
    return clients


def one_round(process, clients, factory):
    with mpx.execution_context(factory):
        return process.next(process.initialize(), clients)


def flat(weights):
    return np.concatenate([np.ravel(weights[n]) for n in sorted(weights)]).astype(np.float64)


def test_clip_update_bounds_the_norm_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        update = [tf.constant(rng.normal(0, scale, s).astype(np.float32)) for s in ((3, 4), (4,))]
        norm = math.sqrt(sum(float(tf.reduce_sum(u * u)) for u in update))
        clipped, unclipped = privacy.clip_update(update, tf.constant(1.0))
        new_norm = math.sqrt(sum(float(tf.reduce_sum(c * c)) for c in clipped))
        assert new_norm <= 1.0 * (1 + 1e-6)
        if norm <= 1.0:
            assert float(unclipped) == 1.0
            for a, b in zip(clipped, update):
                np.testing.assert_array_equal(a, b)
        else:
            assert float(unclipped) == 0.0
            np.testing.assert_allclose(new_norm, 1.0, rtol=1e-6)
            for a, b in zip(clipped, update):  # same direction
                np.testing.assert_allclose(a.numpy() * norm, b.numpy(), rtol=1e-5, atol=1e-6)


def test_each_clients_update_is_clipped_in_the_round(local):
    """No noise, fixed clip: the new model is w0 - sum_i clip(update_i) / clients_per_round,
    with update_i each client's own update (from a one-client, non-private round)."""
    model = learning.logreg(F, K)
    clients = make_clients()
    w0 = flat(model.initial_weights())
    plain = learning.fed_avg(model, 0.5, local_steps=3, batch_size=4, client_weighting="uniform", seed=5)
    updates = [w0 - flat(one_round(plain, [c], local)[0]["model"]) for c in clients]
    norms = sorted(np.linalg.norm(u) for u in updates)
    clip = float((norms[0] + norms[1]) / 2)  # clips two of the three
    private = learning.fed_avg(model, 0.5, local_steps=3, batch_size=4, seed=5,
                               aggregator=learning.dp(0.0, 4, clip=clip))
    state, metrics = one_round(private, clients, local)
    clipped = [u * min(1.0, clip / np.linalg.norm(u)) for u in updates]
    assert all(np.linalg.norm(c) <= clip * (1 + 1e-6) for c in clipped)
    np.testing.assert_allclose(flat(state["model"]), w0 - sum(clipped) / 4, rtol=1e-4, atol=1e-7)
    assert metrics["clip"] == pytest.approx(clip) and state["aggregator"]["clip"] == np.float32(clip)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_noise_has_the_variance_of_the_noise_multiplier(adaptive, local):
    model = learning.logreg(40, 25)  # 1,025 coordinates: the sample std is within ~5%
    rng = np.random.default_rng(1)
    clients = [{"id": np.int32(i), "x": rng.normal(size=(N, 40)).astype(np.float32),
                "y": rng.integers(0, 25, N).astype(np.int32)} for i in range(3)]
    z, clip, cohort = 2.0, 0.5, 3
    extra = dict(adaptive=True, clipped_count_stddev=2.0) if adaptive else {}

    processes = {}

    def model_after(noise, seed=0):
        if (noise, seed) not in processes:  # one trace per setting: a repeated call re-runs it
            processes[noise, seed] = learning.fed_avg(model, 0.5, local_steps=2, batch_size=5, seed=seed,
                                                      aggregator=learning.dp(noise, cohort, clip=clip, **extra))
        return flat(one_round(processes[noise, seed], clients, local)[0]["model"])

    noise = model_after(z) - model_after(0.0)
    agg = learning.dp(z, cohort, clip=clip, **extra)
    # With adaptive clipping part of the privacy budget goes to the count: z_delta > z.
    z_delta = (z**-2 - (2 * 2.0) ** -2) ** -0.5 if adaptive else z
    assert agg.update_noise_multiplier == pytest.approx(z_delta)
    expected_std = z_delta * clip / cohort
    assert np.std(noise) == pytest.approx(expected_std, rel=0.1)
    assert abs(np.mean(noise)) < 4 * expected_std / math.sqrt(noise.size)
    # Deterministic per seed, different across seeds.
    np.testing.assert_array_equal(model_after(z), model_after(z))
    assert not np.array_equal(model_after(z, seed=1), model_after(z))


def test_adaptive_clip_moves_geometrically_towards_the_quantile(local):
    """C <- C * exp(-lr * (unclipped fraction - target)); no noise, so the fraction is exact."""
    model = learning.logreg(F, K)
    clients = make_clients()

    def after(clip, cohort):
        agg = learning.dp(0.0, cohort, clip=clip, adaptive=True, clip_learning_rate=0.2,
                          target_unclipped_quantile=0.5)
        p = learning.fed_avg(model, 0.5, local_steps=2, batch_size=4, aggregator=agg)
        state, metrics = one_round(p, clients, local)
        return float(state["aggregator"]["clip"]), metrics["unclipped_fraction"]

    big, fraction = after(1e3, 3)
    assert fraction == 1.0 and big == pytest.approx(1e3 * math.exp(-0.2 * 0.5), rel=1e-6)
    small, fraction = after(1e-6, 3)
    assert fraction == 0.0 and small == pytest.approx(1e-6 * math.exp(0.2 * 0.5), rel=1e-6)
    _, fraction = after(1e3, 4)  # the denominator is the expected cohort, not the clients seen
    assert fraction == 0.75


def test_dp_arguments_are_checked():
    model = learning.logreg(F, K)
    with pytest.raises(ValueError, match="clip="):
        learning.dp(1.0, 10)
    with pytest.raises(ValueError, match="noise_multiplier"):
        learning.dp(-1.0, 10, clip=1.0)
    with pytest.raises(ValueError, match="clients_per_round"):
        learning.dp(1.0, 0, clip=1.0)
    with pytest.raises(ValueError, match="2 \\* clipped_count_stddev > noise_multiplier") as e:
        learning.dp(1.0, 100, adaptive=True, clipped_count_stddev=0.4)
    # The library's message names dp's keyword arguments (and what would do).
    assert "lower noise_multiplier below 0.8, raise clipped_count_stddev= above 0.5" in str(e.value)
    with pytest.raises(ValueError, match="clients_per_round / 20 = 8 / 20") as e:
        learning.dp(1.0, 8, adaptive=True, clip=0.5)
    assert "clients_per_round= above 10" in str(e.value) and "adaptive=False" in str(e.value)
    with pytest.raises(ValueError, match="uniform"):
        learning.fed_avg(model, 0.1, batch_size=2, aggregator=learning.dp(1.0, 10, clip=1.0),
                         client_weighting="num_examples")
    assert learning.dp(1.0, 100, adaptive=True).count_stddev == 5.0  # clients_per_round / 20


HAVE_DP_ACCOUNTING = importlib.util.find_spec("dp_accounting") is not None
needs_dp_accounting = pytest.mark.skipif(
    not HAVE_DP_ACCOUNTING,
    reason="dp-accounting is not installed (the [dp] extra): pip install 'mp_executors[dp]'")


@needs_dp_accounting
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_dp_accountings(accountant):
    import dp_accounting  # noqa: PLC0415 - optional dependency

    for q, z, steps, delta in [(0.01, 1.1, 1000, 1e-5), (0.1, 0.8, 50, 1e-6), (1.0, 5.0, 3, 1e-5)]:
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
        acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
        expected = acc.compose(event).get_epsilon(delta)
        assert learning.epsilon(z, q, steps, delta, accountant=accountant) == pytest.approx(expected, rel=1e-9)
    assert learning.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert learning.epsilon(0.0, 0.1, 5, 1e-5) == math.inf
    with pytest.raises(ValueError, match="accountant"):
        learning.epsilon(1.0, 0.1, 5, 1e-5, accountant="moments")


@needs_dp_accounting
def test_epsilon_of_one_gaussian_mechanism_is_the_analytic_one():
    """q = 1, one step: the Gaussian mechanism, whose exact (ε, δ) curve is known (Balle and
    Wang 2018): δ(ε) = Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ). PLD is tight; RDP is an upper bound."""
    sigma, delta = 2.0, 1e-5

    def phi(t):
        return 0.5 * math.erfc(-t / math.sqrt(2))

    def delta_of(eps):
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    lo, hi = 0.0, 20.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    exact = (lo + hi) / 2
    assert learning.epsilon(sigma, 1.0, 1, delta, accountant="pld") == pytest.approx(exact, rel=0.01)
    assert learning.epsilon(sigma, 1.0, 1, delta, accountant="rdp") >= exact


@needs_dp_accounting
def test_privacy_accountant_counts_rounds_and_restores():
    acc = learning.PrivacyAccountant(noise_multiplier=1.0, sampling_probability=0.01)
    acc.record_round()
    acc.record_round(9)
    assert acc.rounds == 10
    restored = learning.PrivacyAccountant(**acc.state())
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5) == learning.epsilon(1.0, 0.01, 10, 1e-5)
