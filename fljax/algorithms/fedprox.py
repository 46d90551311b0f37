"""FedProx: local training with a proximal term towards the server model.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
  Heterogeneous Networks". MLSys 2020.
"""

from __future__ import annotations

import optax

from fljax import client, simulation
from fljax.base import Aggregator, ClientUpdate, FederatedAlgorithm


def proximal_client(model, optimizer: optax.GradientTransformation, *, mu: float, **options) -> ClientUpdate:
    """FedProx's client: :func:`fljax.client.local_sgd` minimising ``loss + mu/2 ||w - w_server||^2``.

    Every other option (``batch_size``, ``num_epochs``, ``loss_fn``,
    ``weighting``, ``max_steps``, ``gradient``) is forwarded to ``local_sgd``.
    ``mu=0`` is FedAvg's client.
    """
    return client.local_sgd(model, optimizer, proximal_mu=mu, **options)


def fedprox(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedProx's round: FedAvg's server over clients built by :func:`proximal_client`."""
    return simulation.averaging_algorithm(
        client_update, optax.sgd(server_learning_rate), aggregator=aggregator
    )
