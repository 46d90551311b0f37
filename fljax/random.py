"""The only place PRNG keys are derived.

One ``seed`` per run gives ``run_key = jax.random.key(seed)``. Round ``r`` uses
``round_key(run_key, r) = fold_in(run_key, r)``, so a run resumed from a
checkpoint draws exactly the randomness an uninterrupted run would. Inside a
round, named streams are ``fold_in(round_key, TAG)`` with fixed tags: adding a
stream never shifts the others. Per-client keys are ``fold_in(stream, client_id)``
so a client's randomness does not depend on its slot in the cohort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Fixed tags. Append new names with new numbers; never renumber.
STREAMS: dict[str, int] = {
    "sample": 0,  # cohort sampling
    "clients": 1,  # local training (shuffling, dropout, DP-SGD noise)
    "noise": 2,  # server-side DP noise
    "masks": 3,  # secure aggregation masks
    "aggregate": 4,  # other aggregator randomness (e.g. stochastic rounding)
    "init": 5,  # model initialisation
    "eval": 6,  # evaluation
    "dropout": 7,  # simulated client dropout
}


def run_key(seed: int) -> jax.Array:
    """The run's root key (a typed key) from an integer seed."""
    return jax.random.key(seed)


def round_key(key: jax.Array, round_index: int | jax.Array) -> jax.Array:
    """Key for round ``round_index`` of the run whose root key is ``key``."""
    return jax.random.fold_in(key, round_index)


def stream(key: jax.Array, name: str) -> jax.Array:
    """A named stream of ``key``; names are listed in :data:`STREAMS`."""
    if name not in STREAMS:
        raise ValueError(f"unknown key stream {name!r}; known streams: {sorted(STREAMS)}")
    return jax.random.fold_in(key, STREAMS[name])


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
    """One key per client, ``fold_in(key, client_id)``: ``[clients]`` keys."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(client_ids, jnp.uint32))
