"""Secure aggregation: fixed-point encoding, vectorised masking simulation and
the real cryptographic protocol (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

Import the submodules and call them qualified, e.g.
``secagg.simulation.secure_aggregator(secagg.SecAggConfig(...))``.
"""

from fljax.secagg import encoding, simulation
from fljax.secagg.config import SecAggConfig, default_threshold
from fljax.secagg.simulation import secure_aggregator

__all__ = ["SecAggConfig", "default_threshold", "encoding", "simulation", "secure_aggregator"]
