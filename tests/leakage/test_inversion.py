"""Gradient inversion: recovery without protection, failure under strong DP, label inference, image metrics.

A one-hidden-layer sigmoid MLP on 8x8x3 images keeps every attack to a second or two.
Its first layer's weight gradient is ``delta_1 x^T``: every row is a multiple
of the input, so one image is identifiable exactly from its gradient and a
converged attack reaches a PSNR far above 30 dB (RMS error 3% of the pixel
range). The reference level for "nothing recovered" is a flat grey guess:
for pixels uniform on [0, 1], ``x = 0.5`` has MSE 1/12, i.e. 10.8 dB, and a
uniform random guess 7.8 dB.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fljax import client, models, secagg
from fljax.leakage import image_metrics, inversion

SHAPE = (8, 8, 3)
NUM_CLASSES = 10


class SigmoidMLP(nn.Module):
    """One sigmoid hidden layer (DLG's choice of a smooth activation: every unit carries the input)."""

    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(x)


@functools.cache
def _setup():
    model = SigmoidMLP()
    params = models.init_params(model, SHAPE, jax.random.key(0))
    return model, params


def _image(seed, batch=1):
    return np.random.default_rng(seed).uniform(size=(batch, *SHAPE)).astype(np.float32)


def _attack(client_update, observed, x_true, labels, config):
    _, params = _setup()
    update = inversion.update_function(client_update, params, jax.random.key(1))
    rec = inversion.reconstruct(
        update, observed, labels, x_true.shape, (0.0, 1.0), jax.random.key(2), config=config
    )
    return rec, image_metrics.match(rec.x, x_true, window_size=3)


def _observe(client_update, x, y):
    _, params = _setup()
    return inversion.update_function(client_update, params, jax.random.key(1))(jnp.asarray(x), jnp.asarray(y))


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_single_image_recovered_without_protection(algorithm):
    model, _ = _setup()
    if algorithm == "fedsgd":
        update = client.local_gradient(model, loss_fn=inversion.cross_entropy)
    else:  # three local SGD steps, simulated differentiably by the attacker
        update = client.local_sgd(
            model, optax.sgd(0.1), batch_size=1, num_epochs=3, loss_fn=inversion.cross_entropy
        )
    x, y = _image(0), np.array([7], np.int32)
    observed = _observe(update, x, y)
    labels = inversion.infer_labels(inversion.output_bias(observed, NUM_CLASSES), 1)
    np.testing.assert_array_equal(labels, y)
    rec, m = _attack(update, observed, x, labels, inversion.geiping(num_steps=200, tv_weight=0.0))
    assert m.psnr[0] > 30.0
    assert float(rec.objective[-1]) < float(rec.objective[0])


def test_dlg_recovers_image_and_label_jointly():
    model, _ = _setup()
    update = client.local_gradient(model, loss_fn=inversion.cross_entropy)
    x, y = _image(1), np.array([4], np.int32)
    rec, m = _attack(
        update, _observe(update, x, y), x, None, inversion.dlg(num_steps=500, learning_rate=0.05)
    )
    assert int(rec.labels[0]) == 4
    assert m.psnr[0] > 25.0  # plain Adam on the L2 distance converges more slowly than signed cosine


def test_strong_dp_defeats_the_attack():
    model, _ = _setup()
    update = client.local_gradient(model, loss_fn=inversion.cross_entropy)
    x, y = _image(2), np.array([3], np.int32)
    clean = _observe(update, x, y)
    norm = float(optax.tree.norm(clean))
    # C at the update's own norm (nothing clipped), z = 1: noise of norm ~ sqrt(d) times the signal's.
    noisy = inversion.clip_and_noise(clean, norm, 1.0, jax.random.key(3))
    labels = inversion.infer_labels(inversion.output_bias(noisy, NUM_CLASSES), 1)
    _, m = _attack(update, noisy, x, labels, inversion.geiping(num_steps=200, tv_weight=0.0))
    assert m.psnr[0] < 12.0  # no better than a flat grey guess (10.8 dB) plus 1.2 dB


def test_clip_and_noise_is_dp_fedavg_for_one_client():
    delta = {"a": jnp.full((40_000,), 0.01), "b": jnp.full((10_000,), -0.02)}
    norm = float(optax.tree.norm(delta))
    clipped = inversion.clip_and_noise(delta, norm / 2, 0.0, jax.random.key(0))
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), norm / 2, rtol=1e-5)
    np.testing.assert_allclose(clipped["a"], delta["a"] / 2, rtol=1e-5)
    c, z = 0.5, 0.3
    noisy = inversion.clip_and_noise(delta, c, z, jax.random.key(1))
    clip = inversion.clip_and_noise(delta, c, 0.0, jax.random.key(1))
    residual = np.concatenate([np.asarray(noisy[k] - clip[k]) for k in ("a", "b")])
    # 50,000 draws: the sample std is within 1.5% of z*C with overwhelming probability (sd ~0.3%).
    assert abs(residual.std() / (z * c) - 1.0) < 0.015
    assert abs(residual.mean()) < 5 * z * c / np.sqrt(residual.size)


def test_summed_is_the_cohort_sum_and_secure_sum_agrees():
    rng = np.random.default_rng(0)
    deltas = {"w": jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32) * 0.1)}
    total = inversion.summed(deltas, jax.random.key(0))
    np.testing.assert_allclose(total["w"], deltas["w"].sum(0), rtol=1e-6, atol=1e-7)
    secure = inversion.summed(
        deltas, jax.random.key(0), sum=secagg.secure_sum(secagg.SecAggConfig(frac_bits=20))
    )
    assert float(jnp.max(jnp.abs(secure["w"] - total["w"]))) <= 5 * 2.0**-20
    with pytest.raises(ValueError, match="leading clients axis"):
        inversion.summed({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, jax.random.key(0))


def test_label_inference_single_and_batch():
    model, params = _setup()
    update = client.local_gradient(model)
    x = _image(3, batch=4)
    for label in range(NUM_CLASSES):  # iDLG: exact for one image, whatever the label
        g = _observe(update, x[:1], np.array([label], np.int32))
        assert inversion.infer_labels(inversion.output_bias(g, NUM_CLASSES), 1).tolist() == [label]
    # Distinct labels in a batch of 4: each true class has g_c = p_c - 1/4 < 0 at an untrained model.
    y = np.array([8, 1, 5, 2], np.int32)
    g = inversion.output_bias(_observe(update, x, y), NUM_CLASSES)
    p = inversion.mean_probabilities(model.apply, params, jnp.asarray(_image(4, batch=64)))
    assert inversion.infer_labels(g, 4, p).tolist() == sorted(y.tolist())


def test_infer_labels_counts_repeated_labels():
    k, y = 6, np.array([0, 0, 0, 3, 5, 5])
    p = np.full(k, 1.0 / k)
    g = p - np.bincount(y, minlength=k) / y.size  # the bias gradient when every softmax is p
    assert inversion.infer_labels(g, y.size, p).tolist() == y.tolist()
    with pytest.raises(ValueError, match="batch_size"):
        inversion.infer_labels(g, 0)
    with pytest.raises(ValueError, match="bias_gradient"):
        inversion.infer_labels(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="mean_probs"):
        inversion.infer_labels(g, 2, np.ones(3))


def test_input_validation():
    with pytest.raises(ValueError, match="distance"):
        inversion.InversionConfig(distance="l1")
    with pytest.raises(ValueError, match="num_steps"):
        inversion.geiping(num_steps=0)
    with pytest.raises(ValueError, match="tv_weight"):
        inversion.geiping(tv_weight=-1.0)
    _, params = _setup()
    update = inversion.update_function(client.local_gradient(_setup()[0]), params, jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be"):
        inversion.reconstruct(
            update,
            params,
            np.zeros(3, np.int32),
            (2, *SHAPE),
            (0, 1),
            jax.random.key(0),
            config=inversion.geiping(),
        )
    with pytest.raises(ValueError, match="labels are required"):
        inversion.reconstruct(
            update, params, None, (1, *SHAPE), (0, 1), jax.random.key(0), config=inversion.geiping()
        )
    with pytest.raises(ValueError, match="labels=None"):
        inversion.reconstruct(
            update,
            params,
            np.zeros(1, np.int32),
            (1, *SHAPE),
            (0, 1),
            jax.random.key(0),
            config=inversion.dlg(),
        )
    with pytest.raises(ValueError, match="exactly one 'bias'"):
        inversion.output_bias(params, 7)


# --- image metrics -------------------------------------------------------------------------------------


def test_psnr_properties():
    x = _image(5, batch=2)
    noise = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    assert np.all(np.isinf(np.asarray(image_metrics.psnr(x, x))))
    values = [float(image_metrics.psnr(x + s * noise, x)[0]) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]
    np.testing.assert_allclose(values[0], -20 * np.log10(0.01 * noise[0].std()), atol=0.1)
    with pytest.raises(ValueError, match="same shape"):
        image_metrics.psnr(x, x[:1])
    with pytest.raises(ValueError, match="height, width, channels"):
        image_metrics.psnr(np.zeros((3, 3)), np.zeros((3, 3)))


def _ssim_by_definition(x, y, size=11, sigma=1.5, data_range=1.0):
    """Direct double loop over window positions and channels, float64."""
    g = image_metrics.gaussian_window(size, sigma).astype(np.float64)
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, wd, ch = x.shape
    out = []
    for c in range(ch):
        for i in range(h - size + 1):
            for j in range(wd - size + 1):
                a, b = x[i : i + size, j : j + size, c], y[i : i + size, j : j + size, c]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                out.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(out))


def test_ssim_properties():
    rng = np.random.default_rng(7)
    x = rng.uniform(size=(14, 13, 2)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    assert float(image_metrics.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    y = x + 0.1 * noise
    assert float(image_metrics.ssim(x, y)) == pytest.approx(float(image_metrics.ssim(y, x)), abs=1e-6)
    assert float(image_metrics.ssim(x, y)) == pytest.approx(_ssim_by_definition(x, y), abs=1e-4)
    values = [float(image_metrics.ssim(x, x + s * noise)) for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="smaller than"):
        image_metrics.ssim(x[:8], x[:8])
    with pytest.raises(ValueError, match="odd"):
        image_metrics.ssim(x, x, window_size=4)


def test_match_is_permutation_invariant():
    rng = np.random.default_rng(8)
    true = rng.uniform(size=(5, 12, 12, 3)).astype(np.float32)
    recon = np.clip(true + 0.1 * rng.normal(size=true.shape), 0, 1).astype(np.float32)
    base = image_metrics.match(recon, true)
    perm = rng.permutation(5)
    shuffled = image_metrics.match(recon[perm], true)
    np.testing.assert_allclose(shuffled.psnr, base.psnr, rtol=1e-6)
    np.testing.assert_allclose(shuffled.ssim, base.ssim, rtol=1e-6)
    np.testing.assert_array_equal(perm[shuffled.order], base.order)
    np.testing.assert_array_equal(base.order, np.arange(5))  # noise 0.1 keeps each image closest to itself
    with pytest.raises(ValueError, match="same shape"):
        image_metrics.match(recon[:4], true)
