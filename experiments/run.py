"""The fljax trainer: one runner for every experiment config.

Usage:
  python experiments/run.py --config experiments/configs/heart_disease.py [--set a.b=value ...]
                            [--out DIR] [--resume | --overwrite]

A config file defines ``get_config() -> dict``. Each run writes into its output
folder: ``config.json``, ``run_info.json`` (git revision, python/jax/jaxlib
versions, device; a resumed run adds its own under ``resumed``), ``metrics.jsonl``
(one JSON object per round), the last 3 orbax checkpoints, ``summary.json``
(final metrics, privacy spent) and ``curves.png``.

Results are never lost:

- a run takes ``<out>/.lock`` (``flock``) before it writes anything, so a second
  run in the same folder stops at once (exit code 2); the kernel releases the
  lock when a run ends, even by ``kill -9``;
- a folder that holds results (``metrics.jsonl``, ``checkpoints``,
  ``summary.json``, ``repeats``) is neither overwritten nor deleted unless
  ``--overwrite`` is given: without it, or ``--resume``, the run stops (exit 2);
- ``--resume`` stops (exit 2, one line naming each differing key, old -> new)
  when the config differs from the stored ``config.json``, except for the keys
  in ``RESUMABLE``: ``rounds`` (up only, to extend a run), ``eval_every``,
  ``checkpoint_every``, ``baselines`` and ``repeats``. Anything under ``dp`` is
  never accepted: the privacy already spent was accounted with the stored config.

Crash safety: each round's metrics line is written (one write, then fsync)
before that round's checkpoint, and checkpoints are saved atomically. After a
``kill -9`` at any moment, ``--resume`` restores the newest readable checkpoint
whose rounds all have complete metrics lines, drops a torn last line and any
later rows and checkpoints, and recomputes them: metrics and state equal those
of an uninterrupted run bit for bit (round keys are re-derived from the seed).
A damaged latest checkpoint (orbax error, or state not matching the digest
saved with it) is reported in one ``fljax: warning:`` line on stderr and the
previous one is used. ``FLJAX_TEST_CRASH`` is a test hook (see ``CRASH_ENV``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax

from fljax import aggregators, checkpoint, client, evaluation, models, privacy, secagg
from fljax import random as fl_random
from fljax.algorithms import fedavg, fedavgm, fedopt, fedprox, fedsgd, scaffold
from fljax.base import Performance
from fljax.data import ClientStates, FederatedData, partition, sampling
from fljax.data.datasets import cifar10, heart_disease

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """A bad config file, ``--set`` override or value: ``main`` prints it as one line, exit code 2.

    Its message is ``key=value: what is allowed`` (``main`` prefixes ``fljax: config error:``).
    """


def _bad(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {expected}")


def load_config(path: str, overrides: list[str]) -> dict:
    """The config of ``path`` (``get_config()``) with ``--set key=value`` overrides, validated.

    An override must name a key the config has (or one the trainer reads, see ``SCHEMA``) and
    have the type of the value it replaces (an int where a float is expected is converted);
    ``validate_config`` then checks every value. Raises ``ConfigError`` on any bad input.
    """
    if not pathlib.Path(path).is_file():
        raise _bad("--config", path, "no such file; expected a Python file that defines get_config()")
    spec = importlib.util.spec_from_file_location("fljax_config", path)
    if spec is None or spec.loader is None:
        raise _bad("--config", path, "cannot be imported; expected a Python file that defines get_config()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise _bad("--config", path, "defines no get_config(); expected a function returning the config dict")
    config = copy.deepcopy(module.get_config())
    if not isinstance(config, dict):
        raise _bad("--config", path, f"get_config() returned a {type(config).__name__}; expected a dict")
    for item in overrides:
        if "=" not in item:
            raise _bad("--set", item, "expected key=value, e.g. --set client.learning_rate=0.1")
        dotted, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = raw
        node, keys = config, dotted.split(".")
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                where = ".".join(keys[: i + 1])
                if k in node and node[k] is None:
                    raise _bad(
                        dotted,
                        value,
                        f"{where} is None in this config; expected the whole dict, --set {where}={{...}}",
                    )
                raise _bad(
                    dotted, value, f"{where!r} is not a section of the config (sections: {_sections(node)})"
                )
            node = node[k]
        last, parent = keys[-1], ".".join(keys[:-1])
        known = _settable(parent, node)
        if last not in known:
            raise _bad(
                dotted,
                value,
                f"unknown key; known keys of {parent or 'the config'}: {', '.join(sorted(known))}",
            )
        if last in node:
            value = _like(dotted, node[last], value, _schema_check(keys))
        node[last] = value
    validate_config(config)
    return config


def _sections(node: dict) -> str:
    return ", ".join(sorted(k for k, v in node.items() if isinstance(v, dict))) or "none"


def _schema_check(keys: list[str]):
    """The check ``SCHEMA`` (or ``DATA_SCHEMA``) has for a dotted key, or None."""
    node = SCHEMA
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if node is SCHEMA["data"]:
        node = {k: c for d in DATA_SCHEMA.values() for k, c in d.items()} | node
    check = node.get(keys[-1]) if isinstance(node, dict) else None
    return check if callable(check) else None


def _like(key: str, old, new, check=None):
    """``new`` if it has the type of ``old`` (the value it replaces), else ``ConfigError`` (with
    what ``check``, the key's schema check, expects where it has one)."""
    if old is None or new is None:  # optional values: the schema decides
        return new
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, float):
        if _is_number(new):
            return float(new)
        ok = False
    elif isinstance(old, int):
        ok = _is_int(new)
    elif isinstance(old, (tuple, list)):
        ok = isinstance(new, (tuple, list))
    else:
        ok = isinstance(new, type(old))
    if not ok:
        expected = check(new) if check is not None else None
        raise _bad(key, new, expected or f"expected {_kind(old)}, like the config's {old!r}")
    return new


def _kind(value) -> str:
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, (tuple, list)):
        return "a tuple, e.g. (a, b) or ()"
    if isinstance(value, dict):
        return "a dict, e.g. {'key': value}"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------- config validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok, expected: str):
    """A check: a function of a value that returns None (fine) or what is expected."""
    return lambda v: None if ok(v) else expected


def _optional(check):
    return lambda v: None if v is None else (None if check(v) is None else f"{check(v)} or None")


def _integer(low: int, high: int | None = None):
    text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return _check(lambda v: _is_int(v) and v >= low and (high is None or v <= high), f"expected {text}")


def _choice(*names: str):
    return _check(
        lambda v: isinstance(v, str) and v in names, f"expected one of {', '.join(map(repr, names))}"
    )


_POSITIVE = _check(lambda v: _is_number(v) and 0 < v < math.inf, "expected a positive number")
_NONNEGATIVE = _check(lambda v: _is_number(v) and 0 <= v < math.inf, "expected a number >= 0")
_MOMENTUM = _check(lambda v: _is_number(v) and 0 <= v < 1, "expected a number in [0, 1)")
_FRACTION = _check(lambda v: _is_number(v) and 0 < v < 1, "expected a number in (0, 1)")
_STRING = _check(lambda v: isinstance(v, str) and v != "", "expected a non-empty string")
_SEED = _integer(0)

ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedsgd", "scaffold", "fedadam", "fedyogi", "fedadagrad")
AGGREGATORS = ("weighted_mean", "uniform_mean", "median", "trimmed_mean")
BASELINES = ("local", "nonprivate", "pooled")

# Every key the trainer reads, with its check; a nested dict is a section. ``data`` keys depend
# on the data set (``DATA_SCHEMA``); ``dp`` and ``secagg`` are checked by ``_check_dp_secagg``.
SCHEMA: dict = {
    "name": _STRING,
    "seed": _SEED,
    "data": {"name": _choice("heart_disease", "cifar10")},
    "model": {
        "name": _choice("lenet", "mlp", "logistic"),
        "hidden": _check(
            lambda v: isinstance(v, (tuple, list)) and all(_is_int(h) and h > 0 for h in v),
            "expected a tuple of positive integers, e.g. (32,)",
        ),
    },
    "client": {
        "optimizer": _choice("sgd", "adam"),
        "learning_rate": _POSITIVE,
        "momentum": _optional(_MOMENTUM),
        "batch_size": _integer(1),
        "num_epochs": _integer(1),
        "weighting": _choice("num_examples", "uniform"),
        "max_steps": _optional(_integer(1)),
    },
    "server": {
        "algorithm": _choice(*ALGORITHMS),
        "learning_rate": _POSITIVE,
        "momentum": _MOMENTUM,
        "mu": _NONNEGATIVE,
        "tau": _POSITIVE,
    },
    "cohort": {
        "sampling": _choice("all", "uniform", "poisson"),
        "size": _integer(1),
        "q": _check(lambda v: _is_number(v) and 0 < v <= 1, "expected a number in (0, 1]"),
        "max_size": _optional(_integer(1)),
    },
    "rounds": _integer(1),
    "eval_every": _integer(1),
    "checkpoint_every": _integer(0),
    "repeats": _integer(1),
    "baselines": _check(
        lambda v: isinstance(v, (tuple, list)) and all(b in BASELINES for b in v),
        f"expected a tuple of {', '.join(map(repr, BASELINES))}, e.g. ('local',) or ()",
    ),
    "aggregator": _optional(_choice(*AGGREGATORS)),
    "trim_fraction": _check(lambda v: _is_number(v) and 0 <= v < 0.5, "expected a number in [0, 0.5)"),
    "chunk_size": _check(
        lambda v: v is None or v == "auto" or (_is_int(v) and v >= 1),
        "expected 'auto', None or an integer >= 1",
    ),
    "dp": None,
    "secagg": None,
}
DATA_SCHEMA: dict = {
    "heart_disease": {"test_fraction": _FRACTION, "split_seed": _SEED, "seed": _SEED},
    "cifar10": {
        "seed": _SEED,
        "data_dir": _optional(_STRING),
        "source": _choice("auto", "jpeg", "tfds"),
        "max_train_examples": _optional(_integer(1)),
        "partition": _choice("iid", "classes_per_client", "dirichlet"),
        "num_clients": _integer(1),
        "classes_per_client": _integer(1, 10),
        "alpha": _POSITIVE,
    },
}
# Keys a section must have (a key of the section's ``name``/``algorithm``/... value, or always).
REQUIRED = {
    "": ("name", "seed", "data", "model", "client", "server", "rounds"),
    "data": ("name",),
    "model": ("name",),
    "data.cifar10": ("num_clients",),
    "data.classes_per_client": ("classes_per_client",),
    "data.dirichlet": ("alpha",),
    "server.fedprox": ("mu",),
    "server.fedsgd": ("learning_rate",),
    "cohort.uniform": ("size",),
    "cohort.poisson": ("q",),
}


def _settable(section: str, node: dict) -> set[str]:
    """The keys ``--set`` may give in ``section`` ("" for the top level): the config's own and
    those the trainer reads (e.g. ``data.data_dir``, ``dp.delta``)."""
    if section == "":
        extra = list(SCHEMA)
    elif section == "data":
        extra = [*SCHEMA["data"], *(k for d in DATA_SCHEMA.values() for k in d)]
    elif section in ("dp", "secagg"):
        extra = [
            f.name for f in dataclasses.fields(privacy.DPConfig if section == "dp" else secagg.SecAggConfig)
        ]
        extra += ["budget_epsilon"] if section == "dp" else []
    else:
        extra = list(SCHEMA.get(section) or ()) if isinstance(SCHEMA.get(section), dict) else []
    return set(node) | set(extra)


def population_size(config: dict) -> int | None:
    """The number of clients the data config gives, without loading the data (None: unknown)."""
    data = config.get("data", {})
    if data.get("name") == "heart_disease":
        return len(heart_disease.SITES)
    return data.get("num_clients")


def validate_config(config: dict) -> None:
    """Check every key and value of a run config before any data is loaded; ``ConfigError`` if bad.

    Checks: no unknown keys, the keys each choice needs are there, each value's type and range,
    names (data set, model, algorithm, aggregator, sampling, baselines), the cohort fits in the
    population, the ``dp`` and ``secagg`` fields (through ``DPConfig``/``SecAggConfig``), and that
    a DP budget pays for at least one round.
    """
    _check_section("", config, SCHEMA)
    for section in ("data", "model", "client", "server", "cohort"):
        node = config.get(section, {})
        if not isinstance(node, dict):
            raise _bad(section, node, "expected a dict, e.g. {'name': ...}")
        schema = dict(SCHEMA[section])
        if section == "data":
            schema |= DATA_SCHEMA.get(node.get("name"), {})
        _check_section(
            section, node, schema, f" for data.name={node.get('name')!r}" if section == "data" else ""
        )
    for key in ("data", "cohort"):
        for choice in ("name", "partition", "sampling"):
            for need in REQUIRED.get(f"{key}.{config.get(key, {}).get(choice)}", ()):
                _require(config[key], key, need, f"{key}.{choice}={config[key][choice]!r}")
    algorithm = config["server"].get("algorithm", "fedavg")
    for need in REQUIRED.get(f"server.{algorithm}", ()):
        _require(config["server"], "server", need, f"server.algorithm={algorithm!r}")
    if algorithm != "fedsgd":
        for need in ("learning_rate", "batch_size", "num_epochs"):
            _require(config["client"], "client", need, f"server.algorithm={algorithm!r}")
    if algorithm == "scaffold":
        c = config["client"]
        if c.get("optimizer", "sgd") != "sgd":
            raise _bad(
                "client.optimizer", c["optimizer"], "expected 'sgd' with scaffold (its local steps are SGD)"
            )
        if c.get("momentum"):
            raise _bad(
                "client.momentum", c["momentum"], "expected 0 or None with scaffold (its local steps are SGD)"
            )
    population = population_size(config)
    cohort = config.get("cohort", {})
    if population is not None and cohort.get("sampling", "all") == "uniform" and cohort["size"] > population:
        raise _bad("cohort.size", cohort["size"], f"expected at most the population, {population} clients")
    _check_dp_secagg(config, population)


def _check_section(prefix: str, node: dict, schema: dict, context: str = "") -> None:
    where = f"{prefix}." if prefix else ""
    for need in REQUIRED.get(prefix, ()):
        _require(node, prefix or "the config", need)
    for key, value in node.items():
        check = schema.get(key)
        if callable(check) and (expected := check(value)) is not None:
            raise _bad(f"{where}{key}", value, expected)
    for key, value in node.items():
        if key not in schema:
            raise _bad(
                f"{where}{key}", value, f"unknown key{context}; known keys: {', '.join(sorted(schema))}"
            )


def _require(node: dict, section: str, key: str, because: str | None = None) -> None:
    if key not in node:
        reason = f" (needed by {because})" if because else ""
        name = key if section == "the config" else f"{section}.{key}"
        raise ConfigError(f"{name}: missing{reason}; expected it in the config or --set {name}=...")


def _check_dp_secagg(config: dict, population: int | None) -> None:
    """``dp`` and ``secagg``: known fields of the right types, accepted by DPConfig/SecAggConfig,
    and a DP budget that pays for at least one round."""
    for section, cls, extra in (
        ("dp", privacy.DPConfig, ("budget_epsilon",)),
        ("secagg", secagg.SecAggConfig, ()),
    ):
        node = config.get(section)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise _bad(section, node, f"expected None or a dict of {cls.__name__} fields")
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)} | {k: "float | None" for k in extra}
        for key, value in node.items():
            if key not in fields:
                raise _bad(f"{section}.{key}", value, f"unknown key; known keys: {', '.join(sorted(fields))}")
            kind = fields[key]
            if value is None and "None" in kind:
                continue
            if "float" in kind and not _is_number(value):
                raise _bad(
                    f"{section}.{key}", value, "expected a number" + (" or None" if "None" in kind else "")
                )
            if "float" not in kind and "int" in kind and not _is_int(value):
                raise _bad(
                    f"{section}.{key}", value, "expected an integer" + (" or None" if "None" in kind else "")
                )
            if "float" not in kind and "int" not in kind and not isinstance(value, str):
                raise _bad(f"{section}.{key}", value, "expected a string")
    try:
        sa = config.get("secagg")
        if sa is not None:
            secagg.SecAggConfig(**sa)
    except ValueError as e:
        raise _reworded("secagg", sa, dataclasses.fields(secagg.SecAggConfig), e) from None
    dp = config.get("dp")
    if not dp:  # None or {}: no DP (as build_dp reads it)
        return
    if dp.get("budget_epsilon") is not None and _POSITIVE(dp["budget_epsilon"]):
        raise _bad("dp.budget_epsilon", dp["budget_epsilon"], "expected a positive number or None")
    for need in ("clip_norm", "noise_multiplier"):
        _require(dp, "dp", need)
    if population is None:
        return
    try:
        dp_config = build_dp(config, population)
    except ValueError as e:
        given = {
            "population_size": population,
            "cohort_size": config.get("cohort", {}).get("size", population),
        }
        raise _reworded("dp", given | dp, dataclasses.fields(privacy.DPConfig), e) from None
    budget = dp.get("budget_epsilon")
    if budget is not None:
        first = privacy.epsilon(dp_config, 1)
        if first > budget:
            raise _bad(
                "dp.budget_epsilon",
                budget,
                f"one round already spends epsilon {first:.4g} (delta {dp_config.target_delta:.3g}); "
                f"expected a budget >= {first:.4g}, or more noise (dp.noise_multiplier)",
            )


def _reworded(section: str, node: dict, fields, error: ValueError) -> ConfigError:
    """A DPConfig/SecAggConfig ``ValueError`` as a ConfigError naming the key (the first field
    its message names) and its value: ``dp.clip_norm=-1.0: expected positive``."""
    text = str(error)
    named = sorted((text.find(f.name), f.name) for f in fields if re.search(rf"\b{f.name}\b", text))
    if not named:
        return ConfigError(f"{section}={node!r}: {text}")
    key = named[0][1]
    default = next(f.default for f in fields if f.name == key)
    value = node.get(key, None if default is dataclasses.MISSING else default)
    match = re.fullmatch(rf"{key} must be (.*?)(, got .*)?", text)
    if match is None:
        return _bad(f"{section}.{key}", value, text)
    allowed = match.group(1)
    allowed = {
        "positive": "a positive number",
        "positive and finite": "a positive finite number",
        "finite and >= 0": "a finite number >= 0",
    }.get(allowed, f"a value {allowed}" if allowed.startswith(("in ", ">=")) else allowed)
    return _bad(f"{section}.{key}", value, f"expected {allowed}")


# ----------------------------------------------------------------------------- data


def build_data(cfg: dict, key: jax.Array) -> dict:
    """Returns train/test populations, an optional central test set and shapes."""
    name = cfg["name"]
    if name == "heart_disease":
        d = heart_disease.load(test_fraction=cfg.get("test_fraction", 0.25), seed=cfg.get("split_seed", 0))
        return {"train": d.train, "test": d.test, "central_test": None, "num_classes": 2}
    if name == "cifar10":
        try:
            raw = cifar10.load_raw(cfg.get("data_dir"), source=cfg.get("source", "auto"))
        except FileNotFoundError:
            raise _bad(
                "data.data_dir",
                cfg.get("data_dir"),
                f"no CIFAR-10 archive {cifar10.ARCHIVE} found (searched data.data_dir if set, else "
                "$FLJAX_DATA_DIR/cifar10_jpeg and ../shared/data/cifar10_jpeg, and tensorflow-datasets "
                "could not load it); expected --set data.data_dir=FOLDER or FLJAX_DATA_DIR=FOLDER",
            ) from None
        x_train, y_train = cifar10.normalize(raw["x_train"]), raw["y_train"]
        x_test, y_test = cifar10.normalize(raw["x_test"]), raw["y_test"]
        if cfg.get("max_train_examples"):
            keep = fl_random.host_rng(key, 1).permutation(len(y_train))[: cfg["max_train_examples"]]
            x_train, y_train = x_train[keep], y_train[keep]
        part = cfg.get("partition", "iid")
        n = cfg["num_clients"]
        if part == "iid":
            p = partition.iid(y_train, n, key)
        elif part == "classes_per_client":
            p = partition.classes_per_client(y_train, n, cfg["classes_per_client"], key)
        elif part == "dirichlet":
            p = partition.dirichlet(y_train, n, cfg["alpha"], key)
        else:
            raise _bad("data.partition", part, "expected one of 'iid', 'classes_per_client', 'dirichlet'")
        train = FederatedData.from_partition(x_train, y_train, p.indices, num_classes=10)
        return {
            "train": train,
            "test": None,
            "central_test": (x_test, y_test),
            "num_classes": 10,
            "partition_report": partition.report(p, y_train, 10),
        }
    raise _bad("data.name", name, "expected one of 'heart_disease', 'cifar10'")


# ----------------------------------------------------------------------------- model and algorithm


def build_model(cfg: dict, num_classes: int):
    name = cfg["name"]
    if name == "lenet":
        return models.LeNet(num_classes=num_classes)
    if name == "mlp":
        return models.MLP(hidden=tuple(cfg.get("hidden", (200, 200))), num_classes=num_classes)
    if name == "logistic":
        return models.LogisticRegression(num_classes=num_classes)
    raise _bad("model.name", name, "expected one of 'lenet', 'mlp', 'logistic'")


def build_optimizer(cfg: dict) -> optax.GradientTransformation:
    name, lr = cfg.get("optimizer", "sgd"), cfg["learning_rate"]
    if name == "sgd":
        return optax.sgd(lr, momentum=cfg.get("momentum") or None)
    if name == "adam":
        return optax.adam(lr)
    raise _bad("client.optimizer", name, "expected one of 'sgd', 'adam'")


def build_dp(config: dict, num_clients: int) -> privacy.DPConfig | None:
    """The run's DPConfig, or None. ``population_size`` and ``cohort_size`` default to the data's."""
    dp = config.get("dp")
    if not dp:
        return None
    kwargs = {k: v for k, v in dp.items() if k != "budget_epsilon"}
    kwargs.setdefault("population_size", num_clients)
    kwargs.setdefault("cohort_size", config.get("cohort", {}).get("size", num_clients))
    return privacy.DPConfig(**kwargs)


def build_aggregator(config: dict, dp_config: privacy.DPConfig | None = None):
    """The round's aggregator. With both ``dp`` and ``secagg``, DP runs over the secure sum (its
    weights are in [0, 1]: keep the secagg ``max_weight`` at 1, the default, for exact weights)."""
    secure = secagg.secure_sum(secagg.SecAggConfig(**config["secagg"])) if config.get("secagg") else None
    if dp_config is not None:
        return privacy.dp(dp_config, sum=secure)  # over the secure sum when secagg is configured
    if secure is not None:
        return aggregators.mean(secure)
    name = config.get("aggregator")
    if name is None:  # the algorithm's own: example-weighted mean (FedAvg family), uniform mean (SCAFFOLD)
        return None
    if name == "weighted_mean":
        return aggregators.weighted_mean()
    if name == "uniform_mean":
        return aggregators.uniform_mean()
    if name == "median":
        return aggregators.median()
    if name == "trimmed_mean":
        return aggregators.trimmed_mean(config.get("trim_fraction", 0.1))
    raise _bad("aggregator", name, f"expected None or one of {', '.join(map(repr, AGGREGATORS))}")


def _scaffold_client(config: dict, model):
    c = config["client"]
    if c.get("optimizer", "sgd") != "sgd" or c.get("momentum"):
        raise ValueError(
            "scaffold: its local steps are plain SGD; set client.optimizer='sgd' and client.momentum=0"
        )
    return scaffold.scaffold_client(
        model,
        c["learning_rate"],
        batch_size=c["batch_size"],
        num_epochs=c["num_epochs"],
        weighting=c.get("weighting", "num_examples"),
        max_steps=c.get("max_steps"),
    )


def build_client_states(config: dict, model, params, num_clients: int) -> ClientStates | None:
    """The population's client states (host memory) for a stateful algorithm, else None."""
    if config["server"].get("algorithm", "fedavg") != "scaffold":
        return None
    return ClientStates(_scaffold_client(config, model).init(params), num_clients)


def build_algorithm(
    config: dict, model, dp_config: privacy.DPConfig | None = None, num_clients: int | None = None
):
    c, s = config["client"], config["server"]
    agg = build_aggregator(config, dp_config)
    perf = Performance(chunk_size=config.get("chunk_size", "auto"))
    name = s.get("algorithm", "fedavg")
    lr = s.get("learning_rate", 1.0)
    if name == "fedsgd":
        update = fedsgd.gradient_client(model, weighting=c.get("weighting", "num_examples"))
        return fedsgd.fedsgd(update, learning_rate=s["learning_rate"], aggregator=agg).with_performance(perf)
    options = dict(
        batch_size=c["batch_size"],
        num_epochs=c["num_epochs"],
        weighting=c.get("weighting", "num_examples"),
        max_steps=c.get("max_steps"),
    )
    opt = build_optimizer(c)
    if name == "fedprox":
        update = fedprox.proximal_client(model, opt, mu=s["mu"], **options)
        algo = fedprox.fedprox(update, server_learning_rate=lr, aggregator=agg)
    elif name == "fedavg":
        algo = fedavg.fedavg(client.local_sgd(model, opt, **options), server_learning_rate=lr, aggregator=agg)
    elif name == "fedavgm":
        algo = fedavgm.fedavgm(
            client.local_sgd(model, opt, **options),
            server_learning_rate=lr,
            server_momentum=s.get("momentum", 0.9),
            aggregator=agg,
        )
    elif name == "scaffold":
        if num_clients is None:
            raise ValueError("scaffold needs the population size (num_clients)")
        algo = scaffold.scaffold(
            _scaffold_client(config, model),
            population_size=num_clients,
            server_learning_rate=lr,
            aggregator=agg,
        )
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        fn = {"fedadam": fedopt.fedadam, "fedyogi": fedopt.fedyogi, "fedadagrad": fedopt.fedadagrad}[name]
        algo = fn(
            client.local_sgd(model, opt, **options),
            server_learning_rate=lr,
            tau=s.get("tau", 1e-3),
            aggregator=agg,
        )
    else:
        raise _bad("server.algorithm", name, f"expected one of {', '.join(map(repr, ALGORITHMS))}")
    return algo.with_performance(perf)


def sample_cohort(cfg: dict, key: jax.Array, num_clients: int):
    mode = cfg.get("sampling", "all")
    if mode == "all":
        return np.arange(num_clients, dtype=np.int32), np.ones(num_clients, bool)
    if mode == "uniform":
        return sampling.uniform(key, num_clients, cfg["size"])
    if mode == "poisson":
        return sampling.poisson(key, num_clients, cfg["q"], cfg.get("max_size"))
    raise _bad("cohort.sampling", mode, "expected one of 'all', 'uniform', 'poisson'")


# ----------------------------------------------------------------------------- training


def train(
    config: dict,
    train_data: FederatedData,
    model,
    *,
    eval_fn=None,
    out_dir=None,
    resume=False,
    progress=True,
    desc="federated",
):
    """Runs ``config['rounds']`` rounds; returns (final ServerState, list of per-round records).

    With ``out_dir``, each round's record is appended to ``out_dir/metrics.jsonl`` (one write of
    a whole line, then fsync) BEFORE that round's checkpoint is saved, so every checkpoint has
    all its rounds' metrics on disk. ``resume=True`` continues from the newest readable
    checkpoint whose rounds all have complete metrics lines: a torn last line, rows after that
    round and newer checkpoints are dropped and recomputed, which gives the records and state
    of an uninterrupted run bit for bit (round keys are re-derived from the seed). Without
    ``resume``, an ``out_dir`` that already holds metrics or checkpoints raises
    ``FileExistsError``: nothing is ever deleted here.
    """
    run_key = fl_random.run_key(config["seed"])
    shape = train_data.x.shape[1:]
    params = models.init_params(model, shape, fl_random.stream(run_key, "init"))
    dp_config = build_dp(config, train_data.num_clients)
    ledger = None
    if dp_config is not None:
        ledger = privacy.PrivacyLedger(dp_config, budget_epsilon=config["dp"].get("budget_epsilon"))
    algo, update = _compiled_round(config, model, dp_config, train_data.num_clients)
    state = algo.init(params)
    states = build_client_states(config, model, params, train_data.num_clients)  # stateful clients, host
    bundle = lambda: state if states is None else (state, states.tree)  # what a checkpoint holds
    records, start = [], 0
    ckpt_dir = None if out_dir is None else pathlib.Path(out_dir) / "checkpoints"
    metrics_path = None if out_dir is None else pathlib.Path(out_dir) / "metrics.jsonl"
    if out_dir is not None:
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            start, restored, records = _resume(ckpt_dir, metrics_path, bundle(), ledger)
            if states is None:
                state = restored
            else:
                state, tree = restored
                states.load(tree)
        elif _results(pathlib.Path(out_dir), names=("metrics.jsonl", "checkpoints")):
            raise FileExistsError(
                f"{out_dir} holds metrics or checkpoints of an earlier run; pass resume=True"
            )
        else:
            _write_atomic(metrics_path, "")
    # Pad to a multiple of 4 batches so that populations of similar sizes (other
    # splits, other clients) share one compiled round; padding is a no-op.
    multiple = 4 * config["client"].get("batch_size", 1)
    num_examples = -(-int(train_data.sizes.max()) // multiple) * multiple
    rounds, every = config["rounds"], config.get("eval_every", 1)
    ck_every = config.get("checkpoint_every", 0)
    bar = _Progress(rounds, start, desc=desc, enabled=progress, every_line=out_dir is not None)
    writer = _tensorboard(out_dir, start)
    stopped, done, saved = None, start, start

    def save():
        extra = {"round": done, "epsilon": None if ledger is None else ledger.epsilon()}
        with _crash_hook("save", done):
            checkpoint.save(ckpt_dir, done, bundle(), extra)

    for r in range(start, rounds):
        t0 = time.perf_counter()
        if ledger is not None and not ledger.can_run(1):
            stopped = (
                f"stopped before round {r + 1}: it would spend epsilon {ledger.epsilon(r + 1):.3f} > "
                f"budget {ledger.budget_epsilon} (spent {ledger.epsilon():.3f} after {r} rounds)"
            )
            print(f"fljax: privacy budget reached, {stopped}", flush=True)
            break
        rkey = fl_random.round_key(run_key, r)
        sample_key = fl_random.stream(rkey, "sample")
        if dp_config is not None:  # sample exactly as the accounting assumes
            ids, mask = privacy.sample_cohort(dp_config, sample_key)
        else:
            ids, mask = sample_cohort(config.get("cohort", {}), sample_key, train_data.num_clients)
        cohort = train_data.cohort(
            ids, client_mask=mask, num_examples=num_examples, key=fl_random.stream(run_key, "data")
        )
        if states is not None:
            cohort = states.attach(cohort)
        state, m = update(state, cohort, rkey)
        if states is not None:
            state = states.scatter(cohort, state)
        record = {"round": r + 1, **{k: float(v) for k, v in jax.device_get(m).items()}}
        if ledger is not None:
            record["epsilon"] = ledger.step(1)
        record["round_sec"] = time.perf_counter() - t0
        if eval_fn is not None and ((r + 1) % every == 0 or r + 1 == rounds):
            record.update(eval_fn(state.params))
        records.append(record)
        done = r + 1
        if metrics_path is not None:
            _append_line(metrics_path, _dumps(record) + "\n", crash=_crash_point("metrics", done))
        _tensorboard_scalars(writer, record)
        if ckpt_dir is not None and ck_every and (done % ck_every == 0 or done == rounds):
            save()
            saved = done
        bar.update(record)
    bar.close()
    if writer is not None:
        writer.close()
    if ckpt_dir is not None and ck_every and saved != done:  # stopped by the privacy budget
        save()
    privacy_summary = {"epsilon": float("inf"), "note": "no differential privacy configured"}
    if ledger is not None:
        privacy_summary = ledger.summary() | {"stopped": stopped}
    train.last_privacy = privacy_summary
    return state, records


def _resume(ckpt_dir: pathlib.Path, metrics_path: pathlib.Path, state, ledger):
    """(start round, state, records) to continue a run from; tidies its folder to match.

    The start is the newest readable checkpoint whose rounds all have a complete metrics line;
    an unreadable newer checkpoint is reported in one line on stderr and skipped. Metrics lines
    and checkpoints after the start are removed (they are recomputed identically), so a kill
    at any point in here leaves a folder that resumes the same way.
    """
    rows, dropped = _read_metrics(metrics_path)
    found = checkpoint.restore_latest(
        ckpt_dir, state, max_step=len(rows), on_unreadable=lambda msg: _note(f"warning: {msg}")
    )
    start, extra = 0, {}
    if found is not None:
        start, state, extra = found
    if ledger is not None:
        spent = extra.get("epsilon")
        if spent is not None and not np.isclose(spent, ledger.epsilon(start), rtol=1e-9, atol=0):
            raise ValueError(
                f"checkpoint round {start} recorded epsilon {spent} but this DP config gives "
                f"{ledger.epsilon(start)} after {start} rounds: the DP config changed; start a new run"
            )
        if start:
            ledger.step(start)
    # Rows first: once they end at ``start``, a kill while deleting never makes later
    # checkpoints candidates again.
    _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows[:start]))
    later = checkpoint.delete_after(ckpt_dir, start)
    if start or rows or later or dropped:
        redo = sorted({*range(start + 1, len(rows) + 1), *later})
        _note(
            f"resuming after round {start}"
            + (f"; recomputing rounds {_ranges(redo)}" if redo else "")
            + (
                f"; dropped {dropped} torn or unreadable metrics line(s) after round {len(rows)}"
                if dropped
                else ""
            )
        )
    return start, state, rows[:start]


def _read_metrics(path: pathlib.Path) -> tuple[list[dict], int]:
    """The complete leading rows of ``metrics.jsonl`` (rounds 1, 2, ...) and how many lines follow
    them: a torn or unreadable line ends the rows."""
    if not path.exists():
        return [], 0
    pieces = path.read_bytes().split(b"\n")
    complete, last = pieces[:-1], pieces[-1]  # a last piece without "\n" is torn
    rows = []
    for line in complete:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("round") != len(rows) + 1:
            break
        rows.append(row)
    return rows, len(complete) - len(rows) + bool(last)


def _ranges(values: list[int]) -> str:
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def _note(message: str) -> None:
    print(f"fljax: {message}", file=sys.stderr, flush=True)


def _append_line(path: pathlib.Path, line: str, *, crash: bool = False) -> None:
    """Append ``line`` with one write, then fsync: a kill leaves at most one torn last line."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if crash:  # test hook: the process dies half-way through the line
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once (write a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Test hook, for tests/experiments/test_crash.py only: FLJAX_TEST_CRASH="metrics:3" makes the
# trainer kill itself with SIGKILL half-way through writing round 3's metrics line, and
# FLJAX_TEST_CRASH="save:4" inside round 4's checkpoint save (all data written to orbax's
# temporary folder, before it is committed). Unset, it does nothing.
CRASH_ENV = "FLJAX_TEST_CRASH"


def _crash_point(where: str, round_: int) -> bool:
    return os.environ.get(CRASH_ENV) == f"{where}:{round_}"


@contextlib.contextmanager
def _crash_hook(where: str, round_: int):
    if not _crash_point(where, round_):
        yield
        return
    from orbax.checkpoint.path import atomicity

    def finalize(self):
        os.kill(os.getpid(), signal.SIGKILL)

    original = atomicity.AtomicRenameTemporaryPath.finalize
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    try:
        yield
    finally:
        atomicity.AtomicRenameTemporaryPath.finalize = original
    raise RuntimeError(f"{CRASH_ENV}={where}:{round_} did not kill the process (orbax changed?)")


_ROUNDS: dict = {}


def _compiled_round(config: dict, model, dp_config=None, num_clients: int | None = None):
    """One jitted round per (algorithm settings, model), shared by repeats and baselines."""
    key = json.dumps(
        {k: config.get(k) for k in ("model", "client", "server", "aggregator", "chunk_size", "secagg")}
        | {"dp": repr(dp_config), "num_clients": num_clients},
        sort_keys=True,
        default=str,
    )
    if key not in _ROUNDS:
        algo = build_algorithm(config, model, dp_config, num_clients)
        _ROUNDS[key] = (algo, jax.jit(algo.update))
    return _ROUNDS[key]


def run_info() -> dict:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    import jaxlib

    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {
        "argv": list(sys.argv),  # the command line of this process
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "dependencies": _dependency_versions(),  # every requirement of fljax, as installed
        "device": str(devices[0]),
        "backend": jax.default_backend(),
        "devices": {"count": len(devices), "kinds": kinds},
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def run_once(config: dict, out: pathlib.Path, *, resume=False, progress=True, verbose=True) -> dict:
    """One federated run (and its baselines) for one seed; writes metrics and checkpoints to ``out``."""
    data_key = fl_random.stream(fl_random.run_key(config["data"].get("seed", config["seed"])), "data")
    data = build_data(config["data"], data_key)
    train_data, test_data, central = data["train"], data["test"], data["central_test"]
    model = build_model(config["model"], data["num_classes"])
    names = list(train_data.client_names or [f"client {i}" for i in range(train_data.num_clients)])
    if verbose:
        print(
            f"fljax: {config['name']}: {train_data.num_clients} clients, {len(train_data.y)} training "
            f"examples, {config['rounds']} rounds -> {out}",
            flush=True,
        )

    def eval_fn(params):
        res = {}
        if central is not None:
            ev = evaluation.evaluate(model, params, *central)
            res.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
        if test_data is not None:
            fe = evaluation.federated_evaluate(model, params, test_data)
            res.update({f"fed_{k}": v for k, v in fe.items() if not k.startswith("per_client_loss")})
        return res

    state, records = train(
        config, train_data, model, eval_fn=eval_fn, out_dir=out, resume=resume, progress=progress
    )
    summary = {
        "name": config["name"],
        "rounds": config["rounds"],
        "final": records[-1] if records else {},
        "privacy": train.last_privacy | {"secure_aggregation": bool(config.get("secagg"))},
    }
    if "partition_report" in data:
        summary["partition"] = data["partition_report"]
    baselines = config.get("baselines", ())
    table = None
    if baselines and test_data is not None:
        table = {
            "client": names,
            "test_sizes": test_data.sizes.tolist(),
            "federated": records[-1]["fed_per_client_accuracy"],
        }
        # Reference baselines are non-private: they show what a hospital gives up or gains.
        alone = config | {"cohort": {"sampling": "all"}, "dp": None, "secagg": None}
        if "local" in baselines:
            table["local"] = []
            for c in range(train_data.num_clients):
                _, recs = train(
                    alone,
                    train_data.subset([c]),
                    model,
                    eval_fn=lambda p, c=c: {
                        "acc": evaluation.federated_evaluate(model, p, test_data.subset([c]))["mean_accuracy"]
                    },
                    progress=progress,
                    desc=f"alone: {names[c]}",
                )
                table["local"].append(recs[-1]["acc"])
        per_client = lambda p: {
            "per": evaluation.federated_evaluate(model, p, test_data)["per_client_accuracy"]
        }
        others = {  # the same federation without DP or secure aggregation; everyone's data in one place
            "nonprivate": (lambda: train_data, "federated, not private"),
            "pooled": (
                lambda: FederatedData.from_clients([train_data.pooled()], num_classes=train_data.num_classes),
                "pooled data",
            ),
        }
        for col, (population, desc) in others.items():
            if col in baselines:
                _, recs = train(alone, population(), model, eval_fn=per_client, progress=progress, desc=desc)
                table[col] = recs[-1]["per"]
    _write_atomic(
        out / "summary.json",
        _dumps(summary | {"per_client_test_accuracy": table}, indent=1),
    )
    return {"summary": summary, "records": records, "table": table}


def main(argv=None) -> dict:
    """The command line (see the module docstring). A bad config, override or value (``ConfigError``)
    or bad arguments end the process with exit code 2 and one line on stderr, before any data is
    loaded or anything trained; other errors are bugs and keep their traceback."""
    try:
        return _main(argv)
    except ConfigError as e:
        message = " ".join(str(e).splitlines())
        print(f"fljax: config error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # One line for bad arguments too (argparse would print the usage first); --help has it.
    parser.error = lambda message: parser.exit(2, f"run.py: error: {message} (see --help)\n")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint (the config must match)",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete the results of an earlier run in --out first"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    out = pathlib.Path(args.out or REPO / "runs" / config["name"])
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, parser)
    try:
        previous = _check_out(out, config, args, parser)
        if args.overwrite:
            _clear(out)
        info = run_info()
        if args.resume and previous is not None:  # keep the first run's facts, add this one's
            info = previous | {"resumed": [*previous.get("resumed", []), info]}
        _write_atomic(out / "config.json", _dumps(config, indent=1))
        _write_atomic(out / "run_info.json", _dumps(info, indent=1))
        return _run_repeats(config, out, args)
    finally:
        os.close(lock)  # releases the lock


# What a run folder holds that must never be lost without --overwrite.
RESULTS = ("metrics.jsonl", "checkpoints", "summary.json", "repeats")
# Everything a run writes, deleted by --overwrite (never the folder itself, which may hold more).
OUTPUTS = (*RESULTS, "config.json", "run_info.json", "curves.png", "tensorboard")

# Config keys that --resume lets differ from the stored config.json, and why each is harmless.
# Any other difference is refused, always one under "dp": the privacy already spent was
# accounted with the stored config.
RESUMABLE = {
    "rounds": "may grow to extend a run: the rounds already run are the same (never shrink)",
    "eval_every": "changes what is measured, not what is trained",
    "checkpoint_every": "changes when the state is saved, not what is computed",
    "baselines": "baselines are trained from scratch after the federated run, never resumed",
    "repeats": "each repeat is a run of its own in <out>/repeats/<i>, resumed or started alone",
}


def _results(out: pathlib.Path, names=RESULTS) -> list[str]:
    """The names in ``names`` under ``out`` that hold something (an empty file or folder does not)."""
    found = []
    for name in names:
        p = out / name
        if (p.is_file() and p.stat().st_size) or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _lock(out: pathlib.Path, parser) -> int:
    """Take ``out/.lock`` (``flock``, released by the kernel when the process ends, even on kill -9)."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        parser.exit(2, f"run.py: error: another run (pid {holder}) is writing to {out}; use another --out\n")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_out(out: pathlib.Path, config: dict, args, parser) -> dict | None:
    """Refuse (exit 2) to destroy results or to resume with another config; returns the stored run_info."""
    found = _results(out)
    if found and not (args.resume or args.overwrite):
        parser.exit(
            2,
            f"run.py: error: {out} holds results of an earlier run ({', '.join(found)}); "
            "use --resume to continue it, --overwrite to replace it, or another --out\n",
        )
    if not args.resume:
        return None
    stored = out / "config.json"
    if not stored.exists():
        if found:
            parser.exit(2, f"run.py: error: cannot --resume: {out} has results but no config.json\n")
        return None
    old = json.loads(stored.read_text())
    new = json.loads(_dumps(config, default=str))  # as config.json stores it (tuples as lists, strict)
    refused = []
    for key, a, b in _config_diff(old, new):
        shrinks = key == "rounds" and not (isinstance(a, int) and isinstance(b, int) and b >= a)
        if key in RESUMABLE and not shrinks:
            continue
        refused.append(f"{key}: {a!r} -> {b!r}")
    if refused:
        parser.exit(
            2,
            f"run.py: error: --resume with a config that differs from {stored}: {'; '.join(refused)} "
            f"(only {', '.join(RESUMABLE)} may change, rounds only up; use another --out for a new run)\n",
        )
    info = out / "run_info.json"
    return json.loads(info.read_text()) if info.exists() else None


def _config_diff(old, new, prefix=""):
    """``(dotted key, old, new)`` for each difference between two configs; a missing key is None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
    elif old != new:
        yield prefix[:-1], old, new


def _clear(out: pathlib.Path) -> None:
    """--overwrite: delete what an earlier run wrote in ``out`` (and only that)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run_repeats(config: dict, out: pathlib.Path, args) -> dict:
    t_start = time.perf_counter()
    progress = not args.no_progress
    repeats = int(config.get("repeats", 1))
    tables, summary, runs = [], None, []  # runs: every repeat's per-round records
    for i in range(repeats):
        cfg = copy.deepcopy(config)
        cfg["seed"] = config["seed"] + i
        if "split_seed" in cfg["data"]:
            cfg["data"]["split_seed"] = config["data"]["split_seed"] + i
        run_out = out if i == 0 else out / "repeats" / str(i)
        run_out.mkdir(parents=True, exist_ok=True)
        if repeats > 1:
            print(f"repeat {i + 1}/{repeats} (seed {cfg['seed']})", flush=True)
        result = run_once(cfg, run_out, resume=args.resume, progress=progress, verbose=(i == 0))
        if summary is None:
            summary, records = result["summary"], result["records"]
        runs.append(result["records"])
        if result["table"] is not None:
            tables.append(result["table"])
    table = None
    if tables:
        table = {"client": tables[0]["client"], "test_sizes": tables[0]["test_sizes"]}
        for col in COLUMNS:
            if col in tables[0]:
                vals = np.array([t[col] for t in tables])
                table[col] = vals.mean(axis=0).tolist()
                table[f"{col}_std"] = vals.std(axis=0).tolist()
                table[f"{col}_weighted_all"] = [
                    float(np.dot(t["test_sizes"], t[col]) / np.sum(t["test_sizes"])) for t in tables
                ]
        table["repeats"] = repeats
        summary["per_client_test_accuracy"] = table
        print_table(table)
    summary["wall_sec"] = time.perf_counter() - t_start
    _write_atomic(out / "summary.json", _dumps(summary, indent=1))
    plot(runs, table, out / "curves.png", config["name"])
    final = records[-1]
    shown = {
        k: round(final[k], 4)
        for k in ("test_accuracy", "fed_mean_accuracy", "fed_weighted_accuracy")
        if k in final
    }
    print(f"done in {summary['wall_sec']:.1f}s: {shown}; metrics, summary and plot in {out}", flush=True)
    return summary


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


COLUMNS = ("local", "nonprivate", "federated", "pooled")
HEADS = {"local": "alone", "nonprivate": "fed., no DP", "federated": "federated", "pooled": "pooled data"}


def print_table(table: dict) -> None:
    cols = [c for c in COLUMNS if c in table]
    heads = HEADS
    n = table["repeats"]
    print(f"\nHeld-out accuracy per client, mean +- sd over {n} random splits and seeds:")
    print(f"  {'client':<16}{'test n':>7}" + "".join(f"{heads[c]:>16}" for c in cols))
    for i, name in enumerate(table["client"]):
        print(
            f"  {name:<16}{int(table['test_sizes'][i]):>7}"
            + "".join(f"{table[c][i]:>9.3f} +-{table[c + '_std'][i]:.3f}" for c in cols)
        )
    print(
        f"  {'all (weighted)':<16}{int(np.sum(table['test_sizes'])):>7}"
        + "".join(
            f"{np.mean(table[c + '_weighted_all']):>9.3f} +-{np.std(table[c + '_weighted_all']):.3f}"
            for c in cols
        )
        + "\n",
        flush=True,
    )


def plot(runs: list[list[dict]], table: dict | None, path: pathlib.Path, title: str) -> None:
    """``curves.png``: each curve is the mean over the repeats (``runs``: each repeat's per-round
    records) with a min-max band, on its own axis: client train loss, then test accuracy on a
    fixed 0-1 axis, then for a DP run epsilon against rounds; then the per-client bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    band = f"mean, band min-max over {n} repeats" if n > 1 else "1 run"
    has_eps = any("epsilon" in _restore(r) for records in runs for r in records)
    panels = ["loss", "accuracy", *(["epsilon"] if has_eps else []), *(["table"] if table else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    ax_of = dict(zip(panels, axes[0], strict=True))
    for name in ("loss", "accuracy", "epsilon"):
        if name in ax_of:
            ax_of[name].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

    def draw(ax, key, label, color, marker=None):
        rounds, mean, lo, hi, _ = _curve(runs, key)
        if not len(rounds):
            return False
        ax.plot(rounds, mean, color=color, marker=marker, label=label)
        if n > 1:
            ax.fill_between(rounds, lo, hi, color=color, alpha=0.2, linewidth=0)
        return True

    ax = ax_of["loss"]
    draw(ax, "client_train_loss", "client train loss", "tab:gray")
    ax.set(xlabel="round", ylabel="client train loss", title=f"{title}: training loss ({band})")
    ax = ax_of["accuracy"]
    drawn = [
        draw(ax, "test_accuracy", "central test accuracy", "tab:blue", "."),
        draw(ax, "fed_mean_accuracy", "mean client test accuracy", "tab:orange", "."),
    ]
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=f"test accuracy ({band})")
    if any(drawn):
        ax.legend(loc="lower right")
    if has_eps:
        ax = ax_of["epsilon"]
        draw(ax, "epsilon", "epsilon spent", "tab:red")
        ax.set_ylim(bottom=0)
        ax.set(
            xlabel="round",
            ylabel="epsilon (accounted, seeded noise: a simulation)",
            title="privacy spent",
        )
    if table:
        ax = ax_of["table"]
        cols = [c for c in COLUMNS if c in table]
        x = np.arange(len(table["client"]))
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar(x + j * width, table[c], width, yerr=table.get(f"{c}_std"), capsize=3, label=HEADS[c])
        ax.set_xticks(x + width * (len(cols) - 1) / 2, table["client"], rotation=15)
        ax.set_ylabel(f"held-out accuracy (mean +- sd, {table.get('repeats', 1)} splits)")
        ax.set_ylim(0, 1)
        ax.set_title("final accuracy per client")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- honest outputs
#
# Strict JSON: every file the trainer writes is valid JSON (RFC 8259), written with
# ``allow_nan=False``. A non-finite float is stored as ``null`` with a sibling key
# ``"<key>_nonfinite"`` saying what it was: ``"inf"``, ``"-inf"`` or ``"nan"`` for a number; for a
# list, a list of the same shape with that string where the value was non-finite and ``null``
# elsewhere. ``_restore`` reads such a record back into floats.

NONFINITE = "_nonfinite"


def _nonfinite_kind(x: float) -> str:
    return "nan" if x != x else ("inf" if x > 0 else "-inf")


def _strict(obj):
    """``obj`` as plain JSON values, non-finite floats replaced by ``None`` (see ``_strict_dict``)."""
    return _strict_value(obj)[0]


def _strict_value(obj):
    """(JSON value, flags): flags mirror the value where it had non-finite floats, else None."""
    if isinstance(obj, dict):
        return _strict_dict(obj), None
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj, None
    if isinstance(obj, float):
        return (obj, None) if np.isfinite(obj) else (None, _nonfinite_kind(obj))
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "tolist"):
        return _strict_value(obj.tolist())
    if isinstance(obj, list | tuple):
        pairs = [_strict_value(v) for v in obj]
        flags = [f for _, f in pairs]
        return [v for v, _ in pairs], (flags if any(f is not None for f in flags) else None)
    return _jsonable(obj), None


def _strict_dict(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        value, flags = _strict_value(v)
        out[str(k)] = value
        if flags is not None:
            out[f"{k}{NONFINITE}"] = flags
    return out


def _dumps(obj, **kwargs) -> str:
    """Strict JSON text of ``obj``: an invalid file (NaN, Infinity) can never be written."""
    return json.dumps(_strict(obj), allow_nan=False, **kwargs)


def _restore(record: dict) -> dict:
    """Undo ``_strict`` on one flat record: ``null`` plus ``<key>_nonfinite`` back to a float.

    A key ending in ``_nonfinite`` is a flag only beside a ``null`` (or list) value of its base
    key: a metric of that name (the aggregators' ``num_nonfinite`` count) is kept as it is.
    """
    out = dict(record)
    for k, v in record.items():
        base = k[: -len(NONFINITE)]
        if not (k.endswith(NONFINITE) and base in record):
            continue
        if isinstance(v, str) and record[base] is None:
            out[base] = float(v)
            del out[k]
        elif isinstance(v, list) and isinstance(record[base], list) and len(v) == len(record[base]):
            out[base] = [float(f) if isinstance(f, str) else x for x, f in zip(record[base], v, strict=True)]
            del out[k]
    return out


def _dependency_versions() -> dict:
    """Installed version of every dependency of the ``fljax`` distribution (extras included)."""
    import importlib.metadata as metadata
    import re

    try:
        requires = metadata.requires("fljax") or []
    except metadata.PackageNotFoundError:
        return {}
    versions = {}
    for req in requires:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None  # an optional extra that is not installed
    return versions


class _Progress:
    """Progress of one training: tqdm when stderr is a terminal, else plain lines on stderr.

    The plain line, e.g. ``federated: round 10/30: client_train_loss=0.512 fed_mean_accuracy=0.810
    (1.2 s/round)``, comes every ``max(1, rounds // 10)`` rounds and after the last round of a
    run that writes a folder; a training without a folder (a baseline) prints only its last line.
    """

    SHOWN = ("client_train_loss", "test_accuracy", "fed_mean_accuracy", "epsilon")

    def __init__(self, rounds: int, start: int, *, desc: str, enabled: bool, every_line: bool):
        self.rounds, self.start, self.desc, self.enabled = rounds, start, desc, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, rounds // 10) if every_line else 0
        self.t0, self.last = time.perf_counter(), None
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=rounds, initial=start, desc=desc, leave=False, dynamic_ncols=True)

    def _shown(self, record: dict) -> dict:
        return {k: record[k] for k in self.SHOWN if isinstance(record.get(k), float | int)}

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        self.last = record
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in self._shown(record).items()})
        elif self.every and record["round"] % self.every == 0 and record["round"] != self.rounds:
            self._line(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.last is not None:
            self._line(self.last)

    def _line(self, record: dict) -> None:
        done = record["round"] - self.start
        rate = (time.perf_counter() - self.t0) / max(done, 1)
        shown = " ".join(f"{k}={v:.3f}" for k, v in self._shown(record).items())
        print(
            f"{self.desc}: round {record['round']}/{self.rounds}: {shown} ({rate:.2g} s/round)",
            file=sys.stderr,
            flush=True,
        )


TENSORBOARD = "tensorboard"  # event files of a run folder, one scalar per metric and round


def _tensorboard(out_dir, start: int):
    """A tensorboardX writer for ``out_dir/tensorboard`` (no TensorFlow needed), or None.

    A resumed run gives ``purge_step=start + 1``: TensorBoard then hides the events of rounds
    after ``start`` written before the interruption (they are recomputed). A fresh run first
    removes event files left by an earlier run of the folder.
    """
    if out_dir is None:
        return None
    from tensorboardX import SummaryWriter

    logdir = pathlib.Path(out_dir) / TENSORBOARD
    if not start and logdir.is_dir():
        for p in logdir.glob("events.out.tfevents.*"):
            p.unlink()
    return SummaryWriter(str(logdir), purge_step=start + 1 if start else None)


def _tensorboard_scalars(writer, record: dict) -> None:
    """Every number of a round record as a scalar at step ``round``; a list ``k`` as ``k/<i>``."""
    if writer is None:
        return
    step = int(record["round"])
    for k, v in _restore(record).items():
        if k == "round" or isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            writer.add_scalar(k, float(v), step)
        elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
            for i, x in enumerate(v):
                writer.add_scalar(f"{k}/{i}", float(x), step)


def _curve(runs: list[list[dict]], key: str):
    """(rounds, mean, min, max, n) of ``key`` over the repeats that report it at each round."""
    by_round: dict[int, list[float]] = {}
    for records in runs:
        for r in map(_restore, records):
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                by_round.setdefault(int(r["round"]), []).append(float(v))
    rounds = sorted(by_round)
    vals = [np.array(by_round[t]) for t in rounds]
    return (
        np.array(rounds),
        np.array([v.mean() for v in vals]),
        np.array([v.min() for v in vals]),
        np.array([v.max() for v in vals]),
        max((len(v) for v in vals), default=0),
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
