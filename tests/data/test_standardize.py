import numpy as np
import pytest

from fljax.data import FederatedData, standardize


def _data(n=500, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 10.0, 0.01, 3.0])
    return rng.normal(loc=[0.0, 50.0, -3.0, 1e4], size=(n, 4)) * scale


def _random_split(n, num_clients, rng):
    cuts = np.sort(rng.integers(0, n + 1, num_clients - 1))  # may give empty clients
    return np.split(rng.permutation(n), cuts)


@pytest.mark.parametrize("two_pass", [True, False])
def test_federated_standardisation_equals_pooled_numpy(two_pass):
    x = _data()
    rng = np.random.default_rng(1)
    scaler = standardize.fit([x[i] for i in _random_split(len(x), 6, rng)], two_pass=two_pass)
    np.testing.assert_allclose(scaler.mean, x.mean(axis=0), rtol=1e-12)
    # one pass loses ~(mean / std)^2 * 1e-16 to cancellation (feature 3: mean 3e4, std 3)
    np.testing.assert_allclose(scaler.std, x.std(axis=0, ddof=0), rtol=1e-10 if two_pass else 1e-6)


def test_invariant_to_how_the_data_are_split():
    x = _data(seed=2)
    rng = np.random.default_rng(3)
    ref = standardize.fit([x])
    for num_clients in (1, 2, 5, 40):
        scaler = standardize.fit([x[i] for i in _random_split(len(x), num_clients, rng)])
        np.testing.assert_allclose(scaler.mean, ref.mean, rtol=1e-13)
        np.testing.assert_allclose(scaler.std, ref.std, rtol=1e-12)


def test_statistics_are_additive_and_combine_adds_in_order():
    x = _data(n=60, seed=4)
    parts = [x[:10], x[10:10], x[10:45], x[45:]]
    stacked = standardize.client_statistics(parts)
    assert stacked.count.shape == (4, 4)
    np.testing.assert_array_equal(stacked.count[1], 0.0)  # an empty client sends zeros
    total = standardize.combine(stacked)
    as_list = standardize.combine([standardize.statistics(p) for p in parts])
    whole = standardize.statistics(x)
    for a, b, c in zip(total, as_list, whole, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-12)
    np.testing.assert_array_equal(total.count, 60.0)


def test_shifted_statistics_give_the_same_moments():
    x = _data(n=100, seed=5)
    shift = np.array([1.0, 490.0, 0.0, 3e4 + 1.0])  # near the means [0, 500, -0.03, 3e4]
    mean, var = standardize.moments(standardize.statistics(x, shift=shift), shift=shift)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-9)


def test_two_pass_is_accurate_with_a_large_offset():
    rng = np.random.default_rng(6)
    x = 1e9 + rng.normal(size=(1000, 1))
    scaler = standardize.fit(np.array_split(x, 3))
    np.testing.assert_allclose(scaler.std, x.std(0), rtol=1e-6)


def test_missing_values_are_skipped():
    x = _data(n=80, seed=7)
    x[::7, 1] = np.nan
    x[::5, 3] = np.nan
    scaler = standardize.fit(np.array_split(x, 4))
    np.testing.assert_allclose(scaler.mean, np.nanmean(x, 0), rtol=1e-12)
    np.testing.assert_allclose(scaler.std, np.nanstd(x, 0), rtol=1e-9)
    z = standardize.apply(x, scaler)
    np.testing.assert_array_equal(np.isnan(z), np.isnan(x))


def test_population_round_trip_and_standardised_moments():
    x = _data(n=90, seed=8).astype(np.float32)
    x[:, 2] = 7.0  # a constant feature
    y = np.arange(90) % 3
    data = FederatedData.from_partition(
        x, y, np.array_split(np.arange(90), 4), client_names=tuple("abcd"), num_classes=3
    )
    scaler = standardize.fit(data)
    ref = standardize.fit(np.array_split(x, 4))
    np.testing.assert_array_equal(scaler.mean, ref.mean)
    np.testing.assert_array_equal(scaler.std, ref.std)
    out = standardize.apply(data, scaler)
    assert isinstance(out, FederatedData) and out.x.dtype == np.float32
    np.testing.assert_array_equal(out.offsets, data.offsets)
    assert out.client_names == data.client_names and out.num_classes == 3
    np.testing.assert_array_equal(out.y, data.y)
    np.testing.assert_allclose(out.x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.x.std(0)[[0, 1, 3]], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.x[:, 2], 0.0)  # constant: centred, not divided by 0
    assert (
        standardize.apply(np.arange(4).reshape(2, 2), scaler._replace(mean=np.zeros(2), std=np.ones(2))).dtype
        == np.float32
    )


def test_errors():
    with pytest.raises(ValueError, match="no observed values"):
        standardize.moments(standardize.statistics(np.array([[1.0, np.nan]])))
    with pytest.raises(ValueError, match="different feature shapes"):
        standardize.client_statistics([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="no clients"):
        standardize.client_statistics([])
