"""FEMNIST by writer: a LEAF subset (184 writers, 62 classes).

The offline copy in folder ``femnist_leaf_small`` (``femnist_leaf_small.npz``)
is a SUBSET of LEAF's "small" FEMNIST (niid, sampling fraction 0.05): 184
writers in all, of which 105 have training data (14,708 train images) and all
184 have test data (4,088 test images), because some of LEAF's JSON shards are
missing from the snapshot it was made from. It is not the full FEMNIST of
3,400 writers (TFF's ``emnist`` federated version); results on it are not
comparable with papers that use the full set.

Arrays: ``train_x``/``test_x`` uint8 ``[N, 28, 28]``, ``train_y``/``test_y``
uint8 (0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'), ``train_client``/
``test_client`` int32 index into ``writers`` (LEAF writer ids). Pixels keep
LEAF's convention (white background, 255): pass ``invert=True`` for an
MNIST-like black background.

References:
  Caldas et al. "LEAF: A Benchmark for Federated Settings". 2018.
"""

from __future__ import annotations

import os

import numpy as np

from fljax.data.datasets import paths
from fljax.data.federated import FederatedData

NUM_CLASSES = 62
NUM_WRITERS = 184
FILE = "femnist_leaf_small.npz"


def load(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    keep_empty: bool = False,
    invert: bool = False,
    scale: bool = True,
) -> FederatedData:
    """FEMNIST (LEAF subset) as a population with one client per writer.

    Args:
      split: ``"train"`` (105 writers with data) or ``"test"`` (184 writers).
      data_dir: folder holding ``femnist_leaf_small.npz``.
      keep_empty: keep all 184 writers as clients even without examples in
        this split (so train and test populations share client indices); empty
        clients are never selected into a cohort's real slots.
      invert: ``255 - x`` (black background).
      scale: float32 ``[0, 1]`` (default) or raw uint8.

    Returns:
      :class:`FederatedData` with ``x`` ``[N, 28, 28, 1]``, ``num_classes = 62``
      and LEAF writer ids as ``client_names``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = paths.find("femnist_leaf_small", [FILE], data_dir)
    with np.load(folder / FILE) as d:
        x, y, owner, writers = d[f"{split}_x"], d[f"{split}_y"], d[f"{split}_client"], d["writers"]
    return from_arrays(x, y, owner, writers, keep_empty=keep_empty, invert=invert, scale=scale)


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    owner: np.ndarray,
    writers: np.ndarray,
    *,
    keep_empty: bool = False,
    invert: bool = False,
    scale: bool = True,
) -> FederatedData:
    """A population from LEAF-style arrays (``owner[i]`` indexes ``writers``)."""
    if not len(x) == len(y) == len(owner):
        raise ValueError(f"x, y and owner differ in length: {len(x)}, {len(y)}, {len(owner)}")
    owner = np.asarray(owner, np.int64)
    if owner.size and (owner.min() < 0 or owner.max() >= len(writers)):
        raise ValueError(f"writer index out of range [0, {len(writers)})")
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=len(writers))
    keep = np.ones(len(writers), bool) if keep_empty else counts > 0
    offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
    x = np.asarray(x)[order]
    if invert:
        x = 255 - x
    x = x[..., None] if x.ndim == 3 else x
    x = x.astype(np.float32) / np.float32(255.0) if scale else x
    names = tuple(str(w) for w in np.asarray(writers)[keep])
    return FederatedData(
        x=x,
        y=np.asarray(y)[order].astype(np.int32),
        offsets=offsets,
        client_names=names,
        num_classes=NUM_CLASSES,
    )
