"""CIFAR-10: tensorflow-datasets where it can download, else a local JPEG copy.

The offline source is ``cifar10_jpeg_q75.tar.gz`` (``train/<class>/NNNN.jpg``,
``test/<class>/NNNN.jpg``) found as :mod:`fljax.data.datasets.paths` says:
``data_dir``, ``$FLJAX_DATA_DIR/cifar10_jpeg`` or ``../shared/data/cifar10_jpeg``. It is CIFAR-10 re-encoded as JPEG quality
75: pixels are not bit-identical to CIFAR-10, so report results as
"CIFAR-10 (JPEG)". The archive is decoded once and cached as ``.npz``.
"""

from __future__ import annotations

import io
import os
import pathlib
import tarfile

import numpy as np

from fljax.data.datasets import paths

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE = "cifar10_jpeg_q75.tar.gz"
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def decode_archive(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode the JPEG archive into uint8 arrays ``x_train [50000,32,32,3]``, ``y_train``, ``x_test``, ``y_test``."""
    from PIL import Image

    out: dict[str, list] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = pathlib.PurePosixPath(member.name).parts
            split, cls = parts[-3], parts[-2]
            if split not in ("train", "test") or cls not in CLASSES:
                raise ValueError(f"unexpected archive entry {member.name!r}")
            data = tar.extractfile(member).read()
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8)
            if img.shape != (32, 32, 3):
                raise ValueError(f"{member.name}: expected a 32x32 RGB image, got {img.shape}")
            out[f"x_{split}"].append(img)
            out[f"y_{split}"].append(CLASSES.index(cls))
    return {k: (np.stack(v) if k.startswith("x") else np.asarray(v, np.int32)) for k, v in out.items()}


def _from_tfds(data_dir) -> dict[str, np.ndarray]:
    import tensorflow_datasets as tfds  # needs TensorFlow and network or a prepared tfds dir

    out = {}
    for split in ("train", "test"):
        x, y = tfds.as_numpy(
            tfds.load("cifar10", split=split, batch_size=-1, as_supervised=True, data_dir=data_dir)
        )
        out[f"x_{split}"], out[f"y_{split}"] = np.asarray(x, np.uint8), np.asarray(y, np.int32)
    return out


def load_raw(
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """CIFAR-10 as uint8 arrays.

    Args:
      data_dir: folder holding the JPEG archive (or a tfds data dir for ``source="tfds"``).
      source: ``"jpeg"`` (offline archive), ``"tfds"`` (tensorflow-datasets,
        downloads if needed) or ``"auto"`` (the archive if found, else tfds).
      cache_dir: where the decoded ``.npz`` is cached (default ``~/.cache/fljax``).

    Returns:
      dict with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and ``source``.
    """
    if source not in ("auto", "jpeg", "tfds"):
        raise ValueError(f"source must be 'auto', 'jpeg' or 'tfds', got {source!r}")
    try:
        folder = paths.find("cifar10_jpeg", [ARCHIVE], None if source == "tfds" else data_dir)
    except FileNotFoundError:
        if source == "jpeg":
            raise
        folder = None
    if source == "tfds" or folder is None:
        if source == "auto":
            try:
                import tensorflow  # noqa: F401
                import tensorflow_datasets  # noqa: F401
            except ImportError as e:
                raise FileNotFoundError(
                    f"no {ARCHIVE} found (looked in data_dir, $FLJAX_DATA_DIR/cifar10_jpeg, "
                    "../shared/data/cifar10_jpeg) and tensorflow-datasets cannot load CIFAR-10 here "
                    f"({e}); pass data_dir= pointing at the archive"
                ) from e
        data = _from_tfds(data_dir)
        data["source"] = np.asarray("tfds:cifar10")
        return data
    archive = folder / ARCHIVE
    cache = pathlib.Path(
        cache_dir or os.environ.get("FLJAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "fljax")
    )
    stat = archive.stat()
    cached = cache / f"cifar10_jpeg_{stat.st_size}_{int(stat.st_mtime)}.npz"
    if cached.exists():
        with np.load(cached) as f:
            data = {k: f[k] for k in f.files}
    else:
        data = decode_archive(archive)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, cached)
    data["source"] = np.asarray("CIFAR-10 (JPEG q75)")
    return data


def normalize(x: np.ndarray) -> np.ndarray:
    """uint8 images to float32, standardised per channel with CIFAR-10's statistics."""
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
