"""Client state on the host: gathered with the cohort, through the jitted round, scattered back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import random, simulation
from fljax.base import ClientOutput, StatefulClientUpdate
from fljax.data import ClientStates, sampling
from tests import helpers


def counter_update():
    """A client that counts its rounds and sums the server's round number into its state."""
    inner = helpers.local_sgd(batch_size=4, num_epochs=1)

    def update(params, state, data, key):
        out: ClientOutput = inner(params, data, key)
        return {"count": state["count"] + 1, "seen": state["seen"] + out.weight}, out

    return StatefulClientUpdate(
        lambda p: {"count": jnp.zeros((), jnp.int32), "seen": jnp.zeros((), jnp.float32)}, update
    )


def test_counter_state_counts_participation_and_padding_never_writes():
    pop = helpers.population([5, 9, 3, 12, 6, 4])
    upd = counter_update()
    algo = simulation.averaging_algorithm(upd, optax.sgd(1.0))
    states = ClientStates(upd.init(helpers.params()), pop.num_clients)
    state = algo.init(helpers.params())
    step = jax.jit(algo.update)
    expected = np.zeros(6, np.int64)
    run_key = random.run_key(0)
    for r in range(6):
        rk = random.round_key(run_key, r)
        ids, mask = sampling.poisson(random.stream(rk, "sample"), 6, 0.5, max_cohort=6)
        cohort = states.attach(pop.cohort(ids, client_mask=mask, num_examples=12))
        state, _ = step(state, cohort, rk)
        state = states.scatter(cohort, state)
        expected[np.asarray(ids)[np.asarray(cohort.client_mask)]] += 1
    np.testing.assert_array_equal(states.tree["count"], expected)
    np.testing.assert_allclose(states.tree["seen"], expected * pop.sizes)
    assert step._cache_size() == 1


def test_stateless_round_equals_stateful_round_with_unused_state():
    pop = helpers.population([5, 9, 3])
    inner = helpers.local_sgd()
    upd = StatefulClientUpdate(lambda p: {"z": jnp.zeros((2,))}, lambda p, s, d, k: (s, inner(p, d, k)))
    a = simulation.averaging_algorithm(inner, optax.sgd(1.0))
    b = simulation.averaging_algorithm(upd, optax.sgd(1.0))
    key = jax.random.key(0)
    cohort = pop.cohort([0, 1, 2])
    sa, _ = a.update(a.init(helpers.params()), cohort, key)
    states = ClientStates(upd.init(None), 3)
    sb, _ = b.update(b.init(helpers.params()), states.attach(cohort), key)
    helpers.assert_trees_equal(sa.params, sb.params)


def test_errors_name_the_problem():
    pop = helpers.population([5, 9])
    upd = counter_update()
    algo = simulation.averaging_algorithm(upd, optax.sgd(1.0))
    with pytest.raises(ValueError, match="needs the cohort's client states"):
        algo.update(algo.init(helpers.params()), pop.cohort([0, 1]), jax.random.key(0))
    states = ClientStates(upd.init(None), 2)
    with pytest.raises(ValueError, match="client ids"):
        states.gather([2])
    cohort = states.attach(pop.cohort([0, 0]))
    state, _ = algo.update(algo.init(helpers.params()), cohort, jax.random.key(0))
    with pytest.raises(ValueError, match="twice"):
        states.scatter(cohort, state)
    with pytest.raises(ValueError, match="no arrays"):
        ClientStates((), 3)


def test_lenet_sized_state_for_ten_thousand_clients_stays_on_the_host():
    template = {"w": np.zeros((62_006,), np.float32)}
    states = ClientStates(template, 10_000)
    assert states.nbytes == 62_006 * 4 * 10_000
    g = states.gather(np.array([3, -1, 9_999]))
    assert isinstance(g["w"], np.ndarray) and g["w"].shape == (3, 62_006)
