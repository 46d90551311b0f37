"""Reference models: LeNet's params tree is pinned, and its conv implementations agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fljax import models
from tests import helpers

LENET_SHAPES = {
    "Conv_0": {"kernel": (5, 5, 3, 6), "bias": (6,)},
    "Conv_1": {"kernel": (5, 5, 6, 16), "bias": (16,)},
    "Dense_0": {"kernel": (400, 120), "bias": (120,)},
    "Dense_1": {"kernel": (120, 84), "bias": (84,)},
    "Dense_2": {"kernel": (84, 10), "bias": (10,)},
}


class FlaxLeNet(nn.Module):
    """The founding LeNet written with flax's own layers (the zoo's params must match it)."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(10)(x)


def test_lenet_params_tree_is_the_founding_one():
    params = models.init_params(models.LeNet(), (32, 32, 3), jax.random.key(0))
    assert jax.tree.map(jnp.shape, params) == {"params": LENET_SHAPES}
    assert models.num_params(params) == 62_006
    # Same names, shapes and initial values as the flax-layer LeNet for the same key.
    helpers.assert_trees_equal(params, models.init_params(FlaxLeNet(), (32, 32, 3), jax.random.key(0)))


@pytest.mark.parametrize(
    "impl,layout", [("auto", "auto"), ("xla", "auto"), ("matmul", "banded"), ("matmul", "channels_last")]
)
def test_lenet_conv_settings_change_no_params_and_no_values(impl, layout):
    key = jax.random.key(0)
    m = models.LeNet(conv_impl=impl, conv_layout=layout)
    params = models.init_params(m, (32, 32, 3), key)
    helpers.assert_trees_equal(params, models.init_params(models.LeNet(), (32, 32, 3), key))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    helpers.assert_trees_close(m.apply(params, x), FlaxLeNet().apply(params, x), rtol=1e-4, atol=1e-5)
