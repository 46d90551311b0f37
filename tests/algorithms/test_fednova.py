"""FedNova: equal to FedAvg with equal step counts, unbiased by unequal ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, random
from fljax.algorithms import fedavg, fednova
from fljax.data import FederatedData
from tests import helpers

DIM = 3


def centre(params, x):
    """Predicts ``w`` for every example: with the squared loss below, F_i(w) = ||w - c_i||^2 / 2."""
    return jnp.broadcast_to(params["w"], x.shape)


def squared(pred, y):
    return 0.5 * jnp.sum(jnp.square(pred - y), axis=-1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equal_step_counts_give_fedavg(momentum):
    pop = helpers.population([8, 8, 7, 5])  # 2 minibatches of 4 each, 2 epochs: 4 steps for all
    opts = dict(batch_size=4, num_epochs=2)
    nova = fednova.fednova(fednova.fednova_client(helpers.model(), 0.1, momentum=momentum, **opts))
    avg = fedavg.fedavg(client.local_sgd(helpers.model(), optax.sgd(0.1, momentum=momentum or None), **opts))
    for algo in (nova, avg):
        state = algo.init(helpers.params())
        for r in range(3):
            state, metrics = jax.jit(algo.update)(state, pop.cohort([0, 1, 2, 3, -1]), jax.random.key(r))
        if algo is nova:
            nova_params = state.params
            np.testing.assert_allclose(
                float(metrics["tau_eff"]), float(fednova.normalizer(4.0, momentum)), rtol=1e-6
            )
    helpers.assert_trees_close(nova_params, state.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_normalized_update_of_a_constant_gradient_does_not_depend_on_steps(momentum):
    """Loss -<c, w>: every step sees the gradient -c, so d_i = -lr * c whatever tau_i (checks a_i)."""
    c = np.array([1.0, -2.0, 0.5], np.float32)
    lr = 0.1
    linear = lambda p, x: x @ p["w"]
    upd = fednova.fednova_client(
        linear, lr, momentum=momentum, batch_size=2, num_epochs=3, loss_fn=lambda o, y: -o
    )
    for n in (1, 4, 7):
        data = FederatedData.from_clients([(np.tile(c, (n, 1)), np.zeros(n, np.float32))])
        one = jax.tree.map(lambda a: jnp.asarray(a[0]), data.cohort([0], num_examples=8).data)
        out = upd({"w": jnp.zeros(DIM, jnp.float32)}, one, jax.random.key(n))
        assert float(out.metrics["num_steps"]) == 3 * -(-n // 2)
        np.testing.assert_allclose(np.asarray(out.delta["w"]), -lr * c, rtol=1e-5)


def test_unequal_step_counts_bias_fedavg_but_not_fednova():
    """F_i(w) = ||w - c_i||^2 / 2 with 1, 4 and 16 local full-batch steps (step size eta).

    Client i's delta is b_i (w - c_i) with b_i = 1 - (1 - eta)^tau_i, so FedAvg (uniform
    weights) stops at sum b_i c_i / sum b_i, pulled towards the client taking most steps;
    FedNova at sum (b_i / tau_i) c_i / sum (b_i / tau_i), which tends to the true optimum
    mean(c_i) as eta -> 0.
    """
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, DIM)).astype(np.float32) * 3
    taus = np.array([1, 4, 16])
    batch = 2
    clients = [
        (np.zeros((batch * t, DIM), np.float32), np.tile(c, (batch * t, 1)))
        for c, t in zip(centres, taus, strict=True)
    ]
    data = FederatedData.from_clients(clients)
    eta = 0.01
    opts = dict(batch_size=batch, loss_fn=squared, weighting="uniform")
    w_star = centres.mean(axis=0)
    b = 1 - (1 - eta) ** taus
    expected = {
        "fedavg": (b[:, None] * centres).sum(0) / b.sum(),
        "fednova": ((b / taus)[:, None] * centres).sum(0) / (b / taus).sum(),
    }
    algos = {
        "fedavg": fedavg.fedavg(client.local_sgd(centre, optax.sgd(eta), **opts)),
        "fednova": fednova.fednova(fednova.fednova_client(centre, eta, **opts)),
    }
    errors = {}
    for name, algo in algos.items():
        state = algo.init({"w": jnp.zeros(DIM, jnp.float32)})
        step = jax.jit(algo.update)
        for r in range(300):
            state, _ = step(state, data.cohort([0, 1, 2, -1]), random.round_key(random.run_key(0), r))
        w = np.asarray(state.params["w"])
        np.testing.assert_allclose(w, expected[name], rtol=1e-3, atol=1e-3)
        errors[name] = np.linalg.norm(w - w_star)
    assert errors["fednova"] < 0.1 * errors["fedavg"], errors


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="momentum"):
        fednova.fednova_client(helpers.model(), 0.1, batch_size=4, momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        fednova.fednova_client(helpers.model(), 0.0, batch_size=4)
