"""Reference models (flax linen): the founding LeNet CNN, the CNNs and the
character LSTM of the federated-learning papers, an MLP, logistic regression.

Each takes a batch ``x[batch, ...]`` and returns logits ``[batch, num_classes]``,
except :class:`CharLSTM`, which takes tokens ``[batch, time]`` and returns
next-token logits at every position, ``[batch, time, vocab_size]``.

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


class McMahanCNN(nn.Module):
    """The MNIST CNN of McMahan et al. 2017 (1,663,370 parameters for 28x28x1 inputs, 10 classes).

    Conv(32, 5x5, SAME)-ReLU-MaxPool2-Conv(64, 5x5, SAME)-ReLU-MaxPool2-Flatten-
    Dense(512)-ReLU-Dense(num_classes). Parameters for ``HxWxC`` inputs (``H``, ``W``
    multiples of 4): ``(25 C + 1) 32 + (25 * 32 + 1) 64 + (H W / 16 * 64 + 1) 512
    + (512 + 1) num_classes``.

    Attributes:
      num_classes: logits per example.
      conv_impl: as in :class:`LeNet`.
      conv_layout: as in :class:`LeNet`.

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient
      Learning of Deep Networks from Decentralized Data". AISTATS 2017 (the "CNN").
    """

    num_classes: int = 10
    conv_impl: str = "auto"
    conv_layout: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(fnn.Conv, padding="SAME", impl=self.conv_impl, layout=self.conv_layout)
        pool = functools.partial(fnn.max_pool, window_shape=(2, 2), strides=(2, 2), impl=self.conv_impl)
        x = pool(nn.relu(conv(32, (5, 5), input_grad=False)(x)))
        x = pool(nn.relu(conv(64, (5, 5))(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(self.num_classes)(x)


class EMNISTCNN(nn.Module):
    """The EMNIST CNN of Reddi et al. 2021 (1,206,590 parameters for 28x28x1 inputs, 62 classes).

    Conv(32, 3x3, VALID)-ReLU-Conv(64, 3x3, VALID)-ReLU-MaxPool2-Flatten-
    Dense(128)-ReLU-Dense(num_classes). The paper's two dropout layers (0.25
    after the pool, 0.5 after Dense(128)) are left out: training here is
    deterministic (no dropout key), so this is the network at evaluation time.
    Parameters for ``28x28x1`` inputs: ``(9 + 1) 32 + (9 * 32 + 1) 64 +
    (12 * 12 * 64 + 1) 128 + (128 + 1) num_classes``.

    Attributes:
      num_classes: logits per example (62 for EMNIST/FEMNIST by_class).
      conv_impl: as in :class:`LeNet`.
      conv_layout: as in :class:`LeNet`.

    References:
      Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive
      Federated Optimization". ICLR 2021 (EMNIST CNN, appendix).
    """

    num_classes: int = 62
    conv_impl: str = "auto"
    conv_layout: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(fnn.Conv, padding="VALID", impl=self.conv_impl, layout=self.conv_layout)
        x = nn.relu(conv(32, (3, 3), input_grad=False)(x))
        x = nn.relu(conv(64, (3, 3))(x))
        x = fnn.max_pool(x, window_shape=(2, 2), strides=(2, 2), impl=self.conv_impl)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


class CharLSTM(nn.Module):
    """Character LSTM for federated Shakespeare (820,522 parameters at ``vocab_size=90``).

    Embed(vocab_size, 8)-LSTM(256)-LSTM(256)-Dense(vocab_size), the logits of
    the next character at EVERY position, as in Reddi et al. 2021 and TFF's
    ``tff.simulation.baselines.shakespeare`` (vocabulary of
    :data:`fljax.data.datasets.shakespeare.VOCAB_SIZE` = 90 tokens, sequences of
    80). McMahan et al. 2017 use the same network (their 866,578 parameters are
    for a larger vocabulary). Parameters: ``vocab_size * embed_dim + sum over
    layers of 4 (n_in h + h h + h) + (h_last + 1) vocab_size``.

    Input tokens are cast to int32, so :func:`init_params` (float zeros) works.

    Attributes:
      vocab_size: number of tokens (logits per position).
      embed_dim: embedding size.
      lstm_sizes: hidden size of each stacked LSTM layer
        (``flax.linen.OptimizedLSTMCell``, zero initial state).

    References:
      Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive
      Federated Optimization". ICLR 2021 (Shakespeare model).
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient
      Learning of Deep Networks from Decentralized Data". AISTATS 2017.
    """

    vocab_size: int
    embed_dim: int = 8
    lstm_sizes: tuple[int, ...] = (256, 256)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.embed_dim)(jnp.asarray(x, jnp.int32))  # [batch, time, embed]
        for size in self.lstm_sizes:
            x = nn.RNN(nn.OptimizedLSTMCell(size))(x)  # [batch, time, size]
        return nn.Dense(self.vocab_size)(x)  # [batch, time, vocab_size]


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    The default ``hidden=(200, 200)`` is the "2NN" of McMahan et al. 2017:
    199,210 parameters for 784 inputs (28x28 MNIST) and 10 classes.

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient
      Learning of Deep Networks from Decentralized Data". AISTATS 2017.
    """

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
