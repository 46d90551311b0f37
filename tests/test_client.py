import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, losses
from fljax.base import ClientData
from tests import helpers


def _one_client(n, pad_to=None, seed=0):
    pop = helpers.population([n], seed=seed)
    c = pop.cohort([0], num_examples=pad_to or n)
    return jax.tree.map(lambda a: jnp.asarray(a[0]), c.data)


def test_one_local_step_equals_one_optimizer_step():
    params = helpers.params()
    data = _one_client(4)
    opt = optax.sgd(0.1, momentum=0.9)
    update = client.local_sgd(helpers.model(), opt, batch_size=4, num_epochs=1)
    out = update(params, data, jax.random.key(0))

    def loss(p):
        return jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, data.x), data.y))

    grads = jax.grad(loss)(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    expected = optax.apply_updates(params, updates)
    local = jax.tree.map(lambda s, d: s - d, params, out.delta)
    helpers.assert_trees_close(local, expected)
    assert float(out.weight) == 4.0


def test_padded_examples_and_steps_change_nothing():
    # 10 real examples padded to 10 vs 23: same shuffling of real examples,
    # extra all-padding steps must not move params or momentum.
    params = helpers.params()
    update = client.local_sgd(helpers.model(), optax.sgd(0.1, momentum=0.9), batch_size=4, num_epochs=3)
    a = update(params, _one_client(10, pad_to=10), jax.random.key(3))
    b = update(params, _one_client(10, pad_to=23), jax.random.key(3))
    helpers.assert_trees_close(a.delta, b.delta, rtol=1e-6, atol=1e-7)
    assert float(a.weight) == float(b.weight) == 10.0
    np.testing.assert_allclose(float(a.metrics["train_loss"]), float(b.metrics["train_loss"]), rtol=1e-6)


def test_weight_decay_does_not_drift_on_padding():
    params = helpers.params()
    opt = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9))
    update = client.local_sgd(helpers.model(), opt, batch_size=4)
    a = update(params, _one_client(5, pad_to=5), jax.random.key(1))
    b = update(params, _one_client(5, pad_to=40), jax.random.key(1))
    helpers.assert_trees_close(a.delta, b.delta, rtol=1e-6, atol=1e-7)


def test_empty_client_has_zero_weight_and_zero_delta():
    params = helpers.params()
    data = _one_client(4)
    empty = ClientData(x=data.x, y=data.y, mask=jnp.zeros_like(data.mask))
    out = helpers.local_sgd()(params, empty, jax.random.key(0))
    assert float(out.weight) == 0.0
    for leaf in jax.tree.leaves(out.delta):
        assert np.all(np.asarray(leaf) == 0)


def test_make_batches_puts_every_real_example_once():
    data = _one_client(7, pad_to=13)
    b = client.make_batches(data, 4, jax.random.key(0))
    assert b.mask.shape == (4, 4)
    assert int(b.mask.sum()) == 7
    # real examples first: 7 real -> steps 0 and 1 real (4 + 3)
    np.testing.assert_array_equal(np.asarray(b.mask.any(axis=1)), [True, True, False, False])
    got = np.sort(np.asarray(b.x)[np.asarray(b.mask)][:, 0])
    np.testing.assert_array_equal(got, np.sort(np.asarray(data.x)[:7, 0]))


def test_shuffling_depends_on_key():
    data = _one_client(20)
    a = client.make_batches(data, 4, jax.random.key(0))
    b = client.make_batches(data, 4, jax.random.key(1))
    assert not np.array_equal(np.asarray(a.y), np.asarray(b.y)) or not np.array_equal(
        np.asarray(a.x), np.asarray(b.x)
    )


def test_uniform_weighting():
    out = helpers.local_sgd(weighting="uniform")(helpers.params(), _one_client(9), jax.random.key(0))
    assert float(out.weight) == 1.0


def test_max_steps_caps_local_work():
    params = helpers.params()
    data = _one_client(12)
    capped = helpers.local_sgd(batch_size=4, num_epochs=1, max_steps=1)(params, data, jax.random.key(0))
    one_batch = helpers.local_sgd(batch_size=4, num_epochs=1)(
        params, ClientData(data.x, data.y, data.mask), jax.random.key(0)
    )
    # capped run takes a single step: smaller move than three steps
    norm = lambda t: float(optax.tree.norm(t))
    assert norm(capped.delta) < norm(one_batch.delta)


def test_client_update_rejects_batched_input():
    pop = helpers.population([4, 4])
    cohort = pop.cohort([0, 1])
    with pytest.raises(ValueError, match="ONE client"):
        helpers.local_sgd()(helpers.params(), jax.tree.map(jnp.asarray, cohort.data), jax.random.key(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        client.local_sgd(helpers.model(), optax.sgd(0.1), batch_size=0)
    with pytest.raises(ValueError, match="weighting"):
        client.local_sgd(helpers.model(), optax.sgd(0.1), batch_size=2, weighting="sizes")
    with pytest.raises(TypeError, match="flax module"):
        client.as_apply(3)


def test_local_gradient_is_mean_gradient():
    params = helpers.params()
    data = _one_client(6, pad_to=9)
    out = client.local_gradient(helpers.model())(params, data, jax.random.key(0))
    x, y = data.x[:6], data.y[:6]
    g = jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(helpers.model().apply(p, x), y)))(params)
    helpers.assert_trees_close(out.delta, g)
