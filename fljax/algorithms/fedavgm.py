"""FedAvgM: Federated Averaging with server momentum.

References:
  Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution
  for Federated Visual Classification". arXiv:1909.06335, 2019.
"""

from __future__ import annotations

import optax

from fljax import simulation
from fljax.base import Aggregator, ClientUpdate, FederatedAlgorithm


def fedavgm(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.9,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedAvg whose server applies the averaged delta with heavy-ball momentum."""
    opt = optax.sgd(server_learning_rate, momentum=server_momentum)
    return simulation.averaging_algorithm(client_update, opt, aggregator=aggregator)
