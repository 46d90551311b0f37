"""fljax.data.disk: populations written by streaming, read back equal to FederatedData's."""

import tracemalloc

import jax
import numpy as np
import optax
import pytest

from fljax import client, models
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.data import bucketing, disk, prefetch, sampling
from tests import helpers

SIZES = np.random.default_rng(0).integers(1, 40, 300)


@pytest.fixture(scope="module")
def populations(tmp_path_factory):
    """The same 300 clients in memory and on disk (written in uneven chunks)."""
    mem = helpers.population(SIZES)
    path = tmp_path_factory.mktemp("pop")
    with disk.PopulationWriter(path, num_classes=helpers.NUM_CLASSES) as w:
        for lo, hi in [(0, 1), (1, 77), (77, 78), (78, 300)]:
            s, e = mem.offsets[lo], mem.offsets[hi]
            w.add_many(mem.x[s:e], mem.y[s:e], mem.sizes[lo:hi])
    return mem, disk.DiskPopulation.open(path)


def assert_cohorts_equal(a, b):
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert leaf_a.dtype == leaf_b.dtype
        np.testing.assert_array_equal(leaf_a, leaf_b)


def test_written_population_reads_back_equal(populations):
    mem, pop = populations
    assert pop.num_clients == 300 and pop.num_classes == helpers.NUM_CLASSES
    np.testing.assert_array_equal(pop.offsets, mem.offsets)
    np.testing.assert_array_equal(pop.x, mem.x)  # the files are ordinary .npy files
    np.testing.assert_array_equal(np.load(pop.path / "y.npy"), mem.y)
    for c in (0, 150, 299):
        for got, want in zip(pop.client(c), mem.client(c), strict=True):
            np.testing.assert_array_equal(got, want)
    sub = pop.subset([5, 2])
    np.testing.assert_array_equal(sub.x, np.concatenate([mem.client(5)[0], mem.client(2)[0]]))


def test_cohorts_equal_federated_data_cohorts(populations):
    mem, pop = populations
    run_key = fl_random.run_key(0)
    data_key = fl_random.stream(run_key, "data")
    for r in range(3):
        key = fl_random.stream(fl_random.round_key(run_key, r), "sample")
        ids, mask = sampling.poisson(key, mem.num_clients, 0.05, max_cohort=40)  # with -1 slots
        ids[0] = 7
        mask = mask.copy()
        mask[1] = False  # a masked real client
        assert_cohorts_equal(pop.cohort(ids, client_mask=mask), mem.cohort(ids, client_mask=mask))
        # clients larger than num_examples keep the subset drawn from the key and their id
        assert_cohorts_equal(
            pop.cohort(ids, num_examples=9, key=data_key), mem.cohort(ids, num_examples=9, key=data_key)
        )


def test_bucketing_prefetch_and_the_round_run_unchanged(populations):
    mem, pop = populations
    plan = bucketing.plan(mem.sizes, 8, num_buckets=3)
    ids, mask = sampling.uniform(jax.random.key(1), mem.num_clients, 24)
    want = bucketing.split(mem, ids, mask, plan, slots=8)
    got = list(prefetch.prefetch(lambda r: bucketing.split(pop, ids, mask, plan, slots=8), range(1)))[0]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert isinstance(a.data.x, jax.Array)
        assert_cohorts_equal(jax.device_get(a), b)
    model = models.LogisticRegression(num_classes=helpers.NUM_CLASSES)
    algo = fedavg.fedavg(client.local_sgd(model, optax.sgd(0.1), batch_size=8))
    state = algo.init(models.init_params(model, (helpers.NUM_FEATURES,), jax.random.key(2)))
    step = jax.jit(algo.update)
    cohort_ids = ids[:8]
    a, _ = step(state, pop.cohort(cohort_ids), jax.random.key(3))
    b, _ = step(state, mem.cohort(cohort_ids), jax.random.key(3))
    for leaf_a, leaf_b in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(leaf_a, leaf_b)


def test_one_at_a_time_and_chunked_writes_make_the_same_files(populations, tmp_path):
    mem, pop = populations
    other = disk.write(
        tmp_path, (mem.client(c) for c in range(mem.num_clients)), num_classes=helpers.NUM_CLASSES
    )
    for name in ("x.npy", "y.npy", "offsets.npy"):
        assert (other.path / name).read_bytes() == (pop.path / name).read_bytes()


def test_streaming_writer_memory_does_not_grow_with_the_population(tmp_path):
    # Clients are made one at a time; the writer keeps only their sizes (8 bytes each).
    # 400 clients of 4 KB (1.6 MB in all): holding them would take the peak past 1.6 MB,
    # while one client, the file buffers and the sizes array stay under 0.2 MB.
    rng = np.random.default_rng(0)

    def clients():
        for _ in range(400):
            yield rng.normal(size=(16, 64)).astype(np.float32), rng.integers(0, 10, 16).astype(np.int32)

    tracemalloc.start()
    try:
        with disk.PopulationWriter(tmp_path, num_classes=10) as w:
            for x, y in clients():
                w.add(x, y)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = 400 * 16 * (64 * 4 + 4)
    assert w.num_examples * (64 * 4 + 4) == total
    assert peak < 0.2e6 < total / 8, peak


def test_bad_input_raises_clear_errors(tmp_path):
    x, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int32)
    with disk.PopulationWriter(tmp_path / "a", num_classes=4) as w:
        w.add(x, y)
        with pytest.raises(ValueError, match="3 examples but y has 2"):
            w.add(x, y[:2])
        with pytest.raises(ValueError, match="dtype float64 and example shape"):
            w.add(x.astype(np.float64), y)
        with pytest.raises(ValueError, match=r"example shape \(5,\)"):
            w.add(np.zeros((3, 5), np.float32), y)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            w.add(x, y + 4)
        with pytest.raises(ValueError, match="client 1: x contains NaN"):
            w.add(np.full((3, 2), np.nan, np.float32), y)
        with pytest.raises(ValueError, match="client 1 has no examples"):
            w.add(x[:0], y[:0])
        with pytest.raises(ValueError, match="must be >= 0 and sum to 3"):
            w.add_many(x, y, [1, 1])
    pop = disk.DiskPopulation.open(tmp_path / "a")
    assert pop.num_clients == 1  # rejected clients left nothing behind
    with pytest.raises(ValueError, match="already holds a population"):
        disk.PopulationWriter(tmp_path / "a")
    with pytest.raises(ValueError, match=r"client ids must lie in \[-1, 1\)"):
        pop.cohort([1])
    with pytest.raises(ValueError, match="pass key="):
        pop.cohort([0], num_examples=2)
    with pytest.raises(ValueError, match="no clients given"):
        disk.write(tmp_path / "b", [])
    # an exception while writing deletes the partial files: no half population is left
    with pytest.raises(RuntimeError), disk.PopulationWriter(tmp_path / "c") as w:
        w.add(x, y)
        raise RuntimeError("interrupted")
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(ValueError, match="no finished population"):
        disk.DiskPopulation.open(tmp_path / "c")
    disk.write(tmp_path / "a", [(x, y), (x, y)], overwrite=True)
    assert disk.DiskPopulation.open(tmp_path / "a").num_clients == 2
