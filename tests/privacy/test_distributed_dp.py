"""Distributed discrete Gaussian and Skellam: sampler statistics, rotation, rounding, accounting, mechanism."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from dp_accounting.rdp import rdp_privacy_accountant

from fljax import privacy
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.experiment import config as experiment_config
from fljax.privacy import discrete, distributed, skellam
from fljax.secagg import SecAggConfig, encoding, protocol, simulation
from tests import helpers


def _cfg(**kw):
    base = dict(clip_norm=1.0, noise_multiplier=1.0, dim=1000, cohort_size=100, population_size=10_000)
    base.update(kw)
    return distributed.DistributedDPConfig(**base)


def _gaussian_epsilon(z, rounds, delta, orders, q=1.0):
    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc.compose(event, rounds)
    return acc.get_epsilon(delta)


# --- sampler ---------------------------------------------------------------------------------


def _pmf(sigma, support):
    x = np.arange(-support, support + 1)
    p = np.exp(-(x.astype(np.float64) ** 2) / (2 * sigma**2))
    return x, p / p.sum()


@pytest.mark.parametrize("sigma", [0.8, 3.0, 20.0])
def test_discrete_gaussian_matches_exact_pmf_and_rejects_wrong_scales(sigma):
    n = 200_000
    samples = np.asarray(jax.jit(lambda k: discrete.discrete_gaussian(k, (n,), sigma))(jax.random.key(0)))
    assert samples.dtype == np.int32

    def chi2_pvalue(scale):
        support = int(math.ceil(12 * max(sigma, scale))) + 1
        x, p = _pmf(scale, support)
        # bins: every integer with expected count >= 20, the rest lumped into two tails
        inner = n * p >= 20
        lo, hi = x[inner].min(), x[inner].max()
        counts = np.array([np.sum(samples < lo)] + [np.sum(samples == v) for v in range(lo, hi + 1)])
        counts = np.append(counts, np.sum(samples > hi))
        expected = n * np.concatenate([[p[x < lo].sum()], p[(x >= lo) & (x <= hi)], [p[x > hi].sum()]])
        keep = expected > 0
        extra = counts[~keep].sum()
        assert extra == 0, f"samples outside the support at scale {scale}"
        return scipy.stats.chisquare(
            counts[keep], expected[keep] * counts.sum() / expected[keep].sum()
        ).pvalue

    assert chi2_pvalue(sigma) > 1e-3
    assert chi2_pvalue(0.67 * sigma) < 1e-8
    assert chi2_pvalue(1.5 * sigma) < 1e-8


def test_discrete_gaussian_zero_sigma_and_keys():
    assert not np.any(np.asarray(discrete.discrete_gaussian(jax.random.key(0), (5,), 0.0)))
    a = discrete.discrete_gaussian(jax.random.key(1), (1000,), 4.0)
    b = discrete.discrete_gaussian(jax.random.key(1), (1000,), 4.0)
    c = discrete.discrete_gaussian(jax.random.key(2), (1000,), 4.0)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


# --- rotation and rounding ---------------------------------------------------------------------


def test_hadamard_is_the_normalised_walsh_hadamard_matrix():
    d = 16
    x = jax.random.normal(jax.random.key(0), (3, d), jnp.float32)
    expected = np.asarray(x) @ scipy.linalg.hadamard(d).T / math.sqrt(d)
    np.testing.assert_allclose(discrete.hadamard(x), expected, rtol=1e-5, atol=1e-5)


def test_rotation_keeps_norms_and_inverts():
    x = jax.random.normal(jax.random.key(0), (4, 83), jnp.float32)
    signs = discrete.random_signs(jax.random.key(1), discrete.padded_dim(83))
    y = discrete.rotate(x, signs)
    assert y.shape == (4, 128)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(discrete.unrotate(y, signs, 83), x, atol=1e-5)


def test_conditional_rounding_respects_the_bound_and_is_unbiased():
    cfg = _cfg(dim=64, gamma=0.05, noise_multiplier=0.0)
    x = jax.random.normal(jax.random.key(0), (64,), jnp.float32)
    y = x / jnp.linalg.norm(x) * jnp.float32(cfg.clip_norm / cfg.gamma_value)  # norm exactly c
    bound_sq = cfg.rounded_l2_bound**2
    keys = jax.random.split(jax.random.key(1), 4000)
    q, tries, fell_back = jax.jit(jax.vmap(lambda k: discrete.conditional_round(y, bound_sq, k, 8)))(keys)
    norms_sq = np.sum(np.asarray(q, np.float64) ** 2, axis=1)
    assert np.all(norms_sq <= bound_sq)
    assert np.all(np.abs(np.asarray(q) - np.asarray(y)) < 1)
    assert not np.any(np.asarray(fell_back))
    # the conditioning rejects rarely (probability <= beta), so the mean stays close to y
    assert float(jnp.mean(tries.astype(jnp.float32))) < 1 / (1 - cfg.beta)
    np.testing.assert_allclose(np.mean(np.asarray(q, np.float64), axis=0), y, atol=0.06)


def test_conditional_rounding_falls_back_towards_zero():
    y = jnp.array([2.5, -3.5, 0.5], jnp.float32)
    q, tries, fell_back = discrete.conditional_round(y, 0.5, jax.random.key(0), 3)
    assert bool(fell_back) and int(tries) == 3
    assert q.tolist() == [2, -3, 0]


# --- accounting ------------------------------------------------------------------------------


def test_epsilon_converges_to_the_continuous_gaussian_as_gamma_shrinks():
    """(a) gamma -> 0: rounding slack and tau vanish, epsilon -> the Gaussian's (no sampling)."""
    orders = distributed.accounting_orders(_cfg(amplification=False))
    cfg0 = _cfg(amplification=False)
    target = _gaussian_epsilon(1.0, 10, cfg0.target_delta, orders)
    gaps = []
    for gamma in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        eps = distributed.epsilon(_cfg(amplification=False, gamma=gamma), 10)
        assert eps >= target * (1 - 1e-12)  # never below the continuous Gaussian
        gaps.append(eps / target - 1)
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] < 1e-4


def test_epsilon_converges_with_more_bits():
    cfg = _cfg(amplification=False)
    target = _gaussian_epsilon(1.0, 10, cfg.target_delta, distributed.accounting_orders(cfg))
    eps = [distributed.epsilon(_cfg(amplification=False, bits=b), 10) for b in (12, 16, 20)]
    assert eps[0] > eps[1] > eps[2] > target and eps[2] / target - 1 < 1e-3


def test_one_client_is_the_discrete_gaussian_of_canonne_kamath_steinke():
    """(b) n = 1: tau = 0 and the RDP is exactly alpha Delta^2 / (2 sigma^2), the discrete
    Gaussian's (Canonne, Kamath, Steinke 2020, stated as 1/2 (Delta/sigma)^2-concentrated DP)."""
    cfg = _cfg(cohort_size=1, amplification=False, gamma=0.01)
    assert cfg.tau == 0.0
    z_eff = cfg.noise_multiplier * cfg.clip_norm / cfg.sensitivity
    orders = distributed.accounting_orders(cfg)
    expected = _gaussian_epsilon(z_eff, 5, cfg.target_delta, orders)
    assert distributed.epsilon(cfg, 5) == pytest.approx(expected, rel=1e-9)


def test_tau_and_rounded_norm_follow_the_paper():
    """Theorem 1's rounded-norm bound and the tau of the sum of discrete Gaussians, by hand."""
    cfg = _cfg(cohort_size=3, population_size=100, dim=16, gamma=0.25, noise_multiplier=0.6, min_clients=3)
    s = 0.6 / math.sqrt(3) / 0.25
    assert cfg.local_sigma == pytest.approx(s)
    expected_tau = 10 * (math.exp(-2 * math.pi**2 * s**2 / 2) + math.exp(-2 * math.pi**2 * s**2 * 2 / 3))
    assert cfg.tau == pytest.approx(expected_tau, rel=1e-12)
    c, d, b = 4.0, 16, math.exp(-0.5)
    tight = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / b)) * (c + math.sqrt(d) / 2))
    assert cfg.rounded_l2_bound == pytest.approx(min(c + math.sqrt(d), tight))
    assert cfg.replace(beta=0.0).rounded_l2_bound == pytest.approx(c + math.sqrt(d))
    # tau > 0 costs privacy: epsilon above the continuous Gaussian with the rounded sensitivity
    z_eff = 0.6 * 1.0 / cfg.sensitivity
    orders = distributed.accounting_orders(cfg.replace(amplification=False))
    plain = _gaussian_epsilon(z_eff, 1, cfg.target_delta, orders)
    assert distributed.epsilon(cfg.replace(amplification=False), 1) > plain


def test_subsampled_bound_is_an_upper_bound_close_to_the_exact_gaussian():
    """Zhu-Wang's Theorem 5 on a Gaussian base: above dp_accounting's exact subsampled RDP."""
    z, q = 1.0, 0.01
    orders = np.array(distributed.SUBSAMPLED_ORDERS)
    ours = distributed.poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, orders)
    exact = dp_accounting.rdp.RdpAccountant(orders=list(map(float, orders)))
    exact.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 1)
    assert np.all(ours >= np.asarray(exact._rdp) * (1 - 1e-9))
    eps_ours, _ = rdp_privacy_accountant.compute_epsilon(orders, 100 * ours, 1e-5)
    eps_exact = _gaussian_epsilon(z, 100, 1e-5, orders, q=q)
    assert eps_exact <= eps_ours <= 1.3 * eps_exact
    # the mechanism's epsilon with amplification, gamma small: close to the sampled Gaussian
    cfg = _cfg(gamma=1e-5, delta=1e-5)
    assert eps_exact <= distributed.epsilon(cfg, 100) <= 1.3 * eps_exact


def test_config_validation():
    with pytest.raises(ValueError, match="1/2"):
        _cfg(gamma=1.0, noise_multiplier=0.1)
    with pytest.raises(ValueError, match="bits"):
        _cfg(bits=1)
    with pytest.raises(ValueError, match="cannot hold"):
        _cfg(bits=3, cohort_size=100, k_stddevs=4.0).gamma_value  # noqa: B018
    assert distributed.epsilon(_cfg(noise_multiplier=0.0, gamma=0.01), 3) == math.inf
    assert distributed.epsilon(_cfg(), 0) == 0.0


# --- the mechanism ---------------------------------------------------------------------------


def _updates(key, n, d, scale=0.5):
    return {"w": scale * jax.random.normal(key, (n, d), jnp.float32) / math.sqrt(d)}


def _clipped_sum(deltas, weights, c):
    x = np.asarray(deltas["w"], np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x * np.minimum(1.0, c / np.maximum(norms, 1e-30))
    return np.sum(x * (np.asarray(weights) > 0)[:, None], axis=0)


def _aggregate(cfg, deltas, weights, key, masking=distributed.DEFAULT_MASKING, use_protocol=False):
    agg = distributed.distributed_dp(cfg, masking=masking, protocol=use_protocol)
    template = jax.tree.map(lambda x: x[0], deltas)
    return jax.jit(agg.aggregate)(agg.init(template), deltas, weights, key)


def test_noiseless_decoded_sum_is_within_the_rounding_bound():
    """(c) without noise the error is the rounding only: <= n gamma sqrt(d') in L2 norm, no wrap."""
    n, d = 6, 100
    cfg = _cfg(dim=d, cohort_size=n, population_size=100, noise_multiplier=0.0, gamma=1e-3, bits=16)
    deltas = _updates(jax.random.key(0), n, d, scale=2.0)  # some clipped
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], jnp.float32)
    _, mean, metrics = _aggregate(cfg, deltas, weights, jax.random.key(1))
    err = np.asarray(mean["w"], np.float64) * n - _clipped_sum(deltas, weights, 1.0)
    assert np.linalg.norm(err) <= 5 * cfg.gamma_value * math.sqrt(cfg.padded_dim) + 1e-5
    assert int(metrics["dp_wrapped_coordinates"]) == 0 and int(metrics["num_clients"]) == 5
    # Poisson sampling, expected 6 of 100: the default m is 3 sd below 6, i.e. 1 share suffices.
    assert cfg.num_shares == 1 and int(metrics["dp_noise_shortfall"]) == 0


@pytest.mark.parametrize("mechanism", distributed.MECHANISMS)
def test_noised_decoded_sum_error_matches_the_noise_and_masks_cancel(mechanism):
    """(c) with noise: the error's per-coordinate variance is the noise's (plus rounding), no
    modular wrap at the configured bits, and the masked sum equals the plain modular sum."""
    n, d = 8, 1000
    cfg = _cfg(dim=d, cohort_size=n, population_size=1000, bits=16, mechanism=mechanism)
    deltas = _updates(jax.random.key(0), n, d)
    weights = jnp.ones((n,), jnp.float32)
    key = jax.random.key(1)
    _, mean, metrics = _aggregate(cfg, deltas, weights, key)
    _, plain, _ = _aggregate(cfg, deltas, weights, key, masking=None)
    np.testing.assert_array_equal(mean["w"], plain["w"])
    err = np.asarray(mean["w"], np.float64) * n - _clipped_sum(deltas, weights, 1.0)
    var = np.mean(err**2)
    noise_var = n * (cfg.gamma_value * cfg.local_sigma) ** 2  # = (z C)^2
    assert 0.85 * noise_var <= var <= 1.15 * (noise_var + n * cfg.gamma_value**2 / 4)
    assert int(metrics["dp_wrapped_coordinates"]) == 0 and int(metrics["aborted"]) == 0
    assert float(metrics["dp_noise_std"]) == pytest.approx(math.sqrt(noise_var), rel=1e-4)


def test_too_few_bits_wrap_and_are_reported():
    n, d = 8, 64
    cfg = _cfg(dim=d, cohort_size=n, population_size=1000, bits=6, gamma=0.01, noise_multiplier=0.5)
    deltas = _updates(jax.random.key(0), n, d, scale=1.0)
    _, _, metrics = _aggregate(cfg, deltas, jnp.ones((n,), jnp.float32), jax.random.key(1))
    assert int(metrics["dp_wrapped_coordinates"]) > 0


def test_nonfinite_client_contributes_zero_and_dim_is_checked():
    n, d = 4, 10
    cfg = _cfg(dim=d, cohort_size=n, population_size=100, noise_multiplier=0.0, gamma=1e-4)
    deltas = _updates(jax.random.key(0), n, d)
    bad = {"w": deltas["w"].at[3, 0].set(jnp.nan)}
    weights = jnp.ones((n,), jnp.float32)
    _, mean, metrics = _aggregate(cfg, bad, weights, jax.random.key(1))
    ref = _clipped_sum(deltas, jnp.array([1.0, 1.0, 1.0, 0.0]), 1.0) / n
    np.testing.assert_allclose(mean["w"], ref, atol=3 * cfg.gamma_value * math.sqrt(16) / n)
    assert int(metrics["num_nonfinite"]) == 1 and int(metrics["num_clients"]) == 3
    with pytest.raises(ValueError, match="config.dim"):
        _aggregate(cfg.replace(dim=11), deltas, weights, jax.random.key(2))


def test_runs_inside_fedavg_and_padding_changes_nothing():
    """(d) a few jitted FedAvg rounds; padding slots leave the result bit for bit unchanged."""
    data = helpers.population([5, 7, 6, 4, 8, 5])
    params = helpers.params()
    dim = sum(x.size for x in jax.tree.leaves(params))
    cfg = _cfg(dim=dim, cohort_size=3, population_size=6, noise_multiplier=0.8, bits=20)
    algo = fedavg.fedavg(helpers.local_sgd(), aggregator=privacy.distributed_dp(cfg))
    step = jax.jit(algo.update)
    states = []
    for ids in ([0, 2, 4], [0, 2, 4, -1, -1]):
        state = algo.init(params)
        for r in range(3):
            state, metrics = step(state, data.cohort(ids, num_examples=8), jax.random.key(10 + r))
            assert int(metrics["dp_wrapped_coordinates"]) == 0
            assert int(metrics["num_clients"]) == 3 and int(metrics["dp_noise_shortfall"]) == 0
        states.append(state)
    helpers.assert_trees_equal(states[0].params, states[1].params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(states[0].params))


def test_summary_reports_the_mechanism():
    s = distributed.summary(_cfg(), 10)
    assert s["unit_of_privacy"] == "client" and s["epsilon"] > 0 and s["sensitivity"] >= 1.0


# --- the ring sum through the real secure-aggregation protocol --------------------------------


@pytest.mark.parametrize("bits", [13, 32])
@pytest.mark.parametrize("alive", [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 0, 1, 0, 1]])
def test_protocol_ring_sum_equals_the_masked_simulation_bit_for_bit(alive, bits):
    """Integers already in the ring, no encoding: the protocol's sum (host and inside jit) is the
    survivors' modular sum, as the simulation's; 3 survivors of 5 fall below the threshold 4 and
    both abort alike (zeros, aborted)."""
    n, d = 5, 7
    sa = SecAggConfig()
    assert sa.threshold_for(n) == 4
    values = jax.random.bits(jax.random.key(0), (n, d), jnp.uint32) & encoding.ring_mask(bits)
    alive = jnp.asarray(alive, jnp.bool_)
    sim = jax.jit(lambda v, a, k: simulation.masked_ring_sum(v, a, k, sa, bits))(
        values, alive, jax.random.key(1)
    )
    real = jax.jit(lambda v, a: protocol.ring_sum_callback(v, a, bits, sa))(values, alive)
    host = protocol.ring_sum(np.asarray(values), np.asarray(alive), bits, sa)
    aborted = int(jnp.sum(alive)) < 4
    expected = np.zeros(d, np.uint32) if aborted else np.asarray(encoding.ring_sum(values[alive], bits))
    for total, flag in (sim, real, host):
        np.testing.assert_array_equal(np.asarray(total), expected)
        assert bool(flag) == aborted


def _protocol_spy(monkeypatch):
    """Record the inputs and ring width of every real protocol round."""
    calls = []
    run_round = protocol.run_round

    def spy(values, config, **kw):
        calls.append((np.array(values), kw["bits"]))
        return run_round(values, config, **kw)

    monkeypatch.setattr(protocol, "run_round", spy)
    return calls


def test_protocol_ring_is_bit_identical_to_the_simulation_inside_fedavg(monkeypatch):
    """Jitted FedAvg rounds: the real protocol (padded cohort) gives the simulation's (unpadded)
    model bit for bit for the same keys; padding slots send zeros and add nothing."""
    calls = _protocol_spy(monkeypatch)
    data = helpers.population([5, 7, 6, 4, 8, 5])
    params = helpers.params()
    dim = sum(x.size for x in jax.tree.leaves(params))
    cfg = _cfg(dim=dim, cohort_size=3, population_size=6, noise_multiplier=0.8, bits=20)
    keep = ("num_clients", "num_clipped", "dp_rounding_fallbacks", "dp_wrapped_coordinates", "aborted")
    runs = []
    for ids, use_protocol in (([0, 2, 4], False), ([0, 2, 4, -1], True)):
        algo = fedavg.fedavg(
            helpers.local_sgd(), aggregator=privacy.distributed_dp(cfg, protocol=use_protocol)
        )
        step = jax.jit(algo.update)
        state, history = algo.init(params), []
        for r in range(2):
            state, metrics = step(state, data.cohort(ids, num_examples=8), jax.random.key(10 + r))
            history.append({k: int(v) for k, v in metrics.items() if k in keep})
        runs.append((state, history))
    helpers.assert_trees_equal(runs[0][0].params, runs[1][0].params)
    assert runs[0][1] == runs[1][1] and all(h["aborted"] == 0 and h["num_clients"] == 3 for h in runs[1][1])
    assert len(calls) == 2
    for values, bits in calls:
        assert bits == 20 and values.shape == (4, cfg.padded_dim) and not np.any(values[3])


@pytest.mark.parametrize("mechanism", distributed.MECHANISMS)
def test_protocol_ring_excludes_padding_and_nonfinite_clients_on_a_sparse_graph(monkeypatch, mechanism):
    """A non-finite client and a padding slot take part in the protocol with zero vectors: the
    result equals the simulation's on the same slots and the plain sum over the real clients,
    bit for bit, for either noise."""
    calls = _protocol_spy(monkeypatch)
    n, d = 6, 10
    cfg = _cfg(dim=d, cohort_size=4, population_size=100, noise_multiplier=0.7, bits=16, mechanism=mechanism)
    sparse = SecAggConfig(num_neighbors=2)
    deltas = _updates(jax.random.key(0), n, d)
    deltas = {"w": deltas["w"].at[4, 0].set(jnp.nan)}
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], jnp.float32)  # slot 5 is padding
    _, real, m_real = _aggregate(cfg, deltas, weights, jax.random.key(1), masking=sparse, use_protocol=True)
    _, sim, m_sim = _aggregate(cfg, deltas, weights, jax.random.key(1), masking=sparse)
    first = jax.tree.map(lambda x: x[:4], deltas)
    _, plain, _ = _aggregate(cfg, first, weights[:4], jax.random.key(1), masking=None)
    np.testing.assert_array_equal(real["w"], sim["w"])
    np.testing.assert_array_equal(real["w"], plain["w"])
    assert {k: float(v) for k, v in m_real.items()} == {k: float(v) for k, v in m_sim.items()}
    assert (
        int(m_real["num_nonfinite"]) == 1 and int(m_real["num_clients"]) == 4 and int(m_real["aborted"]) == 0
    )
    ((values, bits),) = calls
    assert bits == 16 and not np.any(values[4:])


def test_protocol_ring_needs_a_masking_config():
    with pytest.raises(ValueError, match="masking"):
        distributed.distributed_dp(_cfg(), masking=None, protocol=True)


# --- Skellam (Agarwal, Kairouz, Liu 2021) -----------------------------------------------------


def _skellam_chi2_pvalue(samples, variance):
    """Chi-square of ``samples`` against Skellam(variance): every integer with expected count
    >= 20 its own bin when the support is narrow, else ~100 bins at normal quantiles."""
    n = samples.size
    law = scipy.stats.skellam(variance / 2, variance / 2)
    if variance < 500:
        x = np.arange(-int(20 * math.sqrt(variance)) - 20, int(20 * math.sqrt(variance)) + 21)
        inner = x[n * law.pmf(x) >= 20]
        edges = np.arange(inner.min() - 1, inner.max() + 1)  # bins (e_i, e_{i+1}]
    else:
        edges = np.unique(np.floor(scipy.stats.norm.ppf(np.arange(1, 100) / 100) * math.sqrt(variance)))
    counts = np.bincount(np.searchsorted(edges, samples, side="left"), minlength=edges.size + 1)
    expected = n * np.diff(np.concatenate([[0.0], law.cdf(edges), [1.0]]))
    return scipy.stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


@pytest.mark.parametrize("variance", [3.0, 60.0, 2e6])
def test_skellam_matches_exact_pmf_and_rejects_wrong_scales(variance):
    """(c) Knuth's path (mean 1.5), centred PTRS (mean 30) and a mean of 1e6, where
    ``jax.random.poisson``'s float32 test departs from the pmf: chi-square against scipy's
    Skellam accepts the right variance and rejects 0.67x and 1.5x."""
    n = 200_000
    samples = np.asarray(jax.jit(lambda k: skellam.skellam(k, (n,), variance))(jax.random.key(0)))
    assert samples.dtype == np.int32
    assert _skellam_chi2_pvalue(samples, variance) > 1e-3
    assert _skellam_chi2_pvalue(samples, 0.67 * variance) < 1e-8
    assert _skellam_chi2_pvalue(samples, 1.5 * variance) < 1e-8


def test_skellam_poisson_offset_is_centred_and_exact_at_huge_means():
    """A Poisson of mean 1e12 drawn as an int32 offset from floor(lam): no overflow, and its
    mean and variance are lam's (5 standard errors)."""
    lam, n = 1e12 + 0.25, 100_000
    j = np.asarray(jax.jit(lambda k: skellam.poisson_offset(k, (n,), lam))(jax.random.key(3)), np.float64)
    assert abs(j.mean() - 0.25) < 5 * math.sqrt(lam / n)
    assert abs(j.var() / lam - 1) < 5 * math.sqrt(2 / n)
    assert not np.any(np.asarray(skellam.skellam(jax.random.key(0), (4,), 0.0)))
    with pytest.raises(ValueError, match="lam"):
        skellam.poisson_offset(jax.random.key(0), (2,), 5.0)


@pytest.mark.parametrize("mu", [2.0, 20.0, 2000.0])
def test_skellam_bound_is_above_the_exact_renyi_divergence(mu):
    """(b) The paper's bound against the exact Renyi divergence of two shifted one-dimensional
    Skellam laws (scipy pmfs): above it, and within 1% + the bound's correction for large mu."""
    law = scipy.stats.skellam(mu / 2, mu / 2)
    x = np.arange(-int(30 * math.sqrt(mu)) - 60, int(30 * math.sqrt(mu)) + 61)
    for shift in (1, 3):
        lp, lq = law.logpmf(x - shift), law.logpmf(x)
        finite = np.isfinite(lp) & np.isfinite(lq)  # beyond, both underflow (far past 30 stds)
        assert finite.sum() > 10 * math.sqrt(mu)
        for alpha in (2, 3, 8, 32):
            log_terms = alpha * lp[finite] + (1 - alpha) * lq[finite]
            exact = scipy.special.logsumexp(log_terms) / (alpha - 1)
            bound = float(skellam.rdp([alpha], l2=shift, l1=shift, mu=mu)[0])
            assert exact <= bound
            if mu >= 2000:
                assert bound <= 1.01 * exact + 3 * shift / (2 * mu)


def _reference_skellam_rdp(scale, central_stddev, l2_sens, beta, dim, q, steps, orders):
    """google-research/federated ``distributed_dp/accounting_utils.py``, ``skellam_epsilon``'s
    RDP (before its conversion), transcribed in its own units: sensitivities in the update's units,
    ``scale = 1 / gamma``, ``central_var = central_stddev**2``."""
    c = l2_sens * scale  # rounded_l2_norm_bound, then rounded_l1_norm_bound
    sq = c**2 + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * math.sqrt(dim))
    rounded = min(c + math.sqrt(dim), math.sqrt(sq))
    l2_sens = rounded / scale
    l1_sens = rounded * min(math.sqrt(dim), rounded) / scale
    mu, s = central_stddev**2, scale

    def eps(a):
        return a / (2 * mu) * l2_sens**2 + min(
            ((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2), 3 * l1_sens / (2 * s * mu)
        )

    out = []
    for a in orders:
        terms = [0.0, eps(2)]
        weights = [(1 - q) ** (a - 1) * (a * q - q + 1), scipy.special.comb(a, 2) * q**2 * (1 - q) ** (a - 2)]
        for j in range(3, a + 1):
            log_comb = (
                scipy.special.gammaln(a + 1) - scipy.special.gammaln(j + 1) - scipy.special.gammaln(a - j + 1)
            )
            terms.append((j - 1) * eps(j) + log_comb + (a - j) * math.log(1 - q) + j * math.log(q))
            weights.append(3)
        out.append(min(scipy.special.logsumexp(terms, b=weights) / (a - 1), eps(a)))
    return steps * np.array(out)


def test_skellam_rdp_reproduces_the_reference_accounting():
    """(b) One configuration (d' = 1024, C = 1, z = 1, 100 of 10 000 clients, 16 bits, the
    heuristic gamma, beta = exp(-1/2), 100 rounds) through the authors' reference formula in its
    units: the same RDP at orders 2..64, hence the same epsilon."""
    cfg = _cfg(mechanism="skellam", bits=16)
    orders = list(range(2, 65))
    ours = 100 * distributed.round_rdp(cfg, orders)
    ref = _reference_skellam_rdp(
        scale=1 / cfg.gamma_value,
        central_stddev=cfg.noise_multiplier * cfg.clip_norm,
        l2_sens=cfg.clip_norm,
        beta=cfg.beta,
        dim=cfg.padded_dim,
        q=cfg.sampling_probability,
        steps=100,
        orders=orders,
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_skellam_epsilon_converges_to_the_continuous_gaussian_as_mu_grows():
    """(a) gamma -> 0, mu = (z C / gamma)^2 -> inf: epsilon decreases to the continuous
    Gaussian's at the same std, at the same integer orders, never below it; sampled too."""
    cfg0 = _cfg(amplification=False, mechanism="skellam")
    orders = distributed.accounting_orders(cfg0)
    assert orders == distributed.SUBSAMPLED_ORDERS
    target = _gaussian_epsilon(1.0, 10, cfg0.target_delta, orders)
    gaps = []
    for gamma in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        eps = distributed.epsilon(cfg0.replace(gamma=gamma), 10)
        assert eps >= target * (1 - 1e-12)
        gaps.append(eps / target - 1)
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)) and gaps[-1] < 1e-4
    # many clients, little noise each (s ~ 0.53): the discrete Gaussian sum's tau costs much more
    # than the exact Skellam sum (the regime the paper introduces Skellam for)
    ddg = _cfg(amplification=False, cohort_size=1000, population_size=10_000, gamma=0.06)
    sk = ddg.replace(mechanism="skellam")
    assert sk.tau == 0.0 < ddg.tau
    assert distributed.epsilon(sk, 1) < 0.5 * distributed.epsilon(ddg, 1)
    # with Poisson sampling, against the same Zhu-Wang bound on a Gaussian base
    cfg = _cfg(mechanism="skellam", gamma=1e-5, delta=1e-5)
    base = distributed.poisson_subsampled_rdp(lambda a: a / 2.0, cfg.sampling_probability, orders)
    expected, _ = rdp_privacy_accountant.compute_epsilon(orders, 100 * base, 1e-5)
    assert distributed.epsilon(cfg, 100) == pytest.approx(expected, rel=1e-3)
    assert distributed.summary(cfg, 10)["mechanism"] == "distributed_skellam"


def test_skellam_config_and_trainer_section():
    with pytest.raises(ValueError, match="mechanism"):
        _cfg(mechanism="laplace")
    # Skellam has no lower limit on the shares' std (the discrete Gaussian's bound needs s >= 1/2)
    with pytest.raises(ValueError, match="1/2"):
        _cfg(gamma=1.0, noise_multiplier=0.1)
    assert 0 < distributed.epsilon(_cfg(gamma=1.0, noise_multiplier=0.1, mechanism="skellam"), 1) < math.inf
    base = experiment_config.Config(
        distributed_dp=experiment_config.DistributedDP(clip_norm=1.0, noise_multiplier=1.0)
    )
    cfg = experiment_config.apply_overrides(base, ["distributed_dp.mechanism=skellam"])
    assert experiment_config.distributed_dp_config(cfg, 100, dim=10).mechanism == "skellam"
    assert experiment_config.distributed_dp_config(base, 100, dim=10).mechanism == "discrete_gaussian"
    with pytest.raises(experiment_config.ConfigError, match="mechanism"):
        experiment_config.apply_overrides(base, ["distributed_dp.mechanism=laplace"])


def test_default_noise_shares_leave_room_for_poisson_sampling():
    """Under Poisson sampling the default m sits POISSON_MARGIN sd below the expected cohort."""
    cfg = _cfg(cohort_size=100, population_size=1000)
    assert cfg.num_shares == math.floor(100 - distributed.POISSON_MARGIN * math.sqrt(100 * 0.9)) == 71
    assert cfg.replace(amplification=False).num_shares == 100
    assert cfg.replace(min_clients=90).num_shares == 90
    # each share is larger, so m shares alone carry the accounted noise z C
    assert cfg.local_stddev * math.sqrt(cfg.num_shares) == pytest.approx(cfg.noise_multiplier * cfg.clip_norm)


def _dropout_case(min_clients, dropout_rate=0.4):
    n, d = 8, 64
    cfg = _cfg(dim=d, cohort_size=n, population_size=1000, noise_multiplier=0.0, gamma=1e-4, bits=20)
    cfg = cfg.replace(min_clients=min_clients)
    masking = SecAggConfig(clip_range=1.0, frac_bits=16, dropout_rate=dropout_rate, threshold=5)
    deltas = _updates(jax.random.key(0), n, d)
    weights = jnp.ones((n,), jnp.float32).at[7].set(0.0)  # one padding slot
    key = jax.random.key(3)
    _, mean, metrics = _aggregate(cfg, deltas, weights, key, masking=masking)
    u = jax.random.uniform(fl_random.stream(key, "dropout"), (n,), jnp.float32)
    alive = np.asarray(u >= jnp.float32(dropout_rate)) & (np.asarray(weights) > 0)
    return cfg, deltas, mean, metrics, alive


def test_dropouts_sum_the_survivors_and_withhold_a_round_short_of_noise_shares():
    """A client that drops after adding its noise takes its share with it: the decoded sum is the
    survivors' (rounding only, z = 0 here), and with fewer survivors than m the round is withheld."""
    cfg, deltas, mean, metrics, alive = _dropout_case(min_clients=1)
    assert 0 < alive.sum() < 7 and int(metrics["num_dropped"]) == 7 - alive.sum()
    assert int(metrics["num_clients"]) == alive.sum() and int(metrics["aborted"]) == 0
    ref = _clipped_sum(deltas, jnp.asarray(alive, jnp.float32), 1.0) / 8
    np.testing.assert_allclose(mean["w"], ref, atol=8 * cfg.gamma_value * math.sqrt(cfg.padded_dim) / 8)
    _, _, mean, metrics, alive = _dropout_case(min_clients=int(alive.sum()) + 1)
    assert int(metrics["dp_noise_shortfall"]) == 1 and int(metrics["aborted"]) == 1
    assert not np.any(np.asarray(mean["w"]))  # nothing released


def test_a_poisson_cohort_short_of_noise_shares_is_withheld():
    n, d = 6, 32
    cfg = _cfg(dim=d, cohort_size=n, population_size=100, noise_multiplier=1.0, bits=20, min_clients=6)
    deltas = _updates(jax.random.key(0), n, d)
    full = jnp.ones((n,), jnp.float32)
    _, mean, metrics = _aggregate(cfg, deltas, full, jax.random.key(1))
    assert int(metrics["aborted"]) == 0 and np.any(np.asarray(mean["w"]))
    _, mean, metrics = _aggregate(cfg, deltas, full.at[5].set(0.0), jax.random.key(1))
    assert int(metrics["dp_noise_shortfall"]) == 1 and int(metrics["aborted"]) == 1
    assert not np.any(np.asarray(mean["w"]))
