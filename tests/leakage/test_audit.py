"""One-run privacy audit: never above the accountant for fljax's mechanisms, catches a broken one."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import aggregators, privacy, secagg
from fljax.experiment import Audit, ConfigError
from fljax.leakage import audit
from tests.experiment import runner

DIM = 20_000  # d >> m: random canary directions nearly orthogonal


def _params():
    return {"w": jnp.zeros((DIM // 2,)), "b": jnp.zeros((DIM // 2,))}


def _dp(z, *, sum=None, q=1.0):
    n = 100
    return privacy.DPConfig(
        clip_norm=1.0,
        noise_multiplier=z,
        population_size=n,
        cohort_size=round(q * n),
        sampling="poisson",
        delta=1e-5,
    )


def _release(mechanism, config, key, num_real=4):
    """One round of ``mechanism`` with the canaries and ``num_real`` real (zero) clients."""
    params = _params()
    agg = audit.with_canaries(mechanism, config, key)
    deltas = jax.tree.map(lambda x: jnp.zeros((num_real,) + x.shape), params)
    _, delta, metrics = jax.jit(agg.aggregate)(
        agg.init(params), deltas, jnp.ones(num_real), jax.random.key(7)
    )
    return delta, metrics


@pytest.mark.parametrize("z", [1.0, 4.0])
def test_gaussian_mechanism_lower_bound_stays_below_the_accountant(z):
    config = audit.AuditConfig(num_canaries=1000)
    dp = _dp(z)
    delta, _ = _release(privacy.dp(dp), config, jax.random.key(3))
    eps = privacy.accounting.epsilon(dp, 1)
    result = audit.run_audit(delta, config, jax.random.key(3), delta=dp.target_delta, accountant_epsilon=eps)
    assert result.passed and 0 <= result.epsilon_lower_bound <= eps
    assert result.auroc > 0.55  # the canaries are visible, the bound is just loose
    assert result.num_included + result.num_excluded == 1000


@pytest.mark.parametrize("z", [3.0])
def test_noise_ten_times_too_small_is_caught(z):
    """The mechanism adds noise z/10 while the accountant is told z: the audit must fail."""
    config = audit.AuditConfig(num_canaries=1000)
    claimed = _dp(z)
    delta, _ = _release(privacy.dp(claimed.replace(noise_multiplier=z / 10)), config, jax.random.key(5))
    eps = privacy.accounting.epsilon(claimed, 1)
    result = audit.run_audit(
        delta, config, jax.random.key(5), delta=claimed.target_delta, accountant_epsilon=eps
    )
    assert not result.passed and result.epsilon_lower_bound > eps
    assert "FAILED" in result.report()["verdict"]


def test_without_noise_scores_separate_perfectly_and_canaries_are_clipped_like_clients():
    """No noise, over the secure sum: included canaries score about C, excluded about 0."""
    config = audit.AuditConfig(num_canaries=200)
    key = jax.random.key(11)
    mech = privacy.dp(_dp(0.0), sum=secagg.secure_sum(secagg.SecAggConfig()))
    delta, metrics = _release(mech, config, key)
    _, coins = audit._keys(key)
    included = audit.inclusion(config, coins)
    assert int(metrics["audit_canaries"]) == included.sum() and int(metrics["audit_canaries_dropped"]) == 0
    assert int(metrics["num_clipped"]) == included.sum()  # every canary clipped to C
    s = audit.scores(delta, config, key) * 100  # DP divides by the cohort size, 100
    # cross-talk between directions: sd sqrt(100 / d) = 0.07 per score; 7 sd margins
    assert np.all(np.abs(s[included] - 1) < 0.5) and np.all(np.abs(s[~included]) < 0.5)
    result = audit.estimate(s, included, delta=1e-5)
    assert result.auroc == 1.0


def test_canaries_are_added_to_the_inner_aggregate_and_padding_stays_zero():
    config = audit.AuditConfig(num_canaries=50, canary_norm=2.0, participation=0.3)
    key = jax.random.key(2)
    params = {"w": jnp.zeros((64,))}
    deltas = {"w": jnp.concatenate([jnp.ones((3, 64)), jnp.full((1, 64), jnp.nan)])}  # last: padding
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    agg = audit.with_canaries(aggregators.weighted_sum(), config, key)
    counts = []
    for r in range(20):
        _, total, m = agg.aggregate(agg.init(params), deltas, weights, jax.random.key(100 + r))
        assert int(m["audit_canaries_dropped"]) == 0
        counts.append(int(m["audit_canaries"]))
        canary_part = total["w"] - 3.0
        # each canary contributes a vector of norm 2: the canary part's norm grows like 2 sqrt(k)
        assert np.isfinite(np.asarray(canary_part)).all()
        if counts[-1] == 0:
            np.testing.assert_allclose(canary_part, 0, atol=1e-6)
    _, coins = audit._keys(key)
    n_in = audit.inclusion(config, coins).sum()
    # participation 0.3 of the included canaries on average (binomial; 20 rounds, 6 sd margin)
    mean, sd = 0.3 * n_in, np.sqrt(n_in * 0.3 * 0.7 / 20)
    assert abs(np.mean(counts) - mean) < 6 * sd
    assert 0 < audit.capacity(config, n_in) <= n_in


def test_estimate_rejects_bad_inputs():
    s = np.zeros(10)
    with pytest.raises(ValueError, match="both included and excluded"):
        audit.estimate(s, np.ones(10, bool), delta=1e-5)
    with pytest.raises(ValueError, match="one length"):
        audit.estimate(s, np.ones(9, bool), delta=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        audit.estimate(np.full(10, np.nan), np.arange(10) % 2 == 0, delta=1e-5)
    with pytest.raises(ValueError, match="boolean"):
        audit.estimate(s, np.arange(10) % 2, delta=1e-5)
    with pytest.raises(ValueError, match="num_canaries"):
        audit.AuditConfig(num_canaries=1)
    with pytest.raises(ValueError, match="participation"):
        audit.AuditConfig(participation=0.0)


def _audited(tmp_path, name, z=5.0):
    config = runner.load_config(runner.CONFIGS / "heart_disease_private.py")
    return dataclasses.replace(
        config,
        name=name,
        rounds=3,
        repeats=1,
        baselines=(),
        checkpoint_every=0,
        secagg=None,
        dp=dataclasses.replace(config.dp, noise_multiplier=z),
        audit=Audit(num_canaries=200),
        model=dataclasses.replace(config.model, hidden=(256,)),  # d = 8,194: canaries nearly orthogonal
    )


def test_trainer_reports_the_audit_beside_the_accountant(tmp_path):
    summary = runner.trainer.run(_audited(tmp_path, "audited"), tmp_path / "a", progress=False)
    privacy_out = json.loads((tmp_path / "a" / "summary.json").read_text())["privacy"]
    assert privacy_out == json.loads(runner.dumps(summary["privacy"]))
    a = privacy_out["audit"]
    assert a["passed"] and a["epsilon_lower_bound"] <= a["accountant_epsilon"] == privacy_out["epsilon"]
    assert a["delta"] == privacy_out["delta"] and a["num_included"] + a["num_excluded"] == 200
    assert privacy_out["private"] is False  # reproducible noise: never called private


def test_trainer_refuses_to_call_a_broken_mechanism_private(tmp_path, monkeypatch, capsys):
    real = privacy.dp
    broken = lambda c, sum=None: real(c.replace(noise_multiplier=c.noise_multiplier / 10), sum=sum)
    monkeypatch.setattr(runner.trainer.privacy, "dp", broken)
    monkeypatch.setattr(runner.trainer, "_ROUNDS", {})  # rounds compiled by other tests hold the real dp
    config = _audited(tmp_path, "broken")
    config = dataclasses.replace(config, dp=dataclasses.replace(config.dp, reproducible=False))
    summary = runner.trainer.run(config, tmp_path / "b", progress=False)
    a = summary["privacy"]["audit"]
    assert not a["passed"] and a["epsilon_lower_bound"] > a["accountant_epsilon"]
    assert summary["privacy"]["private"] is False
    assert "privacy audit FAILED" in capsys.readouterr().out


def test_audit_config_errors():
    config = runner.load_config(runner.CONFIGS / "heart_disease.py")
    with pytest.raises(ConfigError, match="nothing to audit"):
        runner.experiment.config.validate(dataclasses.replace(config, audit=Audit()))
    private = runner.load_config(runner.CONFIGS / "heart_disease_private.py")
    fixed = dataclasses.replace(private, audit=Audit(), dp=dataclasses.replace(private.dp, sampling="fixed"))
    with pytest.raises(ConfigError, match="poisson"):
        runner.experiment.config.validate(fixed)
    with pytest.raises(ConfigError, match="audit.num_canaries"):
        runner.experiment.config.validate(dataclasses.replace(private, audit=Audit(num_canaries=1)))


def test_resumed_audited_run_reports_the_audit_of_an_uninterrupted_one(tmp_path):
    """Canaries derive from the run key and each round's key: a resumed run audits identically."""
    config = dataclasses.replace(_audited(tmp_path, "resume"), checkpoint_every=2, eval_every=2)
    straight = runner.trainer.run_once(dataclasses.replace(config, rounds=4), tmp_path / "s", progress=False)
    runner.trainer.run_once(dataclasses.replace(config, rounds=2), tmp_path / "r", progress=False)
    resumed = runner.trainer.run_once(
        dataclasses.replace(config, rounds=4), tmp_path / "r", resume=True, progress=False
    )
    assert resumed["summary"]["privacy"]["audit"] == straight["summary"]["privacy"]["audit"]
    timeless = lambda records: [{k: v for k, v in r.items() if k != "round_sec"} for r in records]
    assert timeless(resumed["records"]) == timeless(straight["records"])
