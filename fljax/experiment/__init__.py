"""Experiments: typed configs, the one trainer, its outputs and its command line.

A notebook or script runs an experiment exactly as ``experiments/run.py`` does::

    from fljax import experiment

    config = experiment.Config(name="hearts", model=experiment.Model(hidden=(32,)), rounds=30)
    summary = experiment.run(config, "runs/hearts")

See :mod:`fljax.experiment.config` for the config types and :mod:`fljax.experiment.trainer` for
what a run writes and how it survives crashes.
"""

from fljax.experiment import config, data, outputs, trainer
from fljax.experiment.cli import load_config, main
from fljax.experiment.config import (
    DP,
    FEMNIST,
    Audit,
    Client,
    Cohort,
    Config,
    ConfigError,
    Custom,
    Disk,
    DistributedDP,
    FineTune,
    HeartDisease,
    Images,
    Model,
    SecAgg,
    Server,
    Shakespeare,
    Tabular,
    apply_overrides,
    override,
)
from fljax.experiment.data import Prepared
from fljax.experiment.trainer import RunFolderError, Trained, run, train

__all__ = [
    "DP",
    "FEMNIST",
    "Audit",
    "Client",
    "Cohort",
    "Config",
    "ConfigError",
    "Custom",
    "Disk",
    "DistributedDP",
    "FineTune",
    "HeartDisease",
    "Images",
    "Model",
    "Prepared",
    "RunFolderError",
    "SecAgg",
    "Server",
    "Shakespeare",
    "Tabular",
    "Trained",
    "apply_overrides",
    "config",
    "data",
    "load_config",
    "main",
    "outputs",
    "override",
    "run",
    "train",
    "trainer",
]
