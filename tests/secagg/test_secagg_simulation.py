"""Vectorised masking simulation: exact sums, dropouts, uniform masked inputs, the aggregator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fljax import aggregators, random
from fljax.secagg import encoding, simulation
from fljax.secagg.config import SecAggConfig


def _plain_sum(values, survived, bits):
    return encoding.ring_sum(jnp.where(survived[:, None], values, jnp.uint32(0)), bits)


@pytest.mark.parametrize(
    "n,neighbors,bits", [(2, None, 32), (7, None, 20), (8, None, 32), (12, 4, 24), (11, 3, 9), (16, 6, 32)]
)
def test_sum_equals_plain_sum_under_dropout(n, neighbors, bits):
    # The masking arithmetic alone, ungated by the threshold (heavy dropouts would abort).
    cfg = SecAggConfig(num_neighbors=neighbors, bits=bits, frac_bits=0, clip_range=1.0, weight_bits=0)

    @jax.jit
    def fn(values, survived, key):
        masks = simulation.make_masks(survived, values.shape[1], key, cfg, bits)
        return simulation.unmask_sum(simulation.mask_inputs(values, masks, bits), survived, masks, bits)

    gated = jax.jit(lambda v, s, k: simulation.masked_ring_sum(v, s, k, cfg, bits))
    root = jax.random.key(n * 100 + bits)
    for trial in range(4):
        kv, ks, km = jax.random.split(jax.random.fold_in(root, trial), 3)
        values = jax.random.bits(kv, (n, 37), jnp.uint32) & encoding.ring_mask(bits)
        survived = jax.random.uniform(ks, (n,), jnp.float32) >= 0.3 * (trial % 3)
        plain = np.asarray(_plain_sum(values, survived, bits))
        np.testing.assert_array_equal(np.asarray(fn(values, survived, jax.random.clone(km))), plain)
        # The gated sum (default threshold): the same, or zeros when it aborts.
        total, aborted = gated(values, survived, km)
        np.testing.assert_array_equal(np.asarray(total), 0 * plain if bool(aborted) else plain)


def test_pairwise_masks_cancel():
    cfg = SecAggConfig(num_neighbors=None)
    masks = simulation.make_masks(jnp.ones((10,), jnp.bool_), 64, jax.random.key(0), cfg, 32)
    assert int(jnp.max(jnp.sum(masks.pair_masks, axis=0, dtype=jnp.uint32))) == 0
    assert int(jnp.min(masks.holders_alive)) == 10
    assert int(jnp.max(masks.correction)) == 0  # no dropouts, nothing to remove


@pytest.mark.parametrize("neighbors", [None, 4])
def test_masked_input_uniform(neighbors):
    n, dim, bits = 9, 20000, 16
    cfg = SecAggConfig(num_neighbors=neighbors, bits=bits, frac_bits=0, weight_bits=0)
    masks = simulation.make_masks(jnp.ones((n,), jnp.bool_), dim, jax.random.key(1), cfg, bits)
    # A constant input (the worst case for leaking structure) still looks uniform.
    values = jnp.full((n, dim), 12345, jnp.uint32)
    y = np.asarray(simulation.mask_inputs(values, masks, bits)[3]).astype(np.float64)
    counts = np.bincount((y // 2 ** (bits - 6)).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(y / 2**bits, "uniform").pvalue > 1e-3


def test_threshold_abort():
    cfg = SecAggConfig(num_neighbors=None, threshold=6)
    values = jnp.ones((8, 5), jnp.uint32)
    survived = jnp.asarray([True] * 5 + [False] * 3)
    total, aborted = simulation.masked_ring_sum(values, survived, jax.random.key(2), cfg, 16)
    assert bool(aborted) and int(jnp.max(total)) == 0


def _deltas(key, n):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (n, 6, 5), jnp.float32) * 0.05,
        "b": jax.random.normal(k2, (n, 5), jnp.float32) * 0.05,
    }


@pytest.mark.parametrize("neighbors", [None, 4])
def test_aggregator_matches_weighted_mean(neighbors):
    n = 10
    cfg = SecAggConfig(clip_range=0.5, frac_bits=16, max_weight=64.0, num_neighbors=neighbors)
    deltas = _deltas(jax.random.key(3), n)
    weights = jnp.asarray([3, 10, 0, 64, 7, 1, 0, 20, 5, 9], jnp.float32)
    agg = aggregators.mean(simulation.secure_sum(cfg))
    _, delta, metrics = jax.jit(agg.aggregate)(agg.init(None), deltas, weights, jax.random.key(4))
    _, ref, _ = aggregators.weighted_mean().aggregate((), deltas, weights, jax.random.key(5))
    bound = n * cfg.max_weight / (cfg.scale_value * float(jnp.sum(weights)))
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert float(jnp.max(jnp.abs(a - b))) < bound
    assert float(metrics["total_weight"]) == float(jnp.sum(weights))
    assert int(metrics["num_clients"]) == 8
    assert int(metrics["num_nonfinite"]) == 0 and int(metrics["aborted"]) == 0


def test_padding_and_nonfinite_contribute_exactly_zero():
    n = 8
    cfg = SecAggConfig(clip_range=1.0, num_neighbors=4)
    agg = aggregators.mean(simulation.secure_sum(cfg))
    fn = jax.jit(agg.aggregate)
    deltas = _deltas(jax.random.key(6), n)
    weights = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 0], jnp.float32)
    _, base, m0 = fn((), deltas, weights, jax.random.key(7))
    # Padding slots (weight 0) holding garbage, and a NaN client: same result bit for bit.
    garbage = jax.tree.map(lambda x: x.at[3].set(1e6).at[7].set(-3.0), deltas)
    _, padded, m1 = fn((), garbage, weights, jax.random.key(7))  # same key, fresh object
    nan = jax.tree.map(lambda x: x.at[5].set(jnp.nan), deltas)
    _, rejected, m2 = fn((), nan, weights, jax.random.key(70))
    no5 = weights.at[5].set(0.0)
    _, without5, _ = fn((), deltas, no5, jax.random.key(70))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(padded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(rejected), jax.tree.leaves(without5), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert bool(jnp.all(jnp.isfinite(a)))
    assert int(m0["num_nonfinite"]) == 0 and int(m1["num_clients"]) == 6
    assert int(m2["num_nonfinite"]) == 1 and int(m2["num_clients"]) == 5


def test_dropout_mean_over_survivors_and_abort():
    n = 12
    cfg = SecAggConfig(clip_range=1.0, num_neighbors=None, dropout_rate=0.25)
    agg = aggregators.mean(simulation.secure_sum(cfg))
    deltas = _deltas(jax.random.key(8), n)
    weights = jnp.ones((n,), jnp.float32)
    key = jax.random.key(9)
    _, delta, metrics = jax.jit(agg.aggregate)((), deltas, weights, key)
    u = jax.random.uniform(random.stream(key, "dropout"), (n,), jnp.float32)
    survived = (u >= 0.25).astype(jnp.float32)
    assert int(metrics["num_dropped"]) == n - int(jnp.sum(survived)) > 0
    _, ref, _ = aggregators.weighted_mean().aggregate((), deltas, survived, jax.random.key(10))
    bound = n / (cfg.scale_value * float(jnp.sum(survived)))
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) < bound
    # Most clients dropping: below the threshold the round aborts with a zero delta.
    heavy = aggregators.mean(simulation.secure_sum(SecAggConfig(dropout_rate=0.9)))
    _, zero, m = jax.jit(heavy.aggregate)((), deltas, weights, jax.random.key(11))
    assert int(m["aborted"]) == 1
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(zero))


def test_same_key_same_result_and_no_recompile():
    agg = aggregators.mean(simulation.secure_sum(SecAggConfig(num_neighbors=2)))
    fn = jax.jit(agg.aggregate)
    deltas = _deltas(jax.random.key(12), 6)
    w = jnp.ones((6,), jnp.float32)
    _, a, _ = fn((), deltas, w, jax.random.key(13))
    _, b, _ = fn((), deltas, w, jax.random.key(13))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fn((), deltas, w, jax.random.key(14))
    assert fn._cache_size() == 1


def test_converges_like_plain_round():
    """FedAvg on a small logistic regression: secure aggregation tracks the plain round."""
    n, per, dim = 10, 40, 5
    kx, kw, kn = jax.random.split(jax.random.key(15), 3)
    true_w = jax.random.normal(kw, (dim,), jnp.float32)
    x = jax.random.normal(kx, (n, per, dim), jnp.float32)
    y = (x @ true_w + 0.1 * jax.random.normal(kn, (n, per), jnp.float32) > 0).astype(jnp.float32)

    def loss(w, xb, yb):
        logits = xb @ w
        return jnp.mean(jnp.logaddexp(0.0, logits) - yb * logits)

    def client_delta(w, xb, yb):
        local = w
        for _ in range(5):
            local = local - 0.5 * jax.grad(loss)(local, xb, yb)
        return w - local

    def make_round(agg):
        @jax.jit
        def round_fn(w, key):
            deltas = jax.vmap(client_delta, in_axes=(None, 0, 0))(w, x, y)
            _, delta, _ = agg.aggregate((), deltas, jnp.full((n,), float(per), jnp.float32), key)
            return w - delta

        return round_fn

    plain = make_round(aggregators.weighted_mean())
    secure = make_round(
        aggregators.mean(simulation.secure_sum(SecAggConfig(clip_range=2.0, max_weight=64.0)))
    )
    wp = ws = jnp.zeros((dim,), jnp.float32)
    run = jax.random.key(16)
    for r in range(15):
        k = random.round_key(run, r)
        wp, ws = plain(wp, random.stream(k, "aggregate")), secure(ws, random.stream(k, "masks"))
    lp = float(loss(wp, x.reshape(-1, dim), y.reshape(-1)))
    ls = float(loss(ws, x.reshape(-1, dim), y.reshape(-1)))
    l0 = float(loss(jnp.zeros((dim,), jnp.float32), x.reshape(-1, dim), y.reshape(-1)))
    assert ls < 0.5 * l0
    assert abs(ls - lp) < 1e-3


def test_secure_sum_is_the_decoded_plain_ring_sum_bit_for_bit():
    """Masks cancel exactly: the sum equals decoding the unmasked ring sum of the encoded inputs
    (stochastic rounding from the ``"rounding"`` stream), and its weight total is exact."""
    n = 7
    cfg = SecAggConfig(clip_range=0.5, frac_bits=16, max_weight=8.0, num_neighbors=4)
    deltas = _deltas(jax.random.key(17), n)
    weights = jnp.asarray([1.0, 8.0, 0.0, 2.5, 3.0, 0.5, 1.0], jnp.float32)
    key = jax.random.key(18)
    agg = simulation.secure_sum(cfg)
    _, total, metrics = jax.jit(agg.aggregate)(agg.init(None), deltas, weights, key)

    @jax.jit
    def by_hand(deltas, weights, key):
        bits = cfg.ring_bits(n)
        enc = encoding.encode(encoding.flatten(deltas), weights, random.stream(key, "rounding"), cfg, bits)
        s, w = encoding.decode(encoding.ring_sum(enc.values, bits), cfg, bits)
        return encoding.unflatten(s, deltas), w

    ref, ref_weight = by_hand(deltas, weights, jax.random.clone(key))
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(metrics["total_weight"]) == float(ref_weight) == float(jnp.sum(weights))
    assert int(metrics["num_clients"]) == 6 and int(metrics["num_range_clipped"]) == 0


@pytest.mark.parametrize("dropout_rate", [0.0, 0.25])
def test_protocol_sum_equals_simulated_sum_bit_for_bit(dropout_rate):
    """The real protocol behind the same sum contract, inside a jitted aggregate (pure_callback)."""
    n = 8
    cfg = SecAggConfig(clip_range=0.5, max_weight=8.0, dropout_rate=dropout_rate)
    deltas = _deltas(jax.random.key(19), n)
    deltas = jax.tree.map(lambda x: x.at[6].set(jnp.nan), deltas)  # rejected
    weights = jnp.asarray([1.0, 8.0, 0.0, 2.5, 3.0, 0.5, 1.0, 4.0], jnp.float32)  # slot 2 is padding
    for seed in range(20, 100):  # a key whose dropouts (if any) stay above the threshold
        key = jax.random.key(seed)
        survived = jax.random.uniform(random.stream(key, "dropout"), (n,), jnp.float32) >= dropout_rate
        if (dropout_rate == 0 or 1 <= n - int(jnp.sum(survived)) <= 2) and bool(survived[0]):
            break
    simulated, real = simulation.secure_sum(cfg), simulation.protocol_sum(cfg)
    _, a, ma = jax.jit(simulated.aggregate)((), deltas, weights, jax.random.clone(key))
    _, b, mb = jax.jit(real.aggregate)((), deltas, weights, key)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert {k: int(v) for k, v in ma.items() if k != "total_weight"} == {
        k: int(v) for k, v in mb.items() if k != "total_weight"
    }
    assert float(ma["total_weight"]) == float(mb["total_weight"]) > 0
    assert int(mb["num_nonfinite"]) == 1 and int(mb["aborted"]) == 0
    counted = (weights > 0).at[6].set(False)  # padding and the rejected client are not counted
    assert int(mb["num_dropped"]) == int(jnp.sum(counted & ~survived))
