"""Loaders of real data sets, each returning fljax populations or central arrays.

Every loader takes ``data_dir=`` (or reads ``$FLJAX_DATA_DIR``) for an
offline copy and never downloads in tests.
"""

from fljax.data.datasets import cifar10, heart_disease

__all__ = ["cifar10", "heart_disease"]
