"""Central image data sets: MNIST, Fashion-MNIST, EMNIST, CIFAR-100.

Each loader returns central arrays ``(x, y)``: ``x`` float32 ``[N, H, W, C]``
scaled to ``[0, 1]`` (or the raw uint8 with ``scale=False``) and ``y`` int32
``[N]``. Split them into clients with :mod:`fljax.data.partition` and
:meth:`fljax.data.FederatedData.from_partition`.

Sources (``source=``):

* ``"local"``: offline files found by :func:`fljax.data.datasets.paths.find`
  (``data_dir=``, ``$FLJAX_DATA_DIR/<name>``, ``../shared/data/<name>``).
* ``"tfds"``: ``tensorflow_datasets.load(..., batch_size=-1)`` converted with
  ``tfds.as_numpy``. tensorflow-datasets (and TensorFlow, which ``tfds.load``
  needs) are imported lazily inside the call: fljax itself never needs them.
  It downloads into ``data_dir`` (tfds' default ``~/tensorflow_datasets``).
* ``"auto"`` (default): local files when found, else tfds.

Local formats: the idx format of LeCun's MNIST distribution (``.gz`` or raw),
which Fashion-MNIST and EMNIST share (Debian's ``dataset-fashion-mnist``
package installs it in ``/usr/share/datasets/fashion-mnist``, searched last);
MNIST also as ``mnist.npz`` with ``train_x/train_y/test_x/test_y``; CIFAR-100
as the official ``cifar-100-python`` pickles.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
from typing import Literal

import numpy as np

from fljax.data.datasets import paths

Source = Literal["auto", "local", "tfds"]
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` compressed or raw) into a numpy array.

    The format: two zero bytes, a type byte, a rank byte, ``rank`` big-endian
    uint32 dimensions, then the values in row-major order.

    Raises:
      ValueError: for a malformed or truncated file.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4]!r})")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: idx header says shape {shape} but holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype, count, header).reshape(shape).astype(dtype.newbyteorder("="))


def _finish(x: np.ndarray, y: np.ndarray, scale: bool) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y):
        raise ValueError(f"images and labels differ in length: {len(x)} vs {len(y)}")
    if x.ndim == 3:
        x = x[..., None]
    x = x.astype(np.float32) / np.float32(255.0) if scale else x
    return x, np.asarray(y).astype(np.int32)


def _check(split: str, source: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source not in ("auto", "local", "tfds"):
        raise ValueError(f"source must be 'auto', 'local' or 'tfds', got {source!r}")


def _tfds(
    name: str, split: str, data_dir, download: bool, image_key: str = "image", label_key: str = "label"
):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"source='tfds' needs tensorflow-datasets and TensorFlow (pip install tensorflow-datasets tensorflow); "
            f"or use source='local' with offline files ({e})"
        ) from e
    try:
        ds = tfds.load(
            name,
            split=split,
            batch_size=-1,
            data_dir=None if data_dir is None else str(data_dir),
            download=download,
        )
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"tfds.load({name!r}) needs TensorFlow (pip install tensorflow): {e}") from e
    arrays = tfds.as_numpy(ds)
    return np.asarray(arrays[image_key]), np.asarray(arrays[label_key])


def _idx_pair(folder: pathlib.Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = paths.pick(
        folder, f"{prefix}-images-idx3-ubyte.gz|{prefix}-images-idx3-ubyte|{prefix}-images.idx3-ubyte"
    )
    labels = paths.pick(
        folder, f"{prefix}-labels-idx1-ubyte.gz|{prefix}-labels-idx1-ubyte|{prefix}-labels.idx1-ubyte"
    )
    return read_idx(images), read_idx(labels)


def _idx_names(prefix: str) -> list[str]:
    return [
        f"{prefix}-images-idx3-ubyte.gz|{prefix}-images-idx3-ubyte|{prefix}-images.idx3-ubyte",
        f"{prefix}-labels-idx1-ubyte.gz|{prefix}-labels-idx1-ubyte|{prefix}-labels.idx1-ubyte",
    ]


def _local_or_tfds(name, required, data_dir, source, extra=()):
    """The local folder, or None when tfds should be used."""
    if source == "tfds":
        return None
    try:
        return paths.find(name, required, data_dir, extra)
    except FileNotFoundError:
        if source == "local":
            raise
        return None


def mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    scale: bool = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits, ``[N, 28, 28, 1]`` and labels 0-9 (60,000 train / 10,000 test).

    Local files: ``mnist.npz`` (``train_x``, ``train_y``, ``test_x``, ``test_y``)
    or the idx files ``train-images-idx3-ubyte.gz`` ... in folder ``mnist``.

    Args:
      split: ``"train"`` or ``"test"``.
      data_dir: folder with the files (for tfds: its download folder).
      source: ``"auto"``, ``"local"`` or ``"tfds"`` (see the module docstring).
      scale: float32 in ``[0, 1]`` (default) or raw uint8.
      download: let tfds download when ``source`` resolves to tfds.

    Returns:
      ``(x, y)``.
    """
    _check(split, source)
    prefix = "train" if split == "train" else "t10k"
    if source != "tfds":
        for required in (["mnist.npz"], _idx_names(prefix)):
            try:
                folder = paths.find("mnist", required, data_dir)
            except FileNotFoundError:
                continue
            if required == ["mnist.npz"]:
                with np.load(folder / "mnist.npz") as d:
                    return _finish(d[f"{split}_x"], d[f"{split}_y"], scale)
            return _finish(*_idx_pair(folder, prefix), scale)
        if source == "local":
            paths.find("mnist", ["mnist.npz"], data_dir)  # raises with the searched folders
    return _finish(*_tfds("mnist", split, data_dir, download), scale)


def fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    scale: bool = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Xiao et al. 2017), ``[N, 28, 28, 1]``, 10 classes (60,000 / 10,000).

    Local files: the original idx files (``train-images-idx3-ubyte.gz``,
    ``train-labels-idx1-ubyte.gz``, ``t10k-...``) in folder ``fashion_mnist``, or
    where Debian's ``dataset-fashion-mnist`` package puts them
    (``/usr/share/datasets/fashion-mnist``).

    Args and returns as :func:`mnist`.
    """
    _check(split, source)
    prefix = "train" if split == "train" else "t10k"
    folder = _local_or_tfds(
        "fashion_mnist", _idx_names(prefix), data_dir, source, ["/usr/share/datasets/fashion-mnist"]
    )
    if folder is not None:
        return _finish(*_idx_pair(folder, prefix), scale)
    return _finish(*_tfds("fashion_mnist", split, data_dir, download), scale)


EMNIST_SPLITS = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10}


def emnist(
    split: str = "train",
    *,
    subset: str = "byclass",
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    scale: bool = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """EMNIST (Cohen et al. 2017), ``[N, 28, 28, 1]``; ``byclass`` has 62 classes.

    Local files: the idx files of the EMNIST "gzip" distribution
    (``emnist-byclass-train-images-idx3-ubyte.gz`` ...) in folder ``emnist``.
    Those images are stored transposed; they are returned upright, as tfds does.
    Class counts per ``subset``: :data:`EMNIST_SPLITS`. Other arguments as
    :func:`mnist`.

    Args:
      subset: one of :data:`EMNIST_SPLITS`.

    Returns:
      ``(x, y)``.
    """
    _check(split, source)
    if subset not in EMNIST_SPLITS:
        raise ValueError(f"subset must be one of {sorted(EMNIST_SPLITS)}, got {subset!r}")
    prefix = f"emnist-{subset}-{split}"
    folder = _local_or_tfds("emnist", _idx_names(prefix), data_dir, source)
    if folder is not None:
        x, y = _idx_pair(folder, prefix)
        return _finish(np.swapaxes(x, 1, 2), y, scale)
    return _finish(*_tfds(f"emnist/{subset}", split, data_dir, download), scale)


def cifar100(
    split: str = "train",
    *,
    label: Literal["fine", "coarse"] = "fine",
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    scale: bool = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 (Krizhevsky 2009), ``[N, 32, 32, 3]``, 100 fine or 20 coarse labels.

    Local files: the official python version's ``train`` and ``test`` pickles
    (``cifar-100-python/``) in folder ``cifar100``, or that folder itself. Only
    load pickles you trust: unpickling can run code. Other arguments as
    :func:`mnist`.

    Args:
      label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
      ``(x, y)``.
    """
    _check(split, source)
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    folder = _local_or_tfds("cifar100", [f"{split}|cifar-100-python/{split}"], data_dir, source)
    if folder is not None:
        with open(paths.pick(folder, f"{split}|cifar-100-python/{split}"), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return _finish(x, np.asarray(d[f"{label}_labels".encode()]), scale)
    key = "label" if label == "fine" else "coarse_label"
    return _finish(*_tfds("cifar100", split, data_dir, download, label_key=key), scale)
