"""Fine-tuning after federation and evaluating each client's own model."""

import functools

import jax
import numpy as np
import optax
import pytest

from fljax import evaluation, personalization
from fljax import random as fl_random
from tests import helpers

SIZES = [6, 3, 9, 5]


@functools.cache
def _fine_tune(num_epochs):
    opt = optax.sgd(0.1, momentum=0.9)
    return jax.jit(
        lambda p, cohort, k: personalization.fine_tune(
            helpers.model(), opt, p, cohort, k, batch_size=4, num_epochs=num_epochs
        )
    )


def _cohort(ids=(0, 1, 2, 3), client_mask=None):
    return helpers.population(SIZES).cohort(list(ids), client_mask=client_mask, num_examples=9)


def test_zero_epochs_is_the_global_model():
    params = helpers.params()
    personal = _fine_tune(0)(params, _cohort(), jax.random.key(0))
    helpers.assert_trees_equal(personal, personalization.broadcast(params, 4))


def test_each_client_runs_local_training_from_the_global_model():
    """vmapped fine-tuning equals local_sgd from the global model, client by client, with the clients' keys."""
    params, key, cohort = helpers.params(), jax.random.key(3), _cohort()
    personal = _fine_tune(2)(params, cohort, key)
    local = helpers.local_sgd(optimizer=optax.sgd(0.1, momentum=0.9), batch_size=4, num_epochs=2)
    keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
    out = jax.jit(jax.vmap(local, in_axes=(None, 0, 0)))(params, cohort.data, keys)
    expected = jax.tree.map(lambda p, d: p[None] - d, params, out.delta)
    helpers.assert_trees_close(personal, expected, rtol=1e-5, atol=1e-6)


def test_padding_and_masked_out_slots_keep_the_global_model():
    params = helpers.params()
    personal = _fine_tune(2)(
        params, _cohort([0, -1, 2, 3], np.array([True, True, True, False])), jax.random.key(0)
    )
    for c in (1, 3):
        helpers.assert_trees_equal(jax.tree.map(lambda a, c=c: a[c], personal), params)
    assert not np.allclose(
        np.asarray(jax.tree.leaves(personal)[0][0]), np.asarray(jax.tree.leaves(params)[0])
    )


def test_personalized_evaluate_scores_each_client_with_its_own_model():
    test = helpers.population([5, 4, 7, 3], seed=1)
    params = helpers.params()
    same = personalization.personalized_evaluate(
        helpers.model(), personalization.broadcast(params, 4), test, metrics=("auc", "balanced_accuracy")
    )
    ref = evaluation.federated_evaluate(helpers.model(), params, test, metrics=("auc", "balanced_accuracy"))
    assert same.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(np.asarray(same[k], float), np.asarray(ref[k], float), rtol=1e-6)
    personal = _fine_tune(2)(params, _cohort(), jax.random.key(0))
    res = personalization.personalized_evaluate(helpers.model(), personal, test)
    for c in range(4):  # client c's entry is its own model's accuracy on its own data
        mine = jax.tree.map(lambda a, c=c: a[c], personal)
        alone = evaluation.federated_evaluate(helpers.model(), mine, test)
        np.testing.assert_allclose(res["per_client_accuracy"][c], alone["per_client_accuracy"][c])
    rows = evaluation.per_client_table(res)
    assert [r["client"] for r in rows] == [0, 1, 2, 3]


def test_bad_inputs_name_the_argument():
    params, cohort, key = helpers.params(), _cohort(), jax.random.key(0)
    with pytest.raises(ValueError, match="num_epochs"):
        personalization.fine_tune(
            helpers.model(), optax.sgd(0.1), params, cohort, key, batch_size=4, num_epochs=-1
        )
    with pytest.raises(ValueError, match="batch_size"):
        personalization.fine_tune(helpers.model(), optax.sgd(0.1), params, cohort, key, batch_size=0)
    with pytest.raises(ValueError, match="personal_params"):
        personalization.personalized_evaluate(
            helpers.model(), personalization.broadcast(params, 3), helpers.population(SIZES)
        )
