"""The data of an experiment: a typed data section (:mod:`fljax.experiment.config`) to populations.

:func:`load` turns one data section into a :class:`Prepared`: the training population, a
per-client held-out population aligned with it (same clients, same order) or a central test set,
the number of classes and, when a partitioner split central data, its :func:`partition.report`.

| section | clients | held out |
| --- | --- | --- |
| ``HeartDisease`` | 4 hospitals (shipped) | each hospital's own patients |
| ``Images`` | ``num_clients`` from a partitioner | the central test split |
| ``FEMNIST`` | writers (first ``max_clients``) | the central test split |
| ``Shakespeare`` | speaking roles (first ``max_clients``) | the pooled test split |
| ``Tabular`` | one per value of ``client_column`` (credit: or ``num_institutions`` institutions) | adult: ``adult.test`` by client; credit: each client's own rows |
| ``Custom`` | one per value of ``client_column`` | each client's own rows |
| ``Disk`` | a :class:`fljax.data.disk.DiskPopulation`, read per cohort | ``test_path``: the same clients' rows |

A per-client row split (:func:`split_rows`) holds out ``round(test_fraction * n)`` of each
client's ``n`` rows, drawn from ``split_seed``, and always leaves a client at least one training
row (a client may then have no held-out rows). ``Custom`` features are standardised with
:mod:`fljax.data.standardize`: statistics from sums of the TRAINING clients' per-client sums (what
one secure-sum round gives), applied to train and held-out rows.

Randomness: ``key`` (the run's ``"data"`` stream, :mod:`fljax.random`) draws the image subset
(``host_rng(key, 1)``), the ``examples_per_client`` cut (``host_rng(key, 2)``) and the partition
(the partitioner's own use of ``key``); ``Images.seed`` is applied by the caller when it derives
``key``. Credit default's ``num_institutions`` institutions (:func:`institutions`) are drawn from
``host_rng(key, 4)``. Row splits use ``split_seed``, so they stay fixed while the run seed changes.

Private standardisation (``standardize_noise_multiplier=z`` of ``HeartDisease`` and of ``Tabular``
with credit default): the numeric features' means and standard deviations come from
:class:`fljax.analytics.profiling.PrivateStandardize` (two noised sums of per-record
contributions clipped to the data set's public ranges, ``heart_disease.PUBLIC_BOUNDS`` or
``tabular.CREDIT_PUBLIC_BOUNDS``) instead of the exact federated sums; ``z = 0`` goes through the
same path without noise and gives exactly the default's features. Its noise seed is drawn from
``host_rng(key, 3)``: a reproducible simulation tied to the run's seed, not secret noise.
:attr:`Prepared.standardization` records what it spent (epsilon at ``delta``, unit ONE RECORD: a
patient or a card holder, not the training's unit of one client; the two guarantees are about
different neighbouring data sets and are not added).

Errors: a missing file, an unknown column or unusable values raise
:class:`~fljax.experiment.config.ConfigError` with one line ``data.KEY=VALUE: what is wrong;
how to fix it``. Only the errors a loader is expected to raise for bad input
(``FileNotFoundError``, ``ValueError``) are reworded; anything else propagates.

Examples:
  >>> import jax
  >>> from fljax.experiment import config
  >>> d = load(config.HeartDisease(), jax.random.key(0))
  >>> d.train.num_clients, d.test.client_names == d.train.client_names, d.num_classes
  (4, True, 2)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import numpy as np

from fljax import random as fl_random
from fljax.analytics import profiling
from fljax.data import disk, partition, standardize
from fljax.data.datasets import cifar10, custom, femnist, heart_disease, images, paths, shakespeare, tabular
from fljax.data.federated import FederatedData
from fljax.experiment import config
from fljax.privacy import config as privacy_config


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An experiment's data, ready for the trainer.

    Attributes:
      train: the training population.
      test: per-client held-out data with train's clients in train's order (a client may have
        no rows), or ``None``.
      central_test: a central test set ``(x, y)``, or ``None``.
      num_classes: number of classes of the labels.
      report: :func:`fljax.data.partition.report` when a partitioner split central data.
      standardization: what a private standardisation spent (:func:`standardization_summary`),
        or ``None``.
    """

    train: FederatedData
    test: FederatedData | None
    central_test: tuple[np.ndarray, np.ndarray] | None
    num_classes: int
    report: dict | None = None
    standardization: dict | None = None


def private_standardize(
    noise_multiplier: float | None, bounds, key: jax.Array
) -> profiling.PrivateStandardize | None:
    """The loader option of ``standardize_noise_multiplier`` (``None``: the default standardisation).

    Args:
      noise_multiplier: ``z`` (``None``: none; 0: the private path without noise, bounds unused).
      bounds: ``((feature, lo, hi), ...)``, the data set's public ranges.
      key: the run's ``"data"`` key; the noise seed is drawn from ``host_rng(key, 3)``.

    Returns:
      A :class:`~fljax.analytics.profiling.PrivateStandardize`, or ``None``.
    """
    if noise_multiplier is None:
        return None
    seed = int(fl_random.host_rng(key, 3).integers(2**31 - 1))
    return profiling.PrivateStandardize(
        noise_multiplier=float(noise_multiplier),
        bounds=tuple(bounds) if noise_multiplier > 0 else (),
        seed=seed,
    )


def standardization_summary(option: profiling.PrivateStandardize, num_records: int, unit: str) -> dict:
    """A JSON-ready record of a private standardisation's guarantee.

    Args:
      option: the :class:`~fljax.analytics.profiling.PrivateStandardize` used.
      num_records: records whose statistics were released (they set the default delta,
        :func:`fljax.privacy.config.default_delta`).
      unit: what one record is (``"one patient"``, ``"one row (card holder)"``).

    Returns:
      ``{"epsilon", "delta", "unit_of_privacy", ...}``.

    Examples:
      >>> s = standardization_summary(profiling.PrivateStandardize(noise_multiplier=6.0), 690, "one patient")
      >>> round(s["epsilon"], 2), s["delta"], s["unit_of_privacy"]
      (0.95, 1e-05, 'one patient')
    """
    delta = privacy_config.default_delta(num_records)
    return {
        "method": "fljax.analytics.profiling.private_scaler (two Gaussian releases, public feature bounds)",
        "noise_multiplier": option.noise_multiplier,
        "epsilon": option.epsilon(delta),
        "delta": delta,
        "accountant": "rdp",
        "unit_of_privacy": unit,
        "neighboring_relation": "add_or_remove_one record",
        "records": int(num_records),
        "bounds": {n: [lo, hi] for n, lo, hi in option.bounds},
        "noise": "reproducible simulation: noise seeded from the run's seed (data key); NOT private",
        "composition": "not added to the training's epsilon: that one is about one client (a hospital or "
        "group) of the federation, this one about one record; a record's total exposure is bounded by "
        "their composition under a shared unit, which is not computed here",
    }


def load(data: config.Data, key: jax.Array) -> Prepared:
    """The populations of data section ``data`` (see the module docstring).

    Args:
      data: one data section of :class:`fljax.experiment.config.Config`.
      key: typed key for partitions and subsets (the run's ``"data"`` stream).

    Returns:
      A :class:`Prepared`.

    Raises:
      ConfigError: a missing file or folder, an unknown column, unusable values or a partition
        the data cannot give; the message names the key and how to fix it.
    """
    if isinstance(data, config.HeartDisease):
        return _heart_disease(data, key)
    if isinstance(data, config.Images):
        return _images(data, key)
    if isinstance(data, config.FEMNIST):
        return _femnist(data)
    if isinstance(data, config.Shakespeare):
        return _shakespeare(data)
    if isinstance(data, config.Tabular):
        return _tabular(data, key)
    if isinstance(data, config.Custom):
        return _custom(data)
    if isinstance(data, config.Disk):
        return _disk(data)
    raise config.bad("data", type(data).__name__, f"expected one of {', '.join(config.DATA_NAMES)}")


def _open_population(key: str, path: str | None) -> disk.DiskPopulation:
    if path is None:
        raise _error(key, None, "a disk population needs its directory (fljax.data.disk.PopulationWriter)")
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise _error(key, path, "no such directory")
    try:
        population = disk.DiskPopulation.open(folder)
    except ValueError as e:
        raise _error(key, path, str(e)) from None
    if population.num_classes is None:
        raise _error(
            key, path, "the population was written without num_classes; write it with num_classes=..."
        )
    return population


def _disk(data: config.Disk) -> Prepared:
    """A :class:`fljax.data.disk.DiskPopulation` (its clients read per cohort), and the same
    clients' held-out rows from ``test_path`` in memory."""
    train = _open_population("data.path", data.path)
    test = None
    if data.test_path is not None:
        held_out = _open_population("data.test_path", data.test_path)
        if held_out.num_clients != train.num_clients:
            raise _error(
                "data.test_path",
                data.test_path,
                f"{held_out.num_clients} clients, but data.path has {train.num_clients}: the same clients in the same order",
            )
        test = held_out.subset(range(held_out.num_clients))
    return Prepared(train=train, test=test, central_test=None, num_classes=int(train.num_classes))


# ----------------------------------------------------------------------------- helpers


def _error(key: str, value, text: str) -> config.ConfigError:
    """``ConfigError`` ``key=value: text`` on one line."""
    return config.bad(key, value, " ".join(str(text).split()))


def _missing(
    data, folder_name: str, what: str, extra: tuple[str, ...] = (), note: str = ""
) -> config.ConfigError:
    """``data.data_dir=...: no WHAT found (searched ...); expected --set data.data_dir=...``."""
    searched = ", ".join(str(f.resolve()) for f in paths.candidates(folder_name, data.data_dir, extra))
    return _error(
        "data.data_dir",
        data.data_dir,
        f"no {what} found (searched {searched}{note}); expected --set data.data_dir=FOLDER (the folder "
        f"holding the files) or {paths.ENV_VAR}=ROOT (holding {folder_name}/)",
    )


def _locate(data, folder_name: str, required: list[str], what: str) -> pathlib.Path:
    """The folder holding ``required`` (see :func:`paths.find`), else ``ConfigError``."""
    try:
        return paths.find(folder_name, required, data.data_dir)
    except FileNotFoundError:
        raise _missing(data, folder_name, what) from None


def _first(arrays: tuple[np.ndarray, np.ndarray], n: int | None) -> tuple[np.ndarray, np.ndarray]:
    return arrays if n is None else (arrays[0][:n], arrays[1][:n])


def _first_clients(population: FederatedData, n: int | None) -> FederatedData:
    if n is None or n >= population.num_clients:
        return population
    return population.subset(range(n))


def _aligned(test: FederatedData, names: tuple[str, ...]) -> FederatedData:
    """``test`` with clients ``names`` in that order: others dropped, absent ones empty."""
    where = {n: c for c, n in enumerate(test.client_names)}
    empty = (test.x[:0], test.y[:0])
    return FederatedData.from_clients(
        [test.client(where[n]) if n in where else empty for n in names],
        client_names=names,
        num_classes=test.num_classes,
        allow_empty=True,
    )


def split_rows(
    population: FederatedData, test_fraction: float, seed: int
) -> tuple[FederatedData, FederatedData]:
    """Split each client's rows into train and held-out rows (same clients, same order).

    Each client with ``n`` rows holds out ``min(round(test_fraction * n), n - 1)`` of them at
    random: every row lands in exactly one of the two, and every client keeps at least one
    training row (its held-out part may be empty). Rows keep their order.

    Args:
      population: the clients' rows.
      test_fraction: held-out share of each client, in ``(0, 1)``.
      seed: split seed; the same seed gives the same split.

    Returns:
      ``(train, test)``.

    Examples:
      >>> d = FederatedData.from_clients([(np.zeros((8, 1)), np.zeros(8)), (np.zeros((1, 1)), np.zeros(1))])
      >>> train, test = split_rows(d, 0.25, seed=0)
      >>> train.sizes.tolist(), test.sizes.tolist()
      ([6, 1], [2, 0])
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(population.num_clients):
        start, size = int(population.offsets[c]), int(population.sizes[c])
        rows = start + rng.permutation(size)
        k = max(0, min(int(round(test_fraction * size)), size - 1))
        test.append(np.sort(rows[:k]))
        train.append(np.sort(rows[k:]))
    kwargs = {"client_names": population.client_names, "num_classes": population.num_classes}
    return (
        FederatedData.from_partition(population.x, population.y, train, allow_empty=True, **kwargs),
        FederatedData.from_partition(population.x, population.y, test, allow_empty=True, **kwargs),
    )


# ----------------------------------------------------------------------------- heart disease


def _heart_disease(data: config.HeartDisease, key: jax.Array) -> Prepared:
    kwargs = {} if data.path is None else {"path": data.path}
    option = private_standardize(data.standardize_noise_multiplier, heart_disease.PUBLIC_BOUNDS, key)
    try:
        d = heart_disease.load(
            test_fraction=data.test_fraction,
            seed=data.split_seed,
            private_standardize=option,
            target=data.target,
            **kwargs,
        )
    except FileNotFoundError:
        if data.path is None:
            raise
        raise _error(
            "data.path", data.path, "file not found; expected a CSV in the shipped layout, or None"
        ) from None
    except (ValueError, KeyError) as e:
        if data.path is None:
            raise
        what = f"lacks column {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise _error(
            "data.path", data.path, f"{what}; expected a CSV in the shipped layout (site, ..., target)"
        ) from None
    spent = None
    if option is not None:  # the statistics are over the training patients
        spent = standardization_summary(option, len(d.train.y), "one patient")
    return Prepared(
        train=d.train, test=d.test, central_test=None, num_classes=d.train.num_classes, standardization=spent
    )


# ----------------------------------------------------------------------------- central images

_IMAGE_NAMES = {
    "mnist": "MNIST files (mnist.npz or the idx files)",
    "fashion_mnist": "Fashion-MNIST idx files",
    "emnist": "EMNIST idx files",
    "cifar100": "CIFAR-100 pickles (train, test)",
}


def _image_arrays(data: config.Images):
    """``(x_train, y_train), (x_test, y_test), num_classes`` of an image data set."""
    if data.name == "cifar10":
        source = "jpeg" if data.source == "local" else data.source
        try:
            raw = cifar10.load_raw(data.data_dir, source=source)
        except FileNotFoundError:
            raise _error(
                "data.data_dir",
                data.data_dir,
                f"no CIFAR-10 archive {cifar10.ARCHIVE} found (searched data.data_dir if set, else "
                "$FLJAX_DATA_DIR/cifar10_jpeg and ../shared/data/cifar10_jpeg, and tensorflow-datasets "
                "could not load it); expected --set data.data_dir=FOLDER or FLJAX_DATA_DIR=FOLDER",
            ) from None
        except ValueError as e:
            raise _error("data.data_dir", data.data_dir, f"unreadable CIFAR-10 archive: {e}") from None
        except ImportError:
            if source != "tfds":
                raise
            raise _no_tfds(data) from None
        return (raw["x_train"], raw["y_train"]), (raw["x_test"], raw["y_test"]), 10
    if data.source == "jpeg":
        raise _error(
            "data.source",
            data.source,
            f"'jpeg' is CIFAR-10's archive; expected 'auto', 'local' or 'tfds' for data.name={data.name!r}",
        )
    if data.name == "emnist" and data.subset not in images.EMNIST_SPLITS:
        raise _error("data.subset", data.subset, f"expected one of {', '.join(images.EMNIST_SPLITS)}")
    loader, kwargs, num_classes = {
        "mnist": (images.mnist, {}, 10),
        "fashion_mnist": (images.fashion_mnist, {}, 10),
        "emnist": (images.emnist, {"subset": data.subset}, images.EMNIST_SPLITS.get(data.subset)),
        "cifar100": (images.cifar100, {}, 100),
    }[data.name]
    extra = ("/usr/share/datasets/fashion-mnist",) if data.name == "fashion_mnist" else ()
    try:
        arrays = [loader(s, data_dir=data.data_dir, source=data.source, **kwargs) for s in ("train", "test")]
    except FileNotFoundError:
        raise _missing(data, data.name, _IMAGE_NAMES[data.name], extra) from None
    except ImportError:  # no local files and no tensorflow-datasets to fall back on
        if data.source == "local":
            raise
        if data.source == "tfds":
            raise _no_tfds(data) from None
        raise _missing(
            data, data.name, _IMAGE_NAMES[data.name], extra, "; no tensorflow-datasets to fall back on"
        ) from None
    except ValueError as e:
        raise _error("data.data_dir", data.data_dir, f"unreadable {data.name} files: {e}") from None
    return arrays[0], arrays[1], num_classes


def _no_tfds(data: config.Images) -> config.ConfigError:
    return _error(
        "data.source",
        data.source,
        f"tensorflow-datasets cannot load {data.name} here: it or TensorFlow is not installed; expected "
        "pip install tensorflow-datasets tensorflow, or --set data.source=local with offline files",
    )


def _partition(data: config.Images, y: np.ndarray, key: jax.Array) -> partition.Partition:
    n, kind = data.num_clients, data.partition
    if kind != "iid" and data.examples_per_client is not None:
        raise _error(
            "data.examples_per_client", data.examples_per_client, "expected None unless data.partition='iid'"
        )
    if data.examples_per_client is not None:
        need = n * data.examples_per_client
        if need > len(y):
            raise _error(
                "data.examples_per_client",
                data.examples_per_client,
                f"{n} clients x {data.examples_per_client} examples = {need} > the {len(y)} training "
                "examples; expected fewer clients or examples per client",
            )
        order = fl_random.host_rng(key, 2).permutation(len(y))[:need]
        return partition.Partition([np.sort(p).astype(np.int64) for p in np.split(order, n)])
    own = {  # the partitioner's own parameter: the key named when it rejects the data
        "iid": ("data.num_clients", n, lambda: partition.iid(y, n, key)),
        "classes_per_client": (
            "data.classes_per_client",
            data.classes_per_client,
            lambda: partition.classes_per_client(y, n, data.classes_per_client, key),
        ),
        "shards": (
            "data.shards_per_client",
            data.shards_per_client,
            lambda: partition.shards(y, n, data.shards_per_client, key),
        ),
        "dirichlet": ("data.alpha", data.alpha, lambda: partition.dirichlet(y, n, data.alpha, key)),
    }
    name, value, split = own[kind]
    try:
        return split()
    except ValueError as e:
        if "num_clients" in str(e):
            name, value = "data.num_clients", n
        raise _error(name, value, f"data.partition={kind!r} cannot split {len(y)} examples: {e}") from None


def _images(data: config.Images, key: jax.Array) -> Prepared:
    (x_train, y_train), test, num_classes = _image_arrays(data)
    if data.max_train_examples is not None:  # a random subset, drawn before the partition
        keep = fl_random.host_rng(key, 1).permutation(len(y_train))[: data.max_train_examples]
        x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = _first(test, data.max_test_examples)
    if data.name == "cifar10":
        x_train, x_test = cifar10.normalize(x_train), cifar10.normalize(x_test)
    y_train, y_test = np.asarray(y_train, np.int32), np.asarray(y_test, np.int32)
    p = _partition(data, y_train, key)
    train = FederatedData.from_partition(x_train, y_train, p.indices, num_classes=num_classes)
    return Prepared(
        train=train,
        test=None,
        central_test=(x_test, y_test),
        num_classes=num_classes,
        report=partition.report(p, y_train, num_classes),
    )


# ----------------------------------------------------------------------------- natural clients


def _femnist(data: config.FEMNIST) -> Prepared:
    folder = _locate(data, "femnist_leaf_small", [femnist.FILE], f"FEMNIST file {femnist.FILE}")
    try:
        train = femnist.load("train", data_dir=folder)
        test = femnist.load("test", data_dir=folder)
    except (ValueError, KeyError) as e:
        what = f"lacks an array ({e.args[0]})" if isinstance(e, KeyError) else str(e)
        raise _error("data.data_dir", data.data_dir, f"{folder / femnist.FILE}: {what}") from None
    return Prepared(
        train=_first_clients(train, data.max_clients),
        test=None,
        central_test=_first(test.pooled(), data.max_test_examples),
        num_classes=femnist.NUM_CLASSES,
    )


def _shakespeare(data: config.Shakespeare) -> Prepared:
    folder = _locate(
        data,
        "shakespeare_tff",
        ["shakespeare_train.h5|shakespeare_tff.json.gz", "shakespeare_test.h5|shakespeare_tff.json.gz"],
        "Shakespeare files (shakespeare_train.h5 and shakespeare_test.h5, or shakespeare_tff.json.gz)",
    )
    try:
        train = shakespeare.load("train", data_dir=folder, sequence_length=data.sequence_length)
        test = shakespeare.load("test", data_dir=folder, sequence_length=data.sequence_length)
    except (FileNotFoundError, ValueError) as e:
        raise _error("data.data_dir", data.data_dir, f"{folder}: {e}") from None
    return Prepared(
        train=_first_clients(train, data.max_clients),
        test=None,
        central_test=_first(test.pooled(), data.max_test_examples),
        num_classes=shakespeare.VOCAB_SIZE,
    )


def _tabular(data: config.Tabular, key: jax.Array) -> Prepared:
    adult = data.name == "adult"
    column = data.client_column or ("race" if adult else "EDUCATION")
    allowed = tabular.ADULT_CATEGORICAL if adult else tabular.CREDIT_CATEGORICAL
    if column not in allowed:
        raise _error(
            "data.client_column",
            column,
            f"not a categorical column of {data.name}; expected one of {', '.join(allowed)}",
        )
    if adult:
        folder = _locate(
            data, "adult_uci", ["adult.data", "adult.test"], "Adult files adult.data, adult.test"
        )
    else:
        folder = _locate(data, "credit_default_uci", ["UCI_Credit_Card.csv"], "UCI_Credit_Card.csv")
    option = None
    if not adult:
        option = private_standardize(data.standardize_noise_multiplier, tabular.CREDIT_PUBLIC_BOUNDS, key)
    try:
        if not adult:
            population = tabular.credit_default(
                client_column=column, data_dir=folder, private_standardize=option
            )
            if data.num_institutions is not None:
                population = institutions(
                    population, data.num_institutions, data.institution_alpha, fl_random.host_rng(key, 4)
                )
            train, test = split_rows(population, data.test_fraction, data.split_seed)
        else:
            train = tabular.adult("train", client_column=column, data_dir=folder)
            test = _aligned(tabular.adult("test", client_column=column, data_dir=folder), train.client_names)
    except ValueError as e:
        raise _error("data.data_dir", data.data_dir, f"{folder}: {e}") from None
    spent = None
    if option is not None:  # credit default standardises over all rows (train and held out)
        spent = standardization_summary(option, len(population.y), "one row (card holder)")
    return Prepared(train=train, test=test, central_test=None, num_classes=2, standardization=spent)


MIN_INSTITUTION_ROWS = 100
"""Fewest rows an institution of :func:`institutions` holds (a draw with fewer is redrawn)."""


def institutions(
    population: FederatedData, num_clients: int, alpha: float, rng: np.random.Generator
) -> FederatedData:
    """``num_clients`` institutions from a population of groups (e.g. education levels).

    Each group's rows are shared among the institutions in proportions drawn from
    ``Dirichlet(alpha)``: :func:`fljax.data.partition.dirichlet` with the group as the
    "label". Institutions then differ in size and in their mix of groups (small ``alpha``:
    each institution serves few groups; large: all alike). Every row lands in exactly one
    institution, each holds at least :data:`MIN_INSTITUTION_ROWS` rows.

    Args:
      population: one client per group.
      num_clients: number of institutions.
      alpha: Dirichlet concentration (> 0).
      rng: host generator of the draw (``host_rng`` of the run's data key).

    Returns:
      :class:`FederatedData` with clients ``institution_1``, ..., in a fixed order.

    Examples:
      >>> groups = FederatedData.from_clients([(np.zeros((300, 1)), np.zeros(300))] * 3)
      >>> d = institutions(groups, 2, 1.0, np.random.default_rng(0))
      >>> d.client_names, int(d.sizes.sum())
      (('institution_1', 'institution_2'), 900)
    """
    group = np.repeat(np.arange(population.num_clients), population.sizes)
    try:
        p = partition.dirichlet(
            group, num_clients, alpha, int(rng.integers(2**31 - 1)), min_size=MIN_INSTITUTION_ROWS
        )
    except ValueError as e:
        if "min_size" in str(e) or "num_clients" in str(e):
            raise _error("data.num_institutions", num_clients, str(e)) from None
        raise _error("data.institution_alpha", alpha, str(e)) from None
    return FederatedData.from_partition(
        population.x,
        population.y,
        p.indices,
        client_names=tuple(f"institution_{i + 1}" for i in range(num_clients)),
        num_classes=population.num_classes,
    )


# ----------------------------------------------------------------------------- the user's own file


def _columns(frame) -> str:
    names = [str(c) for c in frame.columns]
    return ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")


def _read_frame(data: config.Custom, path: pathlib.Path):
    import pandas as pd

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise _error(
                "data.path",
                data.path,
                "reading Parquet needs pyarrow; expected pip install pyarrow "
                "(or pip install 'fljax[parquet]'), or a .csv or .npz file",
            ) from None
        reader, kind = pd.read_parquet, "Parquet"
    else:
        reader, kind = pd.read_csv, "CSV"
    try:
        return reader(path)
    except ValueError as e:  # pandas' parser errors, pyarrow's ArrowInvalid, bad encodings
        raise _error("data.path", data.path, f"cannot read the file as {kind}: {e}") from None


def _class_ids(values: np.ndarray, key: str, value, where: str) -> int:
    """``num_classes`` of integer class ids ``values`` (their max + 1), else ``ConfigError``."""
    y = np.asarray(values)
    ok = np.issubdtype(y.dtype, np.integer) or y.dtype == bool
    if not ok and np.issubdtype(y.dtype, np.floating):
        ok = bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not ok or y.size == 0 or y.min() < 0:
        raise _error(
            key, value, f"labels in {where} are not class ids; expected integers >= 0 (or text labels)"
        )
    return int(y.max()) + 1


def _from_frame(data: config.Custom, frame, path: pathlib.Path) -> FederatedData:
    import pandas as pd

    file = f"{path} (columns: {_columns(frame)})"
    for name in ("client_column", "label_column"):
        column = getattr(data, name)
        if column not in frame.columns:
            raise _error(f"data.{name}", column, f"not a column of {file}")
        if frame[column].isna().any():
            raise _error(
                f"data.{name}",
                column,
                f"{int(frame[column].isna().sum())} rows of {path} have no value; "
                "expected a value in every row",
            )
    features = data.feature_columns
    if features is not None:
        unknown = [c for c in features if c not in frame.columns]
        if unknown:
            raise _error("data.feature_columns", features, f"{unknown} are not columns of {file}")
        if data.label_column in features:
            raise _error(
                "data.feature_columns",
                features,
                f"holds the label column {data.label_column!r}; expected feature columns only",
            )
    chosen = features or [c for c in frame.columns if c not in (data.client_column, data.label_column)]
    if not chosen:
        raise _error("data.feature_columns", features, f"no feature columns left in {file}")
    for c in chosen:
        col = frame[c]
        numeric = pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col)
        if not numeric and not data.one_hot:
            raise _error(
                "data.one_hot",
                data.one_hot,
                f"feature column {c!r} of {path} is not numeric ({col.dtype}); "
                "expected --set data.one_hot=True, or data.feature_columns without it",
            )
        if numeric and col.isna().any():
            raise _error(
                "data.feature_columns",
                features,
                f"feature column {c!r} of {path} has "
                f"{int(col.isna().sum())} missing value(s); expected complete columns (impute or drop them)",
            )
    label = frame[data.label_column]
    num_classes = None
    if pd.api.types.is_numeric_dtype(label) or pd.api.types.is_bool_dtype(label):
        num_classes = _class_ids(label.to_numpy(), "data.label_column", data.label_column, str(path))
    try:
        return custom.from_dataframe(
            frame,
            client_column=data.client_column,
            label_column=data.label_column,
            feature_columns=chosen,
            num_classes=num_classes,
            one_hot=data.one_hot,
        )
    except ValueError as e:
        raise _error("data.path", data.path, str(e)) from None


def _from_npz(data: config.Custom, path: pathlib.Path) -> FederatedData:
    expected = "expected numpy.savez(FILE, x=..., y=..., client=...) without object arrays"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise _error("data.path", data.path, f"not an .npz (zip) archive; {expected}")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # not a numpy file, or pickled objects
        raise _error("data.path", data.path, f"cannot read the file as .npz ({e}); {expected}") from None
    with f:
        missing = [a for a in ("x", "y", "client") if a not in f.files]
        if missing:
            raise _error(
                "data.path",
                data.path,
                f"lacks array(s) {missing} (arrays: {', '.join(f.files)}); "
                "expected arrays x, y and client (one client id per example)",
            )
        try:
            x, y, client = f["x"], f["y"], f["client"]
        except ValueError as e:  # object arrays need pickle, which is refused
            raise _error("data.path", data.path, f"cannot read the arrays ({e}); {expected}") from None
    num_classes = _class_ids(y, "data.path", data.path, "array y")
    if np.issubdtype(x.dtype, np.floating):  # float32 like every other loader (integer x stays)
        x = x.astype(np.float32)
    try:
        return custom.from_arrays(x, y, client, num_classes=num_classes)
    except ValueError as e:
        raise _error("data.path", data.path, str(e)) from None


def _custom(data: config.Custom) -> Prepared:
    if not data.path:
        raise config.ConfigError(
            "data.path: missing (needed by data.name='custom'); expected --set data.path=FILE"
        )
    path = pathlib.Path(os.path.expanduser(data.path))
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq", ".npz"):
        raise _error(
            "data.path", data.path, "unknown file type; expected a .csv, .parquet (.pq) or .npz file"
        )
    if not path.is_file():
        raise _error(
            "data.path", data.path, f"file not found ({path.resolve()}); expected --set data.path=FILE"
        )
    population = (
        _from_npz(data, path) if suffix == ".npz" else _from_frame(data, _read_frame(data, path), path)
    )
    train, test = split_rows(population, data.test_fraction, data.split_seed)
    if data.standardize:  # statistics from sums of the training clients' sums
        scaler = standardize.fit(train)
        train, test = standardize.apply(train, scaler), standardize.apply(test, scaler)
    return Prepared(train=train, test=test, central_test=None, num_classes=int(population.num_classes))
