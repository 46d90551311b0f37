"""Ditto: the global model is FedAvg's; the personal model interpolates local training and the global model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, personalization
from fljax import random as fl_random
from fljax.algorithms import ditto
from fljax.data import ClientStates
from tests import helpers

SIZES = [6, 3, 9, 5]
LR = 0.1
EPOCHS = 4  # both halves


@functools.cache
def _ditto(lam):
    upd = ditto.ditto_client(helpers.model(), optax.sgd(LR), lam=lam, batch_size=4, num_epochs=EPOCHS)
    algo = ditto.ditto(upd)
    return upd, algo, jax.jit(algo.update)


def _run(lam, ids, client_mask=None, rounds=2):
    """Ditto rounds on one cohort; returns server state, personal states, last metrics."""
    upd, algo, step = _ditto(lam)
    pop = helpers.population(SIZES)
    states = ClientStates(upd.init(helpers.params()), pop.num_clients)
    state = algo.init(helpers.params())
    for r in range(rounds):
        cohort = states.attach(pop.cohort(ids, client_mask=client_mask, num_examples=9))
        state, metrics = step(state, cohort, jax.random.key(r))
        state = states.scatter(cohort, state)
    return state, states, metrics


def _personal(states, c):
    return jax.tree.map(lambda a: a[c], states.tree)


@functools.cache
def _local_vmapped():
    """local_sgd (Ditto's global half, and its personal half with lambda = 0), vmapped, jitted."""
    local = client.local_sgd(helpers.model(), optax.sgd(LR), batch_size=4, num_epochs=EPOCHS)
    return jax.jit(jax.vmap(local))


def _cohort_and_keys(r):
    cohort = helpers.population(SIZES).cohort([0, 1, 2, 3], num_examples=9)
    keys = fl_random.client_keys(fl_random.stream(jax.random.key(r), "clients"), cohort.client_ids)
    return cohort, keys


def test_global_model_is_fedavgs():
    """Two rounds: the server model equals FedAvg's, local_sgd from it averaged by examples."""
    state, _, metrics = _run(0.0, [0, 1, 2, 3])
    w = helpers.params()
    for r in range(2):
        cohort, keys = _cohort_and_keys(r)
        out = _local_vmapped()(personalization.broadcast(w, 4), cohort.data, keys)
        share = out.weight / jnp.sum(out.weight)
        w = jax.tree.map(lambda p, d, s=share: p - jnp.tensordot(s, d, axes=1), w, out.delta)
    helpers.assert_trees_close(state.params, w, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(metrics["client_personal_train_loss_weighted_mean"]))


def test_lambda_zero_personal_model_is_pure_local_training():
    """With lambda = 0 each personal model continues local training from where it stopped,
    whatever the global model does: rounds of local_sgd from the client's own model."""
    _, states, _ = _run(0.0, [0, 1, 2, 3])
    v = personalization.broadcast(helpers.params(), 4)
    for r in range(2):
        cohort, keys = _cohort_and_keys(r)
        personal_keys = jax.vmap(lambda k: fl_random.stream(k, "clients"))(keys)
        out = _local_vmapped()(v, cohort.data, personal_keys)
        v = jax.tree.map(jnp.subtract, v, out.delta)
    helpers.assert_trees_close(states.tree, v, rtol=1e-5, atol=1e-6)


def test_large_lambda_pins_the_personal_model_to_the_global_one():
    """One round from w: with lr * lambda = 1 each personal step lands one gradient step from w,
    however many steps are taken; with lambda = 0 the personal model drifts away."""
    w = helpers.params()
    dist = []
    for lam in (0.0, 1.0 / LR):
        _, states, _ = _run(lam, [0, 1, 2, 3], rounds=1)
        dist.append(
            [float(optax.tree.norm(jax.tree.map(np.subtract, _personal(states, c), w))) for c in range(4)]
        )
    dist = np.array(dist)
    assert np.all(dist[1] < 0.5 * dist[0]), dist


def test_padding_and_masked_out_slots_keep_their_personal_model():
    _, states, _ = _run(0.0, [0, 2, -1, 3], np.array([True, True, True, False]))
    start = helpers.params()
    for c in (1, 3):  # never sampled; sampled but masked out
        helpers.assert_trees_equal(_personal(states, c), start)
    for c in (0, 2):
        assert not np.allclose(
            np.asarray(jax.tree.leaves(_personal(states, c))[0]), np.asarray(jax.tree.leaves(start)[0])
        )


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="lam"):
        ditto.ditto_client(helpers.model(), optax.sgd(0.1), lam=-1.0, batch_size=4)
    with pytest.raises(ValueError, match="personal_epochs"):
        ditto.ditto_client(helpers.model(), optax.sgd(0.1), lam=1.0, batch_size=4, personal_epochs=0)
    with pytest.raises(TypeError, match="stateful"):
        ditto.ditto(helpers.local_sgd())
