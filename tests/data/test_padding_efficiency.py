"""No wasted slots: Poisson cohorts in capacity ladders, bucketed rounds in bounded shapes."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from scipy import stats

from fljax import client, experiment, models, privacy, simulation
from fljax.base import Performance
from fljax.data import FederatedData, bucketing, sampling
from fljax.experiment import trainer

NUM_FEATURES, NUM_CLASSES, BATCH = 5, 3, 4


def _slots_per_sampled(num_clients: int, q: float, capacities) -> float:
    """E[slots] / E[sampled], exactly, for a Binomial(num_clients, q) cohort size."""
    ladder = np.asarray(capacities)
    k = np.arange(ladder[-1] + 1)
    slots = ladder[np.searchsorted(ladder, k)]  # the smallest capacity >= k
    return float(np.sum(stats.binom.pmf(k, num_clients, q) * slots) / (num_clients * q))


@pytest.mark.parametrize("expected", [10, 100, 1000])
@pytest.mark.parametrize("num_clients", [3_000, 1_000_000])
def test_expected_slots_within_1_3_of_sampled(expected, num_clients):
    q = expected / num_clients
    ladder = sampling.poisson_capacities(num_clients, q)
    chernoff = sampling.poisson_max_cohort(num_clients, q)
    assert ladder[-1] == chernoff  # the largest capacity is today's: no draw it held fails now
    assert all(b <= max(a + 1, 1.3 * a) for a, b in zip(ladder, ladder[1:], strict=False))
    assert stats.binom.sf(chernoff, num_clients, q) < 1e-9  # the ladder covers the draws
    ratio = _slots_per_sampled(num_clients, q, ladder)
    assert 1.0 <= ratio <= 1.3
    # The single Chernoff capacity wastes far more at small cohorts (3.9x at 10, 1.7x at 100).
    single = _slots_per_sampled(num_clients, q, [chernoff])
    assert single == pytest.approx(chernoff / expected)
    assert single > 1.15 and ratio < single
    assert len(ladder) <= 16  # the bound on compiled round shapes


def test_sampled_ids_are_unchanged():
    n, q = 500, 0.04
    ladder = sampling.poisson_capacities(n, q)
    seen = set()
    for i in range(40):
        old_ids, old_mask = sampling.poisson(jax.random.key(i), n, q)
        ids, mask = sampling.poisson(jax.random.key(i), n, q, capacities=ladder)  # the same key
        np.testing.assert_array_equal(ids[mask], old_ids[old_mask])
        assert len(ids) in ladder and not np.any(ids[~mask] >= 0)
        smaller = [c for c in ladder if c < len(ids)]
        assert not smaller or smaller[-1] < mask.sum()  # the smallest capacity that holds the draw
        again = sampling.to_capacity(old_ids, old_mask, ladder)
        np.testing.assert_array_equal(again[0], ids)
        seen.add(len(ids))
    assert len(seen) > 1
    with pytest.raises(ValueError, match="exceed the largest capacity"):
        sampling.to_capacity(np.arange(8), np.ones(8, bool), (2, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        sampling.to_capacity(np.arange(2), np.ones(2, bool), (4, 4))
    with pytest.raises(ValueError, match="growth"):
        sampling.geometric_ladder(1, 10, growth=1.0)
    with pytest.raises(ValueError, match="cohort capacity"):
        sampling.poisson(jax.random.key(0), 100, 0.5, capacities=(1, 2))


def _population(sizes, seed=0):
    rng = np.random.default_rng(seed)
    clients = [
        (
            rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        )
        for n in sizes
    ]
    return FederatedData.from_clients(clients, num_classes=NUM_CLASSES)


def _setup():
    """A model and a client update that compile fast (one full-batch gradient, no local scan):
    these tests count and compare shapes; local training's padding is tests/data/test_bucketing.py's."""
    model = models.LogisticRegression(num_classes=NUM_CLASSES)
    params = models.init_params(model, (NUM_FEATURES,), jax.random.key(0))
    return params, client.local_gradient(model)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_round_at_ladder_capacity_equals_round_at_chernoff_capacity():
    data = _population(np.full(200, 6))
    params, update = _setup()
    dp = privacy.DPConfig(clip_norm=0.5, noise_multiplier=1.0, population_size=200, cohort_size=6)
    ladder = sampling.poisson_capacities(200, 6 / 200)
    for agg in (privacy.dp(dp),):  # the streaming mean's padding: the bucketed test below
        algo = simulation.averaging_algorithm(update, optax.sgd(1.0), aggregator=agg)
        step = jax.jit(algo.update)
        ids, mask = privacy.sample_cohort(dp, jax.random.key(10))
        small = sampling.to_capacity(ids, mask, ladder)
        assert len(small[0]) < len(ids) == ladder[-1]
        ref, ref_m = step(algo.init(params), data.cohort(ids, client_mask=mask), jax.random.key(1))
        out, m = step(algo.init(params), data.cohort(small[0], client_mask=small[1]), jax.random.key(1))
        _close(out, ref)
        assert float(m["num_clients"]) == float(ref_m["num_clients"]) == mask.sum() > 0


def test_bucketed_rounds_compile_a_bounded_set_of_shapes():
    rng = np.random.default_rng(0)
    sizes = np.clip(np.round(np.exp(rng.normal(np.log(6), 0.9, 300))), 1, 80).astype(np.int64)
    data = _population(sizes)
    assert bucketing.heavy_tailed(data.sizes, BATCH)
    params, update = _setup()
    traced = []

    def counted(p, d, k):  # traced once per compiled bucket shape (one vmap, no chunks)
        traced.append(d.mask.shape)
        return update(p, d, k)

    q = 0.06
    plan = bucketing.plan(data.sizes, BATCH, num_buckets=2)
    caps = bucketing.count_capacities(sampling.poisson_max_cohort(300, q))
    bound = bucketing.max_shapes(plan, caps)
    algo = simulation.averaging_algorithm(counted, optax.sgd(1.0), performance=Performance(chunk_size=None))
    state = algo.init(params)
    shapes, bucket_shapes = set(), set()
    for r in range(10):
        ids, mask = sampling.poisson(jax.random.key(r), 300, q)
        cohorts = bucketing.gather(data, ids, mask, plan, capacities=caps)
        shapes.add(tuple(c.data.mask.shape for c in cohorts))
        bucket_shapes.update(c.data.mask.shape for c in cohorts)
        got = sorted(int(i) for c in cohorts for i in c.client_ids if i >= 0)
        assert got == ids[mask].tolist()
        assert all(c.client_ids.shape[0] in caps and c.data.mask.shape[1] in plan.lengths for c in cohorts)
        new, _ = algo.update(state, tuple(cohorts), jax.random.key(100 + r))
        if r == 0:  # the bucketed round is the round padded to the largest client
            padded = simulation.averaging_algorithm(update, optax.sgd(1.0))
            cohort = data.cohort(ids, client_mask=mask)
            ref, _ = jax.jit(padded.update)(state, cohort, jax.random.key(100 + r))
            _close(new, ref)
        state = new
    # Most rounds bring a new combination of bucket counts (a compile each under one outer jit) ...
    assert len(shapes) > len(bucket_shapes) / 2
    # ... but the per-bucket calls compiled each [capacity, length] shape once, within the bound.
    assert len(traced) == len(bucket_shapes) <= bound == len(plan.lengths) * len(caps)
    print(f"{len(shapes)} round shapes, {len(traced)} bucket compiles, bound {bound}")


def test_heavy_tailed_and_count_capacities():
    assert bucketing.heavy_tailed(np.array([4, 4, 4, 16]), 4)  # 4 steps against a median of 1
    assert not bucketing.heavy_tailed(np.array([4, 8, 8, 12]), 4)
    assert bucketing.heavy_tailed(np.array([4, 8, 8, 12]), 4, ratio=1.5)
    for n, chunk, multiple in [(1, None, 1), (37, None, 1), (500, 8, 1), (500, 16, 2), (999, None, 4)]:
        caps = bucketing.count_capacities(n, chunk_size=chunk, multiple=multiple)
        assert caps[-1] >= n and list(caps) == sorted(set(caps))
        assert all(c % multiple == 0 for c in caps)
        assert chunk is None or all(c % chunk == 0 for c in caps if c > chunk)
    with pytest.raises(ValueError, match="multiple"):
        bucketing.count_capacities(10, chunk_size=3, multiple=2)
    with pytest.raises(ValueError, match="strictly increasing"):
        bucketing.gather(_population([1, 2]), np.arange(2), None, bucketing.Plan((4,), 4), capacities=())


BASE = experiment.Config(
    model=experiment.Model(name="logistic"),
    client=experiment.Client(learning_rate=0.1, batch_size=BATCH),
    server=experiment.Server(algorithm="fedsgd", learning_rate=0.5),
    cohort=experiment.Cohort(sampling="poisson", q=0.2),
    rounds=2,
    checkpoint_every=0,
    devices=1,
    cohort_layout="compact",
)


def test_trainer_pads_to_ladders_and_buckets_heavy_tails(monkeypatch):
    heavy = _population([1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 8, 60] * 3)
    even = _population(np.full(36, 8))
    dp = dataclasses.replace(
        BASE, dp=experiment.DP(clip_norm=1.0, noise_multiplier=0.5, cohort_size=7, reproducible=True)
    )
    layout = trainer.cohort_layout(dp, experiment.config.dp_config(dp, 36), heavy, stateful=False)
    assert layout.capacities == sampling.poisson_capacities(36, 7 / 36) and layout.plan is not None
    layout = trainer.cohort_layout(BASE, None, even, stateful=False)
    assert layout.capacities == sampling.poisson_capacities(36, 0.2) and layout.plan is None
    scaffold = dataclasses.replace(BASE, server=experiment.Server(algorithm="scaffold", learning_rate=1.0))
    assert trainer.cohort_layout(scaffold, None, heavy, stateful=True).plan is None
    padded_default = dataclasses.replace(dp, cohort_layout="padded")
    assert trainer.cohort_layout(padded_default, None, heavy, stateful=False) == trainer.CohortLayout()

    model = trainer.build_model(BASE.model, NUM_CLASSES)
    bucketed = trainer.train(dp, heavy, model, progress=False)
    with monkeypatch.context() as m:  # the padded round: every slot to the Chernoff capacity
        m.setattr(trainer, "cohort_layout", lambda *a, **k: trainer.CohortLayout())
        padded = trainer.train(dp, heavy, model, progress=False)
    _close(bucketed.state, padded.state)
    assert [r["round"] for r in bucketed.records] == [1, 2]
    assert bucketed.privacy["epsilon"] == padded.privacy["epsilon"]


def test_auto_layout_buckets_heavy_tails_from_32_clients_and_never_uses_a_ladder():
    assert experiment.Config().cohort_layout == "auto"
    heavy = _population([1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 8, 60] * 4)  # 48 clients
    auto = dataclasses.replace(BASE, cohort_layout="auto")
    for size, bucketed in ((trainer.BUCKET_MIN_CLIENTS - 1, False), (trainer.BUCKET_MIN_CLIENTS, True)):
        config = dataclasses.replace(auto, cohort=experiment.Cohort(sampling="uniform", size=size))
        assert trainer.round_clients(config, None, 48) == size
        layout = trainer.cohort_layout(config, None, heavy, stateful=False)
        assert (layout.plan is not None) == bucketed and layout.capacities is None
    # Poisson: the expected cohort decides (not its Chernoff capacity); never a ladder, since
    # the padded round skips its chunks of padding slots in one shape
    for q, bucketed in ((0.2, False), (0.7, True)):
        config = dataclasses.replace(auto, cohort=experiment.Cohort(sampling="poisson", q=q))
        assert trainer.round_clients(config, None, 48) == pytest.approx(48 * q)
        layout = trainer.cohort_layout(config, None, heavy, stateful=False)
        assert (layout.plan is not None) == bucketed and layout.capacities is None
    even = _population(np.full(48, 8))
    assert trainer.cohort_layout(auto, None, even, stateful=False) == trainer.CohortLayout()
    dp = dataclasses.replace(
        auto, dp=experiment.DP(clip_norm=1.0, noise_multiplier=0.5, cohort_size=40, reproducible=True)
    )
    dp_config = experiment.config.dp_config(dp, 48)
    assert trainer.round_clients(dp, dp_config, 48) == 40
    assert trainer.cohort_layout(dp, dp_config, heavy, stateful=False).plan is not None
