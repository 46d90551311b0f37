"""Profiling: schema checks, exact noise-free profiles, the scale flag for a site in other units,
and private standardisation equal to the current one without noise."""

import jax
import numpy as np
import pandas as pd
import pytest

from fljax.analytics import profiling
from fljax.data import standardize
from fljax.data.datasets import heart_disease, tabular

BOUNDS = {"a": (0.0, 20.0), "b": (-5.0, 5.0)}


def _sites(seed=0, scaled=None, factor=100.0):
    rng = np.random.default_rng(seed)
    sites = {}
    for i, n in enumerate((150, 200, 120, 180)):
        a = rng.normal(8.0, 2.0, n)
        b = rng.normal(0.5, 1.0, n)
        a[rng.random(n) < 0.1] = np.nan
        sites[f"site{i}"] = pd.DataFrame({"a": a, "b": b, "kind": rng.choice(["x", "y"], n)})
    if scaled is not None:
        sites[scaled[0]][scaled[1]] *= factor
    return sites


def test_schema_reports_columns_dtypes_and_levels():
    sites = _sites()
    assert profiling.schema(sites).ok
    sites["site1"] = sites["site1"].drop(columns=["b"])
    sites["site2"]["kind"] = sites["site2"]["kind"].replace("y", "z")
    sites["site3"]["a"] = sites["site3"]["a"].astype(str)
    report = profiling.schema(sites)
    assert not report.ok
    text = "\n".join(report.issues)
    assert "'site1' lacks column(s) ['b']" in text
    assert "'a' is categorical at some sites and numeric at others" in text
    assert "site 'site2' lacks level(s) ['y']" in text


def test_noise_free_profile_equals_numpy():
    sites = _sites()
    prof = profiling.profile(sites, BOUNDS, noise_multiplier=0.0, key=jax.random.key(0), num_bins=10)
    for name, frame in sites.items():
        for feature, (lo, hi) in BOUNDS.items():
            fp = prof.sites[name][feature]
            x = frame[feature].to_numpy()
            obs = x[~np.isnan(x)]
            counts, _ = np.histogram(obs, np.linspace(lo, hi, 11))
            np.testing.assert_array_equal(fp.histogram.counts, counts)
            assert fp.missing_rate == pytest.approx(np.mean(np.isnan(x)), abs=1e-12)
            clipped = np.clip(obs, lo, hi)
            assert fp.mean == pytest.approx(clipped.mean(), abs=1e-4)
            assert fp.std == pytest.approx(clipped.std(), abs=1e-3)
    assert prof.flags == {}


@pytest.mark.parametrize("feature", ["a", "b"])
def test_flags_a_site_whose_feature_was_multiplied_by_100(feature):
    sites = _sites(seed=1, scaled=("site2", feature))
    prof = profiling.profile(sites, BOUNDS, noise_multiplier=1.0, key=jax.random.key(1), num_bins=10)
    assert prof.flags == {feature: ["site2"]}
    assert "outside" in prof.reasons[(feature, "site2")]
    # the second rule: a range wide enough to hold both scales, so only the moments can tell (the
    # moments' noise grows with the range: at z = 1 it would hide the unscaled sites' scale; z = 0 here)
    wide = {feature: (-2000.0, 2000.0) if feature == "a" else (-500.0, 500.0)}
    prof = profiling.profile(sites, wide, noise_multiplier=0.0, key=jax.random.key(2), num_bins=10)
    assert prof.flags == {feature: ["site2"]}
    assert "root mean square" in prof.reasons[(feature, "site2")]


def test_profile_plot_and_event(tmp_path):
    prof = profiling.profile(
        _sites(scaled=("site0", "a")), BOUNDS, noise_multiplier=1.0, key=jax.random.key(3)
    )
    fig = profiling.plot(prof, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert "flagged" in fig.axes[0].get_title()
    assert len(prof.dp_event.events) == 2 * len(BOUNDS)


def test_private_scaler_without_noise_is_standardize_fit():
    rng = np.random.default_rng(4)
    clients = [rng.normal(3.0, 2.0, (n, 3)) for n in (10, 30, 5)]
    clients[1][2, 1] = np.nan
    exact = standardize.fit(clients)
    got = profiling.private_scaler(clients).scaler
    np.testing.assert_array_equal(got.mean, exact.mean)
    np.testing.assert_array_equal(got.std, exact.std)
    bounds = (np.full(3, -100.0), np.full(3, 100.0))  # holds the data: clipping changes nothing
    got = profiling.private_scaler(clients, bounds=bounds).scaler
    np.testing.assert_array_equal(got.std, exact.std)


def test_private_scaler_with_noise_is_close_and_accounted():
    rng = np.random.default_rng(5)
    clients = [rng.normal([10.0, -3.0], [2.0, 0.5], (n, 2)) for n in (3000, 2000)]
    exact = standardize.fit(clients)
    bounds = (np.array([0.0, -6.0]), np.array([20.0, 0.0]))
    out = profiling.private_scaler(clients, bounds=bounds, noise_multiplier=1.0, key=jax.random.key(6))
    # noise std on the sums is about 30 (round 1) over 5000 records: errors of ~1e-2
    np.testing.assert_allclose(out.scaler.mean, exact.mean, atol=0.1)
    np.testing.assert_allclose(out.scaler.std, exact.std, rtol=0.1)
    assert len(out.configs) == 2 and all(np.isfinite(c.epsilon()) for c in out.configs)
    with pytest.raises(ValueError, match="finite bounds"):
        profiling.private_scaler(clients, noise_multiplier=1.0, key=jax.random.key(0))


def test_heart_disease_private_standardize_without_noise_is_the_default():
    default = heart_disease.load()
    private = heart_disease.load(private_standardize=profiling.PrivateStandardize())
    np.testing.assert_array_equal(default.train.x, private.train.x)
    np.testing.assert_array_equal(default.test.x, private.test.x)
    noisy = heart_disease.load(
        private_standardize=profiling.PrivateStandardize(
            noise_multiplier=1.0, bounds=(("age", 20, 90), ("trestbps", 80, 220), ("chol", 100, 620),
                                          ("thalach", 60, 220), ("oldpeak", -3, 7), ("ca", 0, 3))),
    )  # fmt: skip
    assert not np.array_equal(default.train.x, noisy.train.x)
    with pytest.raises(ValueError, match="unknown feature"):
        heart_disease.load(private_standardize=profiling.PrivateStandardize(bounds=(("nope", 0, 1),)))


def test_credit_default_private_standardize_without_noise_is_the_default():
    try:
        default = tabular.credit_default()
    except FileNotFoundError as e:
        pytest.skip(f"credit default data not available: {e}")
    private = tabular.credit_default(private_standardize=profiling.PrivateStandardize())
    np.testing.assert_allclose(private.x, default.x, atol=1e-6)
