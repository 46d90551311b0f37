"""FedAvg: Federated Averaging.

References:
  McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient
  Learning of Deep Networks from Decentralized Data". AISTATS 2017.
"""

from __future__ import annotations

import optax

from fljax import simulation
from fljax.base import Aggregator, ClientUpdate, FederatedAlgorithm


def fedavg(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """Federated Averaging.

    The server moves to ``params - server_learning_rate * mean(delta)``; with
    the default rate 1 that is the example-weighted average of the clients'
    local models.

    Args:
      client_update: e.g. ``client.local_sgd(model, optax.sgd(0.01), batch_size=32)``.
      server_learning_rate: server step size on the averaged delta.
      aggregator: default example-weighted mean; DP / secure aggregation wrap a sum.

    Returns:
      ``FederatedAlgorithm(init, update, with_performance)``.

    Examples:
      >>> algo = fedavg(client.local_sgd(model, optax.sgd(0.01), batch_size=32))
      >>> state = algo.init(params)
      >>> state, metrics = jax.jit(algo.update)(state, cohort, key)
    """
    return simulation.averaging_algorithm(
        client_update, optax.sgd(server_learning_rate), aggregator=aggregator
    )
