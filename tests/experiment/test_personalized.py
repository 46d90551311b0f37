"""The main job's "federated + personalized" column: fine-tuning the federated model per client."""

import pytest

from fljax.experiment import config as cfg
from tests.experiment import runner

ARGS = [
    "--config",
    runner.HEART,
    "--set",
    "rounds=2",
    "--set",
    "eval_every=2",
    "--set",
    "checkpoint_every=0",
    "--set",
    "repeats=1",
    "--set",
    "baselines=('personalized',)",
    "--no-progress",
]


def test_zero_fine_tuning_epochs_reproduce_the_federated_column(tmp_path, capsys):
    """The column is produced, printed, and equals the federated one without fine-tuning (the
    main job's own test, tests/experiment/test_run.py, runs it with its 5 epochs)."""
    table = runner.main(ARGS + ["--set", "fine_tune.num_epochs=0", "--out", str(tmp_path / "zero")])[
        "per_client_test_accuracy"
    ]
    assert table["personalized"] == table["federated"]
    assert "fed.+personal." in capsys.readouterr().out
    assert len(table["personalized"]) == 4


def test_fine_tune_settings_are_checked():
    with pytest.raises(cfg.ConfigError, match="fine_tune.num_epochs"):
        runner.load_config(runner.HEART, ["fine_tune.num_epochs=-1"])
    with pytest.raises(cfg.ConfigError, match="fine_tune.learning_rate"):
        runner.load_config(runner.HEART, ["fine_tune.learning_rate=0"])
