"""Releases and queries: exact without noise (plain and secure sum), the stated noise (KS),
enforced contribution bounds against adversarial clients, padding and non-finite clients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fljax import privacy, secagg
from fljax.analytics import queries, release

NUM_CLIENTS, NUM_EXAMPLES = 16, 4
LO, HI = 0.0, 8.0


_noised_sum = jax.jit(release.noised_sum, static_argnums=(2,), static_argnames=("sum",))


def _population(seed=0):
    """Dyadic values (multiples of 1/4) so that every sum is exact in float32; NaNs, padding."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-8, 40, (NUM_CLIENTS, NUM_EXAMPLES)) / 4.0  # some below 0, some above 8
    values[rng.random(values.shape) < 0.15] = np.nan
    mask = rng.random(values.shape) < 0.85
    client_mask = np.ones(NUM_CLIENTS, bool)
    client_mask[-2:] = False
    values[-2:] = 1e30  # padding clients hold garbage: it must not count
    return values, mask, client_mask


def _pooled(values, mask, client_mask):
    keep = mask & client_mask[:, None]
    return values[keep]


def _sums():
    return {
        "plain": None,
        "secure": secagg.secure_sum(secagg.SecAggConfig(clip_range=32.0, frac_bits=8)),
    }


@pytest.mark.parametrize("sum_name", ["plain", "secure"])
def test_noise_free_queries_equal_pooled_numpy(sum_name):
    agg = _sums()[sum_name]
    values, mask, client_mask = _population()
    pooled = _pooled(values, mask, client_mask)
    observed = pooled[~np.isnan(pooled)]
    clipped = np.clip(observed, LO, HI)
    k = NUM_EXAMPLES  # every record of every client counts
    edges = np.array([0.0, 1.0, 2.5, 4.0, 8.0])
    qs = [
        queries.count(lambda v: v > 2.0, max_contributions=k),
        queries.bounded_sum(LO, HI, max_contributions=k),
        queries.mean(LO, HI, max_contributions=k),
        queries.variance(LO, HI, max_contributions=k),
        queries.histogram(edges, max_contributions=k),
    ]
    key = jax.random.key(0)
    if sum_name == "plain":
        results = []
        for q in qs:
            cfg = q.config(noise_multiplier=0.0, population_size=NUM_CLIENTS)
            result, metrics = queries.run(q, cfg, values, mask, client_mask, key)
            results.append(result)
    else:  # one release of all five contributions side by side: one (slow) secure-sum compilation
        sizes = [1, 1, 2, 3, len(edges) + 2]

        def together(data):
            return jnp.concatenate([q.contribution(*data) for q in qs])

        cfg = release.ReleaseConfig(
            l2_bound=math.sqrt(sum(q.l2_bound**2 for q in qs)),
            noise_multiplier=0.0,
            population_size=NUM_CLIENTS,
        )
        data = (jnp.asarray(values, jnp.float32), jnp.asarray(mask))
        value, metrics = jax.jit(lambda d, c, k: release.release(together, d, c, cfg, k, sum=agg))(
            data, jnp.asarray(client_mask), key
        )
        assert int(metrics["num_clipped"]) == 0 and int(metrics["num_range_clipped"]) == 0
        parts = np.split(np.asarray(value, np.float64), np.cumsum(sizes)[:-1])
        results = [q.finalize(part) for q, part in zip(qs, parts, strict=True)]
    count, total, m, v, h = results
    assert int(metrics["num_clients"]) == NUM_CLIENTS - 2
    assert count == float(np.sum(pooled > 2.0))  # bit-exact integer count
    assert total == float(np.sum(clipped))
    assert m.count == v.count == float(clipped.size)
    np.testing.assert_allclose(m.mean, np.mean(clipped), rtol=1e-12)
    np.testing.assert_allclose(v.mean, np.mean(clipped), rtol=1e-12)
    np.testing.assert_allclose(v.variance, np.var(clipped), rtol=1e-12)
    expected, _ = np.histogram(observed, edges)
    np.testing.assert_array_equal(h.counts, expected)  # bit-exact, secure sum included
    assert h.below == np.sum(observed < LO) and h.above == np.sum(observed > HI)
    assert h.missing == np.sum(np.isnan(pooled))


def test_max_contributions_keeps_first_records():
    values = jnp.array([[1.0, 2.0, 3.0], [5.0, jnp.nan, 6.0]])
    mask = jnp.ones((2, 3), bool)
    q = queries.bounded_sum(0.0, 10.0, max_contributions=2)
    total, _ = queries.run(
        q,
        q.config(noise_multiplier=0.0, population_size=2),
        values,
        mask,
        jnp.ones(2, bool),
        jax.random.key(0),
    )
    assert total == 1.0 + 2.0 + 5.0 + 6.0  # NaN skipped, then the first 2 observed values
    q = queries.histogram(np.array([0.0, 10.0]), max_contributions=2)
    h, _ = queries.run(
        q,
        q.config(noise_multiplier=0.0, population_size=2),
        values,
        mask,
        jnp.ones(2, bool),
        jax.random.key(0),
    )
    assert h.counts.tolist() == [3.0] and h.missing == 1.0  # client 2: 5.0 and the NaN


def test_histogram_noise_matches_stated_gaussian():
    """KS: the released error is N(0, (z * l2)^2); a sigma 1.5x too large or too small is rejected."""
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, (64, 8)).astype(np.float32)
    mask = np.ones_like(values, bool)
    clients = np.ones(64, bool)
    edges = np.linspace(0, 1, 401)
    q = queries.histogram(edges, max_contributions=8)
    assert q.l2_bound == 8.0  # all 8 records of a client in one bin
    exact, _ = np.histogram(values.astype(np.float64), edges.astype(np.float32).astype(np.float64))
    cfg = q.config(noise_multiplier=0.7, population_size=64)
    errors = []
    for i in range(3):
        noisy, metrics = queries.run(q, cfg, values, mask, clients, jax.random.key(10 + i))
        errors.append(noisy.counts - exact)
    errors = np.concatenate(errors)
    sigma = 0.7 * q.l2_bound
    assert float(metrics["noise_std"]) == pytest.approx(sigma)
    assert scipy.stats.kstest(errors / sigma, "norm").pvalue > 1e-3
    assert scipy.stats.kstest(errors / (1.5 * sigma), "norm").pvalue < 1e-6
    assert scipy.stats.kstest(errors / (sigma / 1.5), "norm").pvalue < 1e-6


def test_noised_sum_over_secure_sum_has_the_same_noise():
    x = jnp.asarray(np.random.default_rng(2).integers(0, 2, (20, 300)), jnp.float32)
    mask = jnp.ones(20, bool)
    cfg = release.ReleaseConfig(l2_bound=20.0, noise_multiplier=0.5, population_size=20)
    plain, _ = _noised_sum(x, mask, cfg, jax.random.key(3))
    sa = secagg.secure_sum(secagg.SecAggConfig(clip_range=1.0, frac_bits=4))
    secure, metrics = _noised_sum(x, mask, cfg, jax.random.key(3), sum=sa)
    np.testing.assert_array_equal(plain, secure)  # exact integer sums, the same noise key
    assert int(metrics["aborted"]) == 0


def _queries():
    edges = np.linspace(LO, HI, 9)
    return [
        queries.count(lambda v: v > 1.0, max_contributions=3),
        queries.bounded_sum(-2.0, HI, max_contributions=3),
        queries.mean(LO, HI, max_contributions=3),
        queries.variance(LO, HI, max_contributions=3),
        queries.histogram(edges, max_contributions=3, max_per_bin=2),
    ]


@pytest.mark.parametrize("index", range(5))
def test_adversarial_client_moves_release_by_at_most_the_sensitivity(index):
    q = _queries()[index]
    values, mask, client_mask = _population(seed=4)
    cfg = q.config(noise_multiplier=0.0, population_size=NUM_CLIENTS)
    fn = queries._Contribution(q.contribution)
    adversaries = [
        np.full(NUM_EXAMPLES, 1e30),
        np.full(NUM_EXAMPLES, -1e30),
        np.array([HI, LO, HI, LO]),
        np.array([np.nan, 1e6, -1e6, 7.9]),
    ]
    without, _ = release.release(fn, (jnp.asarray(values, jnp.float32), jnp.asarray(mask)), client_mask, cfg,
                                 jax.random.key(0))  # fmt: skip
    for adv in adversaries:
        v, m, c = values.copy(), mask.copy(), client_mask.copy()
        v[-1], m[-1], c[-1] = adv, True, True  # the padding slot becomes the adversary
        with_adv, metrics = release.release(fn, (jnp.asarray(v, jnp.float32), jnp.asarray(m)), c, cfg,
                                            jax.random.key(0))  # fmt: skip
        diff = np.asarray(with_adv, np.float64) - np.asarray(without, np.float64)
        assert np.linalg.norm(diff) <= q.l2_bound * (1 + 1e-6)
        if q.linf_bound is not None:
            assert np.max(np.abs(diff)) <= q.linf_bound
            assert np.sum(np.abs(diff)) <= q.l1_bound


def test_release_enforces_bounds_on_arbitrary_contributions():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(0, 50, (30, 7)), jnp.float32)
    cfg = release.ReleaseConfig(
        l2_bound=2.0, linf_bound=1.0, l1_bound=3.0, noise_multiplier=0.0, population_size=30
    )
    bounded, changed = release.enforce_bounds(x, cfg)
    b = np.asarray(bounded)
    assert np.all(np.abs(b) <= 1.0)
    assert np.all(np.sum(np.abs(b), 1) <= 3.0 * (1 + 1e-6))
    assert np.all(np.linalg.norm(b, axis=1) <= 2.0 * (1 + 1e-6))
    assert bool(jnp.all(changed))
    small = x / 1000.0
    same, changed = release.enforce_bounds(small, cfg)
    np.testing.assert_array_equal(same, small)  # within bounds: multiplied by exactly 1
    assert not bool(jnp.any(changed))


def test_padding_and_nonfinite_contribute_exactly_zero():
    x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    cfg = release.ReleaseConfig(l2_bound=100.0, noise_multiplier=0.0, population_size=4)
    base, _ = _noised_sum(jnp.asarray(x[:2]), jnp.ones(2, bool), cfg, jax.random.key(0))
    bad = x.copy()
    bad[2] = [np.nan, 1.0, 1.0]
    bad[3] = [np.inf, 1e30, -1e30]
    mask = jnp.array([True, True, True, False])
    total, metrics = _noised_sum(jnp.asarray(bad), mask, cfg, jax.random.key(0))
    np.testing.assert_array_equal(total, base)
    assert int(metrics["num_nonfinite"]) == 1 and int(metrics["num_clients"]) == 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="lo < hi"):
        queries.mean(3.0, 1.0)
    with pytest.raises(ValueError, match="max_contributions"):
        queries.count(lambda v: v > 0, max_contributions=0)
    with pytest.raises(ValueError, match="edges"):
        queries.histogram(np.array([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="l2_bound"):
        release.ReleaseConfig(l2_bound=0.0, noise_multiplier=1.0, population_size=3)
    with pytest.raises(ValueError, match="infinite l2_bound"):
        release.ReleaseConfig(l2_bound=math.inf, noise_multiplier=1.0, population_size=3)
    q = queries.mean(0.0, 1.0)
    wrong = release.ReleaseConfig(l2_bound=1.0, noise_multiplier=1.0, population_size=3)
    with pytest.raises(ValueError, match="bounds"):
        queries.run(q, wrong, jnp.zeros((3, 1)), jnp.ones((3, 1), bool), jnp.ones(3, bool), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[clients, d\]"):
        release.noised_sum(jnp.zeros(3), jnp.ones(3, bool), wrong, jax.random.key(0))


def test_calibrate_reaches_target_epsilon():
    cfg = release.calibrate(
        release.ReleaseConfig(l2_bound=3.0, noise_multiplier=0.0, population_size=500), target_epsilon=2.0
    )
    assert cfg.epsilon() == pytest.approx(2.0, rel=0.01)
    assert cfg.noise_std == pytest.approx(3.0 * cfg.noise_multiplier)


def test_distributed_sum_without_noise_is_the_bounded_sum():
    """The distributed discrete Gaussian as the release's sum: without noise, the bounded sum up to
    its rounding (each coordinate within n * gamma * sqrt(d))."""
    dd = privacy.DistributedDPConfig(
        clip_norm=2.0, noise_multiplier=0.0, dim=8, cohort_size=30, population_size=30, bits=20
    )
    x = jnp.asarray(np.random.default_rng(6).integers(0, 2, (30, 8)), jnp.float32)  # norms up to 2.8
    cfg = release.ReleaseConfig(l2_bound=2.0, noise_multiplier=0.0, population_size=30)
    plain, _ = _noised_sum(x, jnp.ones(30, bool), cfg, jax.random.key(0))
    dist, metrics = _noised_sum(
        x, jnp.ones(30, bool), cfg, jax.random.key(0), sum=release.distributed_sum(dd)
    )
    assert int(metrics["num_clipped"]) > 0
    np.testing.assert_allclose(dist, plain, atol=30 * dd.gamma_value * math.sqrt(8) + 1e-4)
