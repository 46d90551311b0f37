"""Federated algorithms, one file per paper, one shape:
``name(client_update, *, <server hyperparameters>, aggregator=None) -> FederatedAlgorithm``."""

from fljax.algorithms import (
    fedavg,
    fedavgm,
    feddyn,
    fednova,
    fedopt,
    fedprox,
    fedsgd,
    mimelite,
    qffl,
    scaffold,
)

__all__ = [
    "fedavg",
    "fedavgm",
    "feddyn",
    "fednova",
    "fedopt",
    "fedprox",
    "fedsgd",
    "mimelite",
    "qffl",
    "scaffold",
]
