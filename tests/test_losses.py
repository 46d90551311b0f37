import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import losses
from fljax.data import FederatedData


def _population(labels, splits, num_classes):
    x = np.zeros((len(labels), 1), np.float32)
    return FederatedData.from_partition(x, labels, splits, num_classes=num_classes, allow_empty=True)


def test_federated_label_counts_sum_to_the_pooled_count():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=300, p=[0.85, 0.1, 0.05, 0.0]).astype(np.int32)
    for splits in (
        [np.arange(300)],
        np.array_split(rng.permutation(300), 7),
        [np.arange(0), np.arange(100), np.arange(100, 300)],  # with an empty client
    ):
        counts = losses.label_counts(_population(labels, splits, 4))
        assert counts.shape == (len(splits), 4) and counts.dtype == np.int64
        np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=4))
        for c, idx in enumerate(splits):
            np.testing.assert_array_equal(counts[c], np.bincount(labels[idx], minlength=4))


def test_label_counts_errors():
    pop = _population(np.array([0, 1]), [np.arange(2)], None)
    with pytest.raises(ValueError, match="num_classes"):
        losses.label_counts(pop)
    with pytest.raises(ValueError, match="labels must lie"):
        losses.label_counts(pop, num_classes=1)


@pytest.mark.parametrize("scheme", losses.CLASS_WEIGHT_SCHEMES)
def test_class_weights_give_every_class_the_same_total_weight(scheme):
    counts = np.array([900, 90, 10, 0])
    w = losses.class_weights(counts, scheme)
    assert w.dtype == np.float32 and w.shape == (4,)
    per_class = counts[:3] * w[:3]
    np.testing.assert_allclose(per_class, per_class[0], rtol=1e-6)
    assert w[3] == 0.0  # absent class
    assert np.all(w[:3] > 0) and w[0] < w[1] < w[2]


def test_class_weight_scales():
    counts = np.array([900, 90, 10])
    balanced = losses.class_weights(counts, "balanced")
    inverse = losses.class_weights(counts, "inverse_frequency")
    # balanced: the mean weight over examples is 1; inverse_frequency: the mean over classes is 1
    np.testing.assert_allclose(np.sum(counts * balanced) / counts.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(inverse.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(balanced / inverse, balanced[0] / inverse[0], rtol=1e-6)  # proportional
    np.testing.assert_allclose(losses.class_weights(np.array([5, 5, 5])), 1.0)


def test_class_weights_errors():
    with pytest.raises(ValueError, match="sum per-client counts"):
        losses.class_weights(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        losses.class_weights(np.array([3, -1]))
    with pytest.raises(ValueError, match="all label counts are zero"):
        losses.class_weights(np.zeros(3))
    with pytest.raises(ValueError, match="unknown scheme"):
        losses.class_weights(np.array([1, 2]), "sqrt")


def test_weighted_loss_is_equal_across_classes_on_an_imbalanced_problem():
    # 95% / 5%: with uninformative logits every example has the same cross-entropy, so the
    # unweighted loss is dominated by the majority class; weighted, both classes contribute equally.
    labels = np.array([0] * 95 + [1] * 5, np.int32)
    weights = losses.class_weights(np.bincount(labels), "balanced")
    loss = losses.weighted_softmax_cross_entropy(weights)(jnp.zeros((100, 2)), jnp.asarray(labels))
    per_class = [float(jnp.sum(loss[labels == k])) for k in (0, 1)]
    np.testing.assert_allclose(per_class[0], per_class[1], rtol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(loss)), np.log(2.0), rtol=1e-6)  # balanced keeps the scale


def test_weighted_loss_with_unit_weights_is_the_plain_loss_and_differentiable():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (16, 3))
    labels = jnp.arange(16) % 3
    fn = losses.weighted_softmax_cross_entropy(np.ones(3))
    np.testing.assert_array_equal(fn(logits, labels), losses.softmax_cross_entropy(logits, labels))
    weights = np.array([0.5, 2.0, 1.0], np.float32)
    weighted = losses.weighted_softmax_cross_entropy(weights)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(weighted(z, labels))))(logits)
    plain_grad = jax.grad(lambda z: jnp.sum(losses.softmax_cross_entropy(z, labels)))(logits)
    np.testing.assert_allclose(grad, weights[np.asarray(labels)][:, None] * plain_grad, rtol=1e-6)


def test_weighted_loss_errors():
    with pytest.raises(ValueError, match="non-negative"):
        losses.weighted_softmax_cross_entropy(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="3 weights"):
        losses.weighted_softmax_cross_entropy(np.ones(3))(jnp.zeros((2, 2)), jnp.array([0, 1]))


def test_class_weights_from_federated_counts_equal_pooled():
    rng = np.random.default_rng(1)
    labels = rng.choice(3, size=400, p=[0.9, 0.07, 0.03]).astype(np.int32)
    splits = np.array_split(rng.permutation(400), 5)
    w_fed = losses.class_weights(losses.label_counts(_population(labels, splits, 3)).sum(axis=0))
    w_pooled = losses.class_weights(np.bincount(labels, minlength=3))
    np.testing.assert_array_equal(w_fed, w_pooled)
