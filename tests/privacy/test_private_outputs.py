"""Privacy you can deploy: secret noise by default, nothing exact released beside epsilon, a
delta below 1/N by default, and the simulated noise cohort that samples its own population."""

import json

import jax
import numpy as np
import pytest

from fljax import privacy
from fljax import random as fl_random
from fljax.privacy.config import default_delta
from tests.experiment import runner

TINY = ["rounds=2", "repeats=1", "baselines=()", "eval_every=2", "checkpoint_every=0"]
DP = "dp={'clip_norm': 0.1, 'noise_multiplier': 1.0, 'delta': 1e-5"


def _run(tmp_path, name, *sets):
    argv = ["--config", runner.HEART, "--out", str(tmp_path / name), "--no-progress"]
    for item in [*TINY, *sets]:
        argv += ["--set", item]
    summary = runner.main(argv)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_secret_key_is_fresh_and_never_the_seeded_one():
    a, b = fl_random.secret_key(), fl_random.secret_key()
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(fl_random.run_key(0)))


def test_dp_noise_is_secret_by_default_and_seeded_only_when_asked(tmp_path):
    s1, r1 = _run(tmp_path, "a", DP + "}")
    s2, r2 = _run(tmp_path, "b", DP + "}")
    # the same config and seed: different noise (the delta norms of the noised updates differ)
    assert [r["delta_norm"] for r in r1] != [r["delta_norm"] for r in r2]
    assert s1["privacy"]["noise"].startswith("secret")
    assert not any(r["dp_noise_from_seed"] for r in r1)
    s3, r3 = _run(tmp_path, "c", DP + ", 'reproducible': True}")
    s4, r4 = _run(tmp_path, "d", DP + ", 'reproducible': True}")
    assert [r["delta_norm"] for r in r3] == [r["delta_norm"] for r in r4]
    assert "NOT private" in s3["privacy"]["noise"] and all(r["dp_noise_from_seed"] for r in r3)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "key" not in json.dumps(config).lower().replace("keys", "")  # no key in the stored config


def test_exact_round_statistics_are_withheld_under_dp(tmp_path):
    _, rows = _run(tmp_path, "dp", DP + "}")
    exact = {"num_clients", "num_clipped", "total_weight", "num_nonfinite", "client_train_loss_weighted_mean"}
    for r in rows:
        assert not exact & set(r), sorted(exact & set(r))
        assert {"epsilon", "delta_norm", "dp_noise_std"} <= set(r)
    summary, rows = _run(tmp_path, "released", DP + ", 'release_unnoised_metrics': True}")
    assert "unnoised_num_clients" in rows[0] and "num_clients" not in rows[0]
    assert "unnoised_num_clients" in summary["privacy"]["unnoised_metrics_released"]
    _, plain = _run(tmp_path, "plain")  # without DP nothing is withheld
    assert "num_clients" in plain[0] and "client_train_loss_weighted_mean" in plain[0]


def test_default_delta_is_below_one_over_n():
    for n in (2, 4, 100, 3400, 10**6):
        cfg = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=n, cohort_size=1)
        assert cfg.target_delta == default_delta(n) < 1.0 / n
    assert default_delta(4) == 1e-5


def test_simulated_noise_cohort_samples_the_simulated_population():
    cfg = privacy.DPConfig(
        clip_norm=1.0, noise_multiplier=1.0, population_size=1_000_000, cohort_size=50, noise_cohort_size=5000
    )
    ids, mask = privacy.sample_cohort(cfg, jax.random.key(0), num_clients=1000)
    assert ids[mask].max() < 1000 and 20 < mask.sum() < 100
    assert cfg.sampling_probability == pytest.approx(5000 / 1_000_000)  # accounted as production
    plain = cfg.replace(noise_cohort_size=None, population_size=1000)
    with pytest.raises(ValueError, match="num_clients=500 differs from population_size=1000"):
        privacy.sample_cohort(plain, jax.random.key(1), num_clients=500)


def test_simulated_noise_cohort_runs_through_the_trainer(tmp_path):
    summary, rows = _run(
        tmp_path,
        "sim",
        "dp={'clip_norm': 0.1, 'noise_multiplier': 1.0, 'population_size': 4000, 'cohort_size': 2, "
        "'noise_cohort_size': 400, 'delta': 1e-6, 'reproducible': True}",
    )
    assert summary["privacy"]["simulated_noise_cohort"] is True
    assert all(r["dp_simulated_noise_cohort"] == 1 for r in rows)


def test_distributed_dp_runs_through_the_trainer_on_the_private_main_job(tmp_path):
    argv = [
        "--config",
        str(runner.CONFIGS / "heart_disease_private.py"),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    sets = [
        *TINY,
        "dp=None",
        "distributed_dp={'clip_norm': 0.1, 'noise_multiplier': 1.0, 'bits': 16, 'delta': 1e-5}",
    ]
    for item in sets:
        argv += ["--set", item]
    summary = runner.main(argv)
    privacy_ = summary["privacy"]
    assert privacy_["mechanism"] == "distributed_discrete_gaussian" and privacy_["secure_aggregation"]
    assert 0 < privacy_["epsilon"] < float("inf") and privacy_["noise"].startswith("secret")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["epsilon"] < rows[1]["epsilon"]
    assert not {"num_clients", "client_train_loss_weighted_mean"} & set(rows[0])
    # the accounting is the distributed mechanism's, for the model's size and the 4 hospitals
    stored = runner.experiment.config.from_dict(
        runner.experiment.Config, json.loads((tmp_path / "config.json").read_text())
    )
    built = runner.experiment.config.distributed_dp_config(stored, 4, dim=29 * 32 + 32 + 32 * 2 + 2)
    assert privacy_["epsilon"] == pytest.approx(privacy.distributed.epsilon(built, 2))


def test_one_dp_mechanism_per_run():
    from fljax import experiment

    both = experiment.Config(
        dp=experiment.DP(clip_norm=1.0, noise_multiplier=1.0),
        distributed_dp=experiment.config.DistributedDP(clip_norm=1.0, noise_multiplier=1.0),
    )
    with pytest.raises(experiment.ConfigError, match="distributed_dp=.*expected None when dp is set"):
        experiment.config.validate(both)


def test_golden_values_of_pinned_dp_accounting():
    # Poisson q = 100/3400, 1,500 rounds, z = 1.0, delta = 1/3400 (values from dp-accounting 0.4.4+)
    cfg = privacy.DPConfig(
        clip_norm=1.0, noise_multiplier=1.0, population_size=3400, cohort_size=100, delta=1 / 3400
    )
    assert privacy.epsilon(cfg, 1500, accountant="rdp") == pytest.approx(6.697, abs=5e-4)
    assert privacy.epsilon(cfg, 1500, accountant="pld") == pytest.approx(5.968, abs=1e-3)  # PLD grid
    z = privacy.calibrate_noise_multiplier(cfg, target_epsilon=10.0, rounds=1500)
    assert z == pytest.approx(0.8331, abs=5e-4)


def test_dp_ftrl_runs_through_the_trainer_and_its_rounds_cannot_grow(tmp_path, capsys):
    mf = "dp_ftrl={'clip_norm': 0.1, 'noise_multiplier': 1.0, 'strategy': 'banded', 'num_bands': 2, 'delta': 1e-5}"
    summary, rows = _run(tmp_path, "mf", mf, "checkpoint_every=1")
    spent = summary["privacy"]
    assert spent["mechanism"] == "matrix_factorization:banded" and spent["sampling_amplification"] is False
    stored = runner.experiment.config.from_dict(
        runner.experiment.Config, json.loads((tmp_path / "mf" / "config.json").read_text())
    )
    built = runner.experiment.config.dp_ftrl_config(stored, 4)
    assert spent["epsilon"] == pytest.approx(privacy.matrix_factorization.epsilon(built, 2))
    assert rows[0]["epsilon"] < rows[1]["epsilon"] == pytest.approx(spent["epsilon"])
    argv = ["--config", runner.HEART, "--out", str(tmp_path / "mf"), "--no-progress", "--resume"]
    for item in [*TINY, mf, "checkpoint_every=1", "rounds=3"]:
        argv += ["--set", item]
    with pytest.raises(SystemExit):  # its correlated noise was planned for 2 rounds
        runner.main(argv)
    assert "rounds: 2 -> 3" in capsys.readouterr().err
