"""Cohort sampling from explicit keys.

Both samplers return ``(client_ids, client_mask)`` padded to a fixed cohort
size, so rounds share compiled shapes. They run on the host from a JAX key:
the population's data stays in host memory and only the cohort is gathered.

Poisson cohorts vary in size. Padding every draw to one Chernoff capacity
(:func:`poisson_max_cohort`) computes 39 slots for 10 expected clients. With a
capacity ladder (:func:`poisson_capacities`: a few geometric sizes from a lower
tail bound up to that capacity, each at most ``growth`` times the previous),
each draw is padded only to the smallest capacity that holds it
(:func:`to_capacity`): the same clients, drawn from the same key, in at most
``len(ladder)`` shapes. The expected computed slots per sampled client,
``E[slots] / E[sampled]``, is about 1.07, 1.14 and 1.06 at expected cohorts
10, 100 and 1,000 (``growth=1.3``; computed exactly from the binomial
distribution in ``tests/data/test_padding_efficiency.py``), against 3.9, 1.7
and 1.2 for the single capacity.

Examples:
  >>> import jax
  >>> ladder = poisson_capacities(1000, 0.1)
  >>> ladder
  (35, 45, 58, 75, 97, 126, 163, 172)
  >>> ids, mask = poisson(jax.random.key(0), 1000, 0.1, capacities=ladder)
  >>> len(ids) in ladder, bool(mask.sum() <= len(ids))
  (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np


def uniform(key: jax.Array, num_clients: int, cohort_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``cohort_size`` distinct clients chosen uniformly (without replacement)."""
    if not 0 < cohort_size <= num_clients:
        raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size}")
    ids = np.asarray(jax.random.choice(key, num_clients, (cohort_size,), replace=False))
    return np.sort(ids).astype(np.int32), np.ones(cohort_size, bool)


def poisson_max_cohort(num_clients: int, q: float, tail: float = 1e-9) -> int:
    """A fixed cohort capacity that Poisson sampling exceeds with probability < ``tail``.

    Uses the Chernoff bound for a Binomial(num_clients, q) count.
    """
    mean = num_clients * q
    # P[X >= mean + t] <= exp(-t^2 / (2 (mean + t/3))): solve for t.
    log_term = math.log(1.0 / tail)
    t = log_term / 3 + math.sqrt((log_term / 3) ** 2 + 2 * mean * log_term)
    return int(min(num_clients, math.ceil(mean + t)))


def poisson(
    key: jax.Array,
    num_clients: int,
    q: float,
    max_cohort: int | None = None,
    *,
    capacities: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each client joins independently with probability ``q`` (Poisson sampling).

    The sampled clients are padded with ``-1`` slots to ``max_cohort`` (default
    :func:`poisson_max_cohort`), or, with ``capacities`` (a ladder such as
    :func:`poisson_capacities`), to the smallest capacity that holds them. If
    more clients are drawn than the largest capacity the call raises rather
    than truncating, since truncation would silently change the sampling that
    privacy accounting assumes. The clients drawn depend on ``key``,
    ``num_clients`` and ``q`` only, never on the capacities.

    Args:
      key: typed key of the draw.
      num_clients: population size.
      q: each client's probability of joining, in (0, 1].
      max_cohort: the single capacity (ignored when ``capacities`` is given).
      capacities: ascending cohort sizes to pad to (see :func:`to_capacity`).

    Returns:
      ``(client_ids, client_mask)``: ``[capacity]`` int32 ids, the sampled
      clients first in increasing order, then ``-1``; and ``client_ids >= 0``.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling probability q must be in (0, 1], got {q}")
    if capacities is not None:
        ladder = _checked_ladder(capacities)
        cap = ladder[-1]
    else:
        cap = poisson_max_cohort(num_clients, q) if max_cohort is None else int(max_cohort)
    chosen = np.flatnonzero(np.asarray(jax.random.bernoulli(key, q, (num_clients,))))
    if chosen.size > cap:
        raise ValueError(
            f"Poisson sampling drew {chosen.size} clients but the cohort capacity is {cap}; "
            "raise max_cohort (truncating would break the privacy accounting)"
        )
    ids = np.full(cap, -1, np.int32)
    ids[: chosen.size] = chosen
    if capacities is not None:
        return to_capacity(ids, ids >= 0, ladder)
    return ids, ids >= 0


def geometric_ladder(low: int, high: int, growth: float = 1.3) -> tuple[int, ...]:
    """Integers from ``low`` to ``high``, each at most ``growth`` times the previous.

    ``v[i+1] = min(high, max(v[i] + 1, floor(v[i] * growth)))``: a count padded
    up to the next rung grows by a factor below ``growth``, or by one slot
    where ``growth`` times a rung adds less than one.

    Examples:
      >>> geometric_ladder(1, 39)
      (1, 2, 3, 4, 5, 6, 7, 9, 11, 14, 18, 23, 29, 37, 39)
      >>> geometric_ladder(796, 1211)
      (796, 1034, 1211)
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    if not growth > 1.0:
        raise ValueError(f"growth must be > 1, got {growth}")
    ladder = [int(low)]
    while ladder[-1] < high:
        ladder.append(min(int(high), max(ladder[-1] + 1, math.floor(ladder[-1] * growth))))
    return tuple(ladder)


def poisson_capacities(
    num_clients: int,
    q: float,
    max_cohort: int | None = None,
    *,
    growth: float = 1.3,
    tail: float = 1e-9,
) -> tuple[int, ...]:
    """A ladder of cohort capacities for Poisson sampling at rate ``q``.

    From the Chernoff lower bound of a Binomial(num_clients, q) count (a draw
    below it has probability < ``tail``; it is still served, by the smallest
    capacity) up to ``max_cohort`` (default :func:`poisson_max_cohort` with the
    same ``tail``), by :func:`geometric_ladder` steps. A round padded with
    :func:`to_capacity` then has one of ``len(ladder)`` shapes, the bound on
    the number of compiled round shapes.

    Args:
      num_clients: population size.
      q: sampling probability, in (0, 1].
      max_cohort: the largest capacity (the single capacity a caller used).
      growth: largest ratio between consecutive capacities.
      tail: probability bound of the lower end (and of the default top).

    Returns:
      Ascending capacities, the last one ``max_cohort``.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling probability q must be in (0, 1], got {q}")
    top = poisson_max_cohort(num_clients, q, tail) if max_cohort is None else int(max_cohort)
    if top < 1:
        raise ValueError(f"max_cohort must be positive, got {top}")
    mean = num_clients * q
    # P[X <= mean - t] <= exp(-t^2 / (2 mean)): the lower Chernoff bound.
    low = math.floor(mean - math.sqrt(2 * mean * math.log(1.0 / tail)))
    return geometric_ladder(min(max(low, 1), top), top, growth)


def to_capacity(
    client_ids: np.ndarray, client_mask: np.ndarray, capacities: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Re-pad a cohort to the smallest of ``capacities`` that holds its clients.

    The real clients (``client_mask`` True, ``client_ids >= 0``) keep their
    order and come first; the rest are ``-1`` padding slots. A padded slot has
    weight 0 and contributes nothing, so the round's result is the one padded
    to any larger capacity.

    Args:
      client_ids: ``[cohort]`` ids from a sampler.
      client_mask: ``[cohort]`` bool.
      capacities: ascending cohort sizes (e.g. :func:`poisson_capacities`).

    Returns:
      ``(client_ids, client_mask)`` of length ``min(c in capacities, c >= clients)``.

    Raises:
      ValueError: more real clients than the largest capacity.
    """
    ladder = _checked_ladder(capacities)
    ids = np.asarray(client_ids)
    real = ids[np.asarray(client_mask, bool) & (ids >= 0)]
    i = int(np.searchsorted(ladder, real.size))
    if i == len(ladder):
        raise ValueError(f"{real.size} sampled clients exceed the largest capacity {ladder[-1]}")
    out = np.full(ladder[i], -1, np.int32)
    out[: real.size] = real
    return out, out >= 0


def _checked_ladder(capacities: Sequence[int]) -> tuple[int, ...]:
    ladder = tuple(int(c) for c in capacities)
    if not ladder or ladder[0] < 1 or any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
        raise ValueError(f"capacities must be positive and strictly increasing, got {capacities}")
    return ladder
