"""Private standardisation through the trainer's data sections (``standardize_noise_multiplier``)."""

import json

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import rdp

from fljax.analytics import profiling
from fljax.data.datasets import heart_disease, tabular
from fljax.experiment import ConfigError
from fljax.experiment import config as cfg
from fljax.experiment import data as data_lib
from tests.experiment import runner


def test_noise_free_private_path_equals_the_default_exactly():
    default = data_lib.load(cfg.HeartDisease(), jax.random.key(0))
    private = data_lib.load(cfg.HeartDisease(standardize_noise_multiplier=0.0), jax.random.key(0))
    np.testing.assert_array_equal(private.train.x, default.train.x)
    np.testing.assert_array_equal(private.test.x, default.test.x)
    np.testing.assert_array_equal(private.train.y, default.train.y)
    assert default.standardization is None
    assert private.standardization["epsilon"] == float("inf")  # reported, and not private


def test_noised_standardisation_follows_the_data_key():
    section = cfg.HeartDisease(standardize_noise_multiplier=6.0)
    a = data_lib.load(section, jax.random.key(0))
    b = data_lib.load(section, jax.random.key(0))
    c = data_lib.load(section, jax.random.key(1))
    exact = data_lib.load(cfg.HeartDisease(), jax.random.key(0))
    np.testing.assert_array_equal(a.train.x, b.train.x)  # a reproducible simulation
    assert not np.array_equal(a.train.x, c.train.x)
    assert not np.array_equal(a.train.x, exact.train.x)
    # the noise only moves the standardisation: the non-numeric columns are untouched
    numeric = [i for i, n in enumerate(heart_disease.load().feature_names) if n in dict.fromkeys(
        b[0] for b in heart_disease.PUBLIC_BOUNDS)]  # fmt: skip
    other = np.setdiff1d(np.arange(a.train.x.shape[1]), numeric)
    np.testing.assert_array_equal(a.train.x[:, other], exact.train.x[:, other])
    # 690 patients, z = 6, unit-scaled contributions: the noise moves each feature's mean by
    # ~0.03-0.1 of its std and its std by ~10% here; 0.5 and a factor 1.5 are generous bounds
    x, ref = a.train.x[:, numeric], exact.train.x[:, numeric]
    assert np.all(np.abs(x.mean(axis=0) - ref.mean(axis=0)) < 0.5)
    assert np.all(np.abs(np.log(x.std(axis=0) / ref.std(axis=0))) < np.log(1.5))


def test_noised_run_reports_the_standardisation_epsilon_per_record(tmp_path):
    summary = runner.main(
        [
            "--config",
            runner.HEART,
            "--set",
            "rounds=1",
            "--set",
            "baselines=()",
            "--set",
            "data.standardize_noise_multiplier=6.0",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    spent = json.loads((tmp_path / "summary.json").read_text())["standardization_privacy"]
    assert spent == json.loads(json.dumps(summary["standardization_privacy"]))
    assert spent["unit_of_privacy"] == "one patient" and "record" in spent["neighboring_relation"]
    assert spent["noise_multiplier"] == 6.0 and spent["delta"] == 1e-5
    assert spent["records"] == 690 and "not added" in spent["composition"]
    # two Gaussian releases of multiplier 6, composed by dp_accounting's RDP accountant
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(6.0), 2)
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert spent["epsilon"] < 1.0


def test_default_run_has_no_standardisation_entry(tmp_path):
    summary = runner.main(
        ["--config", runner.HEART, "--set", "rounds=1", "--set", "baselines=()", "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    assert "standardization_privacy" not in summary


@pytest.mark.parametrize("section", ["HeartDisease", "Tabular"])
def test_negative_noise_multiplier_is_a_config_error_naming_the_key(section):
    data = getattr(cfg, section)(**({"name": "credit_default"} if section == "Tabular" else {}))
    config = cfg.Config(name="x", data=data)
    with pytest.raises(ConfigError, match=r"data\.standardize_noise_multiplier=-1"):
        cfg.override(config, "data.standardize_noise_multiplier=-1")
    with pytest.raises(ConfigError, match=r"data\.standardize_noise_multiplier"):
        cfg.validate(
            cfg.Config(name="x", data=type(data)(**{**vars(data), "standardize_noise_multiplier": -2.0}))
        )


def test_adult_refuses_private_standardisation():
    config = cfg.Config(name="x", data=cfg.Tabular(name="adult", standardize_noise_multiplier=1.0))
    with pytest.raises(ConfigError, match=r"data\.standardize_noise_multiplier=1\.0: expected None"):
        cfg.validate(config)


def test_credit_default_bounds_name_its_numeric_columns_and_noise_free_equals_central():
    try:
        default = data_lib.load(cfg.Tabular(name="credit_default"), jax.random.key(0))
    except (FileNotFoundError, ConfigError) as e:
        pytest.skip(f"credit default data not available: {e}")
    private = data_lib.load(
        cfg.Tabular(name="credit_default", standardize_noise_multiplier=0.0), jax.random.key(0)
    )
    # central nanmean/nanstd against per-client sums: equal up to float64 rounding (then float32)
    np.testing.assert_allclose(private.train.x, default.train.x, atol=1e-6)
    noisy = data_lib.load(
        cfg.Tabular(name="credit_default", standardize_noise_multiplier=6.0), jax.random.key(0)
    )
    assert noisy.standardization["unit_of_privacy"] == "one row (card holder)"
    assert noisy.standardization["records"] == 30000
    assert set(noisy.standardization["bounds"]) == {n for n, _, _ in tabular.CREDIT_PUBLIC_BOUNDS}
    assert noisy.standardization["epsilon"] == pytest.approx(
        profiling.PrivateStandardize(noise_multiplier=6.0).epsilon(1e-5)
    )


def test_private_scaler_noise_on_the_mean_has_the_stated_std():
    """Unit-scaled contributions: the released mean's error is ``R sigma / n`` with
    ``sigma = z sqrt(2 F)`` (KS test over noise draws; a doubled sigma is rejected)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    n, z = 2000, 1.0
    x = rng.uniform(0.0, 10.0, (n, 1))
    clients = [x[:700], x[700:]]  # two sites
    bounds = (np.array([0.0]), np.array([10.0]))
    exact = float(x.mean())
    errors = np.array([
        profiling.private_scaler(clients, bounds=bounds, noise_multiplier=z, key=jax.random.key(i)).scaler.mean[0]
        - exact
        for i in range(200)
    ])  # fmt: skip
    sigma = 5.0 * z * np.sqrt(2.0) / n  # R = 5, F = 1 (the count's noise moves it by ~1e-5: negligible)
    assert stats.kstest(errors / sigma, "norm").pvalue > 0.01
    assert stats.kstest(errors / (2 * sigma), "norm").pvalue < 0.01
