"""Typed experiment configs: frozen dataclasses that hold the defaults and the allowed values.

An experiment is one :class:`Config`; its sections are the types below. Defaults live in the
types (never in ``.get()`` calls of the trainer), the allowed values in the annotations
(``Literal`` choices, ``int``, ``float``, ``X | None``) and in each field's ``check`` (ranges).

Frozen dataclasses rather than ``ml_collections.ConfigDict``: a typo in a config file is an
error when the file is imported (no attribute is created by assignment), the type checker and
the editor see every field, the config is hashable (a jitted round is cached per config),
and no extra dependency is needed. Command-line overrides go through :func:`override`, which
checks the type and range of the new value and names the key in its error.

Examples:
  >>> cfg = Config(name="demo", model=Model(name="mlp", hidden=(32,)), rounds=3)
  >>> override(cfg, "client.learning_rate=1").client.learning_rate
  1.0
  >>> override(cfg, "rounds=0")
  Traceback (most recent call last):
  ...
  fljax.experiment.config.ConfigError: rounds=0: expected an integer >= 1
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Literal, Union

from fljax import privacy, secagg

# ----------------------------------------------------------------------------- errors and checks


class ConfigError(ValueError):
    """A bad config, ``--set`` override or value. The message is ``key=value: what is allowed``;
    the command line prints it as one line and exits with code 2."""


def bad(key: str, value, expected: str) -> ConfigError:
    """``ConfigError("key=value: expected")``."""
    return ConfigError(f"{key}={value!r}: {expected}")


Check = Callable[[object], "str | None"]  # a value -> None (fine) or what is expected


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok, expected: str) -> Check:
    return lambda v: None if ok(v) else expected


def _integer(low: int, high: int | None = None) -> Check:
    text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return _check(lambda v: _is_int(v) and v >= low and (high is None or v <= high), f"expected {text}")


POSITIVE = _check(lambda v: _is_number(v) and 0 < v < math.inf, "expected a positive number")
NONNEGATIVE = _check(lambda v: _is_number(v) and 0 <= v < math.inf, "expected a number >= 0")
MOMENTUM = _check(lambda v: _is_number(v) and 0 <= v < 1, "expected a number in [0, 1)")
FRACTION = _check(lambda v: _is_number(v) and 0 < v < 1, "expected a number in (0, 1)")
PROBABILITY = _check(lambda v: _is_number(v) and 0 < v <= 1, "expected a number in (0, 1]")
NONEMPTY = _check(lambda v: isinstance(v, str) and v != "", "expected a non-empty string")
SEED = _integer(0)
COUNT = _integer(1)


def field(default, check: Check | None = None, *, doc: str = ""):
    """A dataclass field with a default, a range ``check`` and a one-line ``doc``."""
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


# ----------------------------------------------------------------------------- data sections


@dataclasses.dataclass(frozen=True)
class HeartDisease:
    """UCI Heart Disease, one client per hospital (4), shipped inside fljax; no download.

    Each hospital's patients are split into train and test (``test_fraction``, stratified
    by ``split_seed``); every client is evaluated on its own held-out patients. ``target``:
    ``"disease"`` (2 classes, ``num > 0``) or ``"severity"`` (the 5 levels of ``num``; Hungary's
    file codes 0 and 1 only, see :mod:`fljax.data.datasets.heart_disease`).
    """

    name: Literal["heart_disease"] = "heart_disease"
    target: Literal["disease", "severity"] = "disease"
    test_fraction: float = field(0.25, FRACTION, doc="held-out share of each hospital")
    split_seed: int = field(0, SEED, doc="seed of the train/test split (repeats add their index)")
    path: str | None = field(None, doc="CSV in the shipped layout (default: the shipped file)")
    standardize_noise_multiplier: float | None = field(
        None,
        NONNEGATIVE,
        doc="None: exact federated standardisation; z >= 0: private (unit: one patient), see data.py",
    )


IMAGE_SETS = ("mnist", "fashion_mnist", "emnist", "cifar10", "cifar100")
PARTITIONS = ("iid", "classes_per_client", "shards", "dirichlet")


@dataclasses.dataclass(frozen=True)
class Images:
    """A central image data set split into ``num_clients`` clients by a partitioner.

    The test split stays central (``test_*`` metrics). ``partition``: ``"iid"``,
    ``"classes_per_client"`` (``classes_per_client`` labels each), ``"shards"`` (McMahan et
    al. 2017: ``shards_per_client`` label-sorted shards each) or ``"dirichlet"`` (label
    proportions from Dirichlet(``alpha``)); see :mod:`fljax.data.partition`.
    """

    name: Literal["mnist", "fashion_mnist", "emnist", "cifar10", "cifar100"] = "mnist"
    num_clients: int = field(100, COUNT)
    partition: Literal["iid", "classes_per_client", "shards", "dirichlet"] = "iid"
    classes_per_client: int = field(2, COUNT)
    shards_per_client: int = field(2, COUNT)
    alpha: float = field(0.5, POSITIVE)
    examples_per_client: int | None = field(None, COUNT, doc="iid only: exactly this many each")
    max_train_examples: int | None = field(None, COUNT, doc="a random subset of the training split")
    max_test_examples: int | None = field(None, COUNT, doc="the first n test examples")
    subset: str = field("byclass", NONEMPTY, doc="EMNIST split, e.g. 'byclass', 'digits'")
    data_dir: str | None = field(None, NONEMPTY, doc="folder with an offline copy")
    source: Literal["auto", "local", "tfds", "jpeg"] = "auto"
    seed: int | None = field(None, SEED, doc="partition seed (default: the run seed)")


@dataclasses.dataclass(frozen=True)
class FEMNIST:
    """FEMNIST (LEAF subset), one client per writer; the test split is evaluated centrally."""

    name: Literal["femnist"] = "femnist"
    max_clients: int | None = field(None, COUNT, doc="the first n writers (by id)")
    max_test_examples: int | None = field(None, COUNT)
    data_dir: str | None = field(None, NONEMPTY)


@dataclasses.dataclass(frozen=True)
class Shakespeare:
    """Federated Shakespeare (TFF), one client per speaking role; next-character prediction."""

    name: Literal["shakespeare"] = "shakespeare"
    sequence_length: int = field(80, COUNT)
    max_clients: int | None = field(None, COUNT, doc="the first n roles (by name)")
    max_test_examples: int | None = field(None, COUNT)
    data_dir: str | None = field(None, NONEMPTY)


@dataclasses.dataclass(frozen=True)
class Tabular:
    """UCI Adult or credit default, one client per value of ``client_column``.

    Adult is evaluated on its own test file split the same way; credit default has no test
    file, so each client's rows are split (``test_fraction``, ``split_seed``). Each client is
    evaluated on its own held-out rows. Credit default with ``num_institutions`` gives that
    many institutions instead: the rows of each ``client_column`` value are shared among them
    in proportions drawn from ``Dirichlet(institution_alpha)``
    (:func:`fljax.experiment.data.institutions`), so they differ in size and customer mix.
    """

    name: Literal["adult", "credit_default"] = "adult"
    client_column: str | None = field(None, NONEMPTY, doc="default: race (Adult), EDUCATION (credit)")
    test_fraction: float = field(0.25, FRACTION, doc="credit default only")
    split_seed: int = field(0, SEED)
    data_dir: str | None = field(None, NONEMPTY)
    standardize_noise_multiplier: float | None = field(
        None,
        NONNEGATIVE,
        doc="credit default only; None: central standardisation; z >= 0: private (unit: one row)",
    )
    num_institutions: int | None = field(
        None,
        COUNT,
        doc="credit default only; None: one client per client_column value; n: n institutions whose "
        "customer mixes over those values are drawn from Dirichlet(institution_alpha) (see data.py)",
    )
    institution_alpha: float = field(1.0, POSITIVE, doc="Dirichlet concentration of the mixes")


@dataclasses.dataclass(frozen=True)
class Custom:
    """The user's own data: a CSV, Parquet or NumPy ``.npz`` file with a client id per row.

    CSV/Parquet: ``client_column`` names each row's client, ``label_column`` its label, the
    features are ``feature_columns`` (default: every other column; text columns one-hot with
    ``one_hot``). ``.npz``: arrays ``x``, ``y`` and ``client`` (one id per example). Each
    client's rows are split into train and test (``test_fraction``, ``split_seed``).
    """

    name: Literal["custom"] = "custom"
    path: str | None = field(None, NONEMPTY, doc="the file (required)")
    client_column: str = field("client", NONEMPTY)
    label_column: str = field("label", NONEMPTY)
    feature_columns: tuple[str, ...] | None = None
    one_hot: bool = False
    standardize: bool = field(True, doc="federated standardisation of the features (per-client sums)")
    test_fraction: float = field(0.25, FRACTION)
    split_seed: int = field(0, SEED)


@dataclasses.dataclass(frozen=True)
class Disk:
    """A population on disk (:mod:`fljax.data.disk`, written with ``PopulationWriter``): the
    examples stay in the files and each round reads only its cohort's clients, so the
    population may be larger than memory. ``test_path``: a second population with the same
    clients' held-out rows (read into memory for the per-client evaluation; optional)."""

    name: Literal["disk"] = "disk"
    path: str | None = field(None, NONEMPTY, doc="the population directory (required)")
    test_path: str | None = field(None, NONEMPTY, doc="held-out rows of the same clients (optional)")


Data = Union[HeartDisease, Images, FEMNIST, Shakespeare, Tabular, Custom, Disk]  # noqa: UP007
DATA_TYPES: tuple[type, ...] = typing.get_args(Data)


def data_type(name: str) -> type | None:
    """The data section type whose ``name`` may be ``name`` (None if no type has it)."""
    for t in DATA_TYPES:
        if name in typing.get_args(typing.get_type_hints(t)["name"]):
            return t
    return None


DATA_NAMES = tuple(n for t in DATA_TYPES for n in typing.get_args(typing.get_type_hints(t)["name"]))


# ----------------------------------------------------------------------------- model, client, server


def _sizes(v) -> str | None:
    ok = isinstance(v, tuple) and all(_is_int(h) and h > 0 for h in v)
    return None if ok else "expected a tuple of positive integers, e.g. (32,)"


@dataclasses.dataclass(frozen=True)
class Model:
    """A reference model of :mod:`fljax.models`; the number of classes comes from the data."""

    name: Literal["mlp", "logistic", "lenet", "mcmahan_cnn", "emnist_cnn", "char_lstm"] = "mlp"
    hidden: tuple[int, ...] = field((200, 200), _sizes, doc="mlp: hidden layer widths")
    embed_dim: int = field(8, COUNT, doc="char_lstm: embedding size")
    lstm_sizes: tuple[int, ...] = field((256, 256), _sizes, doc="char_lstm: LSTM layer sizes")


@dataclasses.dataclass(frozen=True)
class Client:
    """Local training: ``num_epochs`` over the client's data in batches (or ``max_steps``)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = field(0.1, POSITIVE)
    momentum: float | None = field(None, MOMENTUM)
    batch_size: int = field(32, COUNT)
    num_epochs: int = field(1, COUNT)
    max_steps: int | None = field(None, COUNT)
    weighting: Literal["num_examples", "uniform"] = "num_examples"


ALGORITHMS = (
    "fedavg", "fedavgm", "fedprox", "fedsgd", "scaffold", "fedadam", "fedyogi", "fedadagrad",
    "fednova", "qffl", "feddyn", "mimelite",
)  # fmt: skip
SGD_ONLY = ("scaffold", "fednova", "qffl")  # their local steps are plain SGD (FedNova: with momentum)


@dataclasses.dataclass(frozen=True)
class Server:
    """The algorithm and its server-side hyperparameters (each used only by its algorithms)."""

    algorithm: Literal[
        "fedavg", "fedavgm", "fedprox", "fedsgd", "scaffold", "fedadam", "fedyogi", "fedadagrad",
        "fednova", "qffl", "feddyn", "mimelite",
    ] = "fedavg"  # fmt: skip
    learning_rate: float = field(1.0, POSITIVE)
    momentum: float = field(0.9, MOMENTUM, doc="fedavgm")
    mu: float = field(0.01, NONNEGATIVE, doc="fedprox: proximal weight")
    tau: float = field(1e-3, POSITIVE, doc="fedadam/fedyogi/fedadagrad: adaptivity")
    q: float = field(1.0, NONNEGATIVE, doc="qffl: fairness exponent (0: FedAvg with uniform weights)")
    alpha: float = field(0.01, POSITIVE, doc="feddyn: dynamic regularisation weight")


@dataclasses.dataclass(frozen=True)
class FineTune:
    """The ``"personalized"`` baseline: each client fine-tunes the final federated model on its
    own training data (:func:`fljax.personalization.fine_tune`, the client's optimizer, batch
    size and ``max_steps``); 0 epochs reproduce the federated column."""

    num_epochs: int = field(5, _integer(0), doc="local epochs from the federated model (0: none)")
    learning_rate: float | None = field(None, POSITIVE, doc="default: client.learning_rate")


@dataclasses.dataclass(frozen=True)
class Audit:
    """One-run privacy audit of a DP run (:mod:`fljax.leakage.audit`, Steinke et al. 2023):
    ``num_canaries`` random-direction canary clients, each included with probability 1/2, then
    sampled, clipped, summed and noised with the real clients. After training, ``summary.json``
    reports the empirical epsilon lower bound (confidence ``1 - significance``) beside the
    accountant's epsilon; a run whose bound exceeds the accountant's is not called private.
    Canaries move the model: an audited run is a measurement, not a production run."""

    num_canaries: int = field(
        1000, _check(lambda v: _is_int(v) and v >= 2, "expected an integer >= 2"), doc="canary clients"
    )
    significance: float = field(
        0.05, _check(lambda v: _is_number(v) and 0 < v < 0.5, "expected a number in (0, 0.5)")
    )


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Which clients join a round: all, ``size`` uniformly without replacement, or each with
    probability ``q`` (Poisson, padded to ``max_size``). With DP, the DP section decides."""

    sampling: Literal["all", "uniform", "poisson"] = "all"
    size: int | None = field(None, COUNT)
    q: float | None = field(None, PROBABILITY)
    max_size: int | None = field(None, COUNT)


@dataclasses.dataclass(frozen=True)
class Deploy:
    """Run the experiment as a local Flower deployment (:mod:`fljax.deploy.local`) instead of a
    simulation: a SuperLink and one SuperNode per client on this machine (TLS, 127.0.0.1), the
    same algorithm, client update and seeds; the server holds no data. ``secure``: the secure
    sum over the network, by the masking protocol (``"secagg"``) or CKKS (``"he"``), both with
    ``secagg``'s encoding (default ``SecAgg()``). ``timeout``: seconds the server waits for
    one message round before it drops the nodes that have not answered. ``evaluate``: the
    nodes evaluate the model on their held-out rows every ``eval_every`` rounds and after the
    last (one message round each; the simulation's ``fed_*`` metrics)."""

    secure: Literal["none", "secagg", "he"] = "none"
    timeout: float = field(60.0, POSITIVE)
    evaluate: bool = True


TRAINER_PRIVACY_FIELDS = ("budget_epsilon", "reproducible", "release_unnoised_metrics")


def _privacy_section(name: str, source: type, from_data: tuple[str, ...]) -> type:
    """A config section with every field of the library config ``source`` (those in
    ``from_data`` optional: the trainer fills them from the data and model) plus the trainer's
    :data:`TRAINER_PRIVACY_FIELDS`."""
    hints = typing.get_type_hints(source)
    fields = []
    for f in dataclasses.fields(source):
        kind, default = hints[f.name], f.default
        if f.name in from_data:
            kind, default = int | None, None
        fields.append((f.name, kind) if default is dataclasses.MISSING else (f.name, kind, default))
    fields += [
        ("budget_epsilon", float | None, field(None, POSITIVE)),
        ("reproducible", bool, field(False)),
        ("release_unnoised_metrics", bool, field(False)),
    ]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__
    return cls


def _dp_type() -> type:
    """``DP``: every :class:`fljax.privacy.DPConfig` field (``population_size`` and
    ``cohort_size`` optional: they default to the data's) plus the trainer's three fields."""
    cls = _privacy_section("DP", privacy.DPConfig, ("population_size", "cohort_size"))
    cls.__doc__ = (
        "Client-level DP: the fields of :class:`fljax.privacy.DPConfig` (``population_size`` "
        "and ``cohort_size`` default to the data's population and cohort), and three of the "
        "trainer's: ``budget_epsilon``: the run stops before a round would spend more; "
        "``reproducible``: cohort sampling and noise derived from the public seed (a reproducible "
        "simulation, labelled as not private in every output) instead of a secret key from the "
        "operating system (the default); ``release_unnoised_metrics``: also write the exact, "
        "un-noised round statistics (client counts, clipped counts, training loss), prefixed "
        "``unnoised_`` (by default they are withheld)."
    )
    return cls


DP = _dp_type()
"""The ``dp`` section (client-level DP), a frozen dataclass built from
:class:`fljax.privacy.DPConfig`: its fields (``clip_norm`` and ``noise_multiplier`` required,
``sampling``, ``delta``, ``weighting``, ``clip_scheme``, ...), with ``population_size`` and
``cohort_size`` optional (default: the data's population and the cohort's size), plus
``budget_epsilon`` (the run stops before a round would spend more), ``reproducible`` (round
keys from the public seed: a labelled simulation, not private; default False: a secret key from
the operating system) and ``release_unnoised_metrics`` (default False: exact round statistics
are withheld). The trainer builds the mechanism and its accounting from this one section."""

DistributedDP = _privacy_section(
    "DistributedDP", privacy.DistributedDPConfig, ("dim", "cohort_size", "population_size")
)
DistributedDP.__doc__ = (
    "Distributed DP: the fields of :class:`fljax.privacy.DistributedDPConfig` (``dim``, "
    "``cohort_size`` and ``population_size`` default to the model's size, the cohort's and the "
    "data's) and the trainer's ``budget_epsilon``, ``reproducible`` and "
    "``release_unnoised_metrics`` (as in ``DP``)."
)
"""The ``distributed_dp`` section: the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021),
or with ``mechanism="skellam"`` the Skellam mechanism (Agarwal, Kairouz, Liu 2021):
each client adds integer noise to its rotated, rounded update before the masked modular sum, so
the server only ever sees a noised sum. Masking follows the ``secagg`` section (default: the
complete graph). Excludes ``dp``."""

DPFTRL = _privacy_section("DPFTRL", privacy.MFConfig, ("total_rounds", "cohort_size", "population_size"))
DPFTRL.__doc__ = (
    "DP-FTRL / matrix-factorization DP: the fields of :class:`fljax.privacy.MFConfig` "
    "(``total_rounds``, ``cohort_size`` and ``population_size`` default to the run's rounds, the "
    "cohort's size and the data's population) and the trainer's ``budget_epsilon``, "
    "``reproducible`` and ``release_unnoised_metrics`` (as in ``DP``)."
)
"""The ``dp_ftrl`` section: correlated noise from a banded, BLT or independent matrix
factorization (``jax_privacy``), no sampling amplification: cohorts follow a cyclic schedule in
which a client takes part at most every ``population_size // cohort_size`` rounds. Excludes
``dp`` and ``distributed_dp``."""

SecAgg = secagg.SecAggConfig
"""The ``secagg`` section: :class:`fljax.secagg.SecAggConfig` (fixed-point encoding and pairwise
masking, simulated inside the jitted round, or run by the real protocol on the host with
``secagg_protocol=True``); with ``dp``, DP runs over the secure sum."""

BASELINES = ("local", "nonprivate", "pooled", "personalized")
AGGREGATORS = ("weighted_mean", "uniform_mean", "median", "trimmed_mean")


def _chunk(v) -> str | None:
    return (
        None
        if v is None or v == "auto" or (_is_int(v) and v >= 1)
        else "expected 'auto', None or an integer >= 1"
    )


def _devices(v) -> str | None:
    return None if v == "auto" or (_is_int(v) and v >= 1) else "expected 'auto' or an integer >= 1"


def _metric_names(v) -> str | None:
    from fljax.evaluation import CLASSIFICATION_METRICS

    ok = isinstance(v, tuple) and all(m in CLASSIFICATION_METRICS for m in v)
    return None if ok else f"expected a tuple of {', '.join(map(repr, CLASSIFICATION_METRICS))}"


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: data, model, local training, server, cohort, rounds, privacy, outputs.

    ``repeats`` runs the experiment with seeds ``seed, seed + 1, ...`` (and split seeds
    likewise); ``baselines`` adds, after the federated run, each client trained alone
    (``"local"``), the same federation without DP or secure aggregation (``"nonprivate"``),
    one model on the pooled data (``"pooled"``), all non-private, and the federated model
    fine-tuned by each client on its own data (``"personalized"``, settings in ``fine_tune``). ``metrics`` adds
    classification metrics (AUC, average precision, balanced accuracy, per-class recall, ECE)
    to each evaluation. ``aggregator`` replaces the algorithm's own (example-weighted mean for
    the FedAvg family); with ``dp`` and/or ``secagg`` the aggregation is DP over a secure sum,
    simulated in jit or, with ``secagg_protocol``, computed by the real cryptographic protocol.
    """

    name: str = field("experiment", NONEMPTY)
    seed: int = field(0, SEED)
    data: Data = HeartDisease()
    model: Model = Model()
    client: Client = Client()
    server: Server = Server()
    cohort: Cohort = Cohort()
    rounds: int = field(10, COUNT)
    eval_every: int = field(1, COUNT)
    stop_at_accuracy: float | None = field(
        None,
        PROBABILITY,
        doc="stop after the first evaluated round whose accuracy (test_accuracy, else "
        "fed_weighted_accuracy) is >= this; summary.json records the round (None: run all rounds)",
    )
    checkpoint_every: int = field(10, _integer(0), doc="0: no checkpoints")
    repeats: int = field(1, COUNT)
    baselines: tuple[Literal["local", "nonprivate", "pooled", "personalized"], ...] = ()
    fine_tune: FineTune = FineTune()
    metrics: tuple[str, ...] = field((), _metric_names)
    aggregator: Literal["weighted_mean", "uniform_mean", "median", "trimmed_mean"] | None = None
    trim_fraction: float = field(
        0.1, _check(lambda v: _is_number(v) and 0 <= v < 0.5, "expected a number in [0, 0.5)")
    )
    chunk_size: int | Literal["auto"] | None = field("auto", _chunk)
    cohort_layout: Literal["auto", "padded", "compact"] = field(
        "auto",
        _check(lambda v: v in ("auto", "padded", "compact"), "expected 'auto', 'padded' or 'compact'"),
        doc="'auto': one padded shape per round (a Poisson draw padded to its Chernoff capacity, "
        "the chunks of padding slots skipped, so about the sampled clients are computed), and "
        "a heavy-tailed population in size buckets when a round expects at least "
        "trainer.BUCKET_MIN_CLIENTS clients (fljax.experiment.trainer.cohort_layout). 'compact': "
        "also Poisson draws padded to a capacity ladder and buckets at any cohort size. "
        "'padded': one shape, no buckets. The same clients and accounting in every layout; "
        "buckets and ladders change results by float reassociation only",
    )
    devices: int | Literal["auto"] = field(
        "auto",
        _devices,
        doc="devices the cohort's clients are spread over (fljax.simulation.shard_clients): 'auto' "
        "= every device of the default backend, on CPU at most one per core (the command line "
        "starts jax with one CPU device per core); 1: one device. Cohorts are padded with masked "
        "slots to a multiple of it. Results equal up to float reassociation",
    )
    dp: DP | None = None  # type: ignore[valid-type]
    distributed_dp: DistributedDP | None = None  # type: ignore[valid-type]
    dp_ftrl: DPFTRL | None = None  # type: ignore[valid-type]
    secagg: SecAgg | None = None
    secagg_protocol: bool = field(
        False,
        doc="with secagg: the real cryptographic protocol on the host through jax.pure_callback "
        "(fljax.secagg.protocol_sum) instead of the masking simulation in jit; the same sum bit "
        "for bit as the simulation; for small models",
    )
    audit: Audit | None = None
    deploy: Deploy | None = field(
        None,
        doc="run on a local Flower deployment (fljax.deploy.local: SuperLink, one SuperNode per "
        "client, TLS) instead of simulating; the same results (docs/deploy.md)",
    )


# ----------------------------------------------------------------------------- typed values


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _describe(kind) -> str:
    """What a value of type ``kind`` looks like, for error messages."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return "True or False"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "a string"
    if kind is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return (
            "a tuple, e.g. (a, b) or ()"
            if len(args) != 2 or args[1] is not Ellipsis
            else (f"a tuple of {_describe(args[0])}, e.g. (a, b) or ()")
        )
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if dataclasses.is_dataclass(kind):
        return f"a dict of {kind.__name__} fields, e.g. {{'name': ...}}"
    return getattr(kind, "__name__", str(kind))


class _Mismatch(Exception):
    """A value does not have the annotated type (internal; becomes a ConfigError)."""


# scalar annotation -> (which values it accepts, how they are stored): an int is a number
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), lambda v: v),
    int: (_is_int, lambda v: v),
    float: (_is_number, float),
    str: (lambda v: isinstance(v, str), lambda v: v),
}


def _typed(kind, value, key: str):
    """``value`` as a value of annotated type ``kind`` (ints become floats where a float is
    expected, lists tuples, dicts dataclasses); ``_Mismatch`` if it has another type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return value
    if kind is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if len(classes) > 1:  # the data section: its ``name`` picks the type
            return _section(key, classes, value)
        for a in args:
            if a is type(None):
                continue
            try:
                return _typed(a, value, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str | int) and not isinstance(value, bool) and value in args:
            return value
        raise _Mismatch
    if kind in _SCALARS:
        accepts, convert = _SCALARS[kind]
        if accepts(value):
            return convert(value)
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_typed(a, v, key) for a, v in zip(args, value, strict=True))
    if dataclasses.is_dataclass(kind):
        return _section(key, [kind], value)
    raise TypeError(f"unsupported config annotation {kind!r} of {key}")


def _section(key: str, classes: list[type], value):
    """A section (a dataclass) from a dict or an instance of one of ``classes``."""
    if isinstance(value, tuple(classes)):
        check(value, key)
        return value
    if not isinstance(value, dict):
        raise _Mismatch
    cls = classes[0]
    if len(classes) > 1:
        name = value.get("name", typing.get_args(_hints(classes[0])["name"])[0])
        cls = next((c for c in classes if name in typing.get_args(_hints(c)["name"])), None)
        if cls is None:
            names = [n for c in classes for n in typing.get_args(_hints(c)["name"])]
            raise bad(f"{key}.name", name, "expected one of " + ", ".join(map(repr, names)))
    return from_dict(cls, value, key)


def _value(cls: type, name: str, value, key: str, strict: bool = False):
    """``value`` for field ``name`` of ``cls`` after type and range checks (``ConfigError``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    rule = f.metadata.get("check")
    try:
        typed = _typed(_hints(cls)[name], value, key)
    except _Mismatch:
        expected = rule(value) if rule is not None else None
        raise bad(key, value, expected or f"expected {_describe(_hints(cls)[name])}") from None
    if rule is not None and typed is not None and (expected := rule(typed)) is not None:
        raise bad(key, value, expected)
    if strict and isinstance(typed, tuple) and not isinstance(value, tuple):  # hashable configs only
        raise bad(key, value, (rule(value) if rule else None) or f"expected {_describe(_hints(cls)[name])}")
    return typed


def _construct(cls: type, kwargs: dict, key: str):
    """``cls(**kwargs)``; a ``ValueError`` of its own checks becomes a ConfigError naming the key."""
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise reworded(key, kwargs, cls, e) from None


def from_dict(cls: type, values: dict, prefix: str = ""):
    """An instance of section type ``cls`` from a dict: every key checked, the rest defaults.

    Examples:
      >>> from_dict(Client, {"learning_rate": 1}).learning_rate
      1.0
    """
    if not isinstance(values, dict):
        raise bad(prefix or "config", values, f"expected {_describe(cls)}")
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}." if prefix else ""
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            context = f" for {prefix}.name={values.get('name')!r}" if "name" in values and prefix else ""
            raise bad(f"{where}{k}", v, f"unknown key{context}; known keys: {', '.join(sorted(names))}")
        kwargs[k] = _value(cls, k, v, f"{where}{k}")
    for f in dataclasses.fields(cls):
        if (
            f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(
                f"{where}{f.name}: missing; expected it in the config or --set {where}{f.name}=..."
            )
    return _construct(cls, kwargs, prefix or cls.__name__)


def to_dict(config) -> dict:
    """The config as nested plain dicts (for ``config.json``; ``from_dict(Config, d)`` inverts it).

    Examples:
      >>> to_dict(Config(name="x"))["data"]["name"]
      'heart_disease'
    """
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(v):
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def check(config, prefix: str = "") -> None:
    """Type- and range-check every field of a section (recursively); ``ConfigError`` if bad.

    Catches what a dataclass does not: a wrong type or an out-of-range value written in a
    ``get_config()`` file.
    """
    where = f"{prefix}." if prefix else ""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            kind = _hints(type(config))[f.name]
            allowed = [a for a in (typing.get_args(kind) or (kind,)) if dataclasses.is_dataclass(a)]
            if not isinstance(value, tuple(allowed)):
                raise bad(f"{where}{f.name}", value, f"expected {_describe(kind)}")
            check(value, f"{where}{f.name}")
        else:
            _value(type(config), f.name, value, f"{where}{f.name}", strict=True)


# ----------------------------------------------------------------------------- overrides


def parse_value(raw: str):
    """A ``--set`` value: a Python literal (``0.1``, ``(32,)``, ``None``, ``{'a': 1}``) or, if it
    is not one, the text itself (``fedavg``)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def override(config: Config, item: str) -> Config:
    """``config`` with one ``key=value`` override (``a.b.c=value``), type- and range-checked.

    A value replaces the field's value after conversion to its annotated type (an int where a
    float is expected becomes a float; a list a tuple; a dict a whole section). Setting
    ``data.name`` to another data set switches the section type and keeps the fields the two
    types share. A field of a section that is ``None`` (e.g. ``dp`` without DP) needs the
    whole section: ``--set dp={'clip_norm': 1.0, 'noise_multiplier': 1.0}``.
    """
    if "=" not in item:
        raise bad("--set", item, "expected key=value, e.g. --set client.learning_rate=0.1")
    dotted, raw = item.split("=", 1)
    value = parse_value(raw)
    keys = dotted.split(".")
    if any(k == "" for k in keys):
        raise bad(dotted, value, "expected a dotted key like client.learning_rate")
    return _replace(config, keys, value, dotted)


def _replace(node, keys: list[str], value, dotted: str, done: tuple[str, ...] = ()):
    head, rest = keys[0], keys[1:]
    names = [f.name for f in dataclasses.fields(node)]
    where = ".".join(done)
    if head not in names:
        if rest:
            sections = sorted(n for n in names if dataclasses.is_dataclass(getattr(node, n)))
            raise bad(
                dotted,
                value,
                f"{'.'.join((*done, head))!r} is not a section of the config "
                f"(sections: {', '.join(sections) or 'none'})",
            )
        raise bad(
            dotted, value, f"unknown key; known keys of {where or 'the config'}: {', '.join(sorted(names))}"
        )
    current = getattr(node, head)
    here = ".".join((*done, head))
    if rest:
        if current is None:
            raise bad(
                dotted, value, f"{here} is None in this config; expected the whole dict, --set {here}={{...}}"
            )
        if not dataclasses.is_dataclass(current):
            raise bad(dotted, value, f"{here!r} is not a section of the config ({here} is a value)")
        new = _replace(current, rest, value, dotted, (*done, head))
    elif head == "name" and dataclasses.is_dataclass(node) and type(node) in DATA_TYPES:
        cls = data_type(value) if isinstance(value, str) else None
        if cls is None:
            raise bad(dotted, value, "expected one of " + ", ".join(map(repr, DATA_NAMES)))
        if cls is type(node):
            new = value
        else:  # another data set: keep the fields both types have
            shared = {f.name for f in dataclasses.fields(cls)} & set(names)
            kept = {k: getattr(node, k) for k in shared if k != "name"}
            return _construct(cls, kept | {"name": value}, where)
    elif dataclasses.is_dataclass(current) and isinstance(value, dict):
        kind = _hints(type(node))[head]
        classes = [a for a in (typing.get_args(kind) or (kind,)) if dataclasses.is_dataclass(a)]
        new = _section(here, classes, value)
    else:
        new = _value(type(node), head, value, dotted)
    return _construct(
        type(node), {f.name: getattr(node, f.name) for f in dataclasses.fields(node)} | {head: new}, where
    )


def apply_overrides(config: Config, items: list[str]) -> Config:
    """``config`` with every ``key=value`` of ``items`` applied in order (see :func:`override`)."""
    for item in items:
        config = override(config, item)
    return config


# ----------------------------------------------------------------------------- errors from DPConfig & co.


def reworded(section: str, given: dict, cls: type, error: Exception) -> ConfigError:
    """A section type's own ``ValueError`` (e.g. DPConfig's) as a ConfigError naming the key
    (the first field its message names) and its value: ``dp.clip_norm=-1.0: expected a
    positive number``."""
    import re

    text = str(error)
    fields = dataclasses.fields(cls)
    named = sorted((text.find(f.name), f.name) for f in fields if re.search(rf"\b{f.name}\b", text))
    if not named:
        return ConfigError(f"{section}={given!r}: {text}")
    key = named[0][1]
    default = next(f.default for f in fields if f.name == key)
    value = given.get(key, None if default is dataclasses.MISSING else default)
    match = re.fullmatch(rf"{key} must be (.*?)(, got .*)?", text)
    if match is None:
        return bad(f"{section}.{key}", value, text)
    allowed = match.group(1)
    allowed = {
        "positive": "a positive number",
        "positive and finite": "a positive finite number",
        "finite and >= 0": "a finite number >= 0",
    }.get(allowed, f"a value {allowed}" if allowed.startswith(("in ", ">=")) else allowed)
    return bad(f"{section}.{key}", value, f"expected {allowed}")


# ----------------------------------------------------------------------------- whole-config checks


def population_size(config: Config) -> int | None:
    """The number of clients the data section gives without loading the data (None: unknown)."""
    data = config.data
    if isinstance(data, HeartDisease):
        return 4
    if isinstance(data, Images):
        return data.num_clients
    if isinstance(data, Tabular) and data.num_institutions is not None:
        return data.num_institutions
    return None


def dp_config(config: Config, population: int) -> privacy.DPConfig | None:
    """The run's :class:`fljax.privacy.DPConfig` (None without DP); ``population_size`` and
    ``cohort_size`` default to the population and the cohort's size (all clients without one)."""
    if config.dp is None:
        return None
    kwargs = {f.name: getattr(config.dp, f.name) for f in dataclasses.fields(config.dp)}
    for extra in ("budget_epsilon", "reproducible", "release_unnoised_metrics"):
        kwargs.pop(extra)
    if kwargs["population_size"] is None:
        kwargs["population_size"] = population
    if kwargs["cohort_size"] is None:
        cohort = config.cohort
        expected = round(cohort.q * population) if cohort.sampling == "poisson" else cohort.size
        kwargs["cohort_size"] = expected or population
    try:
        return privacy.DPConfig(**kwargs)
    except ValueError as e:
        raise reworded("dp", kwargs, privacy.DPConfig, e) from None


def distributed_dp_config(config: Config, population: int, dim: int) -> privacy.DistributedDPConfig | None:
    """The run's :class:`fljax.privacy.DistributedDPConfig` (None without it); ``dim`` is the
    model's parameter count, ``cohort_size`` defaults to the cohort's size (Poisson: ``q * N``,
    all clients otherwise) and ``population_size`` to the data's."""
    section = config.distributed_dp
    if section is None:
        return None
    kwargs = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    for extra in TRAINER_PRIVACY_FIELDS:
        kwargs.pop(extra)
    cohort = config.cohort
    defaults = {
        "dim": dim,
        "population_size": population,
        "cohort_size": (round(cohort.q * population) if cohort.sampling == "poisson" else cohort.size)
        or population,
    }
    kwargs |= {k: v for k, v in defaults.items() if kwargs[k] is None}
    try:
        return privacy.DistributedDPConfig(**kwargs)
    except ValueError as e:
        raise reworded("distributed_dp", kwargs, privacy.DistributedDPConfig, e) from None


def dp_ftrl_config(config: Config, population: int) -> privacy.MFConfig | None:
    """The run's :class:`fljax.privacy.MFConfig` (None without it): ``total_rounds`` defaults to
    ``config.rounds``, ``cohort_size`` to the cohort's size (all clients without one) and
    ``population_size`` to the data's."""
    section = config.dp_ftrl
    if section is None:
        return None
    kwargs = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    for extra in TRAINER_PRIVACY_FIELDS:
        kwargs.pop(extra)
    defaults = {
        "total_rounds": config.rounds,
        "population_size": population,
        "cohort_size": config.cohort.size or population,
    }
    kwargs |= {k: v for k, v in defaults.items() if kwargs[k] is None}
    try:
        return privacy.MFConfig(**kwargs)
    except ValueError as e:
        raise reworded("dp_ftrl", kwargs, privacy.MFConfig, e) from None


PRIVACY_SECTIONS = ("dp", "distributed_dp", "dp_ftrl")


def _check_audit(config: Config, dp: privacy.DPConfig | None) -> None:
    """An audit needs a mechanism whose accounting treats a canary as one more client."""
    if config.audit is None:
        return
    if config.dp is None and config.distributed_dp is None:
        raise bad("audit", "{...}", "expected None without dp or distributed_dp (nothing to audit)")
    if config.dp_ftrl is not None:
        raise bad(
            "audit", "{...}", "expected None with dp_ftrl (its cyclic schedule has no place for canaries)"
        )
    if dp is not None and dp.sampling != "poisson":
        raise bad(
            "audit",
            "{...}",
            "expected dp.sampling='poisson' (canaries are add/remove neighbours, Poisson-sampled)",
        )
    if dp is not None and dp.noise_cohort_size is not None:
        raise bad(
            "audit",
            "{...}",
            "expected None with dp.noise_cohort_size (a simulated noise cohort is not private)",
        )


def privacy_section(config: Config):
    """The config's privacy section (``dp``, ``distributed_dp`` or ``dp_ftrl``), or None."""
    return next((getattr(config, n) for n in PRIVACY_SECTIONS if getattr(config, n) is not None), None)


def validate(config: Config, population: int | None = None) -> None:
    """Check a whole config before any data is loaded (and again, with the ``population``,
    once it is); ``ConfigError`` naming the key, the value and what is allowed.

    Checks every field's type and range, the values a choice needs (a uniform cohort's size),
    combinations (SCAFFOLD's local steps are plain SGD), that the cohort fits the population,
    the DP section (through ``DPConfig``) and that a DP budget pays for at least one round.
    """
    if not isinstance(config, Config):
        raise bad("config", type(config).__name__, "expected a fljax.experiment.Config")
    check(config)
    present = [n for n in PRIVACY_SECTIONS if getattr(config, n) is not None]
    if len(present) > 1:
        raise bad(present[1], "{...}", f"expected None when {present[0]} is set (one DP mechanism per run)")
    population = population if population is not None else population_size(config)
    cohort = config.cohort
    if cohort.sampling == "uniform" and cohort.size is None:
        raise ConfigError(
            "cohort.size: missing (needed by cohort.sampling='uniform'); expected --set cohort.size=..."
        )
    if cohort.sampling == "poisson" and cohort.q is None:
        raise ConfigError(
            "cohort.q: missing (needed by cohort.sampling='poisson'); expected --set cohort.q=..."
        )
    algorithm = config.server.algorithm
    if algorithm in SGD_ONLY:
        if config.client.optimizer != "sgd":
            raise bad(
                "client.optimizer",
                config.client.optimizer,
                f"expected 'sgd' with {algorithm} (its local steps are SGD)",
            )
        if config.client.momentum and algorithm != "fednova":
            raise bad(
                "client.momentum",
                config.client.momentum,
                f"expected 0 or None with {algorithm} (its local steps are SGD)",
            )
    data = config.data
    if (
        isinstance(data, Images)
        and data.partition == "classes_per_client"
        and data.classes_per_client > 10
        and data.name in ("mnist", "fashion_mnist", "cifar10")
    ):
        raise bad("data.classes_per_client", data.classes_per_client, "expected an integer in [1, 10]")
    if isinstance(data, Images) and data.examples_per_client is not None and data.partition != "iid":
        raise bad(
            "data.examples_per_client", data.examples_per_client, "expected None unless data.partition='iid'"
        )
    if isinstance(data, Tabular) and data.name == "adult" and data.standardize_noise_multiplier is not None:
        raise bad(
            "data.standardize_noise_multiplier",
            data.standardize_noise_multiplier,
            "expected None with data.name='adult' (private standardisation: heart_disease, credit_default)",
        )
    if isinstance(data, Tabular) and data.name == "adult" and data.num_institutions is not None:
        raise bad(
            "data.num_institutions",
            data.num_institutions,
            "expected None with data.name='adult' (institutions: credit_default; adult splits by client_column)",
        )
    if isinstance(data, Custom) and data.path is None:
        raise ConfigError("data.path: missing (needed by data.name='custom'); expected --set data.path=FILE")
    if config.secagg_protocol and config.secagg is None:
        raise bad(
            "secagg_protocol",
            True,
            "expected False without a secagg section (the protocol runs the secure sum it configures); "
            "set --set secagg={...} too",
        )
    if config.secagg_protocol and config.distributed_dp is not None:
        raise bad(
            "secagg_protocol",
            True,
            "expected False with distributed_dp (its masked modular sum is simulated in jit)",
        )
    if population is None:
        return
    if cohort.sampling == "uniform" and cohort.size > population:
        raise bad("cohort.size", cohort.size, f"expected at most the population, {population} clients")
    dp = dp_config(config, population)
    if dp is not None and dp.population_size != population and dp.noise_cohort_size is None:
        raise bad(
            "dp.population_size",
            dp.population_size,
            f"expected None or the data's population, {population} clients (a larger production "
            "population needs dp.noise_cohort_size: a simulated noise cohort)",
        )
    if dp is not None and dp.cohort_size > population:
        raise bad("dp.cohort_size", dp.cohort_size, f"expected at most the population, {population} clients")
    if dp is not None and cohort.sampling != "all":  # DP samples; a cohort section must agree
        q = dp.cohort_size / population
        if dp.sampling == "poisson" and not (cohort.sampling == "poisson" and math.isclose(cohort.q, q)):
            raise bad(
                "cohort.sampling",
                cohort.sampling if cohort.sampling != "poisson" else f"poisson, q={cohort.q}",
                f"expected Poisson sampling with q = dp.cohort_size / population = {q:.6g} (what the "
                "DP accounting assumes), or cohort.sampling='all' to let the dp section decide",
            )
        if dp.sampling == "fixed" and not (cohort.sampling == "uniform" and cohort.size == dp.cohort_size):
            raise bad(
                "cohort.sampling",
                cohort.sampling,
                f"expected 'uniform' with size {dp.cohort_size} (dp.sampling='fixed', dp.cohort_size), "
                "or 'all' to let the dp section decide",
            )
    _check_audit(config, dp)
    ddp = distributed_dp_config(config, population, dim=1) if config.distributed_dp is not None else None
    if ddp is not None and cohort.sampling == "uniform":
        raise bad(
            "cohort.sampling",
            "uniform",
            "expected 'all' or 'poisson' with distributed_dp (its accounting assumes Poisson sampling)",
        )
    if config.dp_ftrl is not None:
        if cohort.sampling == "poisson":
            raise bad(
                "cohort.sampling",
                "poisson",
                "expected 'all' or 'uniform' with dp_ftrl (no sampling: a cyclic schedule)",
            )
        mf = dp_ftrl_config(config, population)
        if mf.population_size != population:
            raise bad(
                "dp_ftrl.population_size",
                mf.population_size,
                f"expected None or the data's population, {population} clients",
            )
    if dp is not None and config.dp.budget_epsilon is not None:
        first = privacy.epsilon(dp, 1)
        if first > config.dp.budget_epsilon:
            raise bad(
                "dp.budget_epsilon",
                config.dp.budget_epsilon,
                f"one round already spends epsilon {first:.4g} (delta {dp.target_delta:.3g}); "
                f"expected a budget >= {first:.4g}, or more noise (dp.noise_multiplier)",
            )
