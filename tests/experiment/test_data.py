"""fljax.experiment.data: every data section on tiny files in the loaders' real formats, every
error path as a one-line ConfigError naming its key, and the real copies when present."""

import dataclasses
import gzip
import io
import json
import sys
import tarfile

import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fljax.data import FederatedData
from fljax.data.datasets import cifar10, femnist, heart_disease, paths, shakespeare, tabular
from fljax.experiment import config, data


def _load(section):
    return data.load(section, jax.random.key(0))


def _raises(section, *fragments):
    """``load(section)`` raises a one-line ConfigError whose message holds every fragment."""
    with pytest.raises(config.ConfigError) as info:
        _load(section)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _same(a: FederatedData, b: FederatedData):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.client_names == b.client_names


def _check_labels(population: FederatedData, num_classes: int):
    assert population.num_classes == num_classes
    assert population.y.min() >= 0 and population.y.max() < num_classes


# ---- heart disease (shipped) -------------------------------------------------------------


def test_heart_disease_is_the_loader(tmp_path):
    got = _load(config.HeartDisease(test_fraction=0.3, split_seed=2))
    want = heart_disease.load(test_fraction=0.3, seed=2)
    _same(got.train, want.train)
    _same(got.test, want.test)
    assert got.central_test is None and got.num_classes == 2 and got.report is None
    _raises(config.HeartDisease(path=str(tmp_path / "no.csv")), "data.path=", "file not found")
    heart_disease.read_csv().drop(columns="chol").to_csv(tmp_path / "bad.csv", index=False)
    _raises(config.HeartDisease(path=str(tmp_path / "bad.csv")), "data.path=", "lacks column 'chol'")


# ---- central images ----------------------------------------------------------------------


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mnist.npz",
        train_x=rng.integers(0, 256, (80, 28, 28), dtype=np.uint8),
        train_y=np.arange(80, dtype=np.uint8) % 10,
        test_x=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        test_y=np.arange(20, dtype=np.uint8) % 10,
    )
    return tmp_path


@pytest.mark.parametrize("kind", config.PARTITIONS)
def test_images_partitions(mnist_dir, kind):
    section = config.Images(num_clients=5, partition=kind, max_test_examples=7, data_dir=str(mnist_dir))
    d = _load(section)
    assert d.train.num_clients == 5 and d.train.sizes.sum() == 80 and d.train.sizes.min() >= 1
    _check_labels(d.train, 10)
    assert d.num_classes == 10 and d.test is None
    assert d.report["num_clients"] == 5 and d.report["duplicates"] == 0
    with np.load(mnist_dir / "mnist.npz") as raw:
        np.testing.assert_allclose(d.central_test[0][..., 0], raw["test_x"][:7] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(d.central_test[1], raw["test_y"][:7])
        # every training example is used once: the pooled label counts are the central ones
        np.testing.assert_array_equal(np.bincount(d.train.y, minlength=10), np.bincount(raw["train_y"]))
    _same(_load(section).train, d.train)  # same key, same partition


def test_images_subset_and_examples_per_client(mnist_dir):
    sub = _load(config.Images(num_clients=4, max_train_examples=30, data_dir=str(mnist_dir)))
    assert sub.train.sizes.sum() == 30 and sub.central_test[0].shape == (20, 28, 28, 1)
    exact = _load(config.Images(num_clients=6, examples_per_client=13, data_dir=str(mnist_dir)))
    assert exact.train.sizes.tolist() == [13] * 6 and exact.report["duplicates"] == 0
    _raises(
        config.Images(num_clients=7, examples_per_client=13, data_dir=str(mnist_dir)),
        "data.examples_per_client=13",
        "91 > the 80",
    )


def test_images_errors(mnist_dir, tmp_path):
    where = str(mnist_dir)
    _raises(config.Images(num_clients=81, data_dir=where), "data.num_clients=81")
    _raises(
        config.Images(num_clients=30, partition="shards", shards_per_client=3, data_dir=where),
        "data.shards_per_client=3",
        "90 shards for 80 examples",
    )
    _raises(config.Images(source="jpeg", data_dir=where), "data.source='jpeg'", "CIFAR-10")
    _raises(config.Images(name="emnist", subset="nope"), "data.subset='nope'")
    empty = str(tmp_path / "empty")
    _raises(
        config.Images(source="local", data_dir=empty), f"data.data_dir={empty!r}", "no MNIST files", empty
    )
    _raises(config.Images(name="cifar100", source="local", data_dir=empty), "data.data_dir=", "CIFAR-100")
    _raises(config.Images(name="cifar10", source="local", data_dir=empty), "data.data_dir=", cifar10.ARCHIVE)


def test_cifar10_local_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("FLJAX_CACHE_DIR", str(tmp_path / "cache"))
    with tarfile.open(tmp_path / cifar10.ARCHIVE, "w:gz") as tar:
        for split, count in (("train", 3), ("test", 1)):
            for i, name in enumerate(cifar10.CLASSES):
                for k in range(count):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    d = _load(config.Images(name="cifar10", num_clients=3, source="local", data_dir=str(tmp_path)))
    assert d.train.num_clients == 3 and d.train.sizes.sum() == 30 and d.train.x.shape[1:] == (32, 32, 3)
    assert d.train.x.dtype == np.float32 and abs(float(d.train.x.mean())) < 3  # normalised
    assert d.central_test[0].shape == (10, 32, 32, 3) and d.num_classes == 10


# ---- FEMNIST and Shakespeare -------------------------------------------------------------


def test_femnist(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 62, 12).astype(np.uint8)
    np.savez(tmp_path / femnist.FILE, train_x=x, train_y=y, train_client=np.arange(12) % 3, test_x=x[:9],
             test_y=y[:9], test_client=np.arange(9) % 4, writers=np.array(["w0", "w1", "w2", "w3"]))  # fmt: skip
    d = _load(config.FEMNIST(max_clients=2, max_test_examples=5, data_dir=str(tmp_path)))
    assert d.train.client_names == ("w0", "w1") and d.train.sizes.tolist() == [4, 4]
    _check_labels(d.train, 62)
    test = femnist.load("test", data_dir=tmp_path)
    np.testing.assert_array_equal(d.central_test[0], test.x[:5])
    np.testing.assert_array_equal(d.central_test[1], test.y[:5])
    assert _load(config.FEMNIST(data_dir=str(tmp_path))).train.num_clients == 3
    _raises(config.FEMNIST(data_dir=str(tmp_path / "none")), "data.data_dir=", femnist.FILE)
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / femnist.FILE, writers=np.array(["w0"]))
    _raises(config.FEMNIST(data_dir=str(tmp_path / "bad")), "data.data_dir=", "lacks an array (train_x")


def test_shakespeare(tmp_path):
    snippets = {"B_ROLE": ["Hello there.", "Go."], "A_ROLE": ["x" * 40], "C_ROLE": ["Yes."]}
    with gzip.open(tmp_path / "shakespeare_tff.json.gz", "wt") as f:
        json.dump({"train": snippets, "test": {"A_ROLE": ["To be."], "C_ROLE": ["Or not to be."]}}, f)
    d = _load(
        config.Shakespeare(sequence_length=10, max_clients=2, max_test_examples=2, data_dir=str(tmp_path))
    )
    assert d.train.client_names == ("A_ROLE", "B_ROLE") and d.train.x.shape[1] == 10
    _check_labels(d.train, shakespeare.VOCAB_SIZE)
    assert d.num_classes == shakespeare.VOCAB_SIZE and d.central_test[0].shape == (2, 10)
    _raises(config.Shakespeare(data_dir=str(tmp_path / "none")), "data.data_dir=", "shakespeare_tff.json.gz")


# ---- tabular -----------------------------------------------------------------------------


def _adult_row(i, race, label):
    return (f"{20 + i}, Private, {10000 + 37 * i}, Bachelors, 13, Never-married, Sales, Own-child, {race}, "
            f"{'Male' if i % 2 else 'Female'}, 0, 0, {30 + i % 20}, United-States, {label}")  # fmt: skip


def test_adult_test_clients_follow_train(tmp_path):
    header = ",".join(tabular.ADULT_COLUMNS)
    train = [_adult_row(i, race, ">50K" if i % 3 else "<=50K") for i, race in
             enumerate(["White"] * 6 + ["Black"] * 4 + ["Asian-Pac-Islander"] * 2)]  # fmt: skip
    test = [_adult_row(i, race, "<=50K.") for i, race in enumerate(["Black"] * 2 + ["Other"] + ["White"] * 3)]
    (tmp_path / "adult.data").write_text("\n".join([header, *train]) + "\n")
    (tmp_path / "adult.test").write_text("\n".join([header, *test]) + "\n")
    d = _load(config.Tabular(data_dir=str(tmp_path)))
    assert d.train.client_names == ("Asian-Pac-Islander", "Black", "White")
    assert d.test.client_names == d.train.client_names
    assert d.train.sizes.tolist() == [2, 4, 6] and d.test.sizes.tolist() == [0, 2, 3]  # "Other" dropped
    _check_labels(d.train, 2)
    assert d.test.x.shape[1] == d.train.x.shape[1] and d.central_test is None
    by_sex = _load(config.Tabular(client_column="sex", data_dir=str(tmp_path)))
    assert by_sex.train.client_names == ("Female", "Male") == by_sex.test.client_names
    _raises(config.Tabular(client_column="age", data_dir=str(tmp_path)), "data.client_column='age'", "race")
    _raises(config.Tabular(data_dir=str(tmp_path / "none")), "data.data_dir=", "adult.data")


def _credit(path, rows=60, seed=0):
    cols = ["ID"] + [f"X{i}" for i in range(1, 24)] + ["Y"]
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 5, (rows, len(cols)))
    table[:, 0] = np.arange(rows)
    table[:, 1] = 1000 * np.arange(rows)  # X1 (limit): makes every row distinct
    table[:, 3] = rng.choice([1, 2, 3, 0], rows, p=[0.45, 0.45, 0.05, 0.05])  # education
    table[:, -1] = rng.integers(0, 2, rows)
    pd.DataFrame(table, columns=cols).to_csv(path / "UCI_Credit_Card.csv", index=False)


def _rows(population):
    """Each client's rows as a set of tuples."""
    return [{tuple(r) for r in population.client(c)[0].reshape(population.sizes[c], -1)}
            for c in range(population.num_clients)]  # fmt: skip


def test_credit_split_keeps_every_row_once(tmp_path):
    _credit(tmp_path)
    section = config.Tabular(name="credit_default", test_fraction=0.3, split_seed=4, data_dir=str(tmp_path))
    d = _load(section)
    full = tabular.credit_default(data_dir=tmp_path)
    assert d.train.client_names == d.test.client_names == full.client_names
    assert (d.train.sizes + d.test.sizes).tolist() == full.sizes.tolist() and d.train.sizes.min() >= 1
    for tr, te, whole in zip(_rows(d.train), _rows(d.test), _rows(full), strict=True):
        assert not tr & te and tr | te == whole
    _same(_load(section).test, d.test)
    assert _rows(_load(dataclasses.replace(section, split_seed=5)).test) != _rows(d.test)
    _raises(dataclasses.replace(section, client_column="race"), "data.client_column='race'", "EDUCATION")


def test_split_rows():
    sizes = [1, 2, 7, 40]
    population = FederatedData.from_clients(
        [
            (np.arange(s, dtype=np.float32)[:, None] + 100 * c, np.zeros(s, np.int32))
            for c, s in enumerate(sizes)
        ],
        client_names=["a", "b", "c", "d"],
        num_classes=1,
    )
    train, test = data.split_rows(population, 0.5, seed=0)
    assert train.sizes.tolist() == [1, 1, 3, 20] and test.sizes.tolist() == [0, 1, 4, 20]
    for c in range(4):
        both = np.concatenate([train.client(c)[0], test.client(c)[0]])[:, 0]
        np.testing.assert_array_equal(np.sort(both), population.client(c)[0][:, 0])
    again, _ = data.split_rows(population, 0.5, seed=0)
    _same(again, train)
    assert not np.array_equal(data.split_rows(population, 0.5, seed=1)[0].x, train.x)
    assert data.split_rows(population, 0.99, seed=0)[0].sizes.min() == 1


# ---- the user's own file -----------------------------------------------------------------


def _frame(rows=90, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "site": rng.choice(["north", "south", "east"], rows),
            "f1": rng.normal(50, 10, rows),
            "f2": rng.integers(0, 1000, rows),
            "kind": rng.choice(["u", "v"], rows),
            "label": rng.choice(["no", "yes", "maybe"], rows),
        }
    )


def _custom(path, **kwargs):
    return config.Custom(path=str(path), client_column="site", **kwargs)


def test_custom_csv_and_parquet(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    d = _load(_custom(tmp_path / "d.csv", one_hot=True))
    assert d.train.client_names == d.test.client_names == ("east", "north", "south")
    assert d.num_classes == 3 and d.train.x.shape[1] == 4  # f1, f2, kind=u, kind=v
    _check_labels(d.train, 3)
    assert (d.train.sizes + d.test.sizes).tolist() == frame["site"].value_counts().sort_index().tolist()
    assert d.test.sizes.sum() == pytest.approx(0.25 * len(frame), abs=2)
    pooled = d.train.x.astype(np.float64)
    np.testing.assert_allclose(pooled.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(pooled.std(0), 1, atol=1e-5)
    parquet = _load(_custom(tmp_path / "d.parquet", one_hot=True))
    _same(parquet.train, d.train)
    _same(parquet.test, d.test)


def test_custom_standardisation_uses_train_statistics(tmp_path):
    _frame().to_csv(tmp_path / "d.csv", index=False)
    section = _custom(tmp_path / "d.csv", feature_columns=("f1", "f2"), split_seed=3)
    raw = _load(dataclasses.replace(section, standardize=False))
    scaled = _load(section)
    mean, std = raw.train.x.astype(np.float64).mean(0), raw.train.x.astype(np.float64).std(0)
    np.testing.assert_allclose(scaled.train.x, (raw.train.x - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scaled.test.x, (raw.test.x - mean) / std, rtol=1e-5, atol=1e-5)
    assert raw.train.x.shape[1] == 2 and abs(float(raw.train.x[:, 1].mean())) > 10


def test_custom_npz(tmp_path):
    rng = np.random.default_rng(0)
    x, y, client = rng.normal(3, 2, (50, 2, 3)), rng.integers(0, 4, 50), rng.integers(0, 5, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y, client=client)
    d = _load(config.Custom(path=str(tmp_path / "d.npz"), standardize=False, test_fraction=0.2))
    assert d.train.client_names == d.test.client_names == tuple(str(c) for c in np.unique(client))
    assert d.train.x.shape[1:] == (2, 3) and d.num_classes == int(y.max()) + 1
    assert d.train.sizes.sum() + d.test.sizes.sum() == 50
    pooled = np.concatenate([d.train.x, d.test.x]).reshape(50, -1)
    assert {tuple(r) for r in pooled} == {tuple(r) for r in x.astype(np.float32).reshape(50, -1)}
    np.savez(tmp_path / "lacks.npz", x=x, label=y)
    _raises(config.Custom(path=str(tmp_path / "lacks.npz")), "data.path=", "lacks array(s) ['y', 'client']")
    np.savez(tmp_path / "float.npz", x=x, y=y + 0.5, client=client)
    _raises(config.Custom(path=str(tmp_path / "float.npz")), "data.path=", "not class ids")
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    _raises(config.Custom(path=str(tmp_path / "junk.npz")), "data.path=", "not an .npz (zip) archive")
    np.save(tmp_path / "one.npy", x)
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    _raises(config.Custom(path=str(tmp_path / "one.npz")), "data.path=", "not an .npz (zip) archive")
    np.savez(tmp_path / "objects.npz", x=x, y=y, client=np.array(["a", None] * 25, dtype=object))
    _raises(config.Custom(path=str(tmp_path / "objects.npz")), "data.path=", "without object arrays")


def test_custom_errors(tmp_path, monkeypatch):
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    csv = tmp_path / "d.csv"
    _raises(_custom(csv, label_column="lbl"), "data.label_column='lbl'", "not a column of", "site, f1")
    _raises(config.Custom(path=str(csv)), "data.client_column='client'", "not a column")
    _raises(_custom(csv, feature_columns=("f1", "f9")), "data.feature_columns=('f1', 'f9')", "['f9']")
    _raises(_custom(csv, feature_columns=("f1", "label")), "data.feature_columns=", "label column")
    _raises(_custom(csv), "data.one_hot=False", "'kind'", "data.one_hot=True")
    _raises(_custom(tmp_path / "none.csv"), "data.path=", "file not found")
    _raises(_custom(tmp_path / "d.txt"), "data.path=", "unknown file type")
    _raises(config.Custom(), "data.path: missing")
    frame.assign(f1=frame["f1"].where(frame.index != 3)).to_csv(tmp_path / "nan.csv", index=False)
    _raises(
        _custom(tmp_path / "nan.csv", one_hot=True), "data.feature_columns=None", "'f1'", "1 missing value"
    )
    frame.assign(label=-1).to_csv(tmp_path / "neg.csv", index=False)
    _raises(_custom(tmp_path / "neg.csv", one_hot=True), "data.label_column='label'", "not class ids")
    frame.assign(site=frame["site"].where(frame.index != 0)).to_csv(tmp_path / "ids.csv", index=False)
    _raises(_custom(tmp_path / "ids.csv", one_hot=True), "data.client_column='site'", "1 rows")
    (tmp_path / "bad.parquet").write_text("not parquet")
    _raises(_custom(tmp_path / "bad.parquet"), "data.path=", "as Parquet")
    frame.to_parquet(tmp_path / "d.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    _raises(_custom(tmp_path / "d.parquet"), "data.path=", "pip install pyarrow")


# ---- the real copies (../shared/data or $FLJAX_DATA_DIR) ---------------------------------


def _real(name):
    """Skip unless data set folder ``name`` is where paths.find looks for it."""
    searched = paths.candidates(name)
    if not any(folder.is_dir() for folder in searched):
        where = ", ".join(str(f.resolve()) for f in searched)
        pytest.skip(
            f"real data not available: none of {where} exists (set {paths.ENV_VAR}=ROOT holding {name}/)"
        )


def test_real_mnist():
    _real("mnist")
    d = _load(config.Images(num_clients=100, partition="shards", source="local"))
    assert d.train.num_clients == 100 and d.train.sizes.sum() == 60000
    assert d.central_test[0].shape == (10000, 28, 28, 1) and d.report["duplicates"] == 0
    _check_labels(d.train, 10)


def test_real_femnist():
    _real("femnist_leaf_small")
    d = _load(config.FEMNIST(max_clients=20))
    assert d.train.num_clients == 20 and d.central_test[0].shape == (4088, 28, 28, 1)
    assert _load(config.FEMNIST()).train.num_clients == 105
    _check_labels(d.train, 62)


def test_real_shakespeare():
    _real("shakespeare_tff")
    d = _load(config.Shakespeare(max_test_examples=1000))
    assert d.train.num_clients == shakespeare.NUM_CLIENTS and d.central_test[0].shape == (1000, 80)
    _check_labels(d.train, shakespeare.VOCAB_SIZE)


def test_real_adult():
    _real("adult_uci")
    d = _load(config.Tabular())
    assert d.train.num_clients == 5 and d.test.client_names == d.train.client_names
    assert d.train.sizes.sum() == 32561 and d.test.sizes.sum() == 16281


def test_real_credit_default():
    _real("credit_default_uci")
    d = _load(config.Tabular(name="credit_default"))
    assert d.train.num_clients == 4 and d.test.client_names == d.train.client_names
    assert d.train.sizes.sum() + d.test.sizes.sum() == 30000
    assert d.test.sizes.sum() == pytest.approx(7500, abs=4)


def test_a_disk_population_trains_exactly_as_the_same_population_in_memory(tmp_path):
    from fljax.data import disk
    from fljax.experiment import trainer
    from tests import helpers

    train = helpers.population([7, 3, 12, 5, 9], seed=1)
    test = helpers.population([2, 0, 3, 1, 2], seed=2)
    disk.write(tmp_path / "train", (train.client(c) for c in range(5)), num_classes=helpers.NUM_CLASSES)
    disk.write(
        tmp_path / "test",
        (test.client(c) for c in range(5)),
        num_classes=helpers.NUM_CLASSES,
        allow_empty=True,
    )
    section = config.Disk(path=str(tmp_path / "train"), test_path=str(tmp_path / "test"))
    run = config.Config(
        name="disk",
        data=section,
        model=config.Model(name="mlp", hidden=(8,)),
        client=config.Client(batch_size=4, max_steps=3),
        cohort=config.Cohort(sampling="uniform", size=3),
        rounds=2,
        devices=1,
        checkpoint_every=0,
    )
    prepared = _load(section)
    assert isinstance(prepared.train, disk.DiskPopulation) and prepared.num_classes == helpers.NUM_CLASSES
    assert prepared.test.sizes.tolist() == [2, 0, 3, 1, 2]
    model = trainer.build_model(run.model, prepared.num_classes)
    on_disk = trainer.train(run, prepared.train, model, progress=False)
    in_memory = trainer.train(run, train, model, progress=False)
    helpers.assert_trees_equal(
        on_disk.state.params, in_memory.state.params
    )  # the same cohorts, read from disk
    # The whole run from the config: rounds, the per-client evaluation on the held-out population.
    trainer.run(run, tmp_path / "out", progress=False)
    final = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(final["fed_per_client_accuracy"]) == 5 and final["fed_per_client_accuracy"][1] is None
    _raises(config.Disk(path=str(tmp_path / "nowhere")), "data.path=", "no such directory")
    _raises(config.Disk(path=None), "data.path=", "needs its directory")
    disk.write(tmp_path / "four", (train.client(c) for c in range(4)), num_classes=helpers.NUM_CLASSES)
    _raises(
        dataclasses.replace(section, test_path=str(tmp_path / "four")),
        "data.test_path=",
        "4 clients",
        "same clients",
    )
