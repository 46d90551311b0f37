"""``FederatedData``: a population of clients held once in host memory.

Examples of all clients are stored concatenated (``x[N, ...]``, ``y[N]``),
grouped by client through ``offsets`` (client ``c`` owns rows
``offsets[c]:offsets[c+1]``). Each round gathers only its cohort into padded
device arrays (:class:`~fljax.base.Cohort`) of static shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from fljax import random as fl_random
from fljax.base import ClientData, Cohort


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """Clients' examples, concatenated and grouped by client (host numpy).

    Attributes:
      x: ``[N, ...]`` inputs of all clients.
      y: ``[N]`` integer (or float) labels.
      offsets: ``[num_clients + 1]`` int64, client ``c`` owns ``offsets[c]:offsets[c+1]``.
      client_names: optional names (e.g. hospital, writer, speaker).
      num_classes: number of classes for classification labels, or ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    client_names: tuple[str, ...] | None = None
    num_classes: int | None = None

    def __post_init__(self):
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or offsets.shape[0] < 2:
            raise ValueError(
                f"offsets must be [num_clients + 1] with at least one client, got {offsets.shape}"
            )
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0 and be non-decreasing")
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y have different lengths: {len(self.x)} vs {len(self.y)}")
        if offsets[-1] != len(self.y):
            raise ValueError(f"offsets end at {offsets[-1]} but there are {len(self.y)} examples")
        if self.client_names is not None and len(self.client_names) != offsets.shape[0] - 1:
            raise ValueError(f"{len(self.client_names)} client names for {offsets.shape[0] - 1} clients")
        if np.issubdtype(np.asarray(self.x).dtype, np.floating) and not np.all(np.isfinite(self.x)):
            bad = np.argwhere(~np.isfinite(np.asarray(self.x).reshape(len(self.x), -1)))[0, 0]
            raise ValueError(f"x contains NaN or inf (first at example {bad})")
        if self.num_classes is not None:
            y = np.asarray(self.y)
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), found range [{y.min()}, {y.max()}]"
                )

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        client_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        allow_empty: bool = False,
    ) -> FederatedData:
        """Build from a list of ``(x, y)`` pairs, one per client."""
        if not clients:
            raise ValueError("no clients given")
        sizes = [len(y) for _, y in clients]
        for i, (x, y) in enumerate(clients):
            if len(x) != len(y):
                raise ValueError(f"client {i}: x has {len(x)} examples but y has {len(y)}")
        if not allow_empty and min(sizes) == 0:
            raise ValueError(f"client {sizes.index(0)} has no examples (pass allow_empty=True to keep it)")
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        x = np.concatenate([np.asarray(x) for x, _ in clients])
        y = np.concatenate([np.asarray(y) for _, y in clients])
        names = tuple(client_names) if client_names is not None else None
        return cls(x=x, y=y, offsets=offsets, client_names=names, num_classes=num_classes)

    @classmethod
    def from_partition(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        indices: Sequence[np.ndarray],
        *,
        client_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        allow_empty: bool = False,
    ) -> FederatedData:
        """Build from a central data set and one index array per client."""
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        return cls.from_clients(
            [(x[np.asarray(i)], y[np.asarray(i)]) for i in indices],
            client_names=client_names,
            num_classes=num_classes,
            allow_empty=allow_empty,
        )

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def sizes(self) -> np.ndarray:
        """``[num_clients]`` number of examples per client."""
        return np.diff(self.offsets)

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``c``'s ``(x, y)``."""
        s, e = self.offsets[c], self.offsets[c + 1]
        return self.x[s:e], self.y[s:e]

    def subset(self, clients: Sequence[int]) -> FederatedData:
        """A new population made of the listed clients, in that order."""
        names = None if self.client_names is None else [self.client_names[c] for c in clients]
        return FederatedData.from_clients(
            [self.client(c) for c in clients],
            client_names=names,
            num_classes=self.num_classes,
            allow_empty=True,
        )

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All examples as one central data set."""
        return self.x, self.y

    def cohort(
        self,
        client_ids: Sequence[int] | np.ndarray,
        *,
        num_examples: int | None = None,
        client_mask: np.ndarray | None = None,
        key: jax.Array | None = None,
    ) -> Cohort:
        """Gather clients into a padded :class:`~fljax.base.Cohort` (host numpy).

        Args:
          client_ids: ``[cohort]`` population indices; ``-1`` marks a padding slot.
          num_examples: examples per client after padding (static shape). Default:
            the population's largest client, so every round has the same shape.
            A client with more examples keeps a uniformly random subset of
            ``num_examples`` drawn from ``key`` and its id (pass the run-level
            ``fljax.random.stream(run_key, "data")`` to keep the same subset every
            round; see :func:`fljax.client.local_sgd`'s ``max_steps`` for the
            per-epoch cap).
          client_mask: optional ``[cohort]`` bool, ANDed with ``client_ids >= 0``.
          key: typed key for that subsampling; required only when some client is
            larger than ``num_examples``.

        Returns:
          A :class:`Cohort` of numpy arrays (``jax.device_put`` it, or let jit do it).
        """
        ids, n, (x, y, mask) = _cohort_arrays(client_ids, self.sizes, num_examples, self.x, self.y)
        for slot, cid in enumerate(ids):
            if cid < 0:
                continue
            s, size = self.offsets[cid], self.sizes[cid]
            pick = _subset(int(cid), int(size), n, key)
            rows = np.arange(s, s + size) if pick is None else s + pick
            k = len(rows)
            x[slot, :k] = self.x[rows]
            y[slot, :k] = self.y[rows]
            mask[slot, :k] = True
        return _finish_cohort(ids, client_mask, x, y, mask)


def _cohort_arrays(client_ids, sizes: np.ndarray, num_examples: int | None, x_like, y_like):
    """Checked ``client_ids`` (int64), the padded size ``n`` and zero ``(x, y, mask)`` arrays of a
    cohort: what :meth:`FederatedData.cohort` and the disk population's ``cohort`` fill."""
    ids = np.asarray(client_ids, np.int64)
    if ids.ndim != 1:
        raise ValueError(f"client_ids must be 1-D, got shape {ids.shape}")
    if np.any(ids >= len(sizes)) or np.any(ids < -1):
        raise ValueError(f"client ids must lie in [-1, {len(sizes)}), got {ids.min()}..{ids.max()}")
    n = int(sizes.max()) if num_examples is None else int(num_examples)
    if n <= 0:
        raise ValueError(f"num_examples must be positive, got {n}")
    c = ids.shape[0]
    x = np.zeros((c, n) + x_like.shape[1:], x_like.dtype)
    y = np.zeros((c, n) + y_like.shape[1:], y_like.dtype)
    return ids, n, (x, y, np.zeros((c, n), bool))


def _subset(cid: int, size: int, n: int, key: jax.Array | None) -> np.ndarray | None:
    """The sorted positions (within the client) a client larger than ``n`` keeps, drawn from
    ``key`` and its id; None when it keeps all its examples."""
    if size <= n:
        return None
    if key is None:
        raise ValueError(
            f"client {cid} has {size} examples > num_examples={n}: pass key= (e.g. "
            "fljax.random.stream(run_key, 'data')) to draw its subset from the run's seed"
        )
    return np.sort(fl_random.host_rng(key, cid).choice(np.arange(size), n, replace=False))


def _finish_cohort(ids: np.ndarray, client_mask, x, y, mask) -> Cohort:
    """The :class:`Cohort` of filled arrays: a slot is valid when it holds a client, the optional
    ``client_mask`` allows it and it has at least one example."""
    valid = ids >= 0
    if client_mask is not None:
        valid = valid & np.asarray(client_mask, bool)
    valid = valid & mask.any(axis=1)
    return Cohort(
        data=ClientData(x=x, y=y, mask=mask),
        client_ids=np.where(ids >= 0, ids, -1).astype(np.int32),
        client_mask=valid,
    )


def to_device(cohort: Cohort, sharding: jax.sharding.Sharding | None = None) -> Cohort:
    """Start the host-to-device copy of a cohort (asynchronous in JAX)."""
    return jax.device_put(cohort, sharding)
