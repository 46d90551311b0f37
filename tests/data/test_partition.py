"""Partitioners: coverage, determinism, heterogeneity, statistics, plots."""

import jax
import numpy as np
import pytest

from fljax.data import FederatedData, partition

NUM_CLASSES = 10


def _labels(n=2000, seed=0):
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, n)


def _assert_exact_cover(p, n):
    idx = np.concatenate(p.indices + [p.dropped])
    assert len(idx) == n, "every example exactly once (assigned or dropped)"
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))


BUILDERS = {
    "iid": lambda y, key: partition.iid(y, 20, key),
    "classes": lambda y, key: partition.classes_per_client(y, 20, 2, key),
    "shards": lambda y, key: partition.shards(y, 20, 2, key),
    "dirichlet": lambda y, key: partition.dirichlet(y, 20, 0.5, key, min_size=5),
    "quantity": lambda y, key: partition.quantity_skew(len(y), 20, key),
}


@pytest.mark.parametrize("name", ["iid", "classes", "shards", "dirichlet", "quantity"])
def test_cover_and_determinism(name):
    y = _labels()
    build = lambda key: BUILDERS[name](y, key)
    a, b, c = build(jax.random.key(1)), build(jax.random.key(1)), build(jax.random.key(2))
    _assert_exact_cover(a, len(y))
    assert a.num_clients == 20
    assert all(len(i) > 0 for i in a.indices)
    for i, j in zip(a.indices, b.indices, strict=True):
        np.testing.assert_array_equal(i, j)
    assert any(len(i) != len(j) or np.any(i != j) for i, j in zip(a.indices, c.indices, strict=True))


def test_int_seed_matches_itself():
    y = _labels()
    a, b = partition.iid(y, 5, 3), partition.iid(y, 5, 3)
    for i, j in zip(a.indices, b.indices, strict=True):
        np.testing.assert_array_equal(i, j)


def test_iid_sizes_balanced():
    p = partition.iid(_labels(1003), 10, jax.random.key(0))
    assert p.sizes.max() - p.sizes.min() <= 1


def test_classes_per_client_exact_classes():
    y = _labels()
    p = partition.classes_per_client(y, 10, 2, jax.random.key(0))
    hist = partition.label_histogram(p, y, NUM_CLASSES)
    np.testing.assert_array_equal((hist > 0).sum(axis=1), 2)
    # every class held by exactly two of the ten clients
    np.testing.assert_array_equal((hist > 0).sum(axis=0), 2)
    _assert_exact_cover(p, len(y))


def test_classes_per_client_drops_unheld_classes():
    y = _labels()
    p = partition.classes_per_client(y, 3, 2, jax.random.key(0))
    assert len(p.dropped) > 0
    _assert_exact_cover(p, len(y))
    assert set(np.unique(y[p.dropped])).isdisjoint(set(np.unique(y[np.concatenate(p.indices)])))


def test_shards_few_classes():
    y = _labels(4000)
    p = partition.shards(y, 100, 2, jax.random.key(0))
    classes = (partition.label_histogram(p, y, NUM_CLASSES) > 0).sum(axis=1)
    assert classes.max() <= 4  # two shards, each spans at most two labels
    assert np.mean(classes) < 3


def test_dirichlet_alpha_controls_skew():
    y = _labels(5000)
    big = partition.report(partition.dirichlet(y, 20, 1000.0, jax.random.key(0)), y, NUM_CLASSES)
    small = partition.report(partition.dirichlet(y, 20, 0.05, jax.random.key(1), min_size=0), y, NUM_CLASSES)
    iid = partition.report(partition.iid(y, 20, jax.random.key(2)), y, NUM_CLASSES)
    assert big["mean_tv_distance"] < 0.15
    assert big["mean_tv_distance"] < 2 * iid["mean_tv_distance"] + 0.05
    assert small["mean_tv_distance"] > 0.5
    assert small["mean_effective_classes"] < 3
    assert big["mean_effective_classes"] > 9


def test_dirichlet_min_size_error():
    y = _labels(200)
    with pytest.raises(ValueError, match="min_size"):
        partition.dirichlet(y, 50, 0.01, jax.random.key(0), min_size=4, max_retries=5)
    with pytest.raises(ValueError, match="exceeds"):
        partition.dirichlet(y, 50, 1.0, jax.random.key(1), min_size=5)


def test_dirichlet_min_size_met():
    y = _labels(1000)
    p = partition.dirichlet(y, 10, 0.3, jax.random.key(0), min_size=20)
    assert p.sizes.min() >= 20


@pytest.mark.parametrize("distribution", ["lognormal", "powerlaw"])
def test_quantity_skew_heavy_tail(distribution):
    p = partition.quantity_skew(20000, 200, jax.random.key(0), distribution=distribution, min_size=2)
    assert p.sizes.sum() == 20000 and p.sizes.min() >= 2
    assert p.sizes.max() > 3 * np.median(p.sizes)


def test_natural_keeps_names():
    ids = np.array(["b", "a", "c", "a", "b", "b"])
    p = partition.natural(ids)
    assert p.client_names == ("a", "b", "c")
    np.testing.assert_array_equal(p.indices[0], [1, 3])
    np.testing.assert_array_equal(p.indices[1], [0, 4, 5])
    _assert_exact_cover(p, len(ids))


def test_report_and_plot(tmp_path):
    y = _labels()
    p = partition.dirichlet(y, 20, 0.5, jax.random.key(0))
    r = partition.report(p, y, NUM_CLASSES)
    assert r["label_histogram"].shape == (20, NUM_CLASSES)
    assert r["num_examples"] == len(y) and r["duplicates"] == 0 and r["num_dropped"] == 0
    np.testing.assert_array_equal(r["sizes"], p.sizes)
    out = partition.plot(p, y, NUM_CLASSES, str(tmp_path / "labels.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_from_partition_population():
    y = _labels(500)
    x = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    p = partition.classes_per_client(y, 10, 2, jax.random.key(0))
    data = FederatedData.from_partition(x, y, p.indices, num_classes=NUM_CLASSES)
    assert data.num_clients == 10
    np.testing.assert_array_equal(data.sizes, p.sizes)


def test_errors():
    y = _labels(100)
    with pytest.raises(ValueError, match="num_clients"):
        partition.iid(y, 101, jax.random.key(0))
    with pytest.raises(ValueError, match="classes_per_client"):
        partition.classes_per_client(y, 5, 11, jax.random.key(0))
    with pytest.raises(ValueError, match="1-D"):
        partition.shards(y.reshape(10, 10), 5, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="integer"):
        partition.dirichlet(y + 0.5, 5, 1.0, jax.random.key(0))
    with pytest.raises(ValueError, match="distribution"):
        partition.quantity_skew(100, 5, jax.random.key(0), distribution="zipf")
    with pytest.raises(TypeError, match="typed key"):
        partition.iid(y, 5, jax.random.PRNGKey(0))
