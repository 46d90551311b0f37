"""Stragglers with a deadline: exact equivalences with the plain client updates."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import heterogeneity
from fljax import random as fl_random
from fljax.algorithms import fedavg, fednova
from tests import helpers

POP_SIZES = [6, 3, 9, 5]
LR = 0.1


def _one_client(n=12, seed=0):
    pop = helpers.population([n], seed=seed)
    return jax.tree.map(lambda a: jnp.asarray(a[0]), pop.cohort([0]).data)


@functools.cache
def _jitted_round(profile):
    local = helpers.local_sgd(batch_size=4, num_epochs=1)
    algo = fedavg.fedavg(local if profile is None else heterogeneity.with_deadline(local, profile))
    return algo, jax.jit(algo.update)


FINITE = heterogeneity.SystemProfile(deadline=1.5, speed_spread=0.8, min_steps=1)


def test_infinite_deadline_equals_plain_fedavg_exactly():
    pop = helpers.population(POP_SIZES)
    cohort = pop.cohort([0, 1, 2, 3], num_examples=9)
    results = []
    for profile in (None, heterogeneity.SystemProfile(speed_spread=1.0)):
        algo, update = _jitted_round(profile)
        state, metrics = update(algo.init(helpers.params()), cohort, jax.random.key(0))
        results.append(state.params)
    helpers.assert_trees_equal(results[0], results[1])
    assert float(metrics["client_step_budget_weighted_mean"]) == heterogeneity.MAX_BUDGET


def test_budget_b_takes_exactly_b_steps_as_max_steps_b():
    data = _one_client(12)  # 3 minibatches of 4
    params = helpers.params()
    key = jax.random.key(7)
    budget = 2
    profile = heterogeneity.SystemProfile(deadline=float(budget), step_time=1.0)
    plain = helpers.local_sgd(batch_size=4, num_epochs=1)
    capped = helpers.local_sgd(batch_size=4, num_epochs=1, max_steps=budget)
    out = heterogeneity.with_deadline(plain, profile)(params, data, key)
    ref = capped(params, data, jax.random.clone(key))
    assert float(out.metrics["num_steps"]) == budget == float(ref.metrics["num_steps"])
    helpers.assert_trees_equal(out.delta, ref.delta)
    assert float(out.weight) == float(ref.weight) == 12.0


def test_random_budgets_are_the_steps_taken_across_epochs():
    """Budgets drawn from the client keys cap the real steps over all epochs (3 per epoch here)."""
    data = _one_client(10)
    params = helpers.params()
    profile = heterogeneity.SystemProfile(deadline=4.0, speed_spread=0.7)
    update = heterogeneity.with_deadline(helpers.local_sgd(batch_size=4, num_epochs=2), profile)

    @jax.jit
    def run(key):
        keys = jax.random.split(key, 16)
        budgets = jax.vmap(lambda k: heterogeneity.work_budget(profile, k))(keys)
        return budgets, jax.vmap(lambda k: update(params, data, k))(jax.random.clone(keys))

    budgets, outs = run(jax.random.key(3))
    budgets = np.asarray(budgets)
    np.testing.assert_array_equal(outs.metrics["num_steps"], np.minimum(budgets, 6))
    np.testing.assert_array_equal(outs.metrics["step_budget"], budgets.astype(np.float32))
    for leaf in jax.tree.leaves(outs.delta):  # zero-step clients send an exactly zero delta
        assert np.all(np.asarray(leaf)[budgets == 0] == 0)


def test_stragglers_are_dropped_counted_and_compile_once():
    """Clients below min_steps get weight 0; deadline_metrics counts them; one compilation."""
    pop = helpers.population(POP_SIZES)
    algo, update = _jitted_round(FINITE)
    metrics_fn = jax.jit(lambda c, k: heterogeneity.deadline_metrics(FINITE, c, k))
    state = algo.init(helpers.params())
    for r in range(3):
        cohort = pop.cohort([r, r + 1, -1], num_examples=9)
        key = jax.random.key(r)
        state, metrics = update(state, cohort, key)
        m = metrics_fn(cohort, key)
        keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
        budgets = np.asarray(jax.vmap(lambda k: heterogeneity.work_budget(FINITE, k))(keys))[:2]
        assert int(m["num_dropped"]) == int(np.sum(budgets < 1))
        assert float(m["mean_step_budget"]) == pytest.approx(budgets.mean())
        assert int(metrics["num_clients"]) == 2 - int(m["num_dropped"])
        assert np.isfinite(float(metrics["client_train_loss_weighted_mean"]))
    assert update._cache_size() == 1


def test_fednova_with_deadline_is_the_normalized_average():
    """x - tau_eff * sum_i p_i delta_i / tau_i, each delta_i from local SGD capped at its budget."""
    pop = helpers.population([12, 16])
    profile = heterogeneity.SystemProfile(deadline=2.5, speed_spread=0.6, min_steps=1)
    nova_client = fednova.fednova_client(helpers.model(), LR, batch_size=4)
    algo = fednova.fednova(heterogeneity.with_deadline(nova_client, profile))
    params = helpers.params()
    cohort = pop.cohort([0, 1], num_examples=16)
    key = jax.random.key(5)
    state, metrics = jax.jit(algo.update)(algo.init(params), cohort, key)

    def client_key(i):  # as fljax.simulation.run_clients derives it (fresh for the key-reuse checker)
        return fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)[i]

    expected_sum, p_sum, tau_sum = None, 0.0, 0.0
    for i in range(2):
        b = int(heterogeneity.work_budget(profile, client_key(i)))
        if b < 1:
            continue
        data = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), cohort.data)
        local = helpers.local_sgd(optimizer=optax.sgd(LR), batch_size=4, num_epochs=1, max_steps=b)
        out = local(params, data, client_key(i))
        tau, p = float(out.metrics["num_steps"]), float(out.weight)
        term = jax.tree.map(lambda d, p=p, tau=tau: p * d / tau, out.delta)
        expected_sum = term if expected_sum is None else jax.tree.map(jnp.add, expected_sum, term)
        p_sum, tau_sum = p_sum + p, tau_sum + p * tau
    if expected_sum is None:  # every client dropped: nothing moves
        helpers.assert_trees_equal(state.params, params)
        return
    tau_eff = tau_sum / p_sum
    expected = jax.tree.map(lambda x, s: x - tau_eff * s / p_sum, params, expected_sum)
    assert float(metrics["tau_eff"]) == pytest.approx(tau_eff, rel=1e-6)
    helpers.assert_trees_close(state.params, expected, rtol=1e-5, atol=1e-6)


def test_uniform_speeds_stay_in_their_range():
    profile = heterogeneity.SystemProfile(speed_distribution="uniform", speed_spread=0.5)
    speeds = jax.vmap(lambda k: heterogeneity.speed(profile, k))(jax.random.split(jax.random.key(0), 256))
    assert float(speeds.min()) >= 0.5 and float(speeds.max()) <= 1.5
    assert float(speeds.std()) > 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(deadline=0.0), "deadline"),
        (dict(step_time=math.inf), "step_time"),
        (dict(speed_spread=-1.0), "speed_spread"),
        (dict(speed_distribution="uniform", speed_spread=1.0), "speed_spread"),
        (dict(speed_distribution="pareto"), "speed_distribution"),
        (dict(min_steps=-1), "min_steps"),
    ],
)
def test_bad_profiles_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        heterogeneity.SystemProfile(**kwargs)


def test_updates_without_a_step_budget_are_rejected():
    def plain(server_params, data, key):
        return helpers.local_sgd()(server_params, data, key)

    update = heterogeneity.with_deadline(plain, heterogeneity.SystemProfile(deadline=1.0))
    with pytest.raises(ValueError, match="step_budget"):
        update(helpers.params(), _one_client(4), jax.random.key(0))
    with pytest.raises(ValueError, match="profile"):
        heterogeneity.with_deadline(helpers.local_sgd(), None)
