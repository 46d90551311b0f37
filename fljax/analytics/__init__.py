"""Federated analytics: private counts, sums, means, variances, histograms, quantiles, profiling.

Every statistic is a SUM of bounded per-client contributions released by
:func:`release.release` (bounds enforced, any fljax sum, Gaussian noise once):

* :mod:`release`: :class:`ReleaseConfig` (bounds, noise, accounting) and the release itself;
* :mod:`queries`: count, bounded sum, mean, variance, histogram;
* :mod:`quantiles`: quantiles from one DP hierarchical histogram;
* :mod:`budget`: :class:`BudgetLedger`, one budget shared by analytics and training;
* :mod:`profiling`: schema checks, private per-site profiles, private standardisation;
* :mod:`heavy_hitters`: private discovery of frequent items (TrieHH) over the same release.
"""

from fljax.analytics import budget, heavy_hitters, profiling, quantiles, queries, release
from fljax.analytics.budget import BudgetExceededError, BudgetLedger
from fljax.analytics.release import ReleaseConfig

__all__ = [
    "BudgetExceededError",
    "BudgetLedger",
    "ReleaseConfig",
    "budget",
    "heavy_hitters",
    "profiling",
    "quantiles",
    "queries",
    "release",
]
