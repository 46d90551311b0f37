"""Per-example losses: ``loss_fn(outputs[batch, ...], labels[batch]) -> [batch]``.

For imbalanced tasks, :func:`weighted_softmax_cross_entropy` weights each
class by :func:`class_weights`, computed from a global label count that is a
SUM of per-client counts (:func:`label_counts`), so a plain or secure sum over
clients gives it without pooling any data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:
    from fljax.data.federated import FederatedData

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_example(values: jax.Array) -> jax.Array:
    """``[batch, ...]`` values (e.g. one per position of a sequence) as their mean per example."""
    return values if values.ndim <= 1 else values.reshape(values.shape[0], -1).mean(axis=-1)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of integer labels under ``softmax(logits)``, per example.

    Labels with more axes than the batch (``labels[batch, time]`` of a sequence model, logits
    ``[batch, time, classes]``) give each example the mean over its positions.
    """
    return _per_example(optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)))


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy for ``logits[batch]`` or ``[batch, 1]`` and 0/1 labels."""
    logits = logits.reshape(labels.shape)
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness (argmax for multi-class, sign for one logit); for labels with
    positions (``[batch, time]``) the share of correct positions of each example."""
    if logits.ndim == labels.ndim or logits.shape[-1] == 1:
        pred = (logits.reshape(labels.shape) > 0).astype(jnp.int32)
    else:
        pred = jnp.argmax(logits, axis=-1)
    return _per_example((pred == labels.astype(jnp.int32)).astype(jnp.float32))


# --- class weighting for imbalanced tasks, from federated label counts -----------------------------

CLASS_WEIGHT_SCHEMES = ("balanced", "inverse_frequency")


def label_counts(data: FederatedData, num_classes: int | None = None) -> np.ndarray:
    """Per-client label counts of a population (host numpy).

    Each row is what one client would send; their sum (a plain or secure sum)
    is the global count, the input of :func:`class_weights`.

    Args:
      data: a :class:`~fljax.data.FederatedData` with one integer label per example.
      num_classes: default ``data.num_classes``.

    Returns:
      ``[num_clients, num_classes]`` int64; ``.sum(axis=0)`` equals
      ``np.bincount(data.y, minlength=num_classes)``.

    Examples:
      >>> import numpy as np
      >>> from fljax.data import FederatedData
      >>> data = FederatedData.from_clients(
      ...     [(np.zeros((3, 1)), np.array([0, 0, 1])), (np.zeros((1, 1)), np.array([2]))], num_classes=3
      ... )
      >>> label_counts(data).tolist()
      [[2, 1, 0], [0, 0, 1]]
    """
    num_classes = data.num_classes if num_classes is None else num_classes
    if num_classes is None:
        raise ValueError("the population has no num_classes: pass num_classes=")
    y = np.asarray(data.y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(y == np.round(y))):
        raise ValueError(f"label_counts needs one integer label per example, got y of shape {y.shape}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found [{y.min()}, {y.max()}]")
    client = np.repeat(np.arange(data.num_clients), data.sizes)
    flat = np.bincount(client * num_classes + y, minlength=data.num_clients * num_classes)
    return flat.reshape(data.num_clients, num_classes).astype(np.int64)


def class_weights(label_counts: np.ndarray, scheme: str = "balanced") -> np.ndarray:
    """Per-class loss weights from a global label count (e.g. a sum of :func:`label_counts`).

    With ``n_k`` examples of class ``k``, ``N = sum_k n_k`` and ``K`` classes
    that occur (``n_k > 0``):

    * ``"balanced"``: ``w_k = N / (K n_k)`` (scikit-learn's ``"balanced"``).
      Every occurring class gets the same total weight ``N / K``, and the mean
      weight over examples is 1, so the loss scale (and a tuned learning rate)
      stays that of the unweighted loss.
    * ``"inverse_frequency"``: ``w_k = (1 / n_k) / mean_j(1 / n_j)`` over
      occurring classes: the weights average to 1 over CLASSES. Proportional to
      ``"balanced"`` (same minimiser), with a different overall scale.

    A class with no example gets weight 0 (it contributes no term anyway).

    Args:
      label_counts: ``[num_classes]`` non-negative counts.
      scheme: ``"balanced"`` or ``"inverse_frequency"``.

    Returns:
      ``[num_classes]`` float32 numpy weights.

    Examples:
      >>> print(class_weights(np.array([80, 20])))  # each class's total weight: 50
      [0.625 2.5  ]
      >>> print(class_weights(np.array([80, 20]), "inverse_frequency"))
      [0.4 1.6]
    """
    counts = np.asarray(label_counts, np.float64)
    if counts.ndim != 1:
        raise ValueError(
            f"label_counts must be [num_classes], got shape {counts.shape} "
            "(sum per-client counts over clients first: counts.sum(axis=0))"
        )
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"label counts must be finite and non-negative, got {counts.tolist()}")
    present = counts > 0
    if not np.any(present):
        raise ValueError("all label counts are zero")
    inverse = np.where(present, 1.0 / np.where(present, counts, 1.0), 0.0)
    if scheme == "balanced":
        weights = inverse * counts.sum() / present.sum()
    elif scheme == "inverse_frequency":
        weights = inverse / inverse[present].mean()
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {CLASS_WEIGHT_SCHEMES}")
    return weights.astype(np.float32)


def weighted_softmax_cross_entropy(weights: np.ndarray | jax.Array) -> LossFn:
    """Class-weighted softmax cross-entropy: ``weights[label] * CE(logits, label)``, per example.

    Args:
      weights: ``[num_classes]`` non-negative weights, e.g. from :func:`class_weights`.

    Returns:
      ``loss_fn(logits[batch, num_classes], labels[batch]) -> [batch]``, usable
      wherever :func:`softmax_cross_entropy` is (``client.local_sgd``,
      ``evaluation.evaluate``). Averaging it over examples gives each class the
      weight its ``weights`` entry says.

    Examples:
      >>> loss_fn = weighted_softmax_cross_entropy(np.array([0.625, 2.5]))
      >>> logits, labels = jnp.zeros((2, 2)), jnp.array([0, 1])
      >>> print(loss_fn(logits, labels) / jnp.log(2.0))  # log(2) times each class's weight
      [0.625 2.5  ]
    """
    w = np.asarray(weights, np.float32)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be a [num_classes] vector of finite non-negative numbers, got {w}")

    def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
        if logits.shape[-1] != w.shape[0]:
            raise ValueError(f"logits have {logits.shape[-1]} classes but there are {w.shape[0]} weights")
        labels = labels.astype(jnp.int32)
        return jnp.asarray(w, logits.dtype)[labels] * softmax_cross_entropy(logits, labels)

    return loss_fn
