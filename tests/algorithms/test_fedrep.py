"""FedRep / FedPer: only the body is aggregated; every client keeps a head of its own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import aggregators
from fljax import random as fl_random
from fljax.algorithms import fedrep
from fljax.base import Aggregator
from fljax.data import ClientStates
from tests import helpers

SIZES = [6, 3, 9, 5]
HEAD = fedrep.layers("Dense_1")


def _noisy_mean():
    """A weighted mean that then adds 1 everywhere, as a noising aggregator would move every entry."""
    inner = aggregators.weighted_mean()

    def aggregate(state, deltas, weights, key):
        state, delta, metrics = inner.aggregate(state, deltas, weights, key)
        return state, jax.tree.map(lambda d: d + 1.0, delta), metrics

    return Aggregator(inner.init, aggregate)


@functools.cache
def _algo(variant="fedrep", head_lr=0.1, noisy=True):
    upd = fedrep.fedrep_client(
        helpers.model(),
        optax.sgd(0.1),
        head=HEAD,
        batch_size=4,
        variant=variant,
        head_epochs=2,
        head_optimizer=optax.sgd(head_lr),
    )
    algo = fedrep.fedrep(upd, head=HEAD, aggregator=_noisy_mean() if noisy else None)
    return upd, algo, jax.jit(algo.update)


def _run(ids, rounds=2, client_mask=None, **kw):
    upd, algo, step = _algo(**kw)
    pop = helpers.population(SIZES)
    heads = ClientStates(upd.init(helpers.params()), pop.num_clients)
    state = algo.init(helpers.params())
    for r in range(rounds):
        cohort = heads.attach(pop.cohort(ids, client_mask=client_mask, num_examples=9))
        state, _ = step(state, cohort, jax.random.key(r))
        state = heads.scatter(cohort, state)
    return state, heads


def _layer(params, name):
    return params["params"][name]


def test_server_head_never_changes_body_does_and_heads_differ_per_client():
    """Even under an aggregator that moves every entry (as DP noise does) the server's head stays."""
    state, heads = _run([0, 1, 2, 3])
    start = helpers.params()
    helpers.assert_trees_equal(_layer(state.params, "Dense_1"), _layer(start, "Dense_1"))
    assert not np.allclose(_layer(state.params, "Dense_0")["kernel"], _layer(start, "Dense_0")["kernel"])
    bias, kernel = heads.tree  # the head's leaves, [clients, ...]
    for a in (bias, kernel):
        assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])


def test_fedrep_body_phase_freezes_the_head():
    """A head phase that cannot move (learning rate 0) leaves every head at its start: the body
    phase trains the body alone."""
    state, heads = _run([0, 1, 2, 3], head_lr=0.0)
    start = fedrep.split(HEAD, helpers.params())
    for c in range(4):
        helpers.assert_trees_equal([a[c] for a in heads.tree], start)
    assert not np.allclose(
        _layer(state.params, "Dense_0")["bias"], _layer(helpers.params(), "Dense_0")["bias"]
    )


def test_fedper_first_round_is_fedavg_on_the_body_and_local_training_on_the_head():
    """FedPer trains the whole model jointly: its first round is FedAvg's for the body, and each
    client's new head is the head of its FedAvg local model."""
    state, heads = _run([0, 1, 2, 3], rounds=1, variant="fedper", noisy=False)
    local = helpers.local_sgd(optimizer=optax.sgd(0.1), batch_size=4, num_epochs=1)
    cohort = helpers.population(SIZES).cohort([0, 1, 2, 3], num_examples=9)
    keys = fl_random.client_keys(fl_random.stream(jax.random.key(0), "clients"), cohort.client_ids)
    out = jax.jit(jax.vmap(local, in_axes=(None, 0, 0)))(helpers.params(), cohort.data, keys)
    w = out.weight / jnp.sum(out.weight)
    fedavg_model = jax.tree.map(lambda p, d: p - jnp.tensordot(w, d, axes=1), helpers.params(), out.delta)
    helpers.assert_trees_close(
        _layer(state.params, "Dense_0"), _layer(fedavg_model, "Dense_0"), rtol=1e-5, atol=1e-6
    )
    local_models = jax.tree.map(lambda p, d: p[None] - d, helpers.params(), out.delta)
    helpers.assert_trees_close(heads.tree, fedrep.split(HEAD, local_models), rtol=1e-5, atol=1e-6)


def test_padding_and_masked_out_slots_keep_their_head():
    _, heads = _run([0, -1, 2, 3], client_mask=np.array([True, True, True, False]))
    start = fedrep.split(HEAD, helpers.params())
    for c in (1, 3):
        helpers.assert_trees_equal([a[c] for a in heads.tree], start)
    assert not np.allclose(heads.tree[1][0], start[1])


def test_personal_models_put_each_head_on_the_shared_body():
    state, heads = _run([0, 1, 2, 3], rounds=1)
    models = fedrep.personal_models(HEAD, state.params, heads.tree)
    for c in range(4):
        mine = jax.tree.map(lambda a, c=c: a[c], models)
        helpers.assert_trees_equal(_layer(mine, "Dense_0"), _layer(state.params, "Dense_0"))
        helpers.assert_trees_equal(fedrep.split(HEAD, mine), [a[c] for a in heads.tree])


def test_mask_pytree_equals_path_predicate_and_bad_splits_are_refused():
    params = helpers.params()
    mask = jax.tree.map(lambda _: False, params)
    mask["params"]["Dense_1"] = {"bias": True, "kernel": True}
    assert fedrep.head_mask(mask, params) == fedrep.head_mask(HEAD, params)
    helpers.assert_trees_equal(fedrep.split(mask, params), fedrep.split(HEAD, params))
    with pytest.raises(ValueError, match="no parameter"):
        fedrep.split(fedrep.layers("Dense_9"), params)
    with pytest.raises(ValueError, match="every parameter"):
        fedrep.split(lambda path: True, params)
    with pytest.raises(ValueError, match="structure"):
        fedrep.head_mask({"params": True}, params)
    with pytest.raises(ValueError, match="variant"):
        fedrep.fedrep_client(helpers.model(), optax.sgd(0.1), head=HEAD, batch_size=4, variant="fedx")
    with pytest.raises(ValueError, match="head_epochs"):
        fedrep.fedrep_client(helpers.model(), optax.sgd(0.1), head=HEAD, batch_size=4, head_epochs=0)
    with pytest.raises(TypeError, match="stateful"):
        fedrep.fedrep(helpers.local_sgd(), head=HEAD)
    assert float(jnp.sum(fedrep.zero_head(HEAD, params)["params"]["Dense_1"]["kernel"])) == 0.0
