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
      One round on two tiny clients:

      >>> import jax, numpy as np, optax
      >>> from fljax import client, models
      >>> from fljax.algorithms import fedavg
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> algo = fedavg.fedavg(client.local_sgd(model, optax.sgd(0.1), batch_size=3))
      >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
      >>> state, metrics = jax.jit(algo.update)(state, data.cohort([0, 1]), jax.random.key(1))
      >>> int(state.round), bool(np.isfinite(metrics["client_train_loss_weighted_mean"]))
      (1, True)
    """
    return simulation.averaging_algorithm(
        client_update, optax.sgd(server_learning_rate), aggregator=aggregator
    )
