"""fljax: federated learning with privacy protection, in JAX.

A round is one jitted computation over the whole cohort: a one-client update
(``client.local_sgd``) is vmapped across clients, an ``Aggregator`` combines
their deltas (weighted mean, robust means, differential privacy, secure
aggregation), and any optax optimizer applies the result on the server.

Modules are imported and called qualified::

    from fljax import client, data, models
    from fljax.algorithms import fedavg

    algo = fedavg.fedavg(client.local_sgd(models.LeNet(), optax.sgd(0.01, momentum=0.9), batch_size=32))
"""

from fljax import (
    aggregators,
    algorithms,
    analytics,
    attacks,
    base,
    checkpoint,
    client,
    compression,
    data,
    deploy,
    distributed,
    evaluation,
    fast,
    heterogeneity,
    leakage,
    losses,
    models,
    nn,
    personalization,
    privacy,
    random,
    robust,
    secagg,
    simulation,
    tree,
)
from fljax.base import (
    Aggregator,
    ClientData,
    ClientOutput,
    Cohort,
    FederatedAlgorithm,
    Performance,
    ServerState,
    StatefulClientUpdate,
)
from fljax.data import ClientStates, FederatedData

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ClientData",
    "ClientOutput",
    "ClientStates",
    "Cohort",
    "FederatedAlgorithm",
    "FederatedData",
    "Performance",
    "ServerState",
    "StatefulClientUpdate",
    "aggregators",
    "algorithms",
    "analytics",
    "attacks",
    "base",
    "checkpoint",
    "client",
    "compression",
    "data",
    "deploy",
    "distributed",
    "evaluation",
    "fast",
    "heterogeneity",
    "leakage",
    "losses",
    "models",
    "nn",
    "personalization",
    "privacy",
    "random",
    "robust",
    "secagg",
    "simulation",
    "tree",
]
