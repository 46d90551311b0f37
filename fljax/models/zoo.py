"""Reference models (flax linen): the founding LeNet CNN, an MLP, logistic regression.

Each takes a batch ``x[batch, ...]`` and returns logits ``[batch, num_classes]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class LeNet(nn.Module):
    """The founding example's LeNet-5 CNN for 32x32x3 images (62,006 parameters at 10 classes).

    Conv(6, 5x5, VALID)-ReLU-MaxPool2-Conv(16, 5x5, VALID)-ReLU-MaxPool2-Flatten-
    Dense(120)-ReLU-Dense(84)-ReLU-Dense(num_classes).
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(6, (5, 5), padding="VALID")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs."""

    hidden: Sequence[int] = (200, 200)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class LogisticRegression(nn.Module):
    """Multinomial (``num_classes > 1``) or binary (one logit) logistic regression."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def init_params(model: nn.Module, input_shape: Sequence[int], key: jax.Array):
    """Initialise ``model`` for inputs of shape ``[batch, *input_shape]`` (float32)."""
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))


def num_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
