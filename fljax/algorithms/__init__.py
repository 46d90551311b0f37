"""Federated algorithms, one file per paper, one shape:
``name(client_update, *, <server hyperparameters>, aggregator=None) -> FederatedAlgorithm``."""

from fljax.algorithms import fedavg, fedavgm, fedopt, fedprox, fedsgd, scaffold

__all__ = ["fedavg", "fedavgm", "fedopt", "fedprox", "fedsgd", "scaffold"]
