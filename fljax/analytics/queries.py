"""Private counts, sums, means, variances and histograms, each one :func:`~fljax.analytics.release.release`.

Every query is a :class:`Query`: a contribution function written for ONE client's
records ``(values [examples], mask [examples])`` (``mask`` False marks a padding
record, ``NaN`` a missing value), the L2 (and L1/Linf) bound of that contribution,
and a host-side ``finalize`` that turns the released sum into the statistic.
:func:`run` releases it over a population ``values [clients, examples]`` through
any fljax sum, with Gaussian noise of std ``z * l2_bound`` per coordinate.

Unit of privacy: one client (all of its records); neighbouring relation:
add/remove one client. Each query uses at most ``max_contributions = k`` of a
client's records (its first ``k`` present ones), so:

| query | contribution (one client) | L2 bound (sensitivity) |
|---|---|---|
| count | ``[min(#records with predicate, k)]`` | ``k`` |
| bounded_sum | ``[sum clip(x, lo, hi)]`` | ``k max(abs(lo), abs(hi))`` |
| mean | ``[sum (x - c), a n]`` | ``k sqrt(R^2 + a^2)`` |
| variance | ``[sum (x - c), a n, b sum (x - c)^2]`` | ``k sqrt(R^2 + a^2 + (b R^2)^2)`` |
| histogram | counts per cell, each ``<= m`` | ``sqrt(floor(k/m) m^2 + (k mod m)^2)`` |

with ``c = (lo + hi) / 2``, ``R = (hi - lo) / 2`` (values clipped to ``[lo, hi]``,
so ``|x - c| <= R``), and ``a = 2**round(log2 R)``, ``b = 1 / a``: powers of two
that put the count and the sum of squares on the sum's scale (so one noise std
serves all coordinates) while keeping the noise-free release exact. Missing values
(NaN) are skipped by sum/mean/variance and counted in the histogram's own
``missing`` cell.

How noise enters the mean and the variance: with ``sigma = z * l2_bound``, the
released ``n`` has noise std ``sigma / a``, ``S = sum (x - c)`` std ``sigma`` and
``Q = sum (x - c)^2`` std ``sigma / b``; ``mean = c + S / n`` and ``variance =
max(Q / n - (S / n)^2, 0)`` (clamped at 0), the mean clamped to ``[lo, hi]`` and
``n`` floored at 1. Without noise every query equals the pooled numpy computation
over the records used (exactly for counts and histograms; for sums up to float32
rounding, exactly for values whose sums are representable).

Examples:
  A histogram and a mean over three clients, without noise (equal to numpy):

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from fljax.analytics import queries
  >>> values = jnp.array([[1.0, 2.5], [3.0, jnp.nan], [9.0, 0.5]])
  >>> mask = jnp.ones((3, 2), bool)
  >>> clients = jnp.ones(3, bool)
  >>> q = queries.histogram(np.array([0.0, 2.0, 4.0]), max_contributions=2)
  >>> cfg = q.config(noise_multiplier=0.0, population_size=3)
  >>> h, _ = queries.run(q, cfg, values, mask, clients, jax.random.key(0))
  >>> h.counts.tolist(), h.above, h.missing
  ([2.0, 2.0], 1.0, 1.0)
  >>> q = queries.mean(0.0, 4.0, max_contributions=2)
  >>> m, _ = queries.run(q, q.config(noise_multiplier=0.0, population_size=3), values, mask, clients,
  ...                    jax.random.key(1))
  >>> m.mean, m.count  # 9.0 is clipped to 4.0: (1 + 2.5 + 3 + 4 + 0.5) / 5
  (2.2, 5.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax.analytics import release as release_lib
from fljax.base import Aggregator


class Query(NamedTuple):
    """A bounded per-client contribution and how to read its released sum.

    Attributes:
      name: what the query computes.
      contribution: ``(values [examples], mask [examples]) -> [d]`` float32, ONE client.
      l2_bound: L2 bound of a contribution (the sensitivity), enforced by the release.
      linf_bound: per-coordinate bound (or None), enforced.
      l1_bound: L1 bound (or None), enforced.
      finalize: host function of the released ``[d]`` vector (numpy float64) -> result.
    """

    name: str
    contribution: Callable[[jax.Array, jax.Array], jax.Array]
    l2_bound: float
    linf_bound: float | None
    l1_bound: float | None
    finalize: Callable[[np.ndarray], Any]

    def config(
        self, *, noise_multiplier: float, population_size: int, delta: float | None = None
    ) -> release_lib.ReleaseConfig:
        """The :class:`~fljax.analytics.release.ReleaseConfig` with this query's bounds."""
        return release_lib.ReleaseConfig(
            l2_bound=self.l2_bound,
            linf_bound=self.linf_bound,
            l1_bound=self.l1_bound,
            noise_multiplier=noise_multiplier,
            population_size=population_size,
            delta=delta,
        )


class MeanResult(NamedTuple):
    """A released mean and the released number of values it averages."""

    mean: float
    count: float


class VarianceResult(NamedTuple):
    """Released mean, population variance (``ddof=0``, clamped at 0), its root and the count."""

    mean: float
    variance: float
    std: float
    count: float


class HistogramResult(NamedTuple):
    """Released counts per bin (``[bins]``), below/above the range, missing (NaN), and the edges."""

    counts: np.ndarray
    below: float
    above: float
    missing: float
    edges: np.ndarray


def _check_k(max_contributions: int) -> int:
    if isinstance(max_contributions, bool) or not isinstance(max_contributions, int) or max_contributions < 1:
        raise ValueError(f"max_contributions must be a positive int, got {max_contributions!r}")
    return max_contributions


def _check_range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def first_k(selected: jax.Array, k: int) -> jax.Array:
    """``selected [examples]`` bool restricted to its first ``k`` True entries."""
    return selected & (jnp.cumsum(selected.astype(jnp.int32)) <= k)


def _observed(values: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    return first_k(jnp.asarray(mask, jnp.bool_) & ~jnp.isnan(values), k)


def _pow2(x: float) -> float:
    return float(2.0 ** round(math.log2(x)))


def count(predicate: Callable[[jax.Array], jax.Array], *, max_contributions: int = 1) -> Query:
    """Count the records for which ``predicate(values)`` (elementwise bool) holds.

    A client contributes ``min(#its present records with the predicate, k)``;
    L2 bound (sensitivity) ``k``. Result: the released count (float).
    """
    k = _check_k(max_contributions)

    def contribution(values, mask):
        hit = jnp.asarray(mask, jnp.bool_) & jnp.asarray(predicate(values), jnp.bool_)
        return jnp.minimum(jnp.sum(hit), k).astype(jnp.float32)[None]

    return Query(f"count(k={k})", contribution, float(k), None, None, lambda v: float(v[0]))


def bounded_sum(lo: float, hi: float, *, max_contributions: int = 1) -> Query:
    """Sum of a feature clipped to ``[lo, hi]`` (NaN skipped), ``k`` values per client.

    L2 bound (sensitivity) ``k max(|lo|, |hi|)``. Result: the released sum (float).
    """
    k = _check_k(max_contributions)
    lo, hi = _check_range(lo, hi)

    def contribution(values, mask):
        keep = _observed(values, mask, k)
        x = jnp.clip(jnp.where(keep, values, 0.0), lo, hi)
        return jnp.sum(jnp.where(keep, x, 0.0))[None].astype(jnp.float32)

    return Query(
        f"sum[{lo:g}, {hi:g}](k={k})",
        contribution,
        k * max(abs(lo), abs(hi)),
        None,
        None,
        lambda v: float(v[0]),
    )


def _moments(lo: float, hi: float, k: int, with_squares: bool):
    c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
    a = _pow2(r)
    b = 1.0 / a

    def contribution(values, mask):
        keep = _observed(values, mask, k)
        x = jnp.clip(jnp.where(keep, values, c), lo, hi) - jnp.float32(c)
        x = jnp.where(keep, x, 0.0)
        parts = [jnp.sum(x), jnp.float32(a) * jnp.sum(keep).astype(jnp.float32)]
        if with_squares:
            parts.append(jnp.float32(b) * jnp.sum(jnp.square(x)))
        return jnp.stack(parts).astype(jnp.float32)

    l2 = k * math.sqrt(r**2 + a**2 + ((b * r**2) ** 2 if with_squares else 0.0))
    return contribution, l2, c, a, b


def mean(lo: float, hi: float, *, max_contributions: int = 1) -> Query:
    """Mean of a feature clipped to ``[lo, hi]`` (NaN skipped), ``k`` values per client.

    Releases ``[sum (x - c), a n]`` together (module docstring); L2 bound
    ``k sqrt(R^2 + a^2)``. Result: :class:`MeanResult`; the mean is ``c + S / n``
    with ``n`` floored at 1, clamped to ``[lo, hi]``.
    """
    k = _check_k(max_contributions)
    lo, hi = _check_range(lo, hi)
    contribution, l2, c, a, _ = _moments(lo, hi, k, False)

    def finalize(v):
        n = float(v[1]) / a
        m = c + float(v[0]) / max(n, 1.0)
        return MeanResult(mean=float(np.clip(m, lo, hi)), count=n)

    return Query(f"mean[{lo:g}, {hi:g}](k={k})", contribution, l2, None, None, finalize)


def variance(lo: float, hi: float, *, max_contributions: int = 1) -> Query:
    """Mean and population variance of a feature clipped to ``[lo, hi]`` (NaN skipped).

    Releases ``[S, a n, b Q]`` with ``S = sum (x - c)``, ``Q = sum (x - c)^2``
    (module docstring); L2 bound ``k sqrt(R^2 + a^2 + (b R^2)^2)``. Result:
    :class:`VarianceResult` with ``variance = max(Q / n - (S / n)^2, 0)``.
    """
    k = _check_k(max_contributions)
    lo, hi = _check_range(lo, hi)
    contribution, l2, c, a, b = _moments(lo, hi, k, True)

    def finalize(v):
        n = max(float(v[1]) / a, 1.0)
        s, q = float(v[0]) / n, float(v[2]) / b / n
        var = max(q - s * s, 0.0)
        return VarianceResult(
            mean=float(np.clip(c + s, lo, hi)), variance=var, std=math.sqrt(var), count=float(v[1]) / a
        )

    return Query(f"variance[{lo:g}, {hi:g}](k={k})", contribution, l2, None, None, finalize)


def histogram(edges, *, max_contributions: int = 1, max_per_bin: int | None = None) -> Query:
    """Histogram over fixed bin ``edges`` with below-range, above-range and missing cells.

    Bins are ``[e_j, e_{j+1})``, the last one closed (as ``np.histogram``); a
    value below ``e_0`` counts in ``below``, above ``e_B`` in ``above``, a NaN in
    ``missing``. A client's first ``k`` present records count, at most ``m =
    max_per_bin`` (default ``k``) in any cell: L1 bound ``k``, Linf bound ``m``,
    L2 bound ``sqrt(floor(k/m) m^2 + (k mod m)^2)`` (the worst split of ``k``
    records into cells of at most ``m``). Result: :class:`HistogramResult`.
    """
    k = _check_k(max_contributions)
    m = k if max_per_bin is None else _check_k(max_per_bin)
    m = min(m, k)
    e = np.asarray(edges, np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError(f"edges must be a 1-d increasing finite array of >= 2 values, got {edges!r}")
    num_bins = e.size - 1
    e32 = jnp.asarray(e, jnp.float32)

    def contribution(values, mask):
        keep = first_k(jnp.asarray(mask, jnp.bool_), k)
        missing = jnp.isnan(values)
        idx = jnp.searchsorted(e32, values, side="right") - 1
        idx = jnp.where(values == e32[-1], num_bins - 1, idx)
        cell = jnp.where(values < e32[0], num_bins, jnp.where(values > e32[-1], num_bins + 1, idx))
        cell = jnp.where(missing, num_bins + 2, cell)
        counts = jnp.zeros(num_bins + 3, jnp.float32).at[cell].add(keep.astype(jnp.float32))
        return jnp.minimum(counts, jnp.float32(m))

    q, r = divmod(k, m)
    l2 = math.sqrt(q * m * m + r * r)

    def finalize(v):
        return HistogramResult(
            counts=np.asarray(v[:num_bins], np.float64),
            below=float(v[num_bins]),
            above=float(v[num_bins + 1]),
            missing=float(v[num_bins + 2]),
            edges=e,
        )

    return Query(f"histogram({num_bins} bins, k={k}, m={m})", contribution, l2, float(m), float(k), finalize)


_release_jit = jax.jit(release_lib.release, static_argnums=(0, 3), static_argnames=("sum",))


def run(
    query: Query,
    config: release_lib.ReleaseConfig,
    values: jax.Array,
    mask: jax.Array,
    client_mask: jax.Array,
    key: jax.Array,
    *,
    sum: Aggregator | None = None,  # noqa: A002 (the name privacy.dp uses)
) -> tuple[Any, dict[str, jax.Array]]:
    """Release ``query`` over ``values [clients, examples]`` and finalize it on the host.

    Args:
      query: the query.
      config: :meth:`Query.config` (its bounds must be the query's).
      values: ``[clients, examples]`` float, NaN for a missing value.
      mask: ``[clients, examples]`` bool, False for padding records.
      client_mask: ``[clients]`` bool, False for padding clients.
      key: typed PRNG key (the release's; see :func:`fljax.analytics.release.noised_sum`).
      sum: the sum aggregator (default plain), e.g. :func:`fljax.secagg.secure_sum`.

    Returns:
      ``(result, metrics)``: the query's result and the release's metrics.
    """
    bounds = (config.l2_bound, config.linf_bound, config.l1_bound)
    if bounds != (query.l2_bound, query.linf_bound, query.l1_bound):
        raise ValueError(
            f"config bounds (l2, linf, l1) = {bounds} are not those of {query.name}: "
            f"{(query.l2_bound, query.linf_bound, query.l1_bound)}; build it with query.config(...)"
        )
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, jnp.bool_)
    if values.ndim != 2 or mask.shape != values.shape:
        raise ValueError(
            f"values and mask must both be [clients, examples], got {values.shape} and {mask.shape}"
        )
    value, metrics = _release_jit(
        _Contribution(query.contribution),
        (values, mask),
        jnp.asarray(client_mask, jnp.bool_),
        config,
        key,
        sum=sum,
    )
    return query.finalize(np.asarray(value, np.float64)), metrics


class _Contribution(NamedTuple):
    """Hashable adapter: ``fn((values, mask))`` -> ``fn(values, mask)``."""

    fn: Callable

    def __call__(self, data):
        return self.fn(*data)
