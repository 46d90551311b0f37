import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from fljax.data.datasets import cifar10


def _archive(path, entries):
    with tarfile.open(path, "w:gz") as tar:
        for name, img in entries:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def test_jpeg_archive_decodes_labels_and_caches(tmp_path):
    flat = {c: np.full((32, 32, 3), 40 * i, np.uint8) for i, c in enumerate(("airplane", "cat", "truck"))}
    entries = [(f"train/{c}/000{k}.jpg", flat[c]) for c in flat for k in range(2)]
    entries.append(("test/cat/0000.jpg", flat["cat"]))
    _archive(tmp_path / cifar10.ARCHIVE, entries)
    data = cifar10.load_raw(tmp_path, source="jpeg", cache_dir=tmp_path / "cache")
    assert data["x_train"].shape == (6, 32, 32, 3) and data["x_train"].dtype == np.uint8
    np.testing.assert_array_equal(data["y_train"], [0, 0, 3, 3, 9, 9])
    np.testing.assert_array_equal(data["y_test"], [3])
    # JPEG is lossy but a flat image decodes within a few levels
    assert np.abs(data["x_train"][2].astype(int) - 40).max() <= 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = cifar10.load_raw(tmp_path, source="jpeg", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again["x_train"], data["x_train"])
    x = cifar10.normalize(data["x_train"])
    assert x.dtype == np.float32 and np.all(np.isfinite(x))


def test_bad_archive_and_missing_archive_are_named(tmp_path):
    _archive(tmp_path / cifar10.ARCHIVE, [("train/unicorn/0000.jpg", np.zeros((32, 32, 3), np.uint8))])
    with pytest.raises(ValueError, match="unexpected archive entry"):
        cifar10.load_raw(tmp_path, source="jpeg", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="cifar10_jpeg"):
        cifar10.load_raw(tmp_path / "nowhere", source="jpeg")
    with pytest.raises(ValueError, match="source"):
        cifar10.load_raw(tmp_path, source="web")
