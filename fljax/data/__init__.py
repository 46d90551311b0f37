"""Federated data: populations, cohort gathering, sampling, partitioners, loaders."""

from fljax.data import sampling
from fljax.data.federated import FederatedData, to_device

__all__ = ["FederatedData", "sampling", "to_device"]
