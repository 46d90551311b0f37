"""Federated algorithms, one file per paper, one shape:
``name(client_update, *, <server hyperparameters>, aggregator=None) -> FederatedAlgorithm``."""

from fljax.algorithms import (
    ditto,
    fedavg,
    fedavgm,
    fedbuff,
    feddyn,
    fednova,
    fedopt,
    fedprox,
    fedrep,
    fedsgd,
    mimelite,
    qffl,
    scaffold,
)

__all__ = [
    "ditto",
    "fedavg",
    "fedavgm",
    "fedbuff",
    "feddyn",
    "fednova",
    "fedopt",
    "fedprox",
    "fedrep",
    "fedsgd",
    "mimelite",
    "qffl",
    "scaffold",
]
