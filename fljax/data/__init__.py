"""Federated data: populations, per-client state, cohort gathering, sampling, partitioners, loaders."""

from fljax.data import partition, prefetch, sampling
from fljax.data import standardize as standardize
from fljax.data.client_states import ClientStates
from fljax.data.federated import FederatedData, to_device

__all__ = ["ClientStates", "FederatedData", "partition", "prefetch", "sampling", "to_device"]
