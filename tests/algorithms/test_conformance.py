"""Every algorithm through the same checks, plus the equivalences between them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, losses
from fljax.algorithms import (
    ditto,
    fedavg,
    fedavgm,
    feddyn,
    fednova,
    fedopt,
    fedprox,
    fedrep,
    fedsgd,
    mimelite,
    qffl,
    scaffold,
)
from fljax.data import ClientStates
from tests import helpers


def _local():
    return helpers.local_sgd(batch_size=4, num_epochs=1)


ALGORITHMS = {
    "fedavg": lambda: fedavg.fedavg(_local()),
    "fedavgm": lambda: fedavgm.fedavgm(_local(), server_learning_rate=0.5),
    "fedadam": lambda: fedopt.fedadam(_local(), server_learning_rate=0.05),
    "fedyogi": lambda: fedopt.fedyogi(_local(), server_learning_rate=0.05),
    "fedadagrad": lambda: fedopt.fedadagrad(_local(), server_learning_rate=0.05),
    "fedprox": lambda: fedprox.fedprox(
        fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=0.1, batch_size=4)
    ),
    "fedsgd": lambda: fedsgd.fedsgd(fedsgd.gradient_client(helpers.model()), learning_rate=0.5),
    "scaffold": lambda: scaffold.scaffold(_scaffold_client(), population_size=len(POP_SIZES)),
    "fednova": lambda: fednova.fednova(
        fednova.fednova_client(helpers.model(), 0.1, batch_size=4, momentum=0.5)
    ),
    "qffl": lambda: qffl.qffl(qffl.qffl_client(helpers.model(), 0.1, q=1.0, batch_size=4)),
    "feddyn": lambda: feddyn.feddyn(_feddyn_client(), population_size=len(POP_SIZES)),
    "mimelite": lambda: mimelite.mimelite(
        mimelite.mimelite_client(helpers.model(), optax.sgd(0.1, momentum=0.9), batch_size=4)
    ),
    "ditto": lambda: ditto.ditto(_ditto_client()),
    "fedrep": lambda: fedrep.fedrep(_fedrep_client(), head=fedrep.layers("Dense_1")),
}


def _ditto_client():
    return ditto.ditto_client(helpers.model(), optax.sgd(0.1), lam=0.5, batch_size=4)


def _fedrep_client():
    return fedrep.fedrep_client(
        helpers.model(), optax.sgd(0.1), head=fedrep.layers("Dense_1"), batch_size=4, head_epochs=2
    )


def _scaffold_client():
    return scaffold.scaffold_client(helpers.model(), 0.1, batch_size=4)


def _feddyn_client():
    return feddyn.feddyn_client(helpers.model(), optax.sgd(0.1), alpha=0.1, batch_size=4)


# Algorithms whose clients keep state: their cohorts carry it (fljax.data.ClientStates).
STATEFUL = {
    "scaffold": _scaffold_client,
    "feddyn": _feddyn_client,
    "ditto": _ditto_client,
    "fedrep": _fedrep_client,
}

POP_SIZES = [6, 3, 9, 5]


# optax's Adam-family bias correction mixes its int32 step count with Python
# floats, which jax's strict dtype-promotion mode (tests/conftest.py) rejects;
# those server optimizers run under standard promotion.


@functools.cache
def _jitted(name):
    algo = ALGORITHMS[name]()
    return algo, jax.jit(algo.update)


def _round(algo_or_name, ids, key, rounds=1):
    if isinstance(algo_or_name, str):
        algo, update = _jitted(algo_or_name)
    else:
        algo, update = algo_or_name, jax.jit(algo_or_name.update)
    pop = helpers.population(POP_SIZES)
    states = None
    if algo_or_name in STATEFUL:
        states = ClientStates(STATEFUL[algo_or_name]().init(helpers.params()), pop.num_clients)
    state = algo.init(helpers.params())
    for r in range(rounds):
        cohort = pop.cohort(ids, num_examples=9)
        if states is not None:
            cohort = states.attach(cohort)
        state, metrics = update(state, cohort, jax.random.fold_in(key, r))
        if states is not None:
            state = states.scatter(cohort, state)
    return state, metrics


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_same_key_same_result_different_key_different(name):
    a, _ = _round(name, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    b, _ = _round(name, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    helpers.assert_trees_equal(a.params, b.params)
    if name != "fedsgd":  # full-batch gradients use no randomness
        c, _ = _round(name, [0, 1, 2, 3], jax.random.key(1), rounds=2)
        assert any(
            not np.array_equal(np.asarray(x), np.asarray(y))
            for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params), strict=True)
        )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_padding_slots_change_nothing(name):
    a, _ = _round(name, [0, 2], jax.random.key(0))
    b, _ = _round(name, [0, 2, -1, -1], jax.random.key(0))
    helpers.assert_trees_close(a.params, b.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_metrics_are_finite_scalars_and_round_counts(name):
    state, metrics = _round(name, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    assert int(state.round) == 2
    for k, v in metrics.items():
        assert np.shape(v) == (), k
        assert np.isfinite(float(v)), k


def test_fedprox_with_mu_zero_equals_fedavg():
    a, _ = _round(
        fedprox.fedprox(fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=0.0, batch_size=4)),
        [0, 1, 2],
        jax.random.key(0),
    )
    b, _ = _round(
        fedavg.fedavg(helpers.local_sgd(optimizer=optax.sgd(0.1), batch_size=4, num_epochs=1)),
        [0, 1, 2],
        jax.random.key(0),
    )
    helpers.assert_trees_equal(a.params, b.params)


def test_fedavgm_without_momentum_equals_fedavg():
    a, _ = _round(fedavgm.fedavgm(_local(), server_momentum=0.0), [0, 1, 2], jax.random.key(0))
    b, _ = _round(fedavg.fedavg(_local()), [0, 1, 2], jax.random.key(0))
    helpers.assert_trees_close(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_fedsgd_equals_centralised_gradient_step():
    pop = helpers.population(POP_SIZES)
    lr = 0.5
    algo = fedsgd.fedsgd(fedsgd.gradient_client(helpers.model()), learning_rate=lr)
    state, _ = _round(algo, [0, 1, 2, 3], jax.random.key(0))
    x, y = pop.pooled()
    params = helpers.params()
    g = jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, x), y)))(params)
    expected = jax.tree.map(lambda p, gg: p - lr * gg, params, g)
    helpers.assert_trees_close(state.params, expected)


def test_fedavg_one_client_one_step_equals_optimizer_step():
    pop = helpers.population([4])
    opt = optax.sgd(0.1, momentum=0.9)
    algo = fedavg.fedavg(client.local_sgd(helpers.model(), opt, batch_size=4))
    params = helpers.params()
    state, _ = algo.update(algo.init(params), pop.cohort([0]), jax.random.key(0))
    x, y = pop.pooled()
    g = jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, x), y)))(params)
    updates, _ = opt.update(g, opt.init(params), params)
    helpers.assert_trees_close(state.params, optax.apply_updates(params, updates))


def test_fedprox_rejects_negative_mu():
    with pytest.raises(ValueError, match="mu"):
        fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=-1.0, batch_size=4)


def test_fedprox_client_forwards_every_option():
    """max_steps and weighting reach the client (they used to be dropped)."""
    pop = helpers.population([8])
    params = helpers.params()
    key = jax.random.key(0)
    cohort = pop.cohort([0])
    data = jax.tree.map(lambda a: jnp.asarray(a[0]), cohort.data)
    a = fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=0.1, batch_size=2, weighting="uniform")
    assert float(a(params, data, key).weight) == 1.0
    capped = fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=0.1, batch_size=2, max_steps=1)
    full = fedprox.proximal_client(helpers.model(), optax.sgd(0.1), mu=0.1, batch_size=2)
    assert not np.allclose(
        np.asarray(jax.tree.leaves(capped(params, data, key).delta)[0]),
        np.asarray(jax.tree.leaves(full(params, data, key).delta)[0]),
    )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_shape_and_performance_given_once(name):
    """Every algorithm takes its settings once; with_performance changes nothing but speed."""
    import inspect

    from fljax.base import Performance

    algo = ALGORITHMS[name]()
    assert algo.with_performance is not None
    factory = {
        "fedadam": fedopt.fedadam,
        "fedyogi": fedopt.fedyogi,
        "fedadagrad": fedopt.fedadagrad,
        "fedavg": fedavg.fedavg,
        "fedavgm": fedavgm.fedavgm,
        "fedprox": fedprox.fedprox,
        "fedsgd": fedsgd.fedsgd,
        "scaffold": scaffold.scaffold,
        "fednova": fednova.fednova,
        "qffl": qffl.qffl,
        "feddyn": feddyn.feddyn,
        "mimelite": mimelite.mimelite,
        "ditto": ditto.ditto,
        "fedrep": fedrep.fedrep,
    }[name]
    params = list(inspect.signature(factory).parameters.values())
    assert params[0].name == "client_update"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert params[-1].name == "aggregator" and params[-1].default is None
    assert not {"chunk_size", "mesh", "unroll", "compute_dtype", "performance"} & {p.name for p in params}
    a, _ = _round(name, [0, 1, 2, 3], jax.random.key(0))  # strict dtype promotion, every algorithm
    other = algo.with_performance(Performance(chunk_size=2, unroll=2, accelerate=False))
    if name in STATEFUL:
        return  # its rounds need client states; covered by tests/algorithms/test_scaffold.py
    b, _ = _round(other, [0, 1, 2, 3], jax.random.key(0))
    helpers.assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-6)
