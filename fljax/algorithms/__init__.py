"""Federated algorithms, one file per paper."""

from fljax.algorithms import fedavg, fedavgm, fedopt, fedprox, fedsgd

__all__ = ["fedavg", "fedavgm", "fedopt", "fedprox", "fedsgd"]
