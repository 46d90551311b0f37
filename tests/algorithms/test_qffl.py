"""q-FFL (q-FedAvg): q = 0 is uniform FedAvg, q > 0 evens out the clients' losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, random
from fljax.algorithms import fedavg, qffl
from fljax.data import FederatedData
from tests import helpers

DIM = 3


def centre(params, x):
    """Predicts ``w`` for every example: with the squared loss below, F_i(w) = ||w - c_i||^2 / 2."""
    return jnp.broadcast_to(params["w"], x.shape)


def squared(pred, y):
    return 0.5 * jnp.sum(jnp.square(pred - y), axis=-1)


def centres_data(centres, n=4):
    return FederatedData.from_clients([(np.zeros((n, DIM), np.float32), np.tile(c, (n, 1))) for c in centres])


@pytest.mark.parametrize("lipschitz", [None, 7.0])
def test_q_zero_is_fedavg_with_uniform_weights_and_server_rate_one(lipschitz):
    """q = 0: Delta_i = L (w - w_i), h_i = L, so the step mean(w - w_i) does not depend on L."""
    pop = helpers.population([6, 3, 9, 5])
    opts = dict(batch_size=4, num_epochs=2)
    algos = [
        qffl.qffl(qffl.qffl_client(helpers.model(), 0.1, q=0.0, lipschitz=lipschitz, **opts)),
        fedavg.fedavg(client.local_sgd(helpers.model(), optax.sgd(0.1), weighting="uniform", **opts)),
    ]
    results = []
    for algo in algos:
        state = algo.init(helpers.params())
        step = jax.jit(algo.update)
        for r in range(3):
            state, _ = step(state, pop.cohort([0, 1, 2, 3, -1]), jax.random.key(r))
        results.append(state.params)
    helpers.assert_trees_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_one_round_follows_the_q_fedavg_formula():
    """One full-batch local step from w: w - w_i = eta (w - c_i), F_i = ||w - c_i||^2 / 2."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, DIM)).astype(np.float32)
    data = centres_data(centres)
    eta, q, lip = 0.1, 1.5, 4.0
    w = np.array([0.3, -0.2, 1.0], np.float32)
    algo = qffl.qffl(qffl.qffl_client(centre, eta, q=q, lipschitz=lip, batch_size=4, loss_fn=squared))
    state, _ = jax.jit(algo.update)(
        algo.init({"w": jnp.asarray(w)}), data.cohort([0, 1, 2, -1]), jax.random.key(0)
    )
    step = lip * eta * (w - centres)
    f = 0.5 * np.sum(np.square(w - centres), axis=1)
    h = q * f ** (q - 1) * np.sum(step**2, axis=1) + lip * f**q
    expected = w - (f[:, None] ** q * step).sum(0) / h.sum()
    np.testing.assert_allclose(np.asarray(state.params["w"]), expected, rtol=1e-5, atol=1e-6)


def _client_losses(q, data, centres, rounds=100):
    algo = qffl.qffl(qffl.qffl_client(centre, 0.1, q=q, batch_size=4, num_epochs=2, loss_fn=squared))
    state = algo.init({"w": jnp.zeros(DIM, jnp.float32)})
    step = jax.jit(algo.update)
    for r in range(rounds):
        state, metrics = step(
            state, data.cohort(np.arange(len(centres))), random.round_key(random.run_key(0), r)
        )
    w = np.asarray(state.params["w"])
    losses = 0.5 * np.sum(np.square(w - centres), axis=1)
    np.testing.assert_allclose(
        float(metrics["client_start_loss_variance"]), losses.var(), rtol=1e-3, atol=1e-5
    )
    return losses


def test_positive_q_reduces_the_variance_of_client_losses():
    """Three clients around the origin and one far away: q > 0 moves the model towards the outlier."""
    centres = np.array([[0, 0, 0], [0.5, 0.5, 0], [-0.5, 0, 0.5], [4, 0, 0]], np.float32)
    data = centres_data(centres)
    by_q = {q: _client_losses(q, data, centres) for q in (0.0, 1.0, 3.0)}
    # q = 0 converges to the mean of the centres, the minimiser of the average loss.
    np.testing.assert_allclose(
        by_q[0.0], 0.5 * np.sum(np.square(centres.mean(0) - centres), axis=1), rtol=1e-3, atol=1e-4
    )
    variances = [by_q[q].var() for q in (0.0, 1.0, 3.0)]
    assert variances[1] < 0.5 * variances[0] and variances[2] < variances[1], variances
    assert by_q[3.0].max() < by_q[0.0].max()  # the worst-off client is better off
    assert by_q[3.0].mean() > by_q[0.0].mean()  # at the price of the average


def test_rejects_negative_q():
    with pytest.raises(ValueError, match="q must"):
        qffl.qffl_client(helpers.model(), 0.1, q=-1.0, batch_size=4)
