"""FedSGD: one full-batch gradient per client, averaged, one server step.

References:
  Shokri and Shmatikov. "Privacy-Preserving Deep Learning". CCS 2015; the
  FedSGD baseline of McMahan et al., AISTATS 2017.
"""

from __future__ import annotations

import optax

from fljax import client, losses, simulation
from fljax.base import Aggregator, FederatedAlgorithm


def fedsgd(
    model,
    *,
    learning_rate: float,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    aggregator: Aggregator | None = None,
    chunk_size: simulation.ChunkSize = "auto",
    mesh: simulation.Mesh | None = None,
) -> FederatedAlgorithm:
    """FedSGD: clients send the gradient of their mean loss; the server takes an SGD step.

    With example weighting and equal learning rates this is exactly one step of
    centralised full-batch gradient descent on the cohort's pooled data.
    """
    return simulation.averaging_algorithm(
        client.local_gradient(model, loss_fn=loss_fn),
        optax.sgd(learning_rate),
        aggregator=aggregator,
        chunk_size=chunk_size,
        mesh=mesh,
    )
