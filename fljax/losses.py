"""Per-example losses: ``loss_fn(outputs[batch, ...], labels[batch]) -> [batch]``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of integer labels under ``softmax(logits)``, per example."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy for ``logits[batch]`` or ``[batch, 1]`` and 0/1 labels."""
    logits = logits.reshape(labels.shape)
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness (argmax for multi-class, sign for one logit)."""
    if logits.ndim == labels.ndim or logits.shape[-1] == 1:
        pred = (logits.reshape(labels.shape) > 0).astype(jnp.int32)
    else:
        pred = jnp.argmax(logits, axis=-1)
    return (pred == labels.astype(jnp.int32)).astype(jnp.float32)
