"""Aggregators: pure ``(init, aggregate)`` pairs that combine client deltas.

``aggregate(state, deltas, weights, key) -> (state, delta, metrics)`` where
``deltas`` carries a leading ``[clients]`` axis and ``weights`` is ``[clients]``.
Every aggregator here treats a client whose delta contains NaN or inf as
garbage: its weight is set to zero (it contributes exactly zero) and the count
is reported as ``num_nonfinite``. A padding slot (weight 0) contributes exactly
zero whatever its delta holds.

Wrappers (DP in :mod:`fljax.privacy`, secure aggregation in :mod:`fljax.secagg`)
take an :class:`~fljax.base.Aggregator` and return one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fljax import tree
from fljax.base import Aggregator, Params, PyTree


class EmptyState(NamedTuple):
    """State of a stateless aggregator."""


def sanitize(deltas: Params, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero the weight of clients with non-finite deltas or weights.

    Returns:
      ``(weights, num_nonfinite)``: float32 weights where every client with a
      NaN/inf delta, a non-finite weight or a negative weight has weight 0, and
      the number of such clients among those that had a non-zero weight.
    """
    weights = jnp.asarray(weights, jnp.float32)
    ok = tree.is_finite(deltas) & jnp.isfinite(weights) & (weights >= 0)
    bad = (~ok) & (weights != 0)
    clean = jnp.where(ok, weights, 0.0)
    return clean, jnp.sum(bad).astype(jnp.int32)


def weighted_mean() -> Aggregator:
    """Weighted mean of client deltas (FedAvg's example-weighted average).

    ``delta = sum_i w_i delta_i / sum_i w_i`` with non-finite clients dropped
    (reported as ``num_nonfinite``). If every weight is zero the result is zero.

    Examples:
      >>> agg = weighted_mean()
      >>> state = agg.init(params)
      >>> state, delta, metrics = agg.aggregate(state, deltas, weights, key)
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = sanitize(deltas, weights)
        delta = tree.weighted_mean(deltas, w)
        metrics = {
            "num_nonfinite": num_bad,
            "total_weight": jnp.sum(w),
            "num_clients": jnp.sum(w > 0).astype(jnp.int32),
        }
        return state, delta, metrics

    return Aggregator(init, aggregate)


def uniform_mean() -> Aggregator:
    """Unweighted mean over the clients with a non-zero weight.

    Every participating client counts once, whatever its number of examples;
    padding slots (weight 0) and non-finite clients are excluded.
    """
    inner = weighted_mean()

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        ones = jnp.where(jnp.asarray(weights) > 0, 1.0, 0.0)
        ones = jnp.where(jnp.isfinite(jnp.asarray(weights, jnp.float32)), ones, jnp.nan)
        return inner.aggregate(state, deltas, ones, key)

    return Aggregator(inner.init, aggregate)


def _coordinate_robust(reduce_fn) -> Aggregator:
    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = sanitize(deltas, weights)
        valid = w > 0

        def leaf(x):
            v = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
            xf = jnp.where(v, x, jnp.nan)
            out = reduce_fn(xf)
            return jnp.where(jnp.any(valid), out, jnp.zeros_like(out)).astype(x.dtype)

        metrics = {
            "num_nonfinite": num_bad,
            "total_weight": jnp.sum(w),
            "num_clients": jnp.sum(valid).astype(jnp.int32),
        }
        return state, jax.tree.map(leaf, deltas), metrics

    return Aggregator(init, aggregate)


def median() -> Aggregator:
    """Coordinate-wise median over participating clients (Yin et al. 2018).

    Ignores weights beyond participation (weight > 0). Robust to a minority of
    arbitrary (Byzantine) updates.
    """
    return _coordinate_robust(lambda x: jnp.nanmedian(x, axis=0))


def trimmed_mean(trim_fraction: float) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Drops the ``floor(trim_fraction * n)`` largest and smallest values of each
    coordinate among the ``n`` participating clients, then averages the rest.

    Args:
      trim_fraction: in ``[0, 0.5)``.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")

    def reduce(x):
        n = jnp.sum(~jnp.isnan(x[(slice(None),) + (0,) * (x.ndim - 1)])).astype(jnp.int32)
        k = jnp.floor(trim_fraction * n.astype(jnp.float32)).astype(jnp.int32)
        s = jnp.sort(x, axis=0)  # NaNs (non-participants) sort last
        idx = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        keep = (idx >= k) & (idx < n - k)
        total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
        return total / jnp.maximum(n - 2 * k, 1).astype(total.dtype)

    return _coordinate_robust(reduce)
