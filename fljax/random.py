"""The only place PRNG keys are derived: one documented tree, no shared integers.

One ``seed`` per run gives ``run_key = jax.random.key(seed)``. Every other key
is a child of it along ONE tree::

    run_key
    |- stream(run_key, "init")     model initialisation
    |- stream(run_key, "data")     partitions, splits, host-side subsampling of large clients
    |- stream(run_key, "eval")     evaluation outside rounds
    |- stream(run_key, "audit")    privacy-audit canaries (directions, inclusion)
    `- stream(run_key, "loop")     the round loop:
       `- round_key(run_key, r) = fold_in(stream(run_key, "loop"), r)
          |- stream(round, "sample")      cohort sampling
          |- stream(round, "clients")     -> client_keys(., client_ids): local training
          |- stream(round, "aggregate")   the aggregator's key, with sub-streams
          |  |- stream(., "noise")        DP noise
          |  |- stream(., "masks")        secure-aggregation masks
          |  |- stream(., "rounding")     stochastic rounding of the fixed-point encoding
          |  |- stream(., "dropout")      simulated client dropout
          |  `- stream(., "audit")        which audit canaries take part
          `- stream(round, "eval")        evaluation inside a round

Two rules make every key of the tree distinct: named tags are fixed integers
with the top bit set (``2**31 + n``), while indices (rounds, client ids,
epochs, steps) are below ``2**31``, so a name and an index never fold in the
same integer; and round keys are children of the ``"loop"`` stream, never of
the run key itself, so no run-level key is a round key. A child is a
``fold_in`` of its parent, so a run resumed at round ``r`` re-derives exactly
the keys an uninterrupted run would, and a client's randomness follows its id,
not its slot in the cohort. Adding a stream never shifts the others.

Host-side randomness (numpy) is derived from keys of this tree by
:func:`host_rng`, never from a client id or a constant alone.

``jax.random`` is not a cryptographic generator and a seed is public: keys
derived here make simulations reproducible. Privacy noise meant to protect
real data needs a secret source (see ``docs/privacy.md``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

_TAG_BASE = 2**31
MAX_INDEX = 2**31 - 1
"""Largest round index or client id: indices live below the tags' range."""

# Fixed tags. Append new names with new numbers; never renumber.
STREAMS: dict[str, int] = {
    name: _TAG_BASE + n
    for n, name in enumerate(
        (
            "sample",  # round: cohort sampling
            "clients",  # round: local training (shuffling, dropout, DP-SGD noise)
            "noise",  # aggregator: DP noise
            "masks",  # aggregator: secure aggregation masks
            "aggregate",  # round: the aggregator's key
            "init",  # run: model initialisation
            "eval",  # run or round: evaluation
            "dropout",  # aggregator: simulated client dropout
            "loop",  # run: parent of every round key
            "data",  # run: partitions, splits, host subsampling
            "rounding",  # aggregator: stochastic rounding of the encoding
            "audit",  # run: canaries of a privacy audit; aggregator: their participation
        )
    )
}


def run_key(seed: int) -> jax.Array:
    """The run's root key (a typed key) from an integer seed."""
    return jax.random.key(seed)


def secret_key() -> jax.Array:
    """A key from the operating system's CSPRNG (``os.urandom``), never derived from a seed.

    For randomness that a privacy guarantee assumes secret: the cohort sampling and DP noise of
    a private run (the trainer's default; a seeded, reproducible run is a labelled simulation).
    It fills the whole key (64 bits of ``threefry2x32``); nothing derived from it should be
    written to configs, checkpoints or logs.
    """
    data = np.frombuffer(os.urandom(8), dtype=np.uint32).copy()
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def _index(value: int | jax.Array, what: str):
    if isinstance(value, int | np.integer) and not 0 <= int(value) <= MAX_INDEX:
        raise ValueError(f"{what} must be in [0, 2**31), got {value}")
    return value


def round_key(key: jax.Array, round_index: int | jax.Array) -> jax.Array:
    """Key of round ``round_index`` of the run whose root key is ``key``.

    ``fold_in(stream(key, "loop"), round_index)``: round keys never coincide
    with a run-level stream (``"init"``, ``"data"``, ...).
    """
    return jax.random.fold_in(stream(key, "loop"), _index(round_index, "round_index"))


def stream(key: jax.Array, name: str) -> jax.Array:
    """A named child of ``key``; names and their places in the tree are listed above."""
    if name not in STREAMS:
        raise ValueError(f"unknown key stream {name!r}; known streams: {sorted(STREAMS)}")
    return jax.random.fold_in(key, STREAMS[name])


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
    """One key per client, ``fold_in(key, client_id)``: ``[clients]`` keys.

    Padding slots (id ``-1``) get the key of id ``2**31 - 1``, which no real
    client has (ids are checked against :data:`MAX_INDEX` on the host).
    """
    ids = jnp.where(jnp.asarray(client_ids) < 0, MAX_INDEX, client_ids).astype(jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)


def host_rng(key: jax.Array, *indices: int) -> np.random.Generator:
    """A numpy generator seeded from ``key`` (and optional indices folded in).

    For host-side randomness (partitions, subsampling of large clients) that
    must follow the run's seed: ``host_rng(stream(run_key, "data"), client_id)``.
    """
    for i in indices:
        key = jax.random.fold_in(key, _index(int(i), "index"))
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
