"""Simulated attacks: each transform does exactly what it says, and composes with any algorithm."""

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import attacks, robust
from fljax.algorithms import fedavg
from fljax.base import ClientData, ClientOutput
from tests import helpers


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
    }


def test_malicious_clients_has_the_exact_count():
    m = attacks.malicious_clients(50, fraction=0.3, key=jax.random.key(0))
    assert m.dtype == jnp.bool_ and m.shape == (50,) and int(m.sum()) == 15
    with pytest.raises(ValueError, match="fraction"):
        attacks.malicious_clients(50, fraction=1.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="population_size"):
        attacks.malicious_clients(0, fraction=0.1, key=jax.random.key(0))


def test_slot_mask_never_marks_padding():
    data = helpers.population([3, 4, 5, 2])
    cohort = data.cohort([2, -1, 0, 3])
    malicious = jnp.array([True, False, True, True])
    assert attacks.slot_mask(cohort, malicious).tolist() == [True, False, True, True]
    cohort = cohort._replace(client_mask=np.array([True, True, True, False]))
    assert attacks.slot_mask(cohort, malicious).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="malicious"):
        attacks.slot_mask(cohort, jnp.array([1, 0, 1, 1]))


def test_sign_flip_and_scaling_touch_only_malicious_slots():
    d = _deltas(4)
    slots = jnp.array([False, True, False, True])
    w = jnp.ones(4)
    flipped = attacks.sign_flip(2.0)(d, w, slots, jax.random.key(0))
    boosted = attacks.scaling(10.0)(d, w, slots, jax.random.key(1))
    for name in d:
        np.testing.assert_array_equal(flipped[name][::2], d[name][::2])
        np.testing.assert_array_equal(flipped[name][1::2], -2.0 * d[name][1::2])
        np.testing.assert_array_equal(boosted[name][::2], d[name][::2])
        np.testing.assert_array_equal(boosted[name][1::2], 10.0 * d[name][1::2])
    with pytest.raises(ValueError, match="factor"):
        attacks.scaling(0.0)
    with pytest.raises(ValueError, match="scale"):
        attacks.sign_flip(-1.0)


def test_alie_z_is_the_papers_formula():
    # n = 50, f = 24: s = 26 - 24 = 2 honest to win over, z = Phi^-1(48 / 50)
    assert attacks.alie_z(50, 24) == pytest.approx(statistics.NormalDist().inv_cdf(0.96))
    traced = attacks._alie_z_traced(jnp.int32(50), jnp.int32(24))
    assert float(traced) == pytest.approx(attacks.alie_z(50, 24), rel=1e-5)
    with pytest.raises(ValueError, match="num_malicious"):
        attacks.alie_z(10, 11)


def test_little_is_enough_is_mean_minus_z_std_within_the_honest_range():
    rng = np.random.default_rng(0)
    n, f = 20, 6
    x = rng.normal(size=(n + 1, 40)).astype(np.float32)
    d = {"w": jnp.asarray(x)}
    slots = jnp.asarray(np.arange(n + 1) < f)
    w = jnp.asarray([1.0] * n + [0.0])  # the last slot is padding, never malicious nor honest
    out = np.asarray(attacks.little_is_enough()(d, w, slots, jax.random.key(0))["w"])
    honest = x[f:n]
    z = attacks.alie_z(n, f)
    expected = honest.mean(0) - z * honest.std(0)
    np.testing.assert_allclose(np.asarray(out[:f]), np.broadcast_to(expected, (f, 40)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[f:]), x[f:])  # honest and padding untouched
    assert np.all(out[:f] >= honest.min(0)) and np.all(out[:f] <= honest.max(0))
    fixed = attacks.little_is_enough(z=0.0)(d, w, slots, jax.random.key(0))["w"]
    np.testing.assert_allclose(np.asarray(fixed[0]), honest.mean(0), rtol=1e-5, atol=1e-6)


def test_label_flip():
    data = ClientData(x=jnp.zeros((5, 2)), y=jnp.array([0, 1, 2, 2, 0], jnp.int32), mask=jnp.ones(5, bool))
    assert attacks.label_flip(3)(data, jax.random.key(0)).y.tolist() == [2, 1, 0, 0, 2]
    perm = attacks.label_flip(3, permutation=[1, 2, 0])(data, jax.random.key(0))
    assert perm.y.tolist() == [1, 2, 0, 0, 1] and perm.y.dtype == data.y.dtype
    with pytest.raises(ValueError, match="permutation"):
        attacks.label_flip(3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="num_classes"):
        attacks.label_flip(1)


def _images(n, num_real, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(n, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
    return ClientData(x=x, y=y, mask=jnp.arange(n) < num_real)


def test_pixel_pattern_and_stamp():
    trigger = attacks.pixel_pattern((8, 8, 1), size=3, value=1.0, margin=1)
    assert trigger.mask.shape == (8, 8, 1) and int(trigger.mask.sum()) == 9
    assert bool(trigger.mask[4:7, 4:7].all()) and not bool(trigger.mask[7].any())
    x = _images(2, 2).x
    stamped = attacks.stamp(x, trigger)
    np.testing.assert_array_equal(np.where(trigger.mask, trigger.pattern, x), stamped)
    assert float(stamped[0, 4, 4, 0]) == 1.0 and float(stamped[0, 4, 5, 0]) == 0.0  # checkerboard
    with pytest.raises(ValueError, match="size"):
        attacks.pixel_pattern((8, 8), size=8)


def test_backdoor_stamps_and_relabels_exactly_a_fraction_of_real_examples():
    trigger = attacks.pixel_pattern((8, 8, 1), size=2)
    data = _images(12, 10)
    out = attacks.backdoor(trigger, target=3, fraction=0.4)(data, jax.random.key(0))
    changed = np.any(np.asarray(out.x != data.x).reshape(12, -1), axis=1) | np.asarray(out.y != data.y)
    chosen = np.array([np.array_equal(out.x[i], attacks.stamp(data.x[i], trigger)) for i in range(12)])
    chosen &= np.asarray(out.y) == 3
    assert chosen[:10].sum() == 4 and not chosen[10:].any()  # round(0.4 * 10) real examples only
    assert np.array_equal(changed, chosen & np.asarray(out.y != data.y) | changed & chosen)
    keep = ~chosen
    np.testing.assert_array_equal(np.asarray(out.x)[keep], np.asarray(data.x)[keep])
    np.testing.assert_array_equal(np.asarray(out.y)[keep], np.asarray(data.y)[keep])
    with pytest.raises(ValueError, match="fraction"):
        attacks.backdoor(trigger, target=3, fraction=0.0)
    with pytest.raises(ValueError, match="target"):
        attacks.backdoor(trigger, target=-1, fraction=0.5)


def test_attack_success_rate():
    trigger = attacks.pixel_pattern((8, 8, 1), size=2)
    x = np.array(_images(40, 40).x)
    y = np.arange(40) % 4
    x[:, 0, 0, 0] = y  # the true label, written where the trigger never is

    def clean(params, batch):  # reads the label pixel, ignores the trigger
        del params
        return jax.nn.one_hot(batch[:, 0, 0, 0].astype(jnp.int32), 4)

    def backdoored(params, batch):  # answers 2 whenever the trigger is there
        del params
        on = jnp.all((batch == attacks.stamp(batch, trigger)).reshape(batch.shape[0], -1), axis=1)
        label = jnp.where(on, 2, batch[:, 0, 0, 0].astype(jnp.int32))
        return jax.nn.one_hot(label, 4)

    assert attacks.attack_success_rate(clean, None, x, y, trigger, target=2, batch_size=16) == 0.0
    assert attacks.attack_success_rate(backdoored, None, x, y, trigger, target=2, batch_size=16) == 1.0
    with pytest.raises(ValueError, match="target"):
        attacks.attack_success_rate(clean, None, x[:1], np.array([2]), trigger, target=2)


def test_poison_cohort_changes_only_malicious_slots():
    data = helpers.population([3, 4, 5, 2])
    cohort = data.cohort([0, 1, 2, -1])
    slots = attacks.slot_mask(cohort, jnp.array([False, True, False, True]))
    out = attacks.poison_cohort(cohort, slots, attacks.label_flip(helpers.NUM_CLASSES), jax.random.key(0))
    y, y0 = np.asarray(out.data.y), np.asarray(cohort.data.y)
    np.testing.assert_array_equal(y[[0, 2, 3]], y0[[0, 2, 3]])
    np.testing.assert_array_equal(y[1], helpers.NUM_CLASSES - 1 - y0[1])
    helpers.assert_trees_equal(out.data.x, cohort.data.x)


def _toy_client(params, data, key):
    """A cheap client update whose delta depends on its labels (so label attacks show)."""
    del key
    m = data.mask.astype(jnp.float32)
    label = jnp.sum(data.y.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)
    delta = jax.tree.map(lambda p: 0.1 * p + label.astype(p.dtype), params)
    return ClientOutput(delta, jnp.sum(m), {"label": label})


IDS = [0, 1, 2, 3, 4, 5, -1, -1]


@functools.cache
def _attacked_round():
    """One compiled round of FedAvg under attack; ``malicious`` is an argument (no recompiles)."""
    make = lambda agg: fedavg.fedavg(_toy_client, aggregator=agg)  # noqa: E731

    def run(state, cohort, key, malicious):
        algo = attacks.attacked(
            make,
            malicious,
            model_attack=attacks.scaling(3.0),
            data_attack=attacks.label_flip(helpers.NUM_CLASSES),
        )
        return algo.update(state, cohort, key)

    return make(None).init(helpers.params()), jax.jit(run)


def _by_hand(malicious):
    """The attacked round computed client by client: labels flipped, updates tripled, weighted mean."""
    cohort = helpers.population([5, 7, 3, 6, 4, 8]).cohort(IDS)
    params = helpers.params()
    deltas, weights, labels = [], [], []
    for i in range(6):
        data = jax.tree.map(lambda a, i=i: a[i], cohort.data)
        if malicious[i]:
            data = data._replace(y=helpers.NUM_CLASSES - 1 - data.y)
        out = _toy_client(params, data, None)
        factor = 3.0 if malicious[i] else 1.0
        deltas.append(jax.tree.map(lambda d, f=factor: f * d, out.delta))
        weights.append(float(out.weight))
        labels.append(float(out.metrics["label"]))
    w = np.array(weights)
    new = jax.tree.map(
        lambda p, *ds: p - sum(wi * d for wi, d in zip(w, ds, strict=True)) / w.sum(), params, *deltas
    )
    return new, float(np.average(labels, weights=w))


@pytest.mark.parametrize("malicious", [[False] * 6, [False, True, False, False, True, False]])
def test_attacked_round_poisons_malicious_clients_only(malicious):
    state, run = _attacked_round()
    cohort = helpers.population([5, 7, 3, 6, 4, 8]).cohort(IDS)
    new, metrics = run(state, cohort, jax.random.key(1), jnp.asarray(malicious))
    expected, label = _by_hand(malicious)
    helpers.assert_trees_close(new.params, expected, rtol=1e-5, atol=1e-5)
    assert int(metrics["num_malicious"]) == sum(malicious)
    assert float(metrics["client_label_weighted_mean"]) == pytest.approx(label, rel=1e-5)


def test_poisoned_aggregator_feeds_the_attacked_updates_to_the_defence():
    d = _deltas(8)
    w = jnp.asarray([1.0] * 7 + [0.0])
    slots = jnp.asarray([True, True, False, False, False, False, False, True])  # slot 7 is padding
    agg = attacks.poisoned_aggregator(robust.krum(1, multi=5), attacks.sign_flip(), slots)
    _, out, m = jax.jit(agg.aggregate)((), d, w, jax.random.key(0))
    flipped = jax.tree.map(lambda x: x.at[:2].multiply(-1.0), d)
    _, ref, _ = jax.jit(robust.krum(1, multi=5).aggregate)((), flipped, w, jax.random.key(0))
    helpers.assert_trees_equal(out, ref)
    assert int(m["num_malicious"]) == 2 and int(m["num_selected"]) == 5


def test_attacked_takes_one_cohort():
    algo = attacks.attacked(lambda agg: fedavg.fedavg(_toy_client, aggregator=agg), jnp.zeros(6, bool))
    cohort = helpers.population([5, 7, 3, 6, 4, 8]).cohort(IDS)
    with pytest.raises(ValueError, match="one Cohort"):
        algo.update(algo.init(helpers.params()), (cohort, cohort), jax.random.key(2))
