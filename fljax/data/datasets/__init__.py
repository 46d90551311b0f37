"""Loaders of real data sets, each returning fljax populations or central arrays.

Every loader takes ``data_dir=`` (or reads an environment variable) for an
offline copy and never downloads in tests.

* :mod:`~fljax.data.datasets.images`: MNIST, Fashion-MNIST, EMNIST, CIFAR-100 (central arrays).
* :mod:`~fljax.data.datasets.shakespeare`: TFF's federated Shakespeare (715 roles).
* :mod:`~fljax.data.datasets.femnist`: FEMNIST by writer (LEAF subset, 184 writers).
* :mod:`~fljax.data.datasets.tabular`: UCI Adult and credit default by a natural column.
* :mod:`~fljax.data.datasets.custom`: the user's own arrays or pandas frame.
* :mod:`~fljax.data.datasets.paths`: where offline copies are looked for.
"""

from fljax.data.datasets import custom, femnist, images, paths, shakespeare, tabular

__all__ = ["custom", "femnist", "images", "paths", "shakespeare", "tabular"]
