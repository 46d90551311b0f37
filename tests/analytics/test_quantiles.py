"""Quantiles from the DP hierarchical histogram: within one leaf without noise, the stated
rank error with noise, the bound enforced."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax.analytics import quantiles

QS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def _records(values):
    v = jnp.asarray(np.asarray(values).reshape(-1, 1), jnp.float32)
    return v, jnp.ones(v.shape, bool), jnp.ones(v.shape[0], bool)


@pytest.mark.parametrize("branching,depth", [(2, 7), (4, 4), (8, 3)])
def test_noise_free_error_within_one_leaf(branching, depth):
    rng = np.random.default_rng(branching)
    data = rng.lognormal(5.0, 0.4, 500)  # some values above the range: clipped to it
    tree = quantiles.tree(0.0, 400.0, branching=branching, depth=depth)
    est, metrics = quantiles.release_quantiles(
        tree, QS, *_records(data), jax.random.key(0), noise_multiplier=0.0, population_size=500
    )
    truth = np.quantile(np.clip(data, 0.0, 400.0), QS, method="inverted_cdf")
    assert np.all(np.abs(est - truth) <= tree.leaf_width * (1 + 1e-9))
    assert int(metrics["num_clients"]) == 500


def test_noisy_rank_error_within_stated_bound():
    rng = np.random.default_rng(1)
    data = rng.normal(240.0, 50.0, 3000)
    tree = quantiles.tree(100.0, 612.0, branching=4, depth=4)
    z = 2.0
    sigma = z * tree.query.l2_bound
    assert tree.query.l2_bound == pytest.approx(math.sqrt(4))
    qs = np.array([0.25, 0.5, 0.75])
    rank_std = sigma * np.sqrt(tree.depth * (tree.branching - 1) + tree.branching * qs**2)
    worst = 0.0
    for i in range(3):
        est, _ = quantiles.release_quantiles(
            tree, qs, *_records(data), jax.random.key(i), noise_multiplier=z, population_size=3000
        )
        # rank of the estimate; a leaf holds at most this many records more
        ranks = np.array([np.sum(data <= e) for e in est])
        leaf_mass = np.array([np.sum(np.abs(data - e) <= tree.leaf_width) for e in est])
        worst = max(worst, float(np.max((np.abs(ranks - qs * len(data)) - leaf_mass) / rank_std)))
    assert worst < 4.0  # 4 standard deviations of the stated rank error


def test_tree_contribution_bounds_hold_for_an_adversary():
    tree = quantiles.tree(0.0, 1.0, branching=2, depth=5, max_contributions=3)
    assert tree.query.l2_bound == pytest.approx(3 * math.sqrt(5))
    fn = tree.query.contribution
    adversary = fn(jnp.array([1e9, 1e9, 1e9, -1e9, 0.5]), jnp.ones(5, bool))
    assert float(jnp.sum(adversary)) == 3 * 5  # 3 records, one node per level
    assert float(jnp.linalg.norm(adversary)) <= tree.query.l2_bound + 1e-5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="branching"):
        quantiles.tree(0.0, 1.0, branching=1)
    with pytest.raises(ValueError, match="depth"):
        quantiles.tree(0.0, 1.0, depth=0)
    tree = quantiles.tree(0.0, 1.0, branching=2, depth=2)
    with pytest.raises(ValueError, match="quantiles"):
        quantiles.estimate([np.zeros(2), np.zeros(4)], [1.5], tree)
    with pytest.raises(ValueError, match="levels"):
        quantiles.estimate([np.zeros(3)], [0.5], tree)
