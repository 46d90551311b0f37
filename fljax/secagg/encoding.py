"""Fixed-point encoding of client updates into the ring ``Z_(2**b)``.

Both the vectorised simulation and the cryptographic protocol add integers
modulo ``2**b``; this module turns float updates into such integers and the
sum back into floats. Steps, for a client with update ``x`` and weight ``w``:

1. Weight: ``w`` is clipped to ``[0, max_weight]`` and rounded to nearest on
   the grid ``max_weight / 2**weight_bits``: ``k = round(w / max_weight * 2**weight_bits)``,
   ``v = k / 2**weight_bits`` in ``[0, 1]``.
2. Range clip: each coordinate of ``x`` is clipped to ``[-r, r]`` (``r`` =
   ``clip_range``). This is the range requirement of the fixed-point code; an
   L2 clip for differential privacy is the DP wrapper's job, upstream.
3. ``u = v * x`` (in ``[-r, r]``) is scaled by ``s`` (``2**frac_bits`` or
   ``scale``) and rounded stochastically, unbiased, from an explicit key:
   ``q = floor(u*s) + [U < frac(u*s)]`` with ``U ~ Uniform[0,1)``, so
   ``E[q] = u*s`` and ``|q - u*s| < 1``.
4. The integer weight ``k`` is appended as one extra coordinate (exact).
5. The signed integers map into ``Z_(2**b)`` by two's complement (uint32
   wrap-around for ``b = 32``, masked to the low ``b`` bits otherwise).

The server adds the vectors mod ``2**b`` (masked, in secure aggregation) and
decodes: the signed sum ``S`` of the update coordinates and the weight total
``K``. The weighted mean is ``(S / s) / (K / 2**weight_bits)``. The bit width
is chosen (:meth:`SecAggConfig.ring_bits`) so that the true sum never wraps.

Error bound: for ``n`` clients, every coordinate of the decoded sum satisfies
``|S / s - sum_i v_i clip(x_i)| < n / s`` (each rounding moves less than one
unit), up to float32 rounding of the products (relative ``2**-24``); the error
is zero-mean, with standard deviation at most ``sqrt(n) / (2 s)``. The mean's
error is that divided by ``sum_i v_i``. The weight total is exact, so
``decode`` returns exactly the weighted mean, under the quantised weights
``k_i * max_weight / 2**weight_bits``, of the quantised updates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax.base import PyTree
from fljax.secagg.config import SecAggConfig


def flatten(tree: PyTree) -> jax.Array:
    """``[clients, dim]`` float32 from a pytree whose leaves are ``[clients, ...]``."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    return jnp.concatenate([jnp.reshape(x, (n, -1)).astype(jnp.float32) for x in leaves], axis=1)


def unflatten(vec: jax.Array, template: PyTree) -> PyTree:
    """Inverse of :func:`flatten` for ONE client: ``vec[dim]`` shaped like ``template``'s
    per-client slice (``template`` leaves are ``[clients, ...]``)."""
    leaves, treedef = jax.tree.flatten(template)
    out, start = [], 0
    for x in leaves:
        size = int(np.prod(x.shape[1:], dtype=np.int64))
        out.append(jnp.reshape(vec[start : start + size], x.shape[1:]).astype(x.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def quantize_weights(weights: jax.Array, config: SecAggConfig) -> jax.Array:
    """Integer weights ``k`` in ``[0, 2**weight_bits]`` (int32), deterministic."""
    w = jnp.clip(jnp.asarray(weights, jnp.float32), 0.0, config.max_weight)
    return jnp.round(w / jnp.float32(config.max_weight) * jnp.float32(config.weight_levels)).astype(jnp.int32)


def stochastic_round(y: jax.Array, key: jax.Array) -> jax.Array:
    """Unbiased stochastic rounding of float32 ``y`` to int32 (``|y| < 2**24``)."""
    lo = jnp.floor(y)
    u = jax.random.uniform(key, y.shape, jnp.float32)
    return (lo + (u < (y - lo)).astype(jnp.float32)).astype(jnp.int32)


def to_ring(q: jax.Array, bits: int) -> jax.Array:
    """Signed int32 to ``Z_(2**bits)`` as uint32 (two's complement, low ``bits`` bits)."""
    u = jax.lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32)
    return u & ring_mask(bits)


def from_ring(u: jax.Array, bits: int) -> jax.Array:
    """``Z_(2**bits)`` (uint32) to signed int32 in ``[-2**(b-1), 2**(b-1))``."""
    shift = jnp.uint32(32 - bits)
    return jax.lax.bitcast_convert_type(u << shift, jnp.int32) >> jnp.int32(32 - bits)


def ring_mask(bits: int) -> jax.Array:
    """The uint32 with the low ``bits`` bits set."""
    return jnp.uint32((1 << bits) - 1)


class Encoded(NamedTuple):
    """Clients' encoded inputs.

    Attributes:
      values: ``[clients, dim + 1]`` uint32 in ``Z_(2**bits)``; the last
        coordinate is the integer weight ``k``.
      num_range_clipped: int32, clients with a non-zero weight that had at
        least one coordinate outside ``[-clip_range, clip_range]``.
    """

    values: jax.Array
    num_range_clipped: jax.Array


def encode(x: jax.Array, weights: jax.Array, key: jax.Array, config: SecAggConfig, bits: int) -> Encoded:
    """Encode ``x[clients, dim]`` (float, finite) with ``weights[clients]``.

    Clients must already be sanitised (non-finite updates zeroed with weight
    0). A weight-0 client encodes to exact zeros.
    """
    k = quantize_weights(weights, config)
    v = k.astype(jnp.float32) / jnp.float32(config.weight_levels)
    r = jnp.float32(config.clip_range)
    clipped = jnp.clip(x.astype(jnp.float32), -r, r)
    num_clipped = jnp.sum(jnp.any(jnp.abs(x) > r, axis=1) & (k > 0)).astype(jnp.int32)
    y = v[:, None] * clipped * jnp.float32(config.scale_value)
    q = stochastic_round(y, key)
    q = jnp.where((k > 0)[:, None], q, jnp.zeros((), jnp.int32))
    values = jnp.concatenate([to_ring(q, bits), to_ring(k[:, None], bits)], axis=1)
    return Encoded(values, num_clipped)


def ring_sum(values: jax.Array, bits: int) -> jax.Array:
    """Sum over the leading axis in ``Z_(2**bits)``."""
    return jnp.sum(values, axis=0, dtype=jnp.uint32) & ring_mask(bits)


def decode(total: jax.Array, config: SecAggConfig, bits: int) -> tuple[jax.Array, jax.Array]:
    """Decode a ring sum ``total[dim + 1]``.

    Returns:
      ``(weighted_sum[dim], weight_total)``, float32: ``S / s * max_weight``,
      which is ``sum_i w_i clip(x_i)`` under the quantised weights
      ``w_i = k_i * max_weight / 2**weight_bits`` (up to the rounding error
      bound times ``max_weight``), and the exact weight total
      ``K * max_weight / 2**weight_bits``. Their ratio is the weighted mean.
    """
    signed = from_ring(total, bits)
    s = signed[:-1].astype(jnp.float32) / jnp.float32(config.scale_value) * jnp.float32(config.max_weight)
    w = signed[-1].astype(jnp.float32) * jnp.float32(config.max_weight / config.weight_levels)
    return s, w
