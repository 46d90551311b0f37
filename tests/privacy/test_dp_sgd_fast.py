"""Layer-wise DP-SGD clipping equals the vmap reference: same clipped and noised gradient."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from fljax import nn as fnn
from fljax import simulation
from fljax.base import ClientData, Cohort
from fljax.models import zoo
from fljax.privacy import config, dp_sgd, ghost_clipping


class _Positions(nn.Module):
    """Dense layers on ``[batch, 3, 4]`` (three positions per example) then a flat head:
    ``wide`` makes Bu et al.'s rule pick the ghost (Gram) norm, else the direct one."""

    wide: bool

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16 if self.wide else 2)(x.reshape(x.shape[0], 3, 4)))
        return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


class _FlaxConv(nn.Module):
    """Plain flax (XLA) convolution and a dense head: the round's fast path rewrites the conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _TinyCNN(nn.Module):
    """fljax's fast conv and pool layers (as in LeNet), small enough to compile a round quickly."""

    @nn.compact
    def __call__(self, x):
        x = fnn.max_pool(nn.relu(fnn.Conv(3, (3, 3), padding="VALID", input_grad=False)(x)), (2, 2), (2, 2))
        x = nn.relu(fnn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.LayerNorm()(x))


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4)
        return dense(nn.relu(dense(x)))


def _batch(model, shape, seed, batch=6, classes=3):
    """Params (jitted init) and a batch drawn on the host (no per-op compilation)."""
    params = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, *shape), np.float32))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    return params, x, rng.integers(0, classes, batch).astype(np.int32)


def _norms(grads) -> np.ndarray:
    """Per-example L2 norms of per-example gradients (leaves ``[batch, ...]``)."""
    sq = [
        np.sum(np.square(np.asarray(g, np.float64)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree.leaves(grads)
    ]
    return np.sqrt(sum(sq))


def _gradients(model, params, x, y, mask, clip, key, z=1.0):
    """(layer-wise, vmap) DP-SGD ``(gradient, loss)`` with the same noise key."""
    out = []
    for method in ("layerwise", "vmap"):
        fn = dp_sgd.dp_sgd_gradient(
            model, l2_norm_clip=clip, noise_multiplier=z, batch_size=x.shape[0], method=method
        )
        out.append(jax.jit(fn)(params, x, y, mask, jax.random.clone(key)))
    return out


def _assert_trees_close(a, b, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=atol)


MODELS = {
    "lenet": (zoo.LeNet(num_classes=3), (16, 16, 3)),
    "mlp": (zoo.MLP(hidden=(8, 5), num_classes=3), (4,)),
    "positions_ghost": (_Positions(wide=True), (12,)),
    "positions_direct": (_Positions(wide=False), (12,)),
    "flax_conv": (_FlaxConv(), (6, 6, 2)),
}


def _masked_batch(name, seed):
    model, shape = MODELS[name]
    params, x, y = _batch(model, shape, seed)
    x[4:] = 1e6  # garbage in the padding rows must not matter
    return model, params, x, y, np.array([True, True, True, True, False, False])


def _reference_clipped_sum(grads, mask, clip):
    """The clipped sum from vmapped per-example gradients, in numpy (padding rows dropped)."""
    norms = _norms(grads)
    coef = np.where(mask, np.minimum(1.0, clip / np.where(mask, norms, 1.0)), 0.0)
    keep = lambda g: np.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
    return jax.tree.map(lambda g: np.tensordot(coef, keep(np.asarray(g, np.float64)), 1), grads), norms


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layerwise_equals_vmap_with_padding(name):
    model, params, x, y, mask = _masked_batch(name, 0)
    example_losses, grads = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    clip = float(np.median(_norms(grads)[:4]))  # two real examples below the clip, two above
    expected, ref_norms = _reference_clipped_sum(grads, mask, clip)
    total, losses_, norms = jax.jit(ghost_clipping.clipped_sum(model, l2_norm_clip=clip))(params, x, y, mask)
    np.testing.assert_allclose(norms[:4], ref_norms[:4], rtol=1e-4)
    np.testing.assert_allclose(losses_[:4], example_losses[:4], rtol=1e-5)
    _assert_trees_close(total, expected, atol=1e-6 * clip)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(total))


def test_noised_gradient_equals_vmap():
    # any clip: the regimes are covered above and below, here the noise must be the same too
    model, params, x, y, mask = _masked_batch("mlp", 2)
    clip = 0.5
    (g_fast, loss_fast), (g_ref, loss_ref) = _gradients(model, params, x, y, mask, clip, jax.random.key(3))
    _assert_trees_close(g_fast, g_ref, atol=1e-6 * clip)  # the same noise, drawn once per minibatch
    np.testing.assert_allclose(loss_fast, loss_ref, rtol=1e-5)


def test_all_clipped_and_none_clipped():
    model, params, x, y, mask = _masked_batch("mlp", 4)
    _, grads = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    assert np.all(_norms(grads)[:4] > 1e-3) and np.all(_norms(grads)[:4] < 1e3)
    for clip in (1e-3, 1e3):
        expected, _ = _reference_clipped_sum(grads, mask, clip)
        total, _, _ = jax.jit(ghost_clipping.clipped_sum(model, l2_norm_clip=clip))(params, x, y, mask)
        _assert_trees_close(total, expected, atol=1e-7 * min(clip, 1.0))


def _rules(name):
    model, shape = MODELS[name]
    x = jax.ShapeDtypeStruct((6, *shape), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes are enough
    return [layer.rule for layer in ghost_clipping.find_layers(model, params, x)]


def test_rule_follows_bu_et_al():
    # 3 positions: ghost iff 2 * 3^2 < 4 * features; the flat head has one position
    assert _rules("positions_ghost") == ["ghost", "ghost"]
    assert _rules("positions_direct") == ["direct", "ghost"]
    rules = _rules("lenet")
    assert rules == ["direct", "direct", "ghost", "ghost", "ghost"]


def test_unsupported_models_fall_back_or_raise():
    for model, match in ((_Shared(), "called once"), (_Norm(), "LayerNorm")):
        params, x, y = _batch(model, (4,), 4)
        mask = np.ones((6,), bool)
        assert not ghost_clipping.supports(model, params, x)
        with pytest.raises(ValueError, match=match):
            ghost_clipping.find_layers(model, params, x)
        with pytest.raises(ValueError, match=match):
            dp_sgd.dp_sgd_gradient(
                model, l2_norm_clip=1.0, noise_multiplier=0.0, batch_size=6, method="layerwise"
            )(params, x, y, mask, jax.random.key(5))
    # "auto" falls back to the vmap reference
    auto = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=0.5, noise_multiplier=0.0, batch_size=6)
    _, grads = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    expected, _ = _reference_clipped_sum(grads, mask, 0.5)
    _assert_trees_close(
        jax.jit(auto)(params, x, y, mask, jax.random.key(6))[0], jax.tree.map(lambda e: e / 6, expected), 1e-7
    )
    with pytest.raises(ValueError, match="method"):
        dp_sgd.dp_sgd_gradient(zoo.MLP(), l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=2, method="x")
    with pytest.raises(ValueError, match="flax module"):
        dp_sgd.dp_sgd_gradient(
            lambda p, x: x, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=2, method="layerwise"
        )


def test_client_in_the_round_uses_layerwise_and_matches_reference(monkeypatch):
    # one local step per client (batch_size = examples), so delta = lr * clipped sum / batch_size
    model = _TinyCNN()
    clients, n, lr = 2, 4, 0.1
    params, x, y = _batch(model, (10, 10, 2), 7, batch=clients * n)
    mask = np.array([[True] * 4, [True, True, True, False]])  # the second client padded
    x[7] = 1e6
    _, grads = jax.jit(dp_sgd.per_example_gradients(model))(params, x, y)
    clip = float(np.median(_norms(grads)[mask.ravel()]))
    expected = [
        _reference_clipped_sum(jax.tree.map(lambda g, i=i: g[i * n : (i + 1) * n], grads), mask[i], clip)[0]
        for i in range(clients)
    ]
    cohort = Cohort(
        ClientData(x=x.reshape(clients, n, 10, 10, 2), y=y.reshape(clients, n), mask=mask),
        np.arange(clients, dtype=np.int32),
        np.ones((clients,), bool),
    )

    def no_vmap(*args, **kwargs):
        def fail(*a):
            raise AssertionError("the round fell back to vmapped per-example gradients")

        return fail

    monkeypatch.setattr(dp_sgd, "per_example_gradients", no_vmap)
    cfg = config.DPSGDConfig(l2_norm_clip=clip, noise_multiplier=0.0, batch_size=n, num_examples=n)
    update = dp_sgd.dp_sgd_client(model, optax.sgd(lr), cfg)
    _, out = jax.jit(lambda p, c, k: simulation.run_clients(update, p, c, k))(
        params, cohort, jax.random.key(9)
    )
    for i in range(clients):
        delta = jax.tree.map(lambda d, i=i: d[i], out.delta)
        _assert_trees_close(delta, jax.tree.map(lambda e: lr * e / n, expected[i]), atol=1e-7)
    np.testing.assert_array_equal(out.weight, [4.0, 3.0])
