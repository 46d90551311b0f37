"""Fixed-point encoding: error bound, unbiasedness, bit width, exact weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax.secagg import encoding
from fljax.secagg.config import SecAggConfig, default_threshold


def _keys(seed, n):
    return list(jax.random.split(jax.random.key(seed), n))


@pytest.mark.parametrize("bits", [2, 8, 17, 31, 32])
def test_ring_round_trip(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = jnp.asarray(np.linspace(lo, hi, 101).round().astype(np.int64).astype(np.int32))
    u = encoding.to_ring(q, bits)
    assert u.dtype == jnp.uint32
    assert int(jnp.max(u)) <= 2**bits - 1
    np.testing.assert_array_equal(np.asarray(encoding.from_ring(u, bits)), np.asarray(q))


def test_round_trip_within_bound():
    cfg = SecAggConfig(clip_range=0.5, frac_bits=10)
    k1, k2 = _keys(0, 2)
    x = jax.random.uniform(k1, (1, 5000), jnp.float32, -1.0, 1.0)
    bits = cfg.ring_bits(1)
    enc = encoding.encode(x, jnp.ones((1,), jnp.float32), k2, cfg, bits)
    s, w = encoding.decode(encoding.ring_sum(enc.values, bits), cfg, bits)
    err = np.abs(np.asarray(s) - np.clip(np.asarray(x[0]), -0.5, 0.5))
    assert float(w) == 1.0
    assert err.max() < 1.0 / cfg.scale_value
    assert int(enc.num_range_clipped) == 1


def test_sum_error_bound_and_unbiased():
    n, dim = 20, 4000
    cfg = SecAggConfig(clip_range=1.0, frac_bits=6)
    k1, k2 = _keys(1, 2)
    x = jax.random.uniform(k1, (n, dim), jnp.float32, -1.0, 1.0)
    bits = cfg.ring_bits(n)
    enc = encoding.encode(x, jnp.ones((n,), jnp.float32), k2, cfg, bits)
    s, w = encoding.decode(encoding.ring_sum(enc.values, bits), cfg, bits)
    err = np.asarray(s) - np.asarray(jnp.sum(x, axis=0))
    assert float(w) == n
    assert np.abs(err).max() < n / cfg.scale_value  # documented hard bound
    # Zero-mean, per-coordinate std at most sqrt(n) / (2 s): the mean over dim
    # coordinates is within 5 standard errors of 0.
    assert abs(err.mean()) < 5 * np.sqrt(n) / (2 * cfg.scale_value) / np.sqrt(dim)
    assert err.std() <= 1.05 * np.sqrt(n) / (2 * cfg.scale_value)


def test_bit_width_never_wraps_at_extremes():
    n = 13
    cfg = SecAggConfig(clip_range=1.0, frac_bits=12, max_weight=1.0, weight_bits=4)
    bits = cfg.ring_bits(n)
    for sign in (1.0, -1.0):
        x = jnp.full((n, 3), 5.0 * sign, jnp.float32)  # beyond the range: clipped to +-1
        enc = encoding.encode(
            x, jnp.full((n,), 7.0, jnp.float32), jax.random.key(2 if sign > 0 else 3), cfg, bits
        )
        s, w = encoding.decode(encoding.ring_sum(enc.values, bits), cfg, bits)
        np.testing.assert_array_equal(np.asarray(s), np.full(3, sign * n, np.float32))
        assert float(w) == n
    # One bit fewer would not hold the worst case.
    with pytest.raises(ValueError, match="too small"):
        SecAggConfig(clip_range=1.0, frac_bits=12, weight_bits=4, bits=bits - 1).ring_bits(n)


def test_bit_width_error_names_numbers():
    cfg = SecAggConfig(clip_range=4.0, frac_bits=22)
    with pytest.raises(ValueError, match=r"1000 clients.*16777216.*> 32"):
        cfg.ring_bits(1000)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        SecAggConfig(clip_range=8.0, frac_bits=22)


def test_integer_weights_exact():
    n = 6
    cfg = SecAggConfig(clip_range=1.0, frac_bits=16, max_weight=512.0, weight_bits=16)
    w = jnp.asarray([500.0, 1.0, 37.0, 0.0, 250.0, 499.0], jnp.float32)
    x = jax.random.uniform(jax.random.key(4), (n, 50), jnp.float32, -1.0, 1.0)
    bits = cfg.ring_bits(n)
    enc = encoding.encode(x, w, jax.random.key(5), cfg, bits)
    s, total = encoding.decode(encoding.ring_sum(enc.values, bits), cfg, bits)
    mean = s / total
    assert float(total) == float(jnp.sum(w))
    ref = np.sum(np.asarray(w)[:, None] * np.asarray(x), axis=0) / float(jnp.sum(w))
    bound = n * cfg.max_weight / (cfg.scale_value * float(total))
    assert np.abs(np.asarray(mean) - ref).max() < bound
    # The weight-0 client encodes to exact zeros.
    assert int(jnp.max(enc.values[3])) == 0


def test_pytree_flatten_round_trip():
    tree = {"a": jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4), "b": jnp.ones((2, 5), jnp.bfloat16)}
    flat = encoding.flatten(tree)
    assert flat.shape == (2, 17)
    back = encoding.unflatten(flat[1], tree)
    np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(tree["a"][1]))
    assert back["b"].dtype == jnp.bfloat16


def test_config_validation_and_threshold():
    with pytest.raises(ValueError):
        SecAggConfig(clip_range=-1.0)
    with pytest.raises(ValueError):
        SecAggConfig(bits=33)
    cfg = SecAggConfig(num_neighbors=5)
    assert cfg.neighbors_for(100) == 6 and cfg.neighbors_for(6) == 5
    assert default_threshold(100) == 67
    assert cfg.threshold_for(100) == default_threshold(7)
    hash(cfg)  # usable as a static argument
