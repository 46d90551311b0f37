"""Reference models (flax linen): the founding LeNet CNN, an MLP, logistic regression.

Each takes a batch ``x[batch, ...]`` and returns logits ``[batch, num_classes]``.

Convolutions and max-pools are :mod:`fljax.nn`'s layers, called explicitly
(same params as ``flax.linen.Conv``): ``conv_impl`` and ``conv_layout`` choose
their implementation (``"auto"``: the matmul forms on CPU, XLA's operations on
GPU/TPU) and layout, as arguments, so :func:`fljax.fast.accelerate` finds
nothing left to rewrite in these models.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fljax import nn as fnn


class LeNet(nn.Module):
    """The founding example's LeNet-5 CNN for 32x32x3 images (62,006 parameters at 10 classes).

    Conv(6, 5x5, VALID)-ReLU-MaxPool2-Conv(16, 5x5, VALID)-ReLU-MaxPool2-Flatten-
    Dense(120)-ReLU-Dense(84)-ReLU-Dense(num_classes).

    Attributes:
      num_classes: logits per example.
      conv_impl: ``"auto"``, ``"matmul"`` or ``"xla"`` for the convolutions and
        max-pools (:func:`fljax.nn.conv_general_dilated`); same values either way
        up to float reassociation.
      conv_layout: the matmul form's layout (``"auto"``, ``"banded"``,
        ``"channels_last"`` or ``"channels_first"``).
    """

    num_classes: int = 10
    conv_impl: str = "auto"
    conv_layout: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(fnn.Conv, padding="VALID", impl=self.conv_impl, layout=self.conv_layout)
        pool = functools.partial(fnn.max_pool, window_shape=(2, 2), strides=(2, 2), impl=self.conv_impl)
        # The first convolution sees the data: no input gradient (a tile-size hint only).
        x = pool(nn.relu(conv(6, (5, 5), input_grad=False)(x)))
        x = pool(nn.relu(conv(16, (5, 5))(x)))
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
