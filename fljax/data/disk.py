"""Populations larger than memory: clients on disk, one cohort in memory.

A :class:`DiskPopulation` plays the part of a :class:`~fljax.data.FederatedData`
with the examples left in files. A population directory holds:

* ``x.npy``: ``[N, ...]`` inputs of all clients, concatenated by client;
* ``y.npy``: ``[N, ...]`` labels, in the same order;
* ``offsets.npy``: ``[num_clients + 1]`` int64, client ``c`` owns rows
  ``offsets[c]:offsets[c+1]`` (the index per client, 8 bytes a client: held
  in memory, 8 MB for a million clients);
* ``meta.json``: the format version, counts and ``num_classes``; written
  last, so a directory without it is an unfinished population.

:class:`PopulationWriter` builds one by streaming: clients (or chunks of
clients) are appended to ``x.npy`` and ``y.npy`` as they come and nothing of
their data is kept, so building a population needs the memory of one chunk,
whatever its total size. The ``.npy`` headers are rewritten with the final
shapes on :meth:`PopulationWriter.close`. :meth:`DiskPopulation.cohort` has the
contract of :meth:`FederatedData.cohort` (same padding, masks, ids and
subsampling of clients larger than ``num_examples``, element for element), so
the round, :mod:`fljax.data.bucketing` and :mod:`fljax.data.prefetch` use it
unchanged; gathering the next cohort in :func:`fljax.data.prefetch.prefetch`'s
background thread overlaps the disk reads with the current round.

Why numpy memory-maps and not a record format: cohort sampling is random
access to a few clients among millions, and every example has the same shape
and dtype. A ``.npy`` file has a fixed header then raw rows, so client ``c``
is ONE contiguous read at a known byte offset (``offsets``), with no parsing,
decompression or per-record framing, no new dependency (numpy only), and any
numpy program opens it (``np.load(path, mmap_mode="r")``). A record format
brings what this workload does not need: TFRecord is sequential (random access
needs a separate index) and pulls in TensorFlow for I/O; ArrayRecord and
Parquet/Arrow add a dependency and read whole compressed blocks or row groups
to return one client; WebDataset's tar shards are meant for streaming in
order. What memory-maps lack: compression, checksums, ragged examples (one
shape per file) and object stores (they need a local or network file system).

A cohort is gathered with one positioned read (``os.preadv``) per client and
file straight into the padded cohort arrays: the page cache serves repeated
reads, and the process never maps the files, so its resident memory does not
grow with the number of clients read over the rounds. ``x`` and ``y`` are also
exposed as read-only memory-maps (``np.lib.format.open_memmap``) for any other
access.

Examples:
  >>> import pathlib, tempfile
  >>> import numpy as np
  >>> from fljax.data import disk
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = pathlib.Path(tmp.name) / "population"
  >>> with disk.PopulationWriter(path, num_classes=3) as writer:
  ...     for n in (1, 2, 3):  # clients arrive one at a time (or in chunks: add_many)
  ...         writer.add(np.full((n, 2), n, np.float32), np.zeros(n, np.int32))
  >>> pop = disk.DiskPopulation.open(path)
  >>> pop.num_clients, pop.sizes.tolist()
  (3, [1, 2, 3])
  >>> cohort = pop.cohort(np.array([2, -1]))  # same contract as FederatedData.cohort
  >>> cohort.data.x.shape, cohort.data.mask.sum(axis=1).tolist(), cohort.client_mask.tolist()
  ((2, 3, 2), [3, 0], [True, False])
  >>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from fljax.base import Cohort
from fljax.data.federated import FederatedData, _cohort_arrays, _finish_cohort, _subset

FORMAT = "fljax.disk_population"
VERSION = 1
_FILES = ("x.npy", "y.npy", "offsets.npy", "meta.json")
_HEADER_BYTES = 256  # fixed .npy header (a multiple of 64), so it can be rewritten in place


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``_HEADER_BYTES`` bytes."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body = text.encode("latin1")
    magic = np.lib.format.magic(1, 0)
    pad = _HEADER_BYTES - len(magic) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"dtype {dtype} and shape {shape} do not fit a {_HEADER_BYTES}-byte header")
    return magic + struct.pack("<H", _HEADER_BYTES - len(magic) - 2) + body + b" " * pad + b"\n"


class PopulationWriter:
    """Streams clients into a population directory (see the module docstring).

    Holds open files and the clients' sizes (8 bytes a client), never their
    data: every :meth:`add` or :meth:`add_many` writes its arrays through and
    returns. Use it as a context manager: leaving the block closes it
    (:meth:`close`), and an exception inside the block deletes the partial
    files.

    Args:
      path: directory to create (or an empty existing one).
      num_classes: number of classes of integer labels (checked on every
        client), or ``None``.
      allow_empty: keep clients without examples (like
        :meth:`FederatedData.from_clients`).
      overwrite: replace a population already at ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_classes: int | None = None,
        allow_empty: bool = False,
        overwrite: bool = False,
    ):
        self.path = pathlib.Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a directory")
        existing = [f for f in _FILES if (self.path / f).exists()]
        if existing and not overwrite:
            raise ValueError(f"{self.path} already holds a population ({existing}); pass overwrite=True")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.path.mkdir(parents=True, exist_ok=True)
        for f in existing:
            (self.path / f).unlink()
        self.num_classes = num_classes
        self.allow_empty = allow_empty
        self._files = {name: open(self.path / f"{name}.npy", "wb") for name in ("x", "y")}  # noqa: SIM115
        for f in self._files.values():
            f.write(b"\0" * _HEADER_BYTES)  # rewritten by close()
        self._spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._sizes = np.zeros(1024, np.int64)
        self.num_clients = 0
        self.num_examples = 0
        self._closed = False

    def __enter__(self) -> PopulationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self, name: str, a: np.ndarray, where: str) -> None:
        spec = (a.dtype, a.shape[1:])
        if name not in self._spec:
            if a.dtype.hasobject or a.dtype.fields is not None:
                raise ValueError(f"{name} must have a plain numeric dtype, got {a.dtype}")
            self._spec[name] = spec
        elif spec != self._spec[name]:
            d, s = self._spec[name]
            raise ValueError(
                f"{where}: {name} has dtype {a.dtype} and example shape {a.shape[1:]}, "
                f"but earlier clients have {d} and {s}"
            )

    def add_many(self, x: np.ndarray, y: np.ndarray, sizes: Sequence[int] | np.ndarray) -> None:
        """Append a chunk of clients whose examples are concatenated in ``x`` and ``y``.

        Args:
          x: ``[n, ...]`` the chunk's inputs, client by client.
          y: ``[n, ...]`` their labels.
          sizes: ``[clients]`` examples of each client of the chunk (summing to ``n``).
        """
        if self._closed:
            raise ValueError("the writer is closed")
        x, y = np.asarray(x), np.asarray(y)
        sizes = np.asarray(sizes, np.int64)
        first = self.num_clients
        where = f"clients {first}..{first + len(sizes) - 1}"
        if sizes.ndim != 1:
            raise ValueError(f"sizes must be 1-D, got shape {sizes.shape}")
        if x.ndim < 1 or y.ndim < 1:
            raise ValueError(f"{where}: x and y need a leading examples axis")
        if len(x) != len(y):
            raise ValueError(f"{where}: x has {len(x)} examples but y has {len(y)}")
        if np.any(sizes < 0) or int(sizes.sum()) != len(y):
            raise ValueError(f"{where}: sizes {sizes.tolist()[:8]}... must be >= 0 and sum to {len(y)}")
        if not self.allow_empty and np.any(sizes == 0):
            c = first + int(np.flatnonzero(sizes == 0)[0])
            raise ValueError(f"client {c} has no examples (pass allow_empty=True to keep it)")
        self._check("x", x, where)
        self._check("y", y, where)
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
            c = first + int(np.searchsorted(np.cumsum(sizes), bad, side="right"))
            raise ValueError(f"client {c}: x contains NaN or inf")
        if self.num_classes is not None and y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"{where}: labels must lie in [0, {self.num_classes}), found range [{y.min()}, {y.max()}]"
            )
        for name, a in (("x", x), ("y", y)):
            self._files[name].write(np.ascontiguousarray(a).data)
        while self.num_clients + len(sizes) > len(self._sizes):
            self._sizes = np.concatenate([self._sizes, np.zeros_like(self._sizes)])
        self._sizes[first : first + len(sizes)] = sizes
        self.num_clients += len(sizes)
        self.num_examples += len(y)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Append one client: ``x[n, ...]`` inputs and ``y[n, ...]`` labels."""
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim < 1 or y.ndim < 1:
            raise ValueError(f"client {self.num_clients}: x and y need a leading examples axis")
        if len(x) != len(y):
            raise ValueError(f"client {self.num_clients}: x has {len(x)} examples but y has {len(y)}")
        self.add_many(x, y, [len(y)])

    def close(self) -> DiskPopulation:
        """Finish the files (headers, index, ``meta.json``) and open the population."""
        if self._closed:
            raise ValueError("the writer is closed")
        if self.num_clients == 0:
            self.abort()
            raise ValueError("no clients given")
        for name, f in self._files.items():
            dtype, shape = self._spec[name]
            f.seek(0)
            f.write(_npy_header(dtype, (self.num_examples, *shape)))
            f.close()
        offsets = np.concatenate([[0], np.cumsum(self._sizes[: self.num_clients])]).astype(np.int64)
        np.save(self.path / "offsets.npy", offsets)
        meta = dict(
            format=FORMAT,
            version=VERSION,
            num_clients=self.num_clients,
            num_examples=self.num_examples,
            num_classes=self.num_classes,
        )
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        self._closed = True
        return DiskPopulation.open(self.path)

    def abort(self) -> None:
        """Close and delete the partial files (the directory itself is kept)."""
        for f in self._files.values():
            f.close()
        for f in _FILES:
            (self.path / f).unlink(missing_ok=True)
        self._closed = True


def write(
    path: str | os.PathLike,
    clients: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int | None = None,
    allow_empty: bool = False,
    overwrite: bool = False,
) -> DiskPopulation:
    """Stream ``(x, y)`` pairs, one per client (any iterable, e.g. a generator), to ``path``.

    Returns:
      The :class:`DiskPopulation` written.
    """
    with PopulationWriter(path, num_classes=num_classes, allow_empty=allow_empty, overwrite=overwrite) as w:
        for x, y in clients:
            w.add(x, y)
    return DiskPopulation.open(path)


def _read(fd: int, base: int, row_bytes: int, start: int, out: np.ndarray) -> None:
    """Fill the C-contiguous ``out`` with the rows from ``start`` of the file behind ``fd``."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos = base + start * row_bytes
    while len(view):
        got = os.preadv(fd, [view], pos)
        if got <= 0:
            raise ValueError(f"file ended early (offset {pos}): the population is truncated")
        view, pos = view[got:], pos + got


@dataclasses.dataclass(frozen=True, eq=False)
class DiskPopulation:
    """A population whose examples stay on disk (see the module docstring).

    Open one with :meth:`open`; write one with :class:`PopulationWriter` or
    :func:`write`.

    Attributes:
      path: the population directory.
      x: ``[N, ...]`` read-only memory-map of all inputs.
      y: ``[N, ...]`` read-only memory-map of all labels.
      offsets: ``[num_clients + 1]`` int64 (in memory).
      num_classes: number of classes, or ``None``.
    """

    path: pathlib.Path
    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    num_classes: int | None = None
    client_names = None  # no names on disk (FederatedData's attribute, for code reading it)

    @classmethod
    def open(cls, path: str | os.PathLike) -> DiskPopulation:
        """Open the population at ``path`` (checks the files agree with one another)."""
        path = pathlib.Path(path)
        if not (path / "meta.json").exists():
            raise ValueError(f"{path} holds no finished population (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')} v{meta.get('version')} is not {FORMAT} v{VERSION}"
            )
        x = np.lib.format.open_memmap(path / "x.npy", mode="r")
        y = np.lib.format.open_memmap(path / "y.npy", mode="r")
        offsets = np.load(path / "offsets.npy")
        n, m = meta["num_examples"], meta["num_clients"]
        if offsets.shape != (m + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != n:
            raise ValueError(f"{path}: offsets.npy is not a valid index of {m} clients and {n} examples")
        if len(x) != n or len(y) != n:
            raise ValueError(f"{path}: x.npy has {len(x)} rows and y.npy {len(y)}, meta.json says {n}")
        return cls(path=path, x=x, y=y, offsets=offsets.astype(np.int64), num_classes=meta["num_classes"])

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """``[num_clients]`` number of examples per client."""
        return np.diff(self.offsets)

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``c``'s ``(x, y)``, read into memory."""
        s, e = self.offsets[c], self.offsets[c + 1]
        return np.array(self.x[s:e]), np.array(self.y[s:e])

    def subset(self, clients: Sequence[int]) -> FederatedData:
        """The listed clients as an in-memory :class:`FederatedData`, in that order."""
        return FederatedData.from_clients(
            [self.client(c) for c in clients], num_classes=self.num_classes, allow_empty=True
        )

    def cohort(
        self,
        client_ids: Sequence[int] | np.ndarray,
        *,
        num_examples: int | None = None,
        client_mask: np.ndarray | None = None,
        key: jax.Array | None = None,
    ) -> Cohort:
        """Read clients into a padded :class:`~fljax.base.Cohort` (host numpy).

        The same arguments and result as :meth:`FederatedData.cohort` (padding
        to ``num_examples``, default the largest client; ``-1`` padding slots;
        clients larger than ``num_examples`` keep the subset drawn from ``key``
        and their id), reading only the cohort's clients from disk.
        """
        ids, n, (x, y, mask) = _cohort_arrays(client_ids, self.sizes, num_examples, self.x, self.y)
        arrays = ((self.x, x), (self.y, y))
        fds = [os.open(a.filename, os.O_RDONLY) for a, _ in arrays]
        try:
            for slot, cid in enumerate(ids):
                if cid < 0:
                    continue
                s, size = int(self.offsets[cid]), int(self.sizes[cid])
                pick = _subset(int(cid), size, n, key)  # FederatedData's subset: same draw
                for fd, (src, out) in zip(fds, arrays, strict=True):
                    row_bytes = src.itemsize * int(np.prod(src.shape[1:], dtype=np.int64))
                    if pick is None:
                        _read(fd, src.offset, row_bytes, s, out[slot, :size])
                    else:
                        rows = np.empty((size,) + src.shape[1:], src.dtype)
                        _read(fd, src.offset, row_bytes, s, rows)
                        out[slot] = rows[pick]
                mask[slot, : min(size, n)] = True
        finally:
            for fd in fds:
                os.close(fd)
        return _finish_cohort(ids, client_mask, x, y, mask)
