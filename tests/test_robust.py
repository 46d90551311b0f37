"""Robust aggregators: the aggregator contract (padding, non-finite clients) and each paper's property."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import aggregators, robust
from fljax.algorithms import fedavg
from fljax.base import ClientOutput
from tests import helpers

STAGES = {
    "krum": lambda: robust.krum(1),
    "geometric_median": lambda: robust.geometric_median(max_iter=20, eps=1e-6),
    "norm_bounding": lambda: robust.norm_bounding(1.5),
    "norm_bounding_median": lambda: robust.norm_bounding(1.5, inner=aggregators.median()),
    "centered_clipping": lambda: robust.centered_clipping(1.5),
}
NAMES = sorted(STAGES)


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
    }


@functools.cache
def _jitted(name):
    return jax.jit(STAGES[name]().aggregate)


def _jit(agg):
    return jax.jit(agg.aggregate)


def _run(name, deltas, weights, key=0):
    agg = STAGES[name]()
    state = agg.init(jax.tree.map(lambda a: a[0], deltas))
    return _jitted(name)(state, deltas, jnp.asarray(weights, jnp.float32), jax.random.key(key))


def _append(deltas, value, count):
    return jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.full((count,) + a.shape[1:], value, a.dtype)]), deltas
    )


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance_nonfinite_rejection_and_no_clients(name):
    # one compiled shape (8 slots) serves every case; the unpadded reference runs eagerly
    d = _deltas(6)
    w = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0]
    agg = STAGES[name]()
    state = agg.init(jax.tree.map(lambda a: a[0], d))
    _, plain, m0 = _jit(agg)(state, d, jnp.asarray(w, jnp.float32), jax.random.key(0))
    _, zeros, _ = _run(name, _append(d, 0.0, 2), w + [0.0, 0.0])
    garbage = _append(d, 1e30, 2)
    garbage["b"] = garbage["b"].at[7, 0].set(jnp.nan)
    _, padded, m1 = _run(name, garbage, w + [0.0, 0.0])
    helpers.assert_trees_equal(zeros, padded)  # same shape and key: bit for bit
    helpers.assert_trees_close(plain, padded, rtol=1e-5, atol=1e-6)  # padding is invisible
    assert int(m1["num_nonfinite"]) == 0 and int(m1["num_clients"]) == int(m0["num_clients"]) == 6
    for key in ("num_selected", "num_clipped"):
        if key in m0:
            assert int(m0[key]) == int(m1[key])
    # a client with NaN/inf and a positive weight: rejected, counted, exactly as if weight 0
    bad = _append(d, 0.5, 2)
    bad = jax.tree.map(lambda a: a.at[6].set(jnp.nan), bad)
    bad["b"] = bad["b"].at[6, 0].set(jnp.inf)
    _, out, m2 = _run(name, bad, w + [5.0, 0.0])
    helpers.assert_trees_equal(zeros, out)
    assert int(m2["num_nonfinite"]) == 1 and int(m2["num_clients"]) == 6
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(out))
    # no client at all: zero
    _, none, m3 = _run(name, garbage, [0.0] * 8)
    assert int(m3["num_clients"]) == 0
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(none))


def _clusters(num_honest, num_outliers, seed=0):
    rng = np.random.default_rng(seed)
    honest = 1.0 + 0.1 * rng.normal(size=(num_honest, 5))
    outliers = -20.0 + 0.01 * rng.normal(size=(num_outliers, 5))  # colluding: close to each other
    return {"w": jnp.asarray(np.concatenate([outliers, honest]), jnp.float32)}, honest


def test_krum_picks_an_honest_client():
    d, honest = _clusters(7, 2)
    agg = robust.krum(2)
    _, out, m = _jit(agg)(agg.init(None), d, jnp.ones(9), jax.random.key(0))
    matches = np.all(np.isclose(np.asarray(out["w"])[None], honest.astype(np.float32)), axis=1)
    assert matches.sum() == 1 and int(m["num_selected"]) == 1 and int(m["krum_bound_violated"]) == 0


def test_multi_krum_without_byzantine_clients_is_the_uniform_mean():
    d = _deltas(5)
    agg = robust.krum(0, multi=5)
    _, out, _ = _jit(agg)(agg.init(None), d, jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]), jax.random.key(0))
    _, ref, _ = _jit(aggregators.uniform_mean())((), d, jnp.ones(5), jax.random.key(1))
    helpers.assert_trees_close(out, ref)


def test_multi_krum_with_n_minus_f_is_the_honest_mean_and_ignores_padding():
    d, honest = _clusters(7, 2)
    zeros = _append(d, 0.0, 3)  # three padding slots at the origin: a tight cluster, if counted
    agg = robust.krum(2, multi=7)
    _, out, m = jax.jit(agg.aggregate)(
        agg.init(None), zeros, jnp.asarray([1.0] * 9 + [0.0] * 3), jax.random.key(0)
    )
    np.testing.assert_allclose(np.asarray(out["w"]), honest.mean(axis=0), rtol=1e-5)
    assert int(m["num_selected"]) == 7 and int(m["num_clients"]) == 9


def test_krum_checks_its_bounds():
    with pytest.raises(ValueError, match=r"2 \* num_byzantine \+ 2 < cohort size"):
        agg = robust.krum(2)
        agg.aggregate((), _deltas(6), jnp.ones(6), jax.random.key(0))
    with pytest.raises(ValueError, match="multi"):
        robust.krum(1, multi=5).aggregate((), _deltas(5), jnp.ones(5), jax.random.key(0))
    for bad in (lambda: robust.krum(-1), lambda: robust.krum(1, multi=0), lambda: robust.krum(1.5)):
        with pytest.raises(ValueError, match="num_byzantine|multi"):
            bad()
    # fewer real clients than the bound needs: runs, and says so
    _, _, m = _run("krum", _deltas(8), [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # krum(1), 3 real clients
    assert int(m["krum_bound_violated"]) == 1


@functools.cache
def _geomed_fn():
    return jax.jit(robust.geometric_median(max_iter=400, eps=1e-8).aggregate)


def _geomed(values, num_slots=None):
    """Geometric median of the rows of ``values``, padded with zero-weight slots to ``num_slots``."""
    values = np.asarray(values, np.float32)
    n = len(values) if num_slots is None else num_slots
    padded = np.concatenate([values, np.full((n - len(values), values.shape[1]), 7.0, np.float32)])
    w = jnp.asarray(np.arange(n) < len(values), jnp.float32)
    return _geomed_fn()((), {"w": jnp.asarray(padded)}, w, jax.random.key(0))


def test_geometric_median_in_one_dimension_is_the_median_and_resists_outliers():
    values = np.array([[0.3], [-1.2], [2.0], [0.9], [0.1]])
    _, out, _ = _geomed(values, num_slots=6)
    np.testing.assert_allclose(np.asarray(out["w"]), np.median(values, axis=0), atol=1e-4)
    far = np.concatenate([values, [[1e6]]])
    _, out, _ = _geomed(far, num_slots=6)
    assert values.min() <= float(out["w"][0]) <= values.max()


def test_geometric_median_of_symmetric_points_is_their_centre():
    rng = np.random.default_rng(0)
    half = rng.normal(size=(4, 3))
    centre = np.array([1.0, -2.0, 0.5])
    _, out, m = _geomed(np.concatenate([centre + half, centre - half]))
    np.testing.assert_allclose(np.asarray(out["w"]), centre, atol=1e-5)
    assert float(m["geometric_median_objective"]) > 0


def test_geometric_median_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        robust.geometric_median(max_iter=0)
    with pytest.raises(ValueError, match="eps"):
        robust.geometric_median(eps=0.0)


def test_norm_bounding_clips_exactly():
    d = {"w": jnp.asarray([[0.3, 0.4], [3.0, 4.0], [0.0, -4.0]], jnp.float32)}  # norms 0.5, 5, 4
    w = jnp.asarray([1.0, 2.0, 1.0], jnp.float32)
    agg = robust.norm_bounding(1.0)
    _, out, m = _jit(agg)(agg.init(None), d, w, jax.random.key(0))
    clipped = np.array([[0.3, 0.4], [0.6, 0.8], [0.0, -1.0]])
    np.testing.assert_allclose(np.asarray(out["w"]), (clipped * [[1], [2], [1]]).sum(0) / 4, rtol=1e-6)
    assert int(m["num_clipped"]) == 2
    _, loose, m = _jit(agg)(agg.init(None), {"w": d["w"] / 10}, w, jax.random.key(0))
    _, mean, _ = _jit(aggregators.weighted_mean())((), {"w": d["w"] / 10}, w, jax.random.key(0))
    helpers.assert_trees_equal(loose, mean)  # nothing to clip: the inner mean, bit for bit
    assert int(m["num_clipped"]) == 0
    with pytest.raises(ValueError, match="max_norm"):
        robust.norm_bounding(0.0)


def test_centered_clipping_with_huge_radius_is_the_mean_and_keeps_its_centre():
    d = _deltas(5)
    w = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.float32)
    _, mean, _ = _jit(aggregators.weighted_mean())((), d, w, jax.random.key(0))
    for iters in (1, 3):
        agg = robust.centered_clipping(float("inf"), iters=iters)
        state, out, m = _jit(agg)(agg.init(jax.tree.map(lambda a: a[0], d)), d, w, jax.random.key(0))
        helpers.assert_trees_close(out, mean)
        helpers.assert_trees_equal(state.center, out)
        assert int(m["num_clipped"]) == 0


def test_centered_clipping_from_zero_is_norm_bounding_of_the_mean():
    d = _deltas(5)
    w = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.float32)
    agg = robust.centered_clipping(1.0)
    state, out, m = _jit(agg)(agg.init(jax.tree.map(lambda a: a[0], d)), d, w, jax.random.key(0))
    _, ref, mref = _jit(robust.norm_bounding(1.0))((), d, w, jax.random.key(0))
    helpers.assert_trees_close(out, ref)
    assert int(m["num_clipped"]) == int(mref["num_clipped"]) > 0
    # the next round starts from this aggregate: identical clients there give no step
    same = jax.tree.map(lambda c: jnp.repeat(c[None], 5, axis=0), state.center)
    _, again, _ = _jit(agg)(state, same, w, jax.random.key(1))
    helpers.assert_trees_close(again, state.center)
    with pytest.raises(ValueError, match="radius"):
        robust.centered_clipping(-1.0)
    with pytest.raises(ValueError, match="iters"):
        robust.centered_clipping(1.0, iters=0)


def _toy_client(params, data, key):
    """A cheap client update (fast to compile): a delta that depends on the client's data."""
    del key
    m = data.mask.astype(jnp.float32)
    shift = jnp.sum(jnp.mean(data.x, axis=1) * m) / jnp.maximum(jnp.sum(m), 1.0)
    delta = jax.tree.map(lambda p: 0.1 * p + shift.astype(p.dtype), params)
    return ClientOutput(delta, jnp.sum(m), {"shift": shift})


@pytest.mark.parametrize("name", ["krum", "geometric_median", "norm_bounding", "centered_clipping"])
def test_one_fedavg_round_with_each_stage(name):
    data = helpers.population([5, 7, 3, 6, 4, 8])
    algo = fedavg.fedavg(_toy_client, aggregator=STAGES[name]())
    state = algo.init(helpers.params())
    cohort = data.cohort([0, 1, 2, 3, 4, 5, -1, -1])
    new, metrics = jax.jit(algo.update)(state, cohort, jax.random.key(1))
    assert int(new.round) == 1 and int(metrics["num_clients"]) == 6
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert all(np.isfinite(moved)) and max(moved) > 0
