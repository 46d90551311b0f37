"""Conformance: every aggregator goes through the same checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import aggregators
from tests import helpers

AGGREGATORS = {
    "weighted_mean": aggregators.weighted_mean,
    "uniform_mean": aggregators.uniform_mean,
    "median": aggregators.median,
    "trimmed_mean": lambda: aggregators.trimmed_mean(0.2),
}


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
    }


def _run(agg, deltas, weights):
    template = jax.tree.map(lambda a: a[0], deltas)
    state = agg.init(template)
    return jax.jit(agg.aggregate)(state, deltas, jnp.asarray(weights, jnp.float32), jax.random.key(0))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_padding_slots_contribute_exactly_zero(name):
    agg = AGGREGATORS[name]()
    d = _deltas(4)
    _, plain, _ = _run(agg, d, [1.0, 2.0, 3.0, 4.0])
    garbage = jax.tree.map(lambda a: jnp.concatenate([a, jnp.full((2,) + a.shape[1:], 1e30, a.dtype)]), d)
    _, padded, _ = _run(agg, garbage, [1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    helpers.assert_trees_equal(plain, padded)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_nonfinite_client_is_rejected_and_reported(name):
    agg = AGGREGATORS[name]()
    d = _deltas(4)
    _, plain, _ = _run(agg, d, [1.0, 2.0, 3.0, 4.0])
    poisoned = jax.tree.map(lambda a: jnp.concatenate([a, jnp.full((1,) + a.shape[1:], jnp.nan, a.dtype)]), d)
    poisoned["b"] = poisoned["b"].at[4, 0].set(jnp.inf)
    _, out, metrics = _run(agg, poisoned, [1.0, 2.0, 3.0, 4.0, 5.0])
    helpers.assert_trees_equal(plain, out)
    assert int(metrics["num_nonfinite"]) == 1
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_permutation_invariant(name):
    agg = AGGREGATORS[name]()
    d = _deltas(5)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    perm = np.array([3, 0, 4, 1, 2])
    _, a, _ = _run(agg, d, w)
    _, b, _ = _run(agg, jax.tree.map(lambda x: x[perm], d), w[perm])
    helpers.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_identical_clients_give_that_client(name):
    agg = AGGREGATORS[name]()
    one = _deltas(1)
    d = jax.tree.map(lambda a: jnp.repeat(a, 4, axis=0), one)
    _, out, _ = _run(agg, d, [1.0, 3.0, 2.0, 1.0])
    helpers.assert_trees_close(out, jax.tree.map(lambda a: a[0], one), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_all_zero_weights_give_zero(name):
    agg = AGGREGATORS[name]()
    _, out, _ = _run(agg, _deltas(3), [0.0, 0.0, 0.0])
    for leaf in jax.tree.leaves(out):
        assert np.all(np.asarray(leaf) == 0)


def test_weighted_mean_matches_numpy():
    d = _deltas(3)
    w = np.array([1.0, 0.5, 2.5])
    _, out, m = _run(aggregators.weighted_mean(), d, w)
    np.testing.assert_allclose(np.asarray(out["w"]), np.tensordot(w / w.sum(), np.asarray(d["w"]), 1), rtol=1e-6)
    assert float(m["total_weight"]) == pytest.approx(4.0)


def test_median_resists_one_huge_client():
    d = _deltas(5)
    d = jax.tree.map(lambda a: a.at[0].set(1e6), d)
    _, out, _ = _run(aggregators.median(), d, np.ones(5))
    assert float(jnp.max(jnp.abs(out["w"]))) < 10


def test_trimmed_mean_bad_fraction():
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregators.trimmed_mean(0.5)
