"""MimeLite: FedAvg without momentum, the centralised optimizer with one client and one step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, losses
from fljax.algorithms import fedavg, mimelite
from tests import helpers


@pytest.mark.parametrize("momentum", [None, 0.0])
def test_without_momentum_it_is_fedavg(momentum):
    pop = helpers.population([6, 3, 9, 5])
    opts = dict(batch_size=4, num_epochs=2)
    algos = [
        mimelite.mimelite(
            mimelite.mimelite_client(helpers.model(), optax.sgd(0.1, momentum=momentum), **opts)
        ),
        fedavg.fedavg(client.local_sgd(helpers.model(), optax.sgd(0.1), **opts)),
    ]
    results = []
    for algo in algos:
        state = algo.init(helpers.params())
        step = jax.jit(algo.update)
        for r in range(3):
            state, _ = step(state, pop.cohort([0, 1, 2, 3, -1]), jax.random.key(r))
        results.append(state.params)
    helpers.assert_trees_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_one_client_one_full_batch_step_per_round_is_the_centralised_optimizer():
    """y = x - U(g(x), s) and s <- V(g(x), s): each round is one step of heavy-ball momentum."""
    pop = helpers.population([8])
    opt = optax.sgd(0.1, momentum=0.9)
    algo = mimelite.mimelite(mimelite.mimelite_client(helpers.model(), opt, batch_size=8))
    params = helpers.params()
    state = algo.init(params)
    step = jax.jit(algo.update)
    x, y = pop.pooled()
    grad = jax.jit(jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, x), y))))
    opt_state = opt.init(params)
    for r in range(4):
        state, _ = step(state, pop.cohort([0, -1]), jax.random.key(r))
        updates, opt_state = opt.update(grad(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    helpers.assert_trees_close(state.params, params, rtol=1e-5, atol=1e-6)
    helpers.assert_trees_close(state.opt_state, opt_state, rtol=1e-5, atol=1e-6)


def test_local_steps_leave_the_server_momentum_frozen():
    """Two clients with equal data and momentum: the server state is V(mean full gradient, s) only."""
    pop = helpers.population([8, 8])
    opt = optax.sgd(0.1, momentum=0.9)
    algo = mimelite.mimelite(mimelite.mimelite_client(helpers.model(), opt, batch_size=2, num_epochs=3))
    params = helpers.params()
    state, metrics = jax.jit(algo.update)(algo.init(params), pop.cohort([0, 1]), jax.random.key(0))
    x, y = pop.pooled()
    g = jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, x), y)))(params)
    _, expected = opt.update(g, opt.init(params), params)
    helpers.assert_trees_close(state.opt_state, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["full_grad_norm"]), float(optax.tree.norm(g)), rtol=1e-5)


def test_needs_a_mimelite_client():
    with pytest.raises(TypeError, match="mimelite_client"):
        mimelite.mimelite(client.local_sgd(helpers.model(), optax.sgd(0.1), batch_size=4))
