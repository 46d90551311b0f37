"""Cohort sampling from explicit keys.

Both samplers return ``(client_ids, client_mask)`` of a fixed cohort size, so
every round has the same shapes (no recompilation). They run on the host from
a JAX key: the population's data stays in host memory and only the cohort is
gathered.
"""

from __future__ import annotations

import math

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
    key: jax.Array, num_clients: int, q: float, max_cohort: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each client joins independently with probability ``q`` (Poisson sampling).

    The sampled clients are padded with ``-1`` slots to ``max_cohort`` (default
    :func:`poisson_max_cohort`). If more than ``max_cohort`` clients are drawn
    the call raises rather than truncating, since truncation would silently
    change the sampling that privacy accounting assumes.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling probability q must be in (0, 1], got {q}")
    cap = poisson_max_cohort(num_clients, q) if max_cohort is None else int(max_cohort)
    chosen = np.flatnonzero(np.asarray(jax.random.bernoulli(key, q, (num_clients,))))
    if chosen.size > cap:
        raise ValueError(
            f"Poisson sampling drew {chosen.size} clients but the cohort capacity is {cap}; "
            "raise max_cohort (truncating would break the privacy accounting)"
        )
    ids = np.full(cap, -1, np.int32)
    ids[: chosen.size] = chosen
    return ids, ids >= 0
