"""Secure aggregation: fixed-point encoding, vectorised masking simulation and
the real cryptographic protocol (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

:func:`secure_sum` is a sum in the sense of :mod:`fljax.aggregators`; compose
it, e.g. ``aggregators.mean(secagg.secure_sum(cfg))`` (secure weighted mean) or
``privacy.dp(dp_cfg, sum=secagg.secure_sum(cfg))`` (DP over secure aggregation).
:func:`protocol_sum` runs the real protocol on the host behind the same contract.
"""

from fljax.secagg import encoding, simulation
from fljax.secagg.config import SecAggConfig, default_threshold
from fljax.secagg.simulation import protocol_sum, secure_sum

__all__ = ["SecAggConfig", "default_threshold", "encoding", "protocol_sum", "secure_sum", "simulation"]
