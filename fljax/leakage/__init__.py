"""Measured privacy: attacks that try to extract training data, and empirical audits.

Differential privacy gives an upper bound on what any attack can learn (epsilon from
``dp_accounting``); the modules here measure what concrete attacks DO learn from the same
runs, so that a bound and an observation can be read side by side.
"""

from fljax.leakage import audit, image_metrics, inversion, membership, shadows

__all__ = ["audit", "image_metrics", "inversion", "membership", "shadows"]
