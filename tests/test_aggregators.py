"""Conformance: every aggregator goes through the same checks.

Sums (plain, secure), means around them, the robust means and DP (without
noise, with noise, over the secure sum). A secure aggregator's stochastic
rounding depends on the clients' slots and on the cohort size, so comparisons
across slot orders or cohort sizes hold within its documented error bound;
comparisons within one cohort shape hold exactly.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import aggregators, privacy, secagg
from fljax.base import Aggregator
from tests import helpers

SECURE = secagg.SecAggConfig(clip_range=8.0, frac_bits=16, max_weight=8.0)  # weights up to 8 on the grid
DP_CLIP = 2.0
DP_COHORT = 5


def _dp_config(**kw):
    base = dict(clip_norm=DP_CLIP, noise_multiplier=0.0, population_size=100, cohort_size=DP_COHORT)
    base.update(kw)
    return privacy.DPConfig(**base)


def _secure_sum_bound(n, total_weight):
    del total_weight
    return n * SECURE.max_weight / SECURE.scale_value


def _secure_mean_bound(n, total_weight):
    return _secure_sum_bound(n, total_weight) / total_weight


def _dp_secure_bound(n, total_weight):
    del total_weight  # uniform weighting: the weights are on the grid
    sa = secagg.SecAggConfig()
    return DP_CLIP * n * sa.max_weight / sa.scale_value / DP_COHORT


class Case(NamedTuple):
    make: Callable[[], Aggregator]
    kind: str  # "mean" (divides by the observed weight), "sum", or "dp" (fixed denominator)
    noisy: bool = False
    bound: Callable[[int, float], float] | None = None  # slot-dependent error per coordinate; None: exact


AGGREGATORS = {
    "weighted_sum": Case(aggregators.weighted_sum, "sum"),
    "weighted_mean": Case(aggregators.weighted_mean, "mean"),
    "uniform_mean": Case(aggregators.uniform_mean, "mean"),
    "median": Case(aggregators.median, "mean"),
    "trimmed_mean": Case(lambda: aggregators.trimmed_mean(0.2), "mean"),
    "secure_sum": Case(lambda: secagg.secure_sum(SECURE), "sum", bound=_secure_sum_bound),
    "secure_mean": Case(
        lambda: aggregators.mean(secagg.secure_sum(SECURE)), "mean", bound=_secure_mean_bound
    ),
    "dp": Case(lambda: privacy.dp(_dp_config()), "dp"),
    "dp_per_layer": Case(lambda: privacy.dp(_dp_config(clip_scheme="per_layer")), "dp"),
    "dp_noisy": Case(
        lambda: privacy.dp(
            _dp_config(noise_multiplier=1.0, weighting="capped", max_weight=4.0, expected_cohort_weight=4.0)
        ),
        "dp",
        noisy=True,
    ),
    "dp_adaptive": Case(
        lambda: privacy.dp(_dp_config(noise_multiplier=0.5, target_quantile=0.5, clipped_count_stddev=1.0)),
        "dp",
        noisy=True,
    ),
    "dp_secure_sum": Case(
        lambda: privacy.dp(_dp_config(noise_multiplier=1.0), sum=secagg.secure_sum(secagg.SecAggConfig())),
        "dp",
        noisy=True,
        bound=_dp_secure_bound,
    ),
}
NAMES = sorted(AGGREGATORS)


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
    }


def _run(agg, deltas, weights, key=0):
    template = jax.tree.map(lambda a: a[0], deltas)
    state = agg.init(template)
    return jax.jit(agg.aggregate)(state, deltas, jnp.asarray(weights, jnp.float32), jax.random.key(key))


def _assert_within(case, a, b, n, total_weight, factor=1.0):
    """Exact up to float rounding, or within ``factor`` times the case's bound."""
    if case.bound is None:
        helpers.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)
        return
    bound = factor * case.bound(n, total_weight)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        err = float(jnp.max(jnp.abs(x - y)))
        assert err <= bound * (1 + 1e-3) + 1e-6 * float(jnp.max(jnp.abs(y))), (err, bound)


def _append(deltas, value, count):
    return jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.full((count,) + a.shape[1:], value, a.dtype)]), deltas
    )


@pytest.mark.parametrize("name", NAMES)
def test_padding_slots_contribute_exactly_zero(name):
    case = AGGREGATORS[name]
    agg = case.make()
    d = _deltas(4)
    w = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    _, zeros, m0 = _run(agg, _append(d, 0.0, 2), w)
    garbage = _append(d, 1e30, 2)
    garbage["b"] = garbage["b"].at[5, 0].set(jnp.nan)
    _, padded, m1 = _run(agg, garbage, w)
    helpers.assert_trees_equal(zeros, padded)  # same cohort shape and key: bit for bit
    assert int(m1["num_nonfinite"]) == 0 and int(m1["num_clients"]) == int(m0["num_clients"]) == 4
    _, plain, _ = _run(agg, d, w[:4])
    if case.bound is None:
        helpers.assert_trees_equal(plain, padded)  # padding slots are invisible
    else:
        _assert_within(case, plain, padded, 4, 10.0, factor=2.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("poison", ["delta", "weight"])
def test_nonfinite_client_is_rejected_and_reported(name, poison):
    case = AGGREGATORS[name]
    agg = case.make()
    d = _append(_deltas(4), 0.5, 1)
    w = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.float32)
    if poison == "delta":
        bad, bad_w = jax.tree.map(lambda a: a.at[4].set(jnp.nan), d), w
        bad["b"] = bad["b"].at[4, 0].set(jnp.inf)
    else:
        bad, bad_w = d, w.at[4].set(jnp.inf)
    _, out, metrics = _run(agg, bad, bad_w)
    _, without, m0 = _run(agg, d, w.at[4].set(0.0))
    helpers.assert_trees_equal(without, out)  # same shape and key: exactly as if it had weight 0
    assert int(metrics["num_nonfinite"]) == 1 and int(m0["num_nonfinite"]) == 0
    assert int(metrics["num_clients"]) == 4
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))
    _, plain, _ = _run(agg, _deltas(4), w[:4])
    if case.bound is None:
        helpers.assert_trees_equal(plain, out)
    else:
        _assert_within(case, plain, out, 4, 10.0, factor=2.0)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariant(name):
    case = AGGREGATORS[name]
    agg = case.make()
    d = _deltas(5)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    perm = np.array([3, 0, 4, 1, 2])
    _, a, ma = _run(agg, d, w)
    _, b, mb = _run(agg, jax.tree.map(lambda x: x[perm], d), w[perm])
    _assert_within(case, a, b, 5, 15.0, factor=2.0)  # each within the bound of the exact result
    assert int(ma["num_clients"]) == int(mb["num_clients"]) == 5
    assert float(ma["total_weight"]) == pytest.approx(float(mb["total_weight"]), rel=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if AGGREGATORS[n].kind == "mean"])
def test_identical_clients_give_that_client(name):
    case = AGGREGATORS[name]
    one = _deltas(1)
    d = jax.tree.map(lambda a: jnp.repeat(a, 4, axis=0), one)
    _, out, _ = _run(case.make(), d, [1.0, 3.0, 2.0, 1.0])
    _assert_within(case, out, jax.tree.map(lambda a: a[0], one), 4, 7.0)


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_weights_contribute_nothing(name):
    case = AGGREGATORS[name]
    agg = case.make()
    d = _deltas(3)
    _, out, metrics = _run(agg, d, [0.0, 0.0, 0.0])
    _, empty, _ = _run(agg, jax.tree.map(jnp.zeros_like, d), [0.0, 0.0, 0.0])
    helpers.assert_trees_equal(out, empty)  # pure noise (or zero): the deltas are invisible
    assert int(metrics["num_clients"]) == 0 and float(metrics["total_weight"]) == 0.0
    if not case.noisy:
        for leaf in jax.tree.leaves(out):
            assert np.all(np.asarray(leaf) == 0)


@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_result(name):
    agg = AGGREGATORS[name].make()
    d = _deltas(4)
    _, a, _ = _run(agg, d, [1.0, 2.0, 0.0, 4.0], key=3)
    _, b, _ = _run(agg, d, [1.0, 2.0, 0.0, 4.0], key=3)
    helpers.assert_trees_equal(a, b)


@pytest.mark.parametrize("name", [n for n in NAMES if AGGREGATORS[n].kind == "sum"])
def test_sum_is_a_weighted_sum_reporting_its_weight(name):
    case = AGGREGATORS[name]
    agg = case.make()
    d = _deltas(5)
    w = np.array([1.0, 0.5, 2.5, 0.0, 8.0])  # on the secure grid
    _, total, metrics = _run(agg, d, w)
    ref = jax.tree.map(lambda x: jnp.tensordot(jnp.asarray(w, jnp.float32), x, 1), d)
    _assert_within(case, total, ref, 4, float(w.sum()))
    assert float(metrics["total_weight"]) == float(w.sum())  # exact, also for the secure sum
    # mean(sum) is the sum divided by the observed weight
    _, mean, _ = _run(aggregators.mean(agg), d, w)
    helpers.assert_trees_close(
        mean, jax.tree.map(lambda s: s / jnp.float32(w.sum()), total), rtol=1e-6, atol=0
    )


def test_weighted_mean_is_bit_identical_to_hand_written_sum_over_total():
    d = _deltas(7, seed=1)
    w = jnp.asarray([1.0, 0.5, 2.5, 0.0, 3.0, 7.25, 1e-3], jnp.float32)
    d = jax.tree.map(lambda x: x.at[3].set(jnp.nan), d)  # a padding slot holding garbage

    def by_hand(deltas, weights):
        total = jnp.sum(weights)  # once: XLA may sum it in another order when fused into every leaf

        def leaf(x):
            wx = weights.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.sum(jnp.where(wx == 0, 0.0, wx * x), axis=0) / total

        return jax.tree.map(leaf, deltas)

    agg = aggregators.weighted_mean()
    _, out, _ = jax.jit(agg.aggregate)(agg.init(None), d, w, jax.random.key(0))
    helpers.assert_trees_equal(out, jax.jit(by_hand)(d, w))


def test_weighted_mean_matches_numpy():
    d = _deltas(3)
    w = np.array([1.0, 0.5, 2.5])
    _, out, m = _run(aggregators.weighted_mean(), d, w)
    np.testing.assert_allclose(
        np.asarray(out["w"]), np.tensordot(w / w.sum(), np.asarray(d["w"]), 1), rtol=1e-6
    )
    assert float(m["total_weight"]) == pytest.approx(4.0)


def test_median_resists_one_huge_client():
    d = _deltas(5)
    d = jax.tree.map(lambda a: a.at[0].set(1e6), d)
    _, out, _ = _run(aggregators.median(), d, np.ones(5))
    assert float(jnp.max(jnp.abs(out["w"]))) < 10


def test_trimmed_mean_bad_fraction():
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregators.trimmed_mean(0.5)
