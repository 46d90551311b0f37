"""SCAFFOLD and client state: state lives with the client, and it removes client drift."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, random
from fljax.algorithms import fedavg, scaffold
from fljax.data import ClientStates, FederatedData

DIM = 4


def linear(params, x):
    return x @ params["w"]


def squared(pred, y):
    return 0.5 * jnp.square(pred - y)


def heterogeneous_quadratics(num_clients=4, n=32, seed=0):
    """Least squares where every client has its own input scale and optimum (heterogeneous quadratics)."""
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(num_clients):
        scales = rng.uniform(0.2, 3.0, DIM) * (1 + 2 * (i % 2))
        x = (rng.normal(size=(n, DIM)) * scales).astype(np.float32)
        w_i = rng.normal(size=DIM) * 3
        clients.append((x, (x @ w_i).astype(np.float32)))
    data = FederatedData.from_clients(clients)
    # The federation's optimum: uniform mean of the clients' mean losses.
    h = sum(c[0].T @ c[0] / n for c in clients)
    g = sum(c[0].T @ c[1] / n for c in clients)
    return data, np.linalg.solve(h, g)


def _train(algo, data, states=None, rounds=400, return_state=False):
    state = algo.init({"w": jnp.zeros((DIM,), jnp.float32)})
    step = jax.jit(algo.update)
    run_key = random.run_key(0)
    for r in range(rounds):
        cohort = data.cohort(np.arange(data.num_clients))
        if states is not None:
            cohort = states.attach(cohort)
        state, _ = step(state, cohort, random.round_key(run_key, r))
        if states is not None:
            state = states.scatter(cohort, state)
    return state if return_state else np.asarray(state.params["w"])


def test_scaffold_removes_the_drift_that_biases_fedavg():
    data, w_star = heterogeneous_quadratics()
    opts = dict(batch_size=32, num_epochs=10, loss_fn=squared, weighting="uniform")
    lr = 0.02
    w_fedavg = _train(fedavg.fedavg(client.local_sgd(linear, optax.sgd(lr), **opts)), data)
    upd = scaffold.scaffold_client(linear, lr, **opts)
    states = ClientStates(upd.init({"w": jnp.zeros((DIM,), jnp.float32)}), data.num_clients)
    state = _train(scaffold.scaffold(upd, population_size=data.num_clients), data, states, return_state=True)
    w_scaffold = np.asarray(state.params["w"])
    # FedAvg converges, but to a fixed point biased by client drift; SCAFFOLD to the optimum.
    assert np.linalg.norm(w_fedavg - w_star) > 0.1 * np.linalg.norm(w_star)
    np.testing.assert_allclose(w_scaffold, w_star, rtol=1e-3, atol=1e-3)
    # The server's control variate stays the mean of the clients' (every client takes part).
    np.testing.assert_allclose(
        np.asarray(state.control["w"]), states.tree["w"].mean(axis=0), rtol=1e-4, atol=1e-5
    )


def test_scaffold_with_full_participation_and_one_local_step_is_gradient_descent():
    """With one full-batch local step, corrections cancel in the mean: SCAFFOLD = FedAvg = GD."""
    data, _ = heterogeneous_quadratics()
    opts = dict(batch_size=32, num_epochs=1, loss_fn=squared, weighting="uniform")
    a = _train(fedavg.fedavg(client.local_sgd(linear, optax.sgd(0.01), **opts)), data, rounds=5)
    upd = scaffold.scaffold_client(linear, 0.01, **opts)
    states = ClientStates(upd.init({"w": jnp.zeros((DIM,), jnp.float32)}), data.num_clients)
    b = _train(scaffold.scaffold(upd, population_size=data.num_clients), data, states, rounds=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scaffold_partial_participation_keeps_unsampled_states_and_resumes_exactly(tmp_path):
    from fljax import checkpoint
    from fljax.data import sampling

    data, _ = heterogeneous_quadratics(num_clients=6)
    upd = scaffold.scaffold_client(linear, 0.02, batch_size=8, num_epochs=2, loss_fn=squared)
    algo = scaffold.scaffold(upd, population_size=6)
    step = jax.jit(algo.update)
    template = {"w": jnp.zeros((DIM,), jnp.float32)}
    run_key = random.run_key(1)

    def run(rounds, state=None, states=None, start=0):
        state = algo.init(template) if state is None else state
        states = ClientStates(upd.init(template), 6) if states is None else states
        for r in range(start, rounds):
            rk = random.round_key(run_key, r)
            ids, mask = sampling.uniform(random.stream(rk, "sample"), 6, 3)
            before = states.tree["w"].copy()
            cohort = states.attach(data.cohort(ids, client_mask=mask))
            state, _ = step(state, cohort, rk)
            state = states.scatter(cohort, state)
            untouched = np.setdiff1d(np.arange(6), ids)
            np.testing.assert_array_equal(states.tree["w"][untouched], before[untouched])
        return state, states

    full_state, full_states = run(8)
    assert step._cache_size() == 1  # scatter clears the cohort's states: one compiled round
    half_state, half_states = run(4)
    checkpoint.save(tmp_path, 4, (half_state, half_states.tree))
    fresh = ClientStates(upd.init(template), 6)
    (state, tree), _ = checkpoint.restore(tmp_path, 4, (algo.init(template), fresh.tree))
    fresh.load(tree)
    resumed_state, resumed_states = run(8, state, fresh, start=4)
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(full_states.tree["w"], resumed_states.tree["w"])
