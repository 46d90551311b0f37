"""DP-FTRL / matrix factorization: clipped mean, correlated-noise statistics, accounting, FedAvg."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from jax_privacy.experimental import execution_plan
from jax_privacy.matrix_factorization import toeplitz

from fljax import client, privacy, secagg
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.base import ClientData, Cohort
from fljax.models import zoo
from fljax.privacy import matrix_factorization as mf


def _cfg(**kw):
    base = dict(
        clip_norm=1.0,
        noise_multiplier=1.0,
        total_rounds=8,
        cohort_size=5,
        population_size=20,  # cyclic: min_separation 4, 2 participations
        strategy="banded",
        num_bands=3,
        optimizer_steps=50,
    )
    base.update(kw)
    return mf.MFConfig(**base)


def _deltas(key, num_clients=6, scale=1.0):
    k1, k2 = jax.random.split(key)
    return {
        "w": scale * jax.random.normal(k1, (num_clients, 5, 3), jnp.float32),
        "b": scale * jax.random.normal(k2, (num_clients, 3), jnp.float32),
    }


def _template(deltas):
    return jax.tree.map(lambda x: x[0], deltas)


def test_zero_noise_is_the_clipped_sum_over_the_fixed_cohort_size():
    keys = jax.random.split(jax.random.key(0), 2)
    deltas = _deltas(keys[0], scale=0.6)
    weights = jnp.array([3.0, 1.0, 7.0, 1.0, 0.0, 0.0], jnp.float32)  # two padding slots
    cfg = _cfg(noise_multiplier=0.0, clip_norm=0.9)
    agg = mf.dp_ftrl(cfg)
    _, delta, metrics = jax.jit(agg.aggregate)(agg.init(_template(deltas)), deltas, weights, keys[1])
    norms = np.sqrt(sum(np.sum(np.asarray(x) ** 2, axis=tuple(range(1, x.ndim))) for x in deltas.values()))
    factor = np.minimum(1.0, cfg.clip_norm / norms) * (np.asarray(weights) > 0)
    for name, x in deltas.items():
        expect = np.tensordot(factor, np.asarray(x), axes=1) / cfg.cohort_size
        np.testing.assert_allclose(delta[name], expect, rtol=1e-5, atol=1e-6)
    assert int(metrics["num_clients"]) == 4
    assert int(metrics["num_clipped"]) == int(np.sum(norms[:4] > cfg.clip_norm))
    assert float(metrics["dp_noise_std"]) == 0.0


def test_nonfinite_client_contributes_zero_and_is_counted():
    keys = jax.random.split(jax.random.key(1), 3)  # without noise the key does not matter
    deltas = _deltas(keys[0])
    bad = jax.tree.map(lambda x: x.at[2].set(jnp.nan), deltas)
    weights = jnp.ones((6,), jnp.float32)
    cfg = _cfg(noise_multiplier=0.0)
    agg = mf.dp_ftrl(cfg)
    state = agg.init(_template(deltas))
    _, d_bad, metrics = agg.aggregate(state, bad, weights, keys[1])
    _, d_ref, _ = agg.aggregate(state, deltas, weights.at[2].set(0.0), keys[2])
    for a, b in zip(jax.tree.leaves(d_bad), jax.tree.leaves(d_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(metrics["num_nonfinite"]) == 1


def _noise_trajectory(cfg, key, dim=20000):
    """Noise on the sum for every round: ``[total_rounds, dim]`` (zero updates, 3 clients)."""
    agg = mf.dp_ftrl(cfg)
    deltas = {"v": jnp.zeros((3, dim), jnp.float32)}
    state = agg.init({"v": jnp.zeros((dim,), jnp.float32)})
    step = jax.jit(agg.aggregate)
    rows, stds = [], []
    for t in range(cfg.total_rounds):
        state, delta, metrics = step(state, deltas, jnp.ones((3,), jnp.float32), jax.random.fold_in(key, t))
        rows.append(np.asarray(delta["v"], np.float64) * cfg.cohort_size)
        stds.append(float(metrics["dp_noise_std"]))
    return np.stack(rows), np.array(stds)


def _expected_covariance(cfg):
    """``sigma^2 C^-1 C^-T`` from the accounted coefficients, inverted here in numpy."""
    c = mf.strategy_coefs(cfg)
    n = cfg.total_rounds
    strategy = np.array([[c[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])
    strategy /= np.max(np.linalg.norm(strategy, axis=0))  # normalised: unit largest column
    cinv = np.linalg.inv(strategy)
    sigma = cfg.noise_multiplier * cfg.clip_norm
    return sigma**2 * cinv @ cinv.T


@pytest.mark.parametrize("strategy", ["banded", "blt"])
def test_correlated_noise_marginals_and_correlations_match_the_strategy(strategy):
    cfg = _cfg(strategy=strategy, noise_multiplier=1.3, clip_norm=0.7, num_buffers=2)
    noise, reported = _noise_trajectory(cfg, jax.random.key(2))
    cov = _expected_covariance(cfg)
    std = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(reported, std, rtol=1e-4)
    # The strategy really correlates: some rounds' marginal std differs from the i.i.d. sigma.
    sigma = cfg.noise_multiplier * cfg.clip_norm
    assert np.max(np.abs(std / sigma - 1.0)) > 0.1
    worst = int(np.argmax(np.abs(std / sigma - 1.0)))
    for t in range(cfg.total_rounds):
        assert scipy.stats.kstest(noise[t] / std[t], "norm").pvalue > 1e-4
    assert scipy.stats.kstest(noise[worst] / sigma, "norm").pvalue < 1e-6
    # Cross-round correlation over the 20000 independent coordinates.
    empirical = np.corrcoef(noise)
    expected = cov / np.outer(std, std)
    np.testing.assert_allclose(empirical, expected, atol=0.04)
    assert np.max(np.abs(expected - np.eye(cfg.total_rounds))) > 0.2  # not a vacuous check


def test_independent_strategy_is_iid_gaussian_noise():
    cfg = _cfg(strategy="independent", num_bands=None, noise_multiplier=0.8)
    noise, reported = _noise_trajectory(cfg, jax.random.key(3), dim=5000)
    np.testing.assert_allclose(reported, 0.8, rtol=1e-6)
    assert scipy.stats.kstest(noise.ravel() / 0.8, "norm").pvalue > 1e-4
    np.testing.assert_allclose(np.corrcoef(noise), np.eye(cfg.total_rounds), atol=0.06)


def test_noise_state_shapes_follow_the_strategy():
    params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
    banded = mf.dp_ftrl(_cfg(num_bands=3)).init(params)
    assert banded.noise_state["w"].shape == (2, 5, 3)
    blt = mf.dp_ftrl(_cfg(strategy="blt", num_buffers=2)).init(params)
    assert blt.noise_state["b"].shape == (2, 3)
    assert mf.dp_ftrl(_cfg(strategy="independent")).init(params).noise_state == ()


def _pld_epsilon(z, delta):
    return dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(delta)


@pytest.mark.parametrize("strategy", ["banded", "blt", "independent"])
@pytest.mark.parametrize("relation", ["zero_out", "replace_one"])
def test_epsilon_is_one_gaussian_with_jax_privacy_min_sep_sensitivity(strategy, relation):
    cfg = _cfg(strategy=strategy, noise_multiplier=2.0, neighboring_relation=relation)
    c = jnp.asarray(mf.strategy_coefs(cfg), jnp.float32)
    sens = math.sqrt(float(toeplitz.minsep_sensitivity_squared(c, min_sep=4, n=8)))
    col = math.sqrt(float(np.sum(np.asarray(c, np.float64) ** 2)))
    z = 2.0 * col / (sens * (1.0 if relation == "zero_out" else 2.0))
    assert mf.accounting_noise_multiplier(cfg) == pytest.approx(z, rel=1e-5)
    assert mf.epsilon(cfg) == pytest.approx(_pld_epsilon(z, cfg.target_delta), rel=1e-4)
    # the first 4 rounds see one participation per client: the norm of C's first column, cut at 4
    first = math.sqrt(float(np.sum(np.asarray(c[:4], np.float64) ** 2))) / col
    assert mf.sensitivity_multiplier(cfg, rounds=4) == pytest.approx(first, rel=1e-5)


def test_banded_epsilon_matches_jax_privacy_bandmf_execution_plan_without_sampling():
    # min_separation = num_bands: jax_privacy's BandMF plan with sampling probability 1
    cfg = _cfg(total_rounds=12, population_size=15, num_bands=3, noise_multiplier=1.5)
    assert cfg.separation == 3 and cfg.participations == 4
    plan = execution_plan.BandMFExecutionPlanConfig(
        iterations=12,
        strategy=mf.strategy_coefs(cfg)[:3],
        noise_multiplier=1.5,
        epsilon=None,
        delta=None,
        sampling_prob=1.0,
    ).plan
    accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    expected = accountant.compose(plan.dp_event).get_epsilon(cfg.target_delta)
    assert mf.epsilon(cfg) == pytest.approx(expected, rel=1e-5)


def test_independent_single_participation_is_the_gaussian_mechanism():
    cfg = _cfg(strategy="independent", max_participations=1, population_size=40, noise_multiplier=3.0)
    assert cfg.participations == 1
    assert mf.epsilon(cfg) == pytest.approx(_pld_epsilon(3.0, cfg.target_delta), rel=1e-6)
    two = cfg.replace(max_participations=None)  # cyclic: 40 // 5 = 8 groups, one pass of 8 rounds
    assert two.participations == 1
    four = _cfg(strategy="independent", population_size=10, noise_multiplier=3.0)  # every 2nd round
    assert mf.accounting_noise_multiplier(four) == pytest.approx(3.0 / 2.0, rel=1e-6)


def test_epsilon_decreases_with_noise_and_grows_with_rounds_and_calibration_round_trips():
    eps = [mf.epsilon(_cfg(noise_multiplier=z)) for z in (0.8, 1.0, 2.0, 4.0)]
    assert bool(np.all(np.diff(eps) < 0))
    cfg = _cfg(noise_multiplier=1.0)
    assert mf.epsilon(cfg, rounds=3) < mf.epsilon(cfg, rounds=5) < mf.epsilon(cfg)
    assert mf.epsilon(cfg.replace(noise_multiplier=0.0)) == math.inf
    z = mf.calibrate_noise_multiplier(cfg, target_epsilon=2.0)
    assert mf.epsilon(cfg.replace(noise_multiplier=z)) == pytest.approx(2.0, rel=1e-2)
    assert mf.epsilon(cfg.replace(noise_multiplier=z)) <= 2.0 + 1e-6
    with pytest.raises(ValueError, match="rounds"):
        mf.epsilon(cfg, rounds=9)


def test_cohort_schedule_satisfies_the_accounted_participation():
    cfg = _cfg(total_rounds=10, population_size=22)  # 4 groups of 5; 2 clients never drawn
    schedule = mf.cohort_schedule(cfg, jax.random.key(4))
    assert schedule.shape == (10, 5)
    rounds_of = {}
    for t, ids in enumerate(schedule):
        assert len(set(ids.tolist())) == 5
        for i in ids.tolist():
            rounds_of.setdefault(i, []).append(t)
    for rounds in rounds_of.values():
        assert len(rounds) <= cfg.participations
        assert bool(np.all(np.diff(rounds) >= cfg.separation))
    # 4 groups of 5 out of 24: 14 rounds give some client 4 rounds, the config allows 3
    with pytest.raises(ValueError, match="cyclic schedule"):
        mf.cohort_schedule(_cfg(total_rounds=14, population_size=24, max_participations=3), jax.random.key(5))


def test_config_validation():
    with pytest.raises(ValueError, match="num_bands"):
        _cfg(num_bands=None)
    with pytest.raises(ValueError, match="num_bands"):
        _cfg(num_bands=9)
    with pytest.raises(ValueError, match="clip_norm"):
        _cfg(clip_norm=math.inf)
    with pytest.raises(ValueError, match="distinct clients"):
        _cfg(min_separation=5)  # 5 rounds of 5 distinct clients > 20
    with pytest.raises(ValueError, match="max_participations"):
        _cfg(max_participations=1)  # 8 rounds * 5 > 20 clients once
    with pytest.raises(ValueError, match="strategy"):
        _cfg(strategy="tree")
    assert _cfg().target_delta == privacy.config.default_delta(20)


def _population(key, num_clients=6, num_examples=8, dim=4):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (num_clients, num_examples, dim), jnp.float32)
    y = jax.random.randint(ky, (num_clients, num_examples), 0, 3, jnp.int32)
    return x, y


def _cohort(x, y, ids, pad):
    """Cohort of clients ``ids`` followed by ``pad`` padding slots (zero data, mask False)."""
    xs = jnp.concatenate([x[ids], jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    ys = jnp.concatenate([y[ids], jnp.zeros((pad,) + y.shape[1:], y.dtype)])
    n = len(ids)
    mask = jnp.arange(n + pad) < n
    example_mask = jnp.broadcast_to(mask[:, None], ys.shape)
    client_ids = jnp.concatenate([jnp.asarray(ids, jnp.int32), -jnp.ones((pad,), jnp.int32)])
    return Cohort(ClientData(xs, ys, example_mask), client_ids, mask)


# fljax.simulation reports delta_norm with optax.global_norm, deprecated in this optax
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
@pytest.mark.parametrize("strategy", ["blt"])  # banded's jitted path: the noise-statistics test
def test_fedavg_rounds_jitted_on_a_cyclic_schedule_and_padding_changes_nothing(strategy):
    model = zoo.MLP(hidden=(5,), num_classes=3)
    params = zoo.init_params(model, (4,), jax.random.key(6))
    x, y = _population(jax.random.key(7))
    cfg = mf.MFConfig(
        clip_norm=0.5,
        noise_multiplier=0.7,
        total_rounds=4,
        cohort_size=2,
        population_size=6,
        strategy=strategy,
        num_bands=2,
        optimizer_steps=50,
    )
    schedule = mf.cohort_schedule(cfg, jax.random.key(8))
    algo = fedavg.fedavg(
        client.local_sgd(model, optax.sgd(0.1), batch_size=4, weighting="uniform"),
        aggregator=mf.dp_ftrl(cfg),
    )
    update = jax.jit(algo.update)

    def run(pad):
        run_key = fl_random.run_key(0)
        state = algo.init(params)
        for r in range(cfg.total_rounds):
            cohort = _cohort(x, y, schedule[r], pad)
            state, metrics = update(state, cohort, fl_random.round_key(run_key, r))
        return state, metrics

    s0, m0 = run(0)
    s2, m2 = run(2)
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s0.aggregator_state), jax.tree.leaves(s2.aggregator_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s0.aggregator_state.round) == cfg.total_rounds
    assert int(m0["num_clients"]) == 2 and int(m2["num_clients"]) == 2
    assert float(m0["dp_noise_std"]) > 0
    for leaf in jax.tree.leaves(s0.params):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_dp_ftrl_over_secure_sum_tracks_the_plain_sum():
    keys = jax.random.split(jax.random.key(9), 2)
    deltas = _deltas(keys[0])
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], jnp.float32)
    cfg = _cfg(noise_multiplier=1.0)
    plain = mf.dp_ftrl(cfg)
    secure = mf.dp_ftrl(cfg, sum=secagg.secure_sum(secagg.SecAggConfig()))
    template = _template(deltas)
    s_p, s_s = plain.init(template), secure.init(template)
    plain_step, secure_step = jax.jit(plain.aggregate), jax.jit(secure.aggregate)
    for key in jax.random.split(keys[1], 3):
        s_p, d_p, _ = plain_step(s_p, deltas, weights, jax.random.clone(key))
        s_s, d_s, _ = secure_step(s_s, deltas, weights, key)  # the same noise
        for a, b in zip(jax.tree.leaves(d_p), jax.tree.leaves(d_s), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3)
