"""FedSGD: one full-batch gradient per client, averaged, one server step.

References:
  Shokri and Shmatikov. "Privacy-Preserving Deep Learning". CCS 2015; the
  FedSGD baseline of McMahan et al., AISTATS 2017.
"""

from __future__ import annotations

import optax

from fljax import client, simulation
from fljax.base import Aggregator, ClientUpdate, FederatedAlgorithm


def gradient_client(model, **options) -> ClientUpdate:
    """FedSGD's client: :func:`fljax.client.local_gradient` (options ``loss_fn``, ``weighting`` forwarded)."""
    return client.local_gradient(model, **options)


def fedsgd(
    client_update: ClientUpdate,
    *,
    learning_rate: float,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedSGD: clients send the gradient of their mean loss (:func:`gradient_client`); the server takes an SGD step.

    With example weighting and equal learning rates this is exactly one step of
    centralised full-batch gradient descent on the cohort's pooled data.
    """
    return simulation.averaging_algorithm(client_update, optax.sgd(learning_rate), aggregator=aggregator)
