"""Bucketed rounds equal padded rounds; plans waste little; prefetching."""

import jax
import numpy as np
import optax
import pytest

from fljax import aggregators, client, models, simulation
from fljax.base import Performance
from fljax.data import FederatedData, bucketing

NUM_FEATURES, NUM_CLASSES, BATCH = 5, 3, 4


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
    model = models.MLP(hidden=(8,), num_classes=NUM_CLASSES)
    params = models.init_params(model, (NUM_FEATURES,), jax.random.key(0))
    update = client.local_sgd(model, optax.sgd(0.1, momentum=0.9), batch_size=BATCH, num_epochs=1)
    return params, update


SIZES = [1, 3, 4, 5, 9, 13, 2, 40, 7, 6, 17, 3]


def test_bucketed_round_equals_padded_round():
    data = _population(SIZES)
    params, update = _setup()
    ids = np.array([0, 1, 2, 3, 4, 5, 7, 8, 10, 11, -1], np.int32)
    mask = ids >= 0
    padded = simulation.averaging_algorithm(update, optax.sgd(1.0))
    plan = bucketing.plan(data.sizes, BATCH, num_buckets=2)
    assert len(plan.lengths) == 2 and plan.lengths[-1] == 40
    cohorts = bucketing.split(data, ids, mask, plan, slots=4)
    assert sorted(int(i) for c in cohorts for i in c.client_ids if i >= 0) == sorted(ids[mask].tolist())
    key = jax.random.key(1)
    ref_state, ref_metrics = jax.jit(padded.update)(
        padded.init(params), data.cohort(ids, client_mask=mask), key
    )
    for agg in (None, aggregators.weighted_mean()):  # streamed sums, and concatenated outputs
        bucketed = simulation.averaging_algorithm(
            update, optax.sgd(1.0), aggregator=agg, performance=Performance(chunk_size=2)
        )
        state, metrics = bucketed.update(bucketed.init(params), tuple(cohorts), key)
        _check(state, metrics, ref_state, ref_metrics)
    assert bucketing.padding_fraction(cohorts, BATCH) < bucketing.padding_fraction([data.cohort(ids)], BATCH)

    # The same round as ONE jitted computation: calls merged per bucket length.
    merged = bucketing.merge(cohorts)
    assert [c.data.mask.shape[1] for c in merged] == sorted({c.data.mask.shape[1] for c in cohorts})
    assert sum(c.client_ids.shape[0] for c in merged) == sum(c.client_ids.shape[0] for c in cohorts)
    for agg in (None, aggregators.weighted_mean()):
        bucketed = simulation.averaging_algorithm(
            update, optax.sgd(1.0), aggregator=agg, performance=Performance(chunk_size=4)
        )
        state, metrics = jax.jit(bucketed.update)(bucketed.init(params), tuple(merged), key)
        _check(state, metrics, ref_state, ref_metrics)
    with pytest.raises(ValueError, match="no bucket"):
        bucketing.merge([])


def _check(state, metrics, ref_state, ref_metrics):
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        metrics["client_train_loss_weighted_mean"], ref_metrics["client_train_loss_weighted_mean"], rtol=1e-5
    )
    np.testing.assert_allclose(metrics["total_weight"], ref_metrics["total_weight"])
    assert int(state.round) == 1


def test_plan_is_optimal_on_small_cases():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, 40)
    steps = bucketing.num_steps(sizes, 5)

    def waste(lengths):
        bounds = np.array(lengths) // 5
        return int(bounds[np.searchsorted(bounds, steps)].sum() - steps.sum())

    values = np.unique(steps)
    best = min(waste([a * 5, b * 5, values[-1] * 5]) for a in values for b in values if a < b < values[-1])
    plan = bucketing.plan(sizes, 5, num_buckets=3)
    assert waste(plan.lengths) == best
    assert bucketing.plan(sizes, 5, num_buckets=1).lengths == (int(values[-1]) * 5,)
    assert bucketing.plan(sizes, 5, num_buckets=10, max_steps=4).lengths[-1] == 20


def test_heavy_tail_padding_under_ten_percent():
    rng = np.random.default_rng(0)
    sizes = np.clip(np.round(np.exp(rng.normal(np.log(100), 0.62, 5000))), 1, 1000).astype(np.int64)
    plan = bucketing.plan(sizes, 20)
    ids = np.sort(rng.choice(len(sizes), 500, replace=False))
    placed = bucketing.assign(sizes[ids], ids, plan, slots=8)
    computed = sum(len(slots) * (length // 20) for length, slots in placed)
    real = bucketing.num_steps(sizes[ids], 20).sum()
    assert 1 - real / computed < 0.10
    assert bucketing.naive_padding_fraction(sizes[ids], 20, sizes.max()) > 0.5
    assert len({length for length, _ in placed}) <= 12  # one compiled shape per length
    assert all(len(call) == 8 for _, call in placed)


def test_capacity_ladder():
    assert [bucketing.capacity(n) for n in (0, 1, 16, 17, 33, 1000)] == [0, 1, 16, 18, 36, 1024]
    assert bucketing.capacity(300, chunk_size=128) == 384
    caps = {bucketing.capacity(n) for n in range(1, 5000)}
    assert len(caps) < 16 + 8 * 9  # a bounded number of compiled shapes


def test_assign_rejects_clients_beyond_plan():
    plan = bucketing.Plan(lengths=(4, 8), batch_size=4)
    with pytest.raises(ValueError, match="steps"):
        bucketing.assign(np.array([3, 20]), np.array([0, 1]), plan)
