"""Client-level DP aggregation: equivalences, bounded influence, noise statistics, adaptive clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from fljax import aggregators, client, secagg, tree
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.base import ClientData, Cohort
from fljax.models import zoo
from fljax.privacy import aggregation, config


def _deltas(key, num_clients=6, scale=1.0):
    k1, k2 = jax.random.split(key)
    return {
        "w": scale * jax.random.normal(k1, (num_clients, 5, 3), jnp.float32),
        "b": scale * jax.random.normal(k2, (num_clients, 3), jnp.float32),
    }


def _cfg(**kw):
    base = dict(clip_norm=1.0, noise_multiplier=1.0, population_size=100, cohort_size=6)
    base.update(kw)
    return config.DPConfig(**base)


def _template(deltas):
    return jax.tree.map(lambda x: x[0], deltas)


def _run(cfg, deltas, weights, key, state=None):
    agg = aggregation.dp(cfg)
    state = agg.init(_template(deltas)) if state is None else state
    return jax.jit(agg.aggregate)(state, deltas, weights, key)


def test_zero_noise_infinite_clip_equals_weighted_mean():
    keys = jax.random.split(jax.random.key(0), 3)
    deltas = _deltas(keys[0])
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], jnp.float32)  # two padding slots
    cfg = _cfg(clip_norm=math.inf, noise_multiplier=0.0, cohort_size=4)
    _, dp_delta, metrics = _run(cfg, deltas, weights, keys[1])
    plain = aggregators.weighted_mean()
    _, ref, _ = plain.aggregate(plain.init(_template(deltas)), deltas, weights, keys[2])
    for a, b in zip(jax.tree.leaves(dp_delta), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(metrics["num_clipped"]) == 0 and float(metrics["dp_noise_std"]) == 0.0


def test_capped_weights_match_weighted_mean_when_under_cap():
    keys = jax.random.split(jax.random.key(1), 3)
    deltas = _deltas(keys[0])
    weights = jnp.array([3.0, 10.0, 7.0, 1.0, 5.0, 0.0], jnp.float32)
    cap = 10.0
    cfg = _cfg(
        clip_norm=math.inf,
        noise_multiplier=0.0,
        weighting="capped",
        max_weight=cap,
        expected_cohort_weight=float(jnp.sum(weights)) / cap,
    )
    _, dp_delta, _ = _run(cfg, deltas, weights, keys[1])
    plain = aggregators.weighted_mean()
    _, ref, _ = plain.aggregate(plain.init(_template(deltas)), deltas, weights, keys[2])
    for a, b in zip(jax.tree.leaves(dp_delta), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_denominator_is_fixed_not_observed():
    keys = jax.random.split(jax.random.key(2), 3)
    deltas = jax.tree.map(lambda x: jnp.ones_like(x) * 1e-3, _deltas(keys[0]))
    cfg = _cfg(noise_multiplier=0.0, cohort_size=10)
    full = jnp.ones((6,), jnp.float32)
    half = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], jnp.float32)
    _, d_full, _ = _run(cfg, deltas, full, keys[1])
    _, d_half, _ = _run(cfg, deltas, half, keys[2])
    # sum of 6 vs sum of 3 identical small updates, both over the fixed 10
    for a, b in zip(jax.tree.leaves(d_full), jax.tree.leaves(d_half), strict=True):
        np.testing.assert_allclose(a, 2.0 * b, rtol=1e-5)
        np.testing.assert_allclose(a, 6e-3 / 10.0, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["flat", "per_layer"])
def test_adversary_influence_bounded_by_clip_norm(scheme):
    keys = jax.random.split(jax.random.key(3), 2)
    deltas = _deltas(keys[0], scale=0.3)
    clip = 0.5
    cfg = _cfg(clip_norm=clip, noise_multiplier=2.0, clip_scheme=scheme)
    agg = aggregation.dp(cfg)
    aggregate = jax.jit(agg.aggregate)
    state = agg.init(_template(deltas))
    weights = jnp.ones((6,), jnp.float32)
    key = keys[1]
    # the same noise key for every call: differences are the adversary's contribution alone
    _, d_absent, _ = aggregate(state, deltas, weights.at[5].set(0.0), jax.random.clone(key))
    attacks = {
        "huge": (jax.tree.map(lambda x: x.at[5].set(1e30), deltas), weights),
        "large": (jax.tree.map(lambda x: x.at[5].set(1e3), deltas), weights),
        "nan": ({"w": deltas["w"].at[5, 0, 0].set(jnp.nan), "b": deltas["b"]}, weights),
        "inf": ({"w": deltas["w"], "b": deltas["b"].at[5, 1].set(-jnp.inf)}, weights),
        "huge_weight": (jax.tree.map(lambda x: x.at[5].set(1e3), deltas), weights.at[5].set(1e9)),
        "nan_weight": (deltas, weights.at[5].set(jnp.nan)),
        "negative_weight": (deltas, weights.at[5].set(-5.0)),
    }
    for name, (bad, bad_weights) in attacks.items():
        _, d_attack, metrics = aggregate(state, bad, bad_weights, jax.random.clone(key))
        for leaf in jax.tree.leaves(d_attack):
            assert bool(jnp.all(jnp.isfinite(leaf))), name
        diff = jax.tree.map(lambda a, b: (a - b) * cfg.denominator, d_attack, d_absent)
        influence = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(diff))))
        assert influence <= clip * (1 + 1e-4), name
        if name in ("nan", "inf", "nan_weight", "negative_weight"):
            assert int(metrics["num_nonfinite"]) == 1, name
            assert influence == 0.0, name
        else:
            assert int(metrics["num_nonfinite"]) == 0, name
            assert int(metrics["num_clipped"]) >= 1, name


def test_padding_contributes_exactly_zero():
    keys = jax.random.split(jax.random.key(4), 3)
    deltas = _deltas(keys[0])
    garbage = jax.tree.map(lambda x: x.at[4:].set(jnp.nan), deltas)
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], jnp.float32)
    cfg = _cfg(noise_multiplier=1.0)
    key = keys[1]
    _, d1, m1 = _run(cfg, deltas, weights, jax.random.clone(key))
    _, d2, m2 = _run(cfg, garbage, weights, key)
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(m2["num_nonfinite"]) == 0 and int(m2["num_clients"]) == 4


@pytest.mark.parametrize("per_leaf", [False, True])
def test_one_clip_bounds_the_norm_and_reports_factors_and_norms(per_leaf):
    deltas = _deltas(jax.random.key(19), scale=0.5)
    deltas = jax.tree.map(lambda x: x.at[1].multiply(1e-3), deltas)  # one client well inside the ball
    clipped, factors, norms = tree.clip(deltas, 0.8, per_leaf=per_leaf)
    np.testing.assert_allclose(norms, tree.global_norm(deltas), rtol=1e-6)
    assert bool(jnp.all(tree.global_norm(clipped) <= 0.8 * (1 + 1e-6)))
    for f in jax.tree.leaves(factors):
        assert f.shape == (6,) and bool(jnp.all((f > 0) & (f <= 1))) and float(f[1]) == 1.0
    unclipped, ones, _ = tree.clip(deltas, math.inf, per_leaf=per_leaf)
    for a, b in zip(jax.tree.leaves(unclipped), jax.tree.leaves(deltas), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.all(f == 1)) for f in jax.tree.leaves(ones))


def _dp_secure_bound(cfg, sa, num_clients, clip_norm):
    """The documented bound of DP over the secure sum against DP over the plain sum, per coordinate."""
    e_w = 0.0 if cfg.weighting == "uniform" else 2.0 ** -(sa.weight_bits + 1)
    return clip_norm * num_clients * sa.max_weight * (1.0 / sa.scale_value + e_w) / cfg.denominator


@pytest.mark.parametrize(
    "kw",
    [
        dict(clip_norm=0.5),
        dict(clip_norm=50.0, noise_multiplier=0.3),  # most coordinates far outside [-1, 1] before scaling
        dict(clip_norm=0.3, clip_scheme="per_layer"),
        dict(clip_norm=2.0, weighting="capped", max_weight=10.0, expected_cohort_weight=4.0),
        dict(clip_norm=0.05, target_quantile=0.5, clipped_count_stddev=1.0, clip_learning_rate=2.0),
    ],
    ids=["small_clip", "clip_50", "per_layer", "capped", "adaptive"],
)
def test_dp_over_secure_sum_equals_dp_over_plain_sum_within_bound(kw):
    k_data, k_rounds = jax.random.split(jax.random.key(12), 2)
    deltas = _deltas(k_data, num_clients=8, scale=30.0)  # norms ~ 130: clipped for every clip norm here
    deltas = jax.tree.map(lambda x: x.at[2].multiply(1e-3), deltas)  # one client inside the ball
    weights = jnp.asarray([1.0, 3.0, 2.5, 7.0, 12.0, 0.0, 1.0, 0.0], jnp.float32)  # two padding slots
    cfg = _cfg(cohort_size=6, **kw)
    sa = secagg.SecAggConfig()  # clip_range=1, max_weight=1: the unit ball's range
    plain, secure = aggregation.dp(cfg), aggregation.dp(cfg, sum=secagg.secure_sum(sa))
    plain_fn, secure_fn = jax.jit(plain.aggregate), jax.jit(secure.aggregate)
    template = _template(deltas)
    s_plain, s_secure = plain.init(template), secure.init(template)
    for r in range(3):  # adaptive: the clip norms follow each other exactly (same count, same noise)
        key = jax.random.fold_in(k_rounds, r)
        c = float(s_plain.clip_norm)
        s_plain, d_plain, m_plain = plain_fn(s_plain, deltas, weights, jax.random.clone(key))
        s_secure, d_secure, m_secure = secure_fn(s_secure, deltas, weights, key)
        bound = _dp_secure_bound(cfg, sa, 6, c)
        for a, b in zip(jax.tree.leaves(d_secure), jax.tree.leaves(d_plain), strict=True):
            err = float(jnp.max(jnp.abs(a - b)))
            assert err <= bound * 1.001 + 1e-6 * float(jnp.max(jnp.abs(b))), (r, err, bound)
        assert int(m_secure["num_range_clipped"]) == 0 and int(m_secure["aborted"]) == 0
        for name in (
            "num_nonfinite",
            "num_clipped",
            "num_clients",
            "total_weight",
            "dp_clip_norm",
            "dp_noise_std",
        ):
            assert float(m_secure[name]) == float(m_plain[name]), name
        assert int(m_secure["num_clients"]) == 6 and int(m_secure["num_clipped"]) >= 5
        assert float(s_secure.clip_norm) == float(s_plain.clip_norm)
    if cfg.adaptive:
        assert float(s_plain.clip_norm) > 0.05 * 2  # it moved towards the norms


def test_dp_over_secure_sum_reports_its_metrics_and_dropouts():
    deltas = _deltas(jax.random.key(13), num_clients=12, scale=3.0)
    weights = jnp.ones((12,), jnp.float32)
    cfg = _cfg(clip_norm=1.0, noise_multiplier=0.0, cohort_size=12, population_size=100)
    sa = secagg.SecAggConfig(dropout_rate=0.25)
    agg = aggregation.dp(cfg, sum=secagg.secure_sum(sa))
    for seed in range(14, 100):  # a key whose simulated dropouts stay above the threshold (9 of 12)
        key = jax.random.key(seed)
        survived = jax.random.uniform(fl_random.stream(key, "dropout"), (12,), jnp.float32) >= 0.25
        if 1 <= 12 - int(jnp.sum(survived)) <= 3:
            break
    _, delta, metrics = jax.jit(agg.aggregate)(agg.init(_template(deltas)), deltas, weights, key)
    assert int(metrics["num_dropped"]) == 12 - int(jnp.sum(survived)) > 0 and int(metrics["aborted"]) == 0
    assert int(metrics["num_clients"]) == 12 and float(metrics["total_weight"]) == 12.0  # DP's own
    # the dropped clients are missing from the sum: DP over the plain sum of the survivors
    _, ref, _ = _run(cfg, deltas, survived.astype(jnp.float32), jax.random.key(15))
    bound = _dp_secure_bound(cfg, sa, 12, 1.0)
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= bound * 1.001 + 1e-7


def test_dp_over_the_real_protocol_equals_dp_over_the_simulation_bit_for_bit():
    deltas = _deltas(jax.random.key(20), num_clients=5, scale=3.0)
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0], jnp.float32)
    cfg = _cfg(
        clip_norm=0.7, noise_multiplier=1.0, cohort_size=4, target_quantile=0.5, clipped_count_stddev=1.0
    )
    sa = secagg.SecAggConfig()
    outs = []
    for inner in (secagg.secure_sum(sa), secagg.protocol_sum(sa)):
        agg = aggregation.dp(cfg, sum=inner)
        outs.append(jax.jit(agg.aggregate)(agg.init(_template(deltas)), deltas, weights, jax.random.key(21)))
    (s1, d1, m1), (s2, d2, m2) = outs
    for a, b in zip(jax.tree.leaves((s1, d1, m1)), jax.tree.leaves((s2, d2, m2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _noise_samples(z, clip, key):
    num_clients, dim = 3, 30_000
    deltas = {"v": jnp.zeros((num_clients, dim), jnp.float32)}
    cfg = _cfg(clip_norm=clip, noise_multiplier=z, cohort_size=num_clients)
    _, delta, metrics = _run(cfg, deltas, jnp.ones((num_clients,), jnp.float32), key)
    return np.asarray(delta["v"]) * cfg.denominator, float(metrics["dp_noise_std"])


def test_noise_passes_ks_for_z_times_c_and_rejects_wrong_sigma():
    z, clip = 1.3, 0.7
    noise, reported = _noise_samples(z, clip, jax.random.key(5))
    sigma = z * clip
    assert reported == pytest.approx(sigma, rel=1e-6)
    assert scipy.stats.kstest(noise / sigma, "norm").pvalue > 1e-3
    assert scipy.stats.kstest(noise / (0.67 * sigma), "norm").pvalue < 1e-6
    assert scipy.stats.kstest(noise / (1.5 * sigma), "norm").pvalue < 1e-6


def test_noise_is_added_once_to_the_sum_not_per_client():
    # with 3 clients, per-client noise would give std sqrt(3) z C on the sum
    z, clip = 1.0, 1.0
    noise, _ = _noise_samples(z, clip, jax.random.key(6))
    assert scipy.stats.kstest(noise / (z * clip), "norm").pvalue > 1e-3
    assert scipy.stats.kstest(noise / (math.sqrt(3) * z * clip), "norm").pvalue < 1e-6


def test_simulated_noise_cohort_scales_noise_and_is_labelled():
    num_clients, dim = 4, 20_000
    cfg = _cfg(
        clip_norm=1.0,
        noise_multiplier=1.0,
        population_size=10_000,
        cohort_size=num_clients,
        noise_cohort_size=400,
    )
    deltas = {"v": jnp.zeros((num_clients, dim), jnp.float32)}
    _, delta, metrics = _run(cfg, deltas, jnp.ones((num_clients,), jnp.float32), jax.random.key(7))
    # noise on the simulated mean equals the production mean's: z C / 400
    mean_std = 1.0 / 400
    assert scipy.stats.kstest(np.asarray(delta["v"]) / mean_std, "norm").pvalue > 1e-3
    assert int(metrics["dp_simulated_noise_cohort"]) == 1
    assert float(metrics["dp_noise_std"]) == pytest.approx(num_clients / 400)


def test_adaptive_clipping_converges_to_target_quantile():
    target = 0.7
    cfg = _cfg(
        clip_norm=0.05,
        noise_multiplier=0.5,
        population_size=10_000,
        cohort_size=200,
        target_quantile=target,
        clip_learning_rate=0.2,
    )
    agg = aggregation.dp(cfg)
    num_clients, rounds = 200, 150

    def round_fn(state, key):
        k_norm, k_dir, k_agg = jax.random.split(key, 3)
        norms = jnp.exp(jax.random.normal(k_norm, (num_clients,), jnp.float32) * 0.5)  # lognormal norms
        direction = jax.random.normal(k_dir, (num_clients, 8), jnp.float32)
        direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
        deltas = {"v": direction * norms[:, None]}
        state, _, metrics = agg.aggregate(state, deltas, jnp.ones((num_clients,), jnp.float32), k_agg)
        return state, metrics["dp_clip_norm"]

    state0 = agg.init({"v": jnp.zeros((8,), jnp.float32)})
    state, trace = jax.jit(lambda s, k: jax.lax.scan(round_fn, s, jax.random.split(k, rounds)))(
        state0, jax.random.key(8)
    )
    expected = math.exp(0.5 * scipy.stats.norm.ppf(target))  # the lognormal's quantile
    final = float(np.mean(np.asarray(trace)[-30:]))
    assert abs(math.log(final / expected)) < 0.15, (final, expected)
    assert float(trace[0]) == pytest.approx(0.05)


def test_adaptive_effective_noise_multiplier():
    cfg = _cfg(noise_multiplier=1.0, cohort_size=20, target_quantile=0.5, clipped_count_stddev=1.0)
    z_delta = cfg.update_noise_multiplier
    assert z_delta > cfg.noise_multiplier
    # the two Gaussian queries compose to one of multiplier z: z^-2 = z_delta^-2 + (2 sigma_b)^-2
    assert z_delta**-2 + (2 * 1.0) ** -2 == pytest.approx(cfg.noise_multiplier**-2)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        _cfg(noise_multiplier=3.0, cohort_size=20, target_quantile=0.5, clipped_count_stddev=1.0)


def test_config_validation():
    with pytest.raises(ValueError):
        _cfg(clip_norm=math.inf, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="expected_cohort_weight"):
        _cfg(weighting="capped", max_weight=10.0)
    assert _cfg().sensitivity == 1.0 and _cfg(sampling="fixed").sensitivity == 2.0
    assert config.expected_capped_weight([5, 10, 20], 3, 10.0) == pytest.approx(2.5)


def _tiny_problem(key, num_clients=5, num_examples=12, dim=4):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (num_clients, num_examples, dim), jnp.float32)
    y = jax.random.randint(ky, (num_clients, num_examples), 0, 3, jnp.int32)
    mask = jnp.ones((num_clients, num_examples), bool).at[1, 7:].set(False)
    client_mask = jnp.array([True, True, True, True, False])
    return Cohort(ClientData(x, y, mask), jnp.arange(num_clients, dtype=jnp.int32), client_mask)


# fljax.simulation reports delta_norm with optax.global_norm, deprecated in this optax
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_dp_fedavg_jitted_end_to_end_and_deterministic():
    model = zoo.LogisticRegression(num_classes=3)
    params = zoo.init_params(model, (4,), jax.random.key(9))
    cohort = _tiny_problem(jax.random.key(10))
    cfg = _cfg(
        clip_norm=0.5,
        noise_multiplier=0.8,
        population_size=50,
        cohort_size=4,
        target_quantile=0.5,
        clipped_count_stddev=1.0,
    )
    algo = fedavg.fedavg(
        client.local_sgd(model, optax.sgd(0.1), batch_size=4, weighting="uniform"),
        aggregator=aggregation.dp(cfg),
    )
    update = jax.jit(algo.update)

    def run(seed):
        run_key = fl_random.run_key(seed)
        state = algo.init(params)
        for r in range(3):
            state, metrics = update(state, cohort, fl_random.round_key(run_key, r))
        return state, metrics

    s1, m1 = run(0)
    s2, m2 = run(0)
    s3, _ = run(1)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s3.params), strict=True)
    )
    assert int(m1["num_clients"]) == 4 and int(m1["num_nonfinite"]) == 0
    assert float(m1["dp_noise_std"]) > 0
    assert float(s1.aggregator_state.clip_norm) != 0.5  # adapted
    for leaf in jax.tree.leaves(s1.params):
        assert bool(jnp.all(jnp.isfinite(leaf)))


# fljax.simulation reports delta_norm with optax.global_norm, deprecated in this optax
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_dp_over_secure_sum_in_a_jitted_round_tracks_dp_over_plain_sum():
    model = zoo.LogisticRegression(num_classes=3)
    params = zoo.init_params(model, (4,), jax.random.key(16))
    cohort = _tiny_problem(jax.random.key(17))
    cfg = _cfg(
        clip_norm=0.5,
        noise_multiplier=0.8,
        population_size=50,
        cohort_size=4,
        target_quantile=0.5,
        clipped_count_stddev=1.0,
    )
    update = client.local_sgd(model, optax.sgd(0.1), batch_size=4, weighting="uniform")
    results = []
    for inner in (None, secagg.secure_sum(secagg.SecAggConfig())):
        algo = fedavg.fedavg(update, aggregator=aggregation.dp(cfg, sum=inner))
        step = jax.jit(algo.update)
        state = algo.init(params)
        for r in range(3):
            state, metrics = step(state, cohort, fl_random.round_key(fl_random.run_key(0), r))
        assert step._cache_size() == 1
        results.append((state, metrics))
    (plain, _), (secure, m) = results
    assert int(m["num_range_clipped"]) == 0 and int(m["aborted"]) == 0 and int(m["num_clients"]) == 4
    for a, b in zip(jax.tree.leaves(secure.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert float(secure.aggregator_state.clip_norm) == pytest.approx(float(plain.aggregator_state.clip_norm))


def test_sample_cohort_follows_config():
    keys = jax.random.split(jax.random.key(11), 2)
    ids, mask = aggregation.sample_cohort(_cfg(sampling="fixed", population_size=100, cohort_size=6), keys[0])
    assert ids.shape == (6,) and mask.all() and len(set(ids.tolist())) == 6
    ids, mask = aggregation.sample_cohort(_cfg(population_size=100, cohort_size=6), keys[1])
    assert ids.shape[0] >= 6 and np.all(ids[~mask] == -1)
