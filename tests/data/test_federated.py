import jax
import numpy as np
import pytest

from fljax import random
from fljax.data import FederatedData, sampling
from tests import helpers


def test_cohort_shapes_masks_and_padding_slots():
    pop = helpers.population([3, 5, 2])
    c = pop.cohort([2, -1, 0], num_examples=5)
    assert c.data.x.shape == (3, 5, helpers.NUM_FEATURES)
    np.testing.assert_array_equal(c.data.mask.sum(axis=1), [2, 0, 3])
    np.testing.assert_array_equal(c.client_mask, [True, False, True])
    np.testing.assert_array_equal(c.client_ids, [2, -1, 0])
    x2, _ = pop.client(2)
    np.testing.assert_array_equal(c.data.x[0, :2], x2)
    assert np.all(c.data.x[1] == 0)


def test_cohort_default_pads_to_largest_client():
    pop = helpers.population([3, 7])
    assert pop.cohort([0]).data.mask.shape == (1, 7)


def test_oversized_client_subset_follows_the_key_not_the_id_alone():
    pop = helpers.population([10])
    key = random.stream(random.run_key(0), "data")
    a = pop.cohort([0], num_examples=4, key=key)
    b = pop.cohort([0], num_examples=4, key=key)
    assert a.data.mask.sum() == 4
    np.testing.assert_array_equal(a.data.x, b.data.x)
    subsets = {
        tuple(
            np.asarray(
                pop.cohort([0], num_examples=4, key=random.stream(random.run_key(s), "data")).data.x
            ).ravel()
        )
        for s in range(6)
    }
    assert len(subsets) > 1  # other seeds draw other subsets
    with pytest.raises(ValueError, match="pass key="):
        pop.cohort([0], num_examples=4)


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="has 4 examples but y has 3"):
        FederatedData.from_clients([(x, np.zeros(3, np.int32))])
    with pytest.raises(ValueError, match="no examples"):
        FederatedData.from_clients([(x, np.zeros(4, np.int32)), (x[:0], np.zeros(0, np.int32))])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        FederatedData.from_clients([(x, np.array([0, 1, 2, 3]))], num_classes=3)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        FederatedData.from_clients([(bad, np.zeros(4, np.int32))])
    pop = helpers.population([3])
    with pytest.raises(ValueError, match="client ids"):
        pop.cohort([1])


def test_subset_and_pooled():
    pop = helpers.population([3, 5, 2])
    sub = pop.subset([2, 0])
    np.testing.assert_array_equal(sub.sizes, [2, 3])
    np.testing.assert_array_equal(sub.client(1)[0], pop.client(0)[0])
    assert pop.pooled()[0].shape[0] == 10


def test_uniform_sampling_distinct_and_keyed():
    a, m = sampling.uniform(jax.random.key(0), 100, 10)
    b, _ = sampling.uniform(jax.random.key(0), 100, 10)
    c, _ = sampling.uniform(jax.random.key(1), 100, 10)
    assert len(set(a.tolist())) == 10 and m.all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.uniform(jax.random.key(0), 5, 6)


def test_poisson_sampling_rate_and_padding():
    counts = []
    for s in range(200):
        ids, mask = sampling.poisson(jax.random.key(s), 1000, 0.05)
        assert ids.shape == (sampling.poisson_max_cohort(1000, 0.05),)
        np.testing.assert_array_equal(mask, ids >= 0)
        counts.append(mask.sum())
    # mean 50, sd ~6.9: the average of 200 draws is within 2 (> 4 standard errors)
    assert abs(np.mean(counts) - 50) < 2.0
    with pytest.raises(ValueError, match="capacity"):
        sampling.poisson(jax.random.key(0), 1000, 0.5, max_cohort=10)
