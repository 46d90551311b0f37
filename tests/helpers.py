"""Small shared fixtures for the core tests: a tiny MLP and random populations."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax

from fljax import client, models
from fljax.data import FederatedData

NUM_FEATURES = 6
NUM_CLASSES = 3


def population(sizes, seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    clients = [
        (
            rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        )
        for n in sizes
    ]
    return FederatedData.from_clients(clients, num_classes=NUM_CLASSES, allow_empty=True)


def model():
    return models.MLP(hidden=(8,), num_classes=NUM_CLASSES)


def params(seed: int = 0):
    return models.init_params(model(), (NUM_FEATURES,), jax.random.key(seed))


def local_sgd(**kw):
    defaults = dict(batch_size=4, num_epochs=2)
    defaults.update(kw)
    opt = defaults.pop("optimizer", optax.sgd(0.1, momentum=0.9))
    return client.local_sgd(model(), opt, **defaults)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    # Leaf lists: same number of leaves, any containers (as before chex was used here).
    chex.assert_trees_all_close(jax.tree.leaves(a), jax.tree.leaves(b), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal(jax.tree.leaves(a), jax.tree.leaves(b))
