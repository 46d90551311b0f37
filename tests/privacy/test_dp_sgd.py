"""DP-SGD: per-example gradients equal a loop, padding contributes zero, noise once per minibatch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from fljax import client
from fljax.base import ClientData
from fljax.models import zoo
from fljax.privacy import config, dp_sgd


def _setup(key, batch=6):
    k_init, kx, ky = jax.random.split(key, 3)
    model = zoo.MLP(hidden=(5,), num_classes=3)
    params = zoo.init_params(model, (4,), k_init)
    x = jax.random.normal(kx, (batch, 4), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 3, jnp.int32)
    return model, params, x, y


def test_per_example_gradients_equal_python_loop():
    model, params, x, y = _setup(jax.random.key(0))
    losses_, grads = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    ref_grad = jax.jit(
        lambda p, xj, yj: client.masked_mean_gradient(model.apply)(p, xj, yj, jnp.ones((1,), bool), None)
    )
    for j in range(x.shape[0]):
        g, loss = ref_grad(params, x[j : j + 1], y[j : j + 1])
        np.testing.assert_allclose(losses_[j], loss, rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves(jax.tree.map(lambda t, j=j: t[j], grads)), jax.tree.leaves(g), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_clipped_gradient_equals_loop_and_padding_is_zero():
    model, params, x, y = _setup(jax.random.key(1))
    clip, batch = 0.05, 6
    mask = jnp.array([True, True, True, True, False, False])
    grad_fn = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=clip, noise_multiplier=0.0, batch_size=batch)
    # garbage in the padding rows must not matter
    x_pad = x.at[4:].set(1e6)
    keys = jax.random.split(jax.random.key(2), 2)
    g, _ = jax.jit(grad_fn)(params, x_pad, y, mask, keys[0])
    _, per_ex = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    per_ex = jax.tree.map(np.asarray, per_ex)
    expected = jax.tree.map(lambda t: np.zeros(t.shape[1:], np.float64), per_ex)
    for j in range(4):
        gj = jax.tree.map(lambda t: t[j].astype(np.float64), per_ex)  # noqa: B023
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(gj)))
        expected = jax.tree.map(lambda e, t: e + t * min(1.0, clip / norm), expected, gj)  # noqa: B023
    expected = jax.tree.map(lambda t: t / batch, expected)  # the fixed batch size, not 4
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    # no clipping and no noise gives the plain minibatch gradient (full batch)
    plain = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=math.inf, noise_multiplier=0.0, batch_size=batch)
    full = jnp.ones((batch,), bool)
    g_plain, _ = jax.jit(plain)(params, x, y, full, keys[1])
    g_ref, _ = jax.jit(client.masked_mean_gradient(model.apply))(params, x, y, full, None)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_noise_std_is_z_clip_over_batch():
    model, params, x, y = _setup(jax.random.key(3))
    z, clip, batch = 1.5, 0.4, 6
    grad_fn = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=clip, noise_multiplier=z, batch_size=batch)
    none = jnp.zeros((batch,), bool)  # an all-padding batch: the gradient is pure noise
    keys = jax.random.split(jax.random.key(4), 300)
    grads, _ = jax.jit(jax.vmap(grad_fn, in_axes=(None, None, None, None, 0)))(params, x, y, none, keys)
    samples = np.concatenate([np.ravel(v) for v in jax.tree.leaves(grads)])
    sigma = z * clip / batch
    assert scipy.stats.kstest(samples / sigma, "norm").pvalue > 1e-3
    assert scipy.stats.kstest(samples / (0.67 * sigma), "norm").pvalue < 1e-6
    assert scipy.stats.kstest(samples / (1.5 * sigma), "norm").pvalue < 1e-6


def test_dp_sgd_client_runs_deterministically_and_checks_batch():
    model, params, _, _ = _setup(jax.random.key(5))
    kx, ky = jax.random.split(jax.random.key(6))
    data = ClientData(
        x=jax.random.normal(kx, (20, 4), jnp.float32),
        y=jax.random.randint(ky, (20,), 0, 3, jnp.int32),
        mask=jnp.arange(20) < 17,
    )
    cfg = config.DPSGDConfig(l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=5, num_examples=17)
    update = jax.jit(dp_sgd.dp_sgd_client(model, optax.sgd(0.1), cfg))
    out1 = update(params, data, jax.random.key(7))
    out2 = update(params, data, jax.random.key(7))
    for a, b in zip(jax.tree.leaves(out1.delta), jax.tree.leaves(out2.delta), strict=True):
        np.testing.assert_array_equal(a, b)
        assert bool(jnp.all(jnp.isfinite(a)))
    assert float(out1.weight) == 17.0
    wrong = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        jax.jit(client.local_sgd(model, optax.sgd(0.1), batch_size=5, gradient=wrong))(
            params, data, jax.random.key(8)
        )
