"""Federated data: populations, cohort gathering, sampling, partitioners, loaders."""

from fljax.data import partition, prefetch, sampling
from fljax.data.federated import FederatedData, to_device

__all__ = ["FederatedData", "partition", "prefetch", "sampling", "to_device"]
