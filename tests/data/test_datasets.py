"""Loaders on tiny generated files, and on the real ../shared/data copies when present."""

import gzip
import json
import pathlib
import pickle

import numpy as np
import pandas as pd
import pytest

from fljax.data import FederatedData
from fljax.data.datasets import custom, femnist, images, paths, shakespeare, tabular

SHARED = pathlib.Path("..") / "shared" / "data"


def _shared(name):
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(
            f"real data not available: ../shared/data/{name} not found relative to {pathlib.Path.cwd()}"
        )
    return folder


def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + data)


def _tiny_images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


# ---- idx, MNIST, Fashion-MNIST, EMNIST, CIFAR-100 -----------------------------------------


def test_read_idx_roundtrip_and_errors(tmp_path):
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", x)
    np.testing.assert_array_equal(images.read_idx(tmp_path / "a.idx"), x)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        images.read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-3])
    with pytest.raises(ValueError, match="holds"):
        images.read_idx(tmp_path / "short.idx")


def test_fashion_mnist_idx(tmp_path):
    x, y = _tiny_images()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y)
    fx, fy = images.fashion_mnist("test", data_dir=tmp_path, source="local")
    assert fx.shape == (12, 28, 28, 1) and fx.dtype == np.float32 and fy.dtype == np.int32
    np.testing.assert_allclose(fx[..., 0] * 255, x, atol=1e-3)
    np.testing.assert_array_equal(fy, y)
    raw, _ = images.fashion_mnist("test", data_dir=tmp_path, source="local", scale=False)
    np.testing.assert_array_equal(raw[..., 0], x)
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        images.fashion_mnist("train", data_dir=tmp_path, source="local")


def test_mnist_npz_and_env_var(tmp_path, monkeypatch):
    x, y = _tiny_images()
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", train_x=x, train_y=y, test_x=x[:3], test_y=y[:3])
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    mx, my = images.mnist("test", source="local")
    assert mx.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(my, y[:3])


def test_emnist_transposed(tmp_path):
    x, y = _tiny_images()
    _write_idx(
        tmp_path / "emnist-byclass-train-images-idx3-ubyte.gz", np.ascontiguousarray(np.swapaxes(x, 1, 2))
    )
    _write_idx(tmp_path / "emnist-byclass-train-labels-idx1-ubyte.gz", y)
    ex, _ = images.emnist("train", data_dir=tmp_path, source="local", scale=False)
    np.testing.assert_array_equal(ex[..., 0], x)
    with pytest.raises(ValueError, match="subset"):
        images.emnist(subset="nope", data_dir=tmp_path)


def test_cifar100_pickle(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3 * 32 * 32), dtype=np.uint8)
    with open(tmp_path / "train", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [1, 2, 3, 4, 99], b"coarse_labels": [0, 1, 2, 3, 19]}, f)
    x, y = images.cifar100("train", data_dir=tmp_path, source="local", scale=False)
    assert x.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(x[0, :, :, 1].ravel(), data[0, 1024:2048])
    np.testing.assert_array_equal(y, [1, 2, 3, 4, 99])
    _, yc = images.cifar100("train", label="coarse", data_dir=tmp_path, source="local")
    assert yc.max() == 19


def test_bad_split_and_source(tmp_path):
    with pytest.raises(ValueError, match="split"):
        images.mnist("valid", data_dir=tmp_path)
    with pytest.raises(ValueError, match="source"):
        images.mnist("train", data_dir=tmp_path, source="web")


def test_missing_dir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="FLJAX_DATA_DIR"):
        femnist.load(data_dir=tmp_path / "nowhere")


def test_real_mnist():
    _shared("mnist")
    x, y = images.mnist("test", source="local")
    assert x.shape == (10000, 28, 28, 1) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(y[:5], [7, 2, 1, 0, 4])


# ---- Shakespeare -------------------------------------------------------------------------


def test_tokenize_follows_tff():
    chunks = shakespeare.tokenize("ab", sequence_length=5)
    a, b = shakespeare.CHAR_VOCAB.index("a") + 1, shakespeare.CHAR_VOCAB.index("b") + 1
    np.testing.assert_array_equal(chunks, [[shakespeare.BOS, a, b, shakespeare.EOS, 0, 0]])
    assert shakespeare.tokenize("x" * 6, sequence_length=5).shape == (2, 6)  # 8 tokens -> 2 chunks
    assert shakespeare.tokenize("é", sequence_length=5)[0, 1] == shakespeare.OOV  # UTF-8 bytes, as TFF
    assert shakespeare.VOCAB_SIZE == 90 and len(shakespeare.CHAR_VOCAB) == 86
    assert shakespeare.detokenize(shakespeare.tokenize("To be, or not")) == "To be, or not"


def _tiny_shakespeare():
    return {"PLAY_A": [b"Hello there.", b"Go."], "PLAY_B": [b"x" * 200]}


def test_shakespeare_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "shakespeare_train.h5", "w") as f:
        for cid, snippets in _tiny_shakespeare().items():
            f.create_dataset(
                f"examples/{cid}/snippets", data=np.array(snippets, dtype=object), dtype=h5py.string_dtype()
            )
    data = shakespeare.load("train", data_dir=tmp_path, sequence_length=10)
    assert data.client_names == ("PLAY_A", "PLAY_B")
    # PLAY_A: 14 and 5 tokens -> 2 + 1 chunks of 11; PLAY_B: 202 tokens -> 19 chunks
    np.testing.assert_array_equal(data.sizes, [3, 19])
    assert data.x.shape == (22, 10) and data.y.shape == (22, 10)
    np.testing.assert_array_equal(data.x[0, 1:], data.y[0, :-1])


def test_shakespeare_json(tmp_path):
    with gzip.open(tmp_path / "shakespeare_tff.json.gz", "wt") as f:
        json.dump(
            {"train": {k: [s.decode() for s in v] for k, v in _tiny_shakespeare().items()}, "test": {}}, f
        )
    data = shakespeare.load("train", data_dir=tmp_path, sequence_length=10)
    np.testing.assert_array_equal(data.sizes, [3, 19])


def test_real_shakespeare():
    _shared("shakespeare_tff")
    snippets = shakespeare.read_snippets("train")
    assert len(snippets) == 715 and sum(len(s) for s in snippets.values()) == 16068
    test = shakespeare.read_snippets("test")
    assert len(test) == 715 and sum(len(s) for s in test.values()) == 2356
    data = shakespeare.from_snippets(snippets)
    assert data.num_clients == shakespeare.NUM_CLIENTS and data.x.shape[1] == 80
    assert data.y.max() < shakespeare.VOCAB_SIZE


# ---- FEMNIST -----------------------------------------------------------------------------


def test_femnist_tiny(tmp_path):
    x, y = _tiny_images(10)
    owner = np.array([2, 0, 2, 0, 2, 2, 0, 0, 0, 2], np.int32)
    writers = np.array(["w0", "w1", "w2"])
    np.savez(tmp_path / femnist.FILE, train_x=x, train_y=y, train_client=owner, test_x=x, test_y=y,
             test_client=np.arange(10) % 3, writers=writers)  # fmt: skip
    data = femnist.load("train", data_dir=tmp_path, invert=True, scale=False)
    assert data.client_names == ("w0", "w2")
    np.testing.assert_array_equal(data.sizes, [5, 5])
    np.testing.assert_array_equal(data.client(1)[0][..., 0], 255 - x[owner == 2])
    assert femnist.load("train", data_dir=tmp_path, keep_empty=True).num_clients == 3


def test_real_femnist():
    _shared("femnist_leaf_small")
    train, test = femnist.load("train"), femnist.load("test")
    assert test.num_clients == femnist.NUM_WRITERS == 184
    assert train.num_clients == 105 and len(train.y) == 14708 and len(test.y) == 4088
    assert femnist.load("train", keep_empty=True).num_clients == 184
    assert train.x.shape[1:] == (28, 28, 1) and train.y.max() < 62


# ---- tabular -----------------------------------------------------------------------------

ADULT_ROWS = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K",
    "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K",
    "38, ?, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, Black, Female, 0, 0, 40, ?, <=50K",
    "28, Private, 338409, Bachelors, 13, Married-civ-spouse, Prof-specialty, Wife, Black, Female, 0, 0, 40, Cuba, >50K",
]


def test_adult_tiny(tmp_path):
    header = ",".join(tabular.ADULT_COLUMNS)
    (tmp_path / "adult.data").write_text("\n".join([header] + ADULT_ROWS) + "\n")
    (tmp_path / "adult.test").write_text("\n".join([header] + [r + "." for r in ADULT_ROWS[:2]]) + "\n")
    data = tabular.adult(data_dir=tmp_path)
    assert data.client_names == ("Black", "White")
    np.testing.assert_array_equal(data.sizes, [2, 2])
    assert data.x.dtype == np.float32 and np.all(np.isfinite(data.x))
    np.testing.assert_array_equal(data.y, [0, 1, 0, 1])
    test = tabular.adult("test", client_column="workclass", data_dir=tmp_path)
    assert test.x.shape[1] == data.x.shape[1]
    np.testing.assert_array_equal(test.y, [1, 0])  # Self-emp-not-inc (>50K) sorts before State-gov
    with pytest.raises(ValueError, match="client_column"):
        tabular.adult(client_column="age", data_dir=tmp_path)


def test_credit_tiny(tmp_path):
    cols = ["ID"] + [f"X{i}" for i in range(1, 24)] + ["Y"]
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 5, (8, len(cols)))
    rows[:, 3] = [1, 2, 3, 4, 0, 1, 2, 6]  # X3 education
    rows[:, -1] = rng.integers(0, 2, 8)
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "UCI_Credit_Card.csv", index=False)
    data = tabular.credit_default(data_dir=tmp_path)
    assert data.client_names == ("graduate_school", "high_school", "other", "university")
    np.testing.assert_array_equal(data.sizes, [2, 1, 3, 2])


def test_real_tabular():
    _shared("adult_uci")
    adult = tabular.adult(client_column="race")
    assert adult.num_clients == 5 and len(adult.y) == 32561 and adult.y.sum() == 7841
    assert len(tabular.adult("test").y) == 16281
    _shared("credit_default_uci")
    credit = tabular.credit_default(client_column="MARRIAGE")
    assert credit.num_clients == 3 and len(credit.y) == 30000 and credit.y.sum() == 6636


# ---- the user's own data ------------------------------------------------------------------


def _frame():
    return pd.DataFrame(
        {"site": ["a", "b", "a", "c"], "f1": [0.1, 0.2, 0.3, 0.4], "f2": [1, 2, 3, 4], "kind": ["u", "v", "u", "u"],
         "label": [0, 1, 1, 0]}
    )  # fmt: skip


def test_from_dataframe():
    data = custom.from_dataframe(
        _frame(), client_column="site", label_column="label", feature_columns=["f1", "f2"], num_classes=2
    )
    assert isinstance(data, FederatedData) and data.client_names == ("a", "b", "c")
    np.testing.assert_array_equal(data.sizes, [2, 1, 1])
    np.testing.assert_allclose(data.client(0)[0], [[0.1, 1], [0.3, 3]], rtol=1e-6)
    onehot = custom.from_dataframe(_frame(), client_column="site", label_column="label", one_hot=True)
    assert onehot.x.shape == (4, 4)
    by_kind = custom.from_dataframe(
        _frame(), client_column="label", label_column="kind", feature_columns=["f1"]
    )
    assert by_kind.num_classes == 2


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"client_column": "hospital"}, "client_column 'hospital' is not a column"),
        ({"feature_columns": ["f9"]}, "unknown feature columns"),
        ({"feature_columns": ["kind"]}, "not numeric"),
        ({"num_classes": 1}, r"labels must lie in \[0, 1\)"),
        ({"clients": ["a", "b", "c", "d"]}, "clients without examples"),
        ({"clients": ["a", "b"]}, "not in `clients`"),
    ],
)
def test_dataframe_errors(kwargs, error):
    args = {"client_column": "site", "label_column": "label", "feature_columns": ["f1", "f2"], **kwargs}
    with pytest.raises(ValueError, match=error):
        custom.from_dataframe(_frame(), **args)


def test_array_errors():
    x, y, ids = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        custom.from_arrays(x[:3], y, ids)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf values \(first at row 2, feature 1\)"):
        custom.from_arrays(bad, y, ids)
    with pytest.raises(ValueError, match="labels must lie"):
        custom.from_arrays(x, y + 5, ids, num_classes=2)
    frame = _frame()
    frame.loc[1, "f1"] = np.nan
    with pytest.raises(ValueError, match="missing"):
        custom.from_dataframe(frame, client_column="site", label_column="label", feature_columns=["f1"])
    data = custom.from_arrays(x, y, ids, num_classes=2, clients=[0, 1, 2], allow_empty=True)
    np.testing.assert_array_equal(data.sizes, [2, 2, 0])


# ---- UCI Heart Disease (shipped) ----------------------------------------------------------


def test_heart_disease_standardisation_is_the_federated_helper_with_the_old_numbers(monkeypatch):
    from fljax.data import standardize
    from fljax.data.datasets import heart_disease

    calls, fit = [], standardize.fit

    def spy(xs, **kw):
        calls.append((list(xs), fit(xs, **kw)))
        return calls[-1][1]

    monkeypatch.setattr(heart_disease.standardize, "fit", spy)
    d = heart_disease.load(seed=3)
    ((xs, scaler),) = calls
    assert len(xs) == 4  # one raw (unstandardised, NaN = missing) block per hospital
    # The loader's computation before it used fljax.data.standardize, reproduced verbatim.
    sums = sum(np.nansum(x, axis=0) for x in xs)
    counts = sum(np.sum(~np.isnan(x), axis=0) for x in xs)
    mean = sums / counts
    std = np.sqrt(sum(np.nansum((x - mean) ** 2, axis=0) for x in xs) / counts)
    np.testing.assert_array_equal(scaler.mean, mean)
    np.testing.assert_array_equal(scaler.std, std)
    pooled = np.concatenate(xs)
    np.testing.assert_allclose(scaler.mean, np.nanmean(pooled, 0), rtol=1e-12)
    np.testing.assert_allclose(scaler.std, np.nanstd(pooled, 0), rtol=1e-12)
    numeric = [d.feature_names.index(c) for c in heart_disease._NUMERIC]
    for c, x in enumerate(xs):
        old = np.nan_to_num((x - mean) / np.where(std > 0, std, 1.0), nan=0.0).astype(np.float32)
        np.testing.assert_array_equal(d.train.client(c)[0][:, numeric], old)
