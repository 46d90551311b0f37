"""Adaptive federated optimisation: FedAdam, FedYogi, FedAdagrad.

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive
  Federated Optimization". ICLR 2021.
"""

from __future__ import annotations

import optax

from fljax import simulation
from fljax.base import Aggregator, ClientUpdate, FederatedAlgorithm


def fedopt(
    client_update: ClientUpdate,
    *,
    server_optimizer: optax.GradientTransformation,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedOpt with any optax server optimizer (Algorithm 1 of Reddi et al.)."""
    return simulation.averaging_algorithm(client_update, server_optimizer, aggregator=aggregator)


def fedadam(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedAdam: Adam on the server with adaptivity ``tau`` (paper's epsilon)."""
    opt = optax.adam(server_learning_rate, b1=b1, b2=b2, eps=tau)
    return fedopt(client_update, server_optimizer=opt, aggregator=aggregator)


def fedyogi(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedYogi: Yogi on the server (Zaheer et al. 2018) with adaptivity ``tau``."""
    opt = optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=tau)
    return fedopt(client_update, server_optimizer=opt, aggregator=aggregator)


def fedadagrad(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float,
    tau: float = 1e-3,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedAdagrad: Adagrad on the server with adaptivity ``tau``.

    optax's adagrad starts its accumulator at ``initial_accumulator_value``;
    the paper's ``v_{-1} >= tau^2`` corresponds to setting it to ``tau**2``.
    """
    opt = optax.adagrad(server_learning_rate, initial_accumulator_value=tau**2, eps=tau)
    return fedopt(client_update, server_optimizer=opt, aggregator=aggregator)
