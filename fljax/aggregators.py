"""Aggregators: pure ``(init, aggregate)`` pairs that combine client deltas.

``aggregate(state, deltas, weights, key) -> (state, delta, metrics)`` where
``deltas`` carries a leading ``[clients]`` axis and ``weights`` is ``[clients]``.
Every aggregator here treats a client whose delta contains NaN or inf as
garbage: its weight is set to zero (it contributes exactly zero) and the count
is reported as ``num_nonfinite``. A padding slot (weight 0) contributes exactly
zero whatever its delta holds.

Aggregation is built around a SUM. A sum is an aggregator whose output is
``total = sum_i weights_i * deltas_i`` and whose metrics report the weight it
actually summed as ``total_weight`` (with ``num_nonfinite`` and
``num_clients``): :func:`weighted_sum` (plain) and
:func:`fljax.secagg.secure_sum` (fixed-point, masked). Stages surround a sum:
:func:`mean` divides by the observed ``total_weight``;
:func:`fljax.privacy.dp` clips, bounds weights, calls its sum once, adds noise
once and divides by a fixed denominator. Sums are additive, so chunked,
bucketed and sharded rounds can add partial sums instead of re-writing a mean.
The coordinate-wise robust means (:func:`median`, :func:`trimmed_mean`) are not
sums and stand alone.

Examples:
  A secure mean of two clients' deltas (the third slot is padding: weight 0,
  it contributes exactly zero), then DP over the same secure sum:

  >>> import jax, jax.numpy as jnp
  >>> from fljax import aggregators, privacy, secagg
  >>> params = {"w": jnp.zeros(2)}
  >>> deltas = {"w": jnp.array([[0.5, 0.0], [0.0, 0.25], [9.0, 9.0]])}
  >>> weights = jnp.array([1.0, 1.0, 0.0])
  >>> agg = aggregators.mean(secagg.secure_sum(secagg.SecAggConfig()))  # secure mean
  >>> _, delta, metrics = jax.jit(agg.aggregate)(agg.init(params), deltas, weights, jax.random.key(0))
  >>> bool(jnp.allclose(delta["w"], jnp.array([0.25, 0.125]), atol=1e-4)), float(metrics["total_weight"])
  (True, 2.0)
  >>> dp_config = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=100, cohort_size=2)
  >>> agg = privacy.dp(dp_config, sum=secagg.secure_sum(secagg.SecAggConfig()))  # DP over it
  >>> _, noised, metrics = jax.jit(agg.aggregate)(agg.init(params), deltas, weights, jax.random.key(1))
  >>> noised["w"].shape, float(metrics["dp_noise_std"])
  ((2,), 1.0)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fljax import tree
from fljax.base import Aggregator, Params, PyTree


class EmptyState(NamedTuple):
    """State of a stateless aggregator."""


def _init_empty(params: Params) -> EmptyState:
    del params
    return EmptyState()


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


def _metrics(weights: jax.Array, num_nonfinite: jax.Array) -> dict[str, jax.Array]:
    return {
        "num_nonfinite": num_nonfinite,
        "total_weight": jnp.sum(weights),
        "num_clients": jnp.sum(weights > 0).astype(jnp.int32),
    }


def weighted_sum() -> Aggregator:
    """The plain sum: ``total = sum_i w_i delta_i``.

    Non-finite clients (or weights) get weight 0 and are counted in
    ``num_nonfinite``; a weight-0 client contributes exactly zero (see
    :func:`sanitize`). Stateless; the key is unused.

    Returns:
      A sum: ``aggregate(state, deltas, weights, key) -> (state, total,
      metrics)`` with metrics ``total_weight`` (``sum_i w_i`` over the clients
      kept), ``num_nonfinite`` and ``num_clients``.

    Examples:
      The third client's delta holds a NaN: it is dropped and counted.

      >>> import jax, jax.numpy as jnp
      >>> from fljax import aggregators
      >>> params = {"w": jnp.zeros(2)}
      >>> deltas = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 0.0]])}
      >>> weights = jnp.array([1.0, 2.0, 1.0])
      >>> agg = aggregators.weighted_sum()
      >>> state, total, metrics = agg.aggregate(agg.init(params), deltas, weights, jax.random.key(0))
      >>> total["w"].tolist(), float(metrics["total_weight"]), int(metrics["num_nonfinite"])
      ([7.0, 10.0], 3.0, 1)
    """

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = sanitize(deltas, weights)
        return state, tree.weighted_sum(deltas, w), _metrics(w, num_bad)

    return Aggregator(_init_empty, aggregate)


def mean(sum: Aggregator | None = None) -> Aggregator:
    """Mean over the observed weight: ``sum``'s total divided by its ``total_weight``.

    The result is zero when the observed weight is 0 (no client, every client
    rejected, or a secure round that aborted). Dividing by the OBSERVED weight
    is not differentially private; :func:`fljax.privacy.dp` divides by a fixed
    denominator instead.

    Args:
      sum: the inner sum (default :func:`weighted_sum`), e.g.
        :func:`fljax.secagg.secure_sum`.

    Returns:
      An aggregator with the inner sum's state and metrics.

    Examples:
      The plain weighted mean, the mean of no observed weight (zero), and a
      secure weighted mean for weights up to 512 examples (run in the module
      example above):

      >>> import jax, jax.numpy as jnp
      >>> from fljax import aggregators, secagg
      >>> params = {"w": jnp.zeros(2)}
      >>> deltas = {"w": jnp.array([[0.5, 0.0], [0.0, 0.25]])}
      >>> agg = aggregators.mean()
      >>> _, delta, _ = agg.aggregate(agg.init(params), deltas, jnp.array([100.0, 300.0]), jax.random.key(0))
      >>> delta["w"].tolist()
      [0.125, 0.1875]
      >>> _, delta, metrics = agg.aggregate(agg.init(params), deltas, jnp.zeros(2), jax.random.key(1))
      >>> delta["w"].tolist(), float(metrics["total_weight"])
      ([0.0, 0.0], 0.0)
      >>> secure_mean = aggregators.mean(secagg.secure_sum(secagg.SecAggConfig(max_weight=512.0)))
    """
    inner = weighted_sum() if sum is None else sum

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        state, total, metrics = inner.aggregate(state, deltas, weights, key)
        observed = metrics["total_weight"]
        some = observed > 0
        denom = jnp.where(some, observed, jnp.ones_like(observed))
        delta = jax.tree.map(
            lambda s: jnp.where(some, s / denom.astype(s.dtype), jnp.zeros((), s.dtype)), total
        )
        return state, delta, metrics

    return Aggregator(inner.init, aggregate)


def weighted_mean() -> Aggregator:
    """Weighted mean of client deltas (FedAvg's example-weighted average): ``mean(weighted_sum())``.

    ``delta = sum_i w_i delta_i / sum_i w_i`` with non-finite clients dropped
    (reported as ``num_nonfinite``). If every weight is zero the result is zero.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fljax import aggregators
      >>> params = {"w": jnp.zeros(2)}
      >>> deltas = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])}
      >>> weights = jnp.array([1.0, 3.0, 0.0])  # examples per client; the last slot is padding
      >>> agg = aggregators.weighted_mean()
      >>> state = agg.init(params)
      >>> state, delta, metrics = agg.aggregate(state, deltas, weights, jax.random.key(0))
      >>> delta["w"].tolist()  # (1 * [1, 2] + 3 * [3, 4]) / 4
      [2.5, 3.5]
    """
    return mean(weighted_sum())


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
    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = sanitize(deltas, weights)
        valid = w > 0

        def leaf(x):
            v = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
            xf = jnp.where(v, x, jnp.nan)
            out = reduce_fn(xf)
            return jnp.where(jnp.any(valid), out, jnp.zeros_like(out)).astype(x.dtype)

        return state, jax.tree.map(leaf, deltas), _metrics(w, num_bad)

    return Aggregator(_init_empty, aggregate)


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
