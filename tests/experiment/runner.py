"""The trainer as the tests call it: ``experiments/run.py``'s command line, in process."""

import pathlib

from fljax import experiment
from fljax.experiment import ConfigError, outputs, trainer  # noqa: F401  (used through this module)

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
HEART = str(CONFIGS / "heart_disease.py")

build_model = trainer.build_model
build_algorithm = trainer.build_algorithm
build_client_states = trainer.build_client_states
plot = outputs.plot
curve = outputs.curve
dumps = outputs.dumps
restore = outputs.restore
strict = outputs.strict


def main(argv):
    """``python experiments/run.py ARGV`` in this process; returns the summary."""
    return experiment.main(argv, configs_dir=CONFIGS, runs_dir=REPO / "runs")


def load_config(path, sets=()):
    return experiment.load_config(path, list(sets), CONFIGS)
