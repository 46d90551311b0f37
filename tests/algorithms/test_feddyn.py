"""FedDyn: dynamic regularization removes the client drift that biases FedAvg."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, random
from fljax.algorithms import fedavg, feddyn
from fljax.base import Performance
from fljax.data import ClientStates, FederatedData, sampling
from tests import helpers

DIM = 4
TEMPLATE = {"w": jnp.zeros((DIM,), jnp.float32)}


def linear(params, x):
    return x @ params["w"]


def squared(pred, y):
    return 0.5 * jnp.square(pred - y)


def heterogeneous_quadratics(num_clients=4, n=16, seed=0):
    """Least squares, each client with its own input scales (Hessian) and optimum; and the global optimum."""
    rng = np.random.default_rng(seed)
    clients = []
    for _ in range(num_clients):
        x = (rng.normal(size=(n, DIM)) * rng.uniform(0.5, 1.5, DIM)).astype(np.float32)
        clients.append((x, (x @ (rng.normal(size=DIM) * 3)).astype(np.float32)))
    h = sum(x.T @ x / n for x, _ in clients)
    g = sum(x.T @ y / n for x, y in clients)
    return FederatedData.from_clients(clients), np.linalg.solve(h, g)


def _train(algo, data, states=None, rounds=100, cohort_size=None, seed=0):
    state = algo.init(TEMPLATE)
    step = jax.jit(algo.update)
    run_key = random.run_key(seed)
    m = data.num_clients
    for r in range(rounds):
        rk = random.round_key(run_key, r)
        if cohort_size is None:
            cohort = data.cohort(np.arange(m))
        else:
            ids, mask = sampling.uniform(random.stream(rk, "sample"), m, cohort_size)
            cohort = data.cohort(ids, client_mask=mask)
        if states is not None:
            cohort = states.attach(cohort)
        state, _ = step(state, cohort, rk)
        if states is not None:
            state = states.scatter(cohort, state)
    return state


def test_feddyn_converges_to_the_global_optimum_where_fedavg_drifts():
    data, w_star = heterogeneous_quadratics()
    opts = dict(batch_size=16, num_epochs=10, loss_fn=squared, weighting="uniform")
    lr = 0.1
    w_fedavg = np.asarray(
        _train(fedavg.fedavg(client.local_sgd(linear, optax.sgd(lr), **opts)), data).params["w"]
    )
    upd = feddyn.feddyn_client(linear, optax.sgd(lr), alpha=1.0, **opts)
    states = ClientStates(upd.init(TEMPLATE), data.num_clients)
    state = _train(feddyn.feddyn(upd, population_size=data.num_clients), data, states)
    w_feddyn = np.asarray(state.params["w"])
    assert np.linalg.norm(w_fedavg - w_star) > 0.1 * np.linalg.norm(w_star)
    np.testing.assert_allclose(w_feddyn, w_star, rtol=1e-3, atol=1e-3)


def test_partial_participation_h_is_the_mean_of_the_clients_gradient_states():
    """h = mean over the population of g_i (both start at 0 and move together); unsampled g_i stay."""
    data, w_star = heterogeneous_quadratics(num_clients=6)
    alpha = 1.0
    upd = feddyn.feddyn_client(
        linear, optax.sgd(0.1), alpha=alpha, batch_size=16, num_epochs=5, loss_fn=squared
    )
    states = ClientStates(upd.init(TEMPLATE), data.num_clients)
    state = _train(feddyn.feddyn(upd, population_size=6), data, states, rounds=150, cohort_size=3, seed=1)
    np.testing.assert_allclose(
        alpha * np.asarray(state.correction["w"]), states.tree["w"].mean(axis=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(state.params["w"]), w_star, rtol=1e-2, atol=1e-2)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="alpha"):
        feddyn.feddyn_client(helpers.model(), optax.sgd(0.1), alpha=0.0, batch_size=4)
    with pytest.raises(TypeError, match="stateful"):
        feddyn.feddyn(client.local_sgd(helpers.model(), optax.sgd(0.1), batch_size=4), population_size=3)


def test_performance_settings_change_nothing():
    pop = helpers.population([6, 3, 9, 5])
    upd = feddyn.feddyn_client(helpers.model(), optax.sgd(0.1), alpha=0.1, batch_size=4)
    algo = feddyn.feddyn(upd, population_size=4)
    results = []
    for a in (algo, algo.with_performance(Performance(chunk_size=2, unroll=2, accelerate=False))):
        states = ClientStates(upd.init(helpers.params()), 4)
        state = a.init(helpers.params())
        for r in range(2):
            cohort = states.attach(pop.cohort([0, 1, 2, 3]))
            state, _ = jax.jit(a.update)(state, cohort, jax.random.key(r))
            state = states.scatter(cohort, state)
        results.append((state.params, states.tree))
    helpers.assert_trees_close(results[0], results[1], rtol=1e-5, atol=1e-6)
