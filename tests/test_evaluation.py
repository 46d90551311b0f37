import jax.numpy as jnp
import numpy as np

from fljax import evaluation, losses
from tests import helpers


def _reference(params, x, y):
    logits = helpers.model().apply(params, jnp.asarray(x))
    return float(jnp.mean(losses.accuracy(logits, jnp.asarray(y)))), float(
        jnp.mean(losses.softmax_cross_entropy(logits, jnp.asarray(y)))
    )


def test_central_evaluation_matches_direct_computation_with_partial_batch():
    pop = helpers.population([37])
    x, y = pop.pooled()
    params = helpers.params()
    res = evaluation.evaluate(helpers.model(), params, x, y, batch_size=8)
    acc, loss = _reference(params, x, y)
    assert res["num_examples"] == 37
    np.testing.assert_allclose(res["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(res["loss"], loss, rtol=1e-5)


def test_federated_evaluation_per_client_and_percentiles():
    pop = helpers.population([5, 12, 3])
    params = helpers.params()
    res = evaluation.federated_evaluate(helpers.model(), params, pop)
    for c in range(3):
        acc, _ = _reference(params, *pop.client(c))
        np.testing.assert_allclose(res["per_client_accuracy"][c], acc, rtol=1e-6)
    assert res["accuracy_p10"] <= res["accuracy_p50"] <= res["accuracy_p90"]
    np.testing.assert_allclose(res["mean_accuracy"], np.mean(res["per_client_accuracy"]), rtol=1e-6)
    x, y = pop.pooled()
    np.testing.assert_allclose(res["weighted_accuracy"], _reference(params, x, y)[0], rtol=1e-6)
