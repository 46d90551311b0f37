"""FedProx: local training with a proximal term towards the server model.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
  Heterogeneous Networks". MLSys 2020.
"""

from __future__ import annotations

import optax

from fljax import client, losses, simulation
from fljax.base import Aggregator, FederatedAlgorithm


def fedprox(
    model,
    optimizer: optax.GradientTransformation,
    *,
    mu: float,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
    chunk_size: simulation.ChunkSize = "auto",
    mesh: simulation.Mesh | None = None,
) -> FederatedAlgorithm:
    """FedProx: each client minimises ``loss + mu/2 ||w - w_server||^2``. ``mu=0`` is FedAvg."""
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    update = client.local_sgd(
        model, optimizer, batch_size=batch_size, num_epochs=num_epochs, loss_fn=loss_fn, proximal_mu=mu
    )
    return simulation.averaging_algorithm(
        update, optax.sgd(server_learning_rate), aggregator=aggregator, chunk_size=chunk_size, mesh=mesh
    )
