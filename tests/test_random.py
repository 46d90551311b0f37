"""The key tree: every derived key is distinct; resumed rounds re-derive the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import random

ROUND_STREAMS = ("sample", "clients", "aggregate", "eval")
RUN_STREAMS = ("init", "data", "eval", "loop")
AGGREGATOR_STREAMS = ("noise", "masks", "rounding", "dropout")


def _data(keys) -> np.ndarray:
    return np.asarray(jax.random.key_data(keys)).reshape(-1, 2)


def test_the_old_collision_is_gone():
    k = random.run_key(0)
    for name in RUN_STREAMS:
        for r in range(16):
            assert not np.array_equal(_data(random.stream(k, name)), _data(random.round_key(k, r)))


def test_every_key_of_the_tree_is_distinct():
    """Seeds 0-2, rounds < 10,000, every stream, client ids < 1,000: no two keys share key data."""
    rounds = jnp.arange(10_000, dtype=jnp.uint32)
    ids = jnp.arange(1_000, dtype=jnp.int32)
    all_keys = []
    with jax.debug_key_reuse(False):  # one parent, many children: that is the point here
        _collect(rounds, ids, all_keys)
    stacked = np.concatenate(all_keys)
    assert len(stacked) > 3 * 10_000 * 8
    assert len(np.unique(stacked, axis=0)) == len(stacked)


def _collect(rounds, ids, all_keys):
    for seed in range(3):
        k = random.run_key(seed)
        all_keys.append(_data(k))
        all_keys += [_data(random.stream(k, n)) for n in RUN_STREAMS]
        rk = jax.vmap(lambda r, k=k: random.round_key(k, r))(rounds)
        all_keys.append(_data(rk))
        for name in ROUND_STREAMS:
            s = jax.vmap(lambda key, name=name: random.stream(key, name))(rk)
            all_keys.append(_data(s))
            if name == "aggregate":
                for sub in AGGREGATOR_STREAMS:
                    all_keys.append(_data(jax.vmap(lambda key, sub=sub: random.stream(key, sub))(s)))
        # Client keys of every client id for the first rounds, under every round stream.
        for r in range(3):
            for name in ROUND_STREAMS:
                all_keys.append(_data(random.client_keys(random.stream(rk[r], name), ids)))
        all_keys.append(_data(random.client_keys(random.stream(k, "data"), ids)))


def test_round_keys_are_re_derived_identically():
    k = random.run_key(3)
    np.testing.assert_array_equal(
        _data(random.round_key(k, 7)), _data(random.round_key(random.run_key(3), 7))
    )


def test_tags_and_indices_do_not_overlap():
    assert min(random.STREAMS.values()) > random.MAX_INDEX
    assert len(set(random.STREAMS.values())) == len(random.STREAMS)
    with pytest.raises(ValueError, match="round_index"):
        random.round_key(random.run_key(0), 2**31)
    with pytest.raises(ValueError, match="unknown key stream"):
        random.stream(random.run_key(0), "nosie")


def test_host_rng_follows_the_key():
    d = random.stream(random.run_key(0), "data")
    a = random.host_rng(d, 5).integers(0, 2**31, 8)
    b = random.host_rng(d, 5).integers(0, 2**31, 8)
    c = random.host_rng(d, 6).integers(0, 2**31, 8)
    e = random.host_rng(random.stream(random.run_key(1), "data"), 5).integers(0, 2**31, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, e)
