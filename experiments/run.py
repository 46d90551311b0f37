"""The fljax trainer's command line: ``python experiments/run.py --config NAME [--set k=v ...]``.

``--help`` lists the configs of ``experiments/configs/``. Everything else (typed configs,
training, crash-safe outputs) lives in :mod:`fljax.experiment`; notebooks call
``fljax.experiment.run`` directly.
"""

import pathlib
import sys

from fljax.experiment import main

HERE = pathlib.Path(__file__).resolve().parent

if __name__ == "__main__":
    summary = main(configs_dir=HERE / "configs", runs_dir=HERE.parent / "runs")
    sys.exit(0 if summary else 1)
