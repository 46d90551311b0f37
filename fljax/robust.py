"""Byzantine-robust aggregators: Krum, the geometric median, norm bounding, centred clipping.

Every stage here is an :class:`~fljax.base.Aggregator` with the contract of
:mod:`fljax.aggregators`: ``aggregate(state, deltas[clients, ...],
weights[clients], key) -> (state, delta, metrics)``; a client whose delta
holds NaN/inf (or whose weight is non-finite or negative) is rejected by
:func:`fljax.aggregators.sanitize` and counted in ``num_nonfinite``; a padding
slot (weight 0) contributes exactly zero whatever its delta holds, is never
selected and never counts as a neighbour. Everything runs under ``jit``:
choices are masks, not Python branches on data. Metrics always include
``num_nonfinite``, ``num_clients`` (clients kept) and ``total_weight`` (their
weight), plus what each stage did (``num_selected``, ``num_clipped``).

Like the coordinate-wise :func:`fljax.aggregators.median` and
:func:`fljax.aggregators.trimmed_mean`, these are not sums: they do not
compose under :func:`fljax.privacy.dp`, whose accounting needs a clipped SUM
over a fixed denominator. :func:`norm_bounding` around the mean is the one
stage here that is also what DP does (clip, then average).

Examples:
  Three honest clients near ``[1, 1]``, one attacker far away and one padding
  slot holding garbage: Krum (one Byzantine client) picks an honest update.

  >>> import jax, jax.numpy as jnp
  >>> from fljax import robust
  >>> deltas = {"w": jnp.array([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [50.0, -50.0], [jnp.nan, 0.0]])}
  >>> weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
  >>> agg = robust.krum(num_byzantine=0)
  >>> _, delta, metrics = jax.jit(agg.aggregate)(agg.init(None), deltas, weights, jax.random.key(0))
  >>> delta["w"].tolist(), int(metrics["num_selected"]), int(metrics["num_nonfinite"])
  ([1.0, 1.0], 1, 0)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fljax import aggregators, tree
from fljax.base import Aggregator, Params, PyTree


def _metrics(weights: jax.Array, num_nonfinite: jax.Array, **extra) -> dict[str, jax.Array]:
    return {
        "num_nonfinite": num_nonfinite,
        "total_weight": jnp.sum(weights),
        "num_clients": jnp.sum(weights > 0).astype(jnp.int32),
        **extra,
    }


def _zero_invalid(deltas: Params, valid: jax.Array) -> Params:
    """Replace the deltas of invalid clients by zeros (so no NaN or inf reaches a product)."""

    def leaf(x):
        v = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
        return jnp.where(v, x, jnp.zeros((), x.dtype))

    return jax.tree.map(leaf, deltas)


def _masked_mean(deltas: Params, coefficients: jax.Array) -> Params:
    """``sum_i c_i x_i / sum_i c_i`` (zero when every ``c_i`` is 0)."""
    total = jnp.sum(coefficients)
    some = total > 0
    denom = jnp.where(some, total, 1.0)
    summed = tree.weighted_sum(deltas, coefficients)
    return jax.tree.map(lambda s: jnp.where(some, s / denom.astype(s.dtype), jnp.zeros((), s.dtype)), summed)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value, allow_inf: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not v > 0 or math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a positive{'' if allow_inf else ' finite'} number, got {value!r}")
    return v


def pairwise_sq_distances(deltas: Params, valid: jax.Array) -> jax.Array:
    """``[clients, clients]`` squared L2 distances between valid clients' whole updates.

    Computed in float32 from the Gram matrix (``|a|^2 + |b|^2 - 2 a.b``, floored
    at 0), so memory is ``O(clients^2)`` beyond the deltas. Entries that involve
    an invalid client (``valid`` False) are ``inf``; the diagonal is 0.
    """
    clean = _zero_invalid(deltas, valid)
    n = valid.shape[0]
    gram = jnp.zeros((n, n), jnp.float32)
    for x in jax.tree.leaves(clean):
        flat = x.reshape(n, -1).astype(jnp.float32)
        gram = gram + flat @ flat.T
    sq = jnp.diagonal(gram)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    both = valid[:, None] & valid[None, :]
    dist = jnp.where(both, dist, jnp.inf)
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)


def krum(num_byzantine: int, *, multi: int = 1) -> Aggregator:
    """Krum and multi-Krum (Blanchard et al. 2017).

    With ``n`` valid clients (weight > 0, finite) and ``f = num_byzantine``,
    client ``i``'s score is the sum of its squared distances to its
    ``n - f - 2`` nearest OTHER valid clients; padding and rejected clients are
    never neighbours and never selected. Krum returns the update with the
    lowest score; multi-Krum returns the plain (unweighted) average of the
    ``multi`` lowest-scored updates, as in the paper (``multi = n - f`` keeps
    every client but the ``f`` most isolated; ``f = 0, multi = n`` is the
    uniform mean). Ties go to the lower slot.

    Krum's guarantee needs ``2f + 2 < n``. The cohort's slot count is known at
    trace time, so a cohort that cannot satisfy it raises; when fewer valid
    clients than that arrive in a round (dropouts, rejections), the round still
    runs with ``max(n - f - 2, 1)`` neighbours and reports
    ``krum_bound_violated = 1``.

    Args:
      num_byzantine: ``f``, the number of Byzantine clients tolerated (int >= 0).
      multi: how many best-scored updates to average (int >= 1; 1 is Krum).

    Returns:
      A stateless aggregator. Metrics: ``num_selected``, ``krum_bound_violated``
      and ``num_nonfinite``, ``num_clients``, ``total_weight``.

    Raises:
      ValueError: bad arguments; at trace time, a cohort of ``n_slots`` slots with
        ``2 * num_byzantine + 2 >= n_slots`` or ``multi > n_slots - num_byzantine``.

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent". NeurIPS 2017.
    """
    f = _check_int("num_byzantine", num_byzantine, 0)
    m = _check_int("multi", multi, 1)

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        n_slots = weights.shape[0]
        if 2 * f + 2 >= n_slots:
            raise ValueError(
                f"krum needs 2 * num_byzantine + 2 < cohort size, got num_byzantine={f} "
                f"with a cohort of {n_slots} slots"
            )
        if m > n_slots - f:
            raise ValueError(
                f"multi must be at most cohort size - num_byzantine = {n_slots - f}, got multi={m}"
            )
        w, num_bad = aggregators.sanitize(deltas, weights)
        valid = w > 0
        n = jnp.sum(valid).astype(jnp.int32)
        k = jnp.clip(n - f - 2, 1, None)
        dist = pairwise_sq_distances(deltas, valid)
        dist = jnp.where(jnp.eye(n_slots, dtype=bool), jnp.inf, dist)  # not its own neighbour
        nearest = jnp.sort(dist, axis=1)
        rank = jnp.arange(n_slots)[None, :]
        scores = jnp.sum(jnp.where(rank < k, nearest, 0.0), axis=1)
        scores = jnp.where(valid, scores, jnp.inf)
        order = jnp.argsort(scores, stable=True)
        position = jnp.zeros((n_slots,), jnp.int32).at[order].set(jnp.arange(n_slots, dtype=jnp.int32))
        selected = valid & (position < m)
        delta = _masked_mean(deltas, selected.astype(jnp.float32))
        metrics = _metrics(
            w,
            num_bad,
            num_selected=jnp.sum(selected).astype(jnp.int32),
            krum_bound_violated=((2 * f + 2 >= n) & (n > 0)).astype(jnp.int32),
        )
        return state, delta, metrics

    return Aggregator(aggregators._init_empty, aggregate)


def _distances(deltas: Params, center: Params) -> jax.Array:
    """``[clients]`` L2 distance of each client's update to ``center`` (float32)."""
    sq = [
        jnp.sum(jnp.square((x - c[None]).astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x, c in zip(jax.tree.leaves(deltas), jax.tree.leaves(center), strict=True)
    ]
    return jnp.sqrt(sum(sq))


def geometric_median(*, max_iter: int = 32, eps: float = 1e-6) -> Aggregator:
    """Weighted geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    Minimises ``sum_i a_i max(eps, ||v - x_i||)`` over ``v`` with ``a_i`` the
    valid clients' weights (normalised). Starting from the weighted mean, each
    of ``max_iter`` iterations (``lax.fori_loop``) sets::

        beta_i = a_i / max(eps, ||v - x_i||)
        v      = sum_i beta_i x_i / sum_i beta_i

    The smoothing ``eps`` keeps the step defined when ``v`` lands on a client.
    A client arbitrarily far away moves the result by a bounded amount
    (breakdown point 1/2 of the weight). In one dimension the geometric median
    is the (weighted) median; for inputs symmetric about a point, that point.

    Args:
      max_iter: Weiszfeld iterations (int >= 1).
      eps: smoothing, a positive distance.

    Returns:
      A stateless aggregator. Metrics: ``geometric_median_objective`` (the
      weighted mean distance at the result), ``num_nonfinite``,
      ``num_clients``, ``total_weight``.

    References:
      Pillutla, Kakade, Harchaoui. "Robust Aggregation for Federated
      Learning". IEEE Transactions on Signal Processing 70, 2022.
    """
    iters = _check_int("max_iter", max_iter, 1)
    smooth = _check_positive("eps", eps)

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = aggregators.sanitize(deltas, weights)
        clean = _zero_invalid(deltas, w > 0)
        total = jnp.sum(w)
        a = w / jnp.where(total > 0, total, 1.0)

        def step(_, v):
            beta = a / jnp.maximum(_distances(clean, v), smooth)
            return _masked_mean(clean, beta)

        v = jax.lax.fori_loop(0, iters, step, _masked_mean(clean, a))
        objective = jnp.sum(a * _distances(clean, v))
        return state, v, _metrics(w, num_bad, geometric_median_objective=objective)

    return Aggregator(aggregators._init_empty, aggregate)


def norm_bounding(max_norm: float, inner: Aggregator | None = None) -> Aggregator:
    """Clip each client's update to L2 norm ``max_norm``, then aggregate with ``inner``.

    ``delta_i <- delta_i * min(1, max_norm / ||delta_i||)`` (one global norm
    over the whole update, :func:`fljax.tree.clip`), a defence against boosted
    (model-replacement) backdoors (Sun et al. 2019). Non-finite clients are
    rejected before the inner aggregator sees them.

    Args:
      max_norm: the L2 bound (positive; ``inf`` clips nothing).
      inner: the aggregator of the clipped updates (default
        :func:`fljax.aggregators.weighted_mean`); its state is this stage's.

    Returns:
      An aggregator with ``inner``'s state and metrics, plus ``num_clipped``;
      ``num_nonfinite`` counts the clients this stage rejected.

    References:
      Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor Federated
      Learning?". arXiv:1911.07963, 2019.
    """
    bound = _check_positive("max_norm", max_norm, allow_inf=True)
    agg = aggregators.weighted_mean() if inner is None else inner

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        w, num_bad = aggregators.sanitize(deltas, weights)
        valid = w > 0
        clean = _zero_invalid(deltas, valid)
        clipped, factors, _ = tree.clip(clean, bound)
        state, delta, metrics = agg.aggregate(state, clipped, w, key)
        metrics = dict(metrics)
        metrics.update(
            num_nonfinite=num_bad,
            num_clipped=jnp.sum(valid & (factors < 1.0)).astype(jnp.int32),
        )
        return state, delta, metrics

    return Aggregator(agg.init, aggregate)


class CenteredClippingState(NamedTuple):
    """State of :func:`centered_clipping`.

    Attributes:
      center: the previous round's aggregate (shaped like the params; zeros at init).
    """

    center: Params


def centered_clipping(radius: float, *, iters: int = 1) -> Aggregator:
    """Centred clipping around the previous aggregate (Karimireddy, He, Jaggi 2021).

    Starting from ``v`` = the previous round's aggregate (zero in the first
    round), each of ``iters`` iterations sets::

        v <- v + sum_i a_i clip(x_i - v, radius)

    with ``a_i`` the valid clients' normalised weights and ``clip`` the L2
    clip of the whole update. The result becomes the next round's centre. With
    ``radius = inf`` one iteration gives the weighted mean. A round without
    valid clients returns zero and keeps the centre.

    Args:
      radius: clipping radius ``tau`` (positive; ``inf`` allowed).
      iters: clipping iterations per round (int >= 1).

    Returns:
      An aggregator with state :class:`CenteredClippingState`. Metrics:
      ``num_clipped`` (in the last iteration), ``num_nonfinite``,
      ``num_clients``, ``total_weight``.

    References:
      Karimireddy, He, Jaggi. "Learning from History for Byzantine Robust
      Optimization". ICML 2021.
    """
    tau = _check_positive("radius", radius, allow_inf=True)
    num_iters = _check_int("iters", iters, 1)

    def init(params: Params) -> CenteredClippingState:
        return CenteredClippingState(center=jax.tree.map(jnp.zeros_like, params))

    def aggregate(state: CenteredClippingState, deltas: Params, weights: jax.Array, key: jax.Array):
        del key
        w, num_bad = aggregators.sanitize(deltas, weights)
        valid = w > 0
        clean = _zero_invalid(deltas, valid)
        total = jnp.sum(w)
        some = total > 0
        a = w / jnp.where(some, total, 1.0)
        v = state.center
        num_clipped = jnp.zeros((), jnp.int32)
        for _ in range(num_iters):
            diff = jax.tree.map(lambda x, c: x - c[None].astype(x.dtype), clean, v)
            clipped, factors, _ = tree.clip(diff, tau)
            step = tree.weighted_sum(clipped, a)
            v = jax.tree.map(lambda c, s: c + s.astype(c.dtype), v, step)
            num_clipped = jnp.sum(valid & (factors < 1.0)).astype(jnp.int32)
        delta = jax.tree.map(lambda x: jnp.where(some, x, jnp.zeros_like(x)), v)
        center = jax.tree.map(lambda new, old: jnp.where(some, new, old), v, state.center)
        return CenteredClippingState(center), delta, _metrics(w, num_bad, num_clipped=num_clipped)

    return Aggregator(init, aggregate)
