"""Every config of experiments/configs runs: a 2-round smoke run each, through the command line.

The smoke overrides shrink the data and the model only where a full-size round would take
minutes; a config whose data set is not on this machine (``../shared/data`` or
``$FLJAX_DATA_DIR``) is skipped, naming the folder it needs.
"""

import json
import pathlib

import pytest

from fljax.data.datasets import paths
from tests.experiment import runner

CONFIGS = runner.CONFIGS
# devices=1: one compiled program per config; spreading rounds over devices (the default) is
# tested bit for bit in tests/experiment/test_devices.py.
COMMON = ["rounds=2", "eval_every=2", "repeats=1", "checkpoint_every=2", "devices=1"]
# config name -> (offline data folder it needs or None, smoke overrides). Baselines are run
# where a config's own (hospitals_severity: pooled); the main job's local, pooled and
# personalized baselines are tested in tests/experiment/test_run.py.
SMOKE = {
    "heart_disease": (None, ["baselines=()"]),
    "heart_disease_private": (None, []),
    "hospitals_severity": (None, ["baselines=('pooled',)"]),
    "femnist_adaptive_clip": (
        "femnist_leaf_small",
        # 10 writers: expected cohort 2, whose default sigma_b = 2/20 is below z / 2
        ["data.max_clients=10", "data.max_test_examples=500", "dp.clipped_count_stddev=1.0"],
    ),
    "cifar10_founding": (
        "cifar10_jpeg",
        ["data.max_train_examples=300", "data.max_test_examples=200", "client.num_epochs=1"],
    ),
    "dp_mnist": (
        "mnist",
        ["data.num_clients=50", "data.examples_per_client=20", "dp.cohort_size=5", "cohort.q=0.1"],
    ),
    "mcmahan2017_mnist": ("mnist", ["data.max_train_examples=2000", "data.max_test_examples=500"]),
    "adult": ("adult_uci", ["client.max_steps=20", "baselines=()"]),
    "credit_default": ("credit_default_uci", ["client.max_steps=20", "baselines=()"]),
    "banks_credit": ("credit_default_uci", ["client.max_steps=20", "baselines=()"]),
    "femnist": ("femnist_leaf_small", ["data.max_clients=10", "data.max_test_examples=500", "cohort.size=3"]),
    "femnist_private": ("femnist_leaf_small", ["data.max_clients=10", "data.max_test_examples=500"]),
    "reddi2021_femnist": (
        "femnist_leaf_small",
        ["data.max_clients=10", "data.max_test_examples=500", "cohort.size=3", "server.algorithm=fedadagrad"],
    ),
    "reddi2021_shakespeare": (
        "shakespeare_tff",
        [
            "data.max_clients=6",
            "data.max_test_examples=100",
            "model.lstm_sizes=(16,)",
            "cohort.size=3",
            "client.max_steps=2",
            "server.algorithm=fedadagrad",
        ],
    ),
    "shakespeare": (
        "shakespeare_tff",
        [
            "data.max_clients=6",
            "data.max_test_examples=100",
            "model.lstm_sizes=(16,)",
            "cohort.size=3",
            "client.max_steps=2",
        ],
    ),
}


def test_every_config_has_a_smoke_run():
    assert sorted(runner.experiment.cli.names(CONFIGS)) == sorted(SMOKE)


def _available(folder: str | None) -> bool:
    if folder is None:
        return True
    return any(p.is_dir() for p in paths.candidates(folder))


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_config_runs_two_rounds(name, tmp_path, capsys):
    folder, sets = SMOKE[name]
    if not _available(folder):
        pytest.skip(f"{name} needs the offline data folder {folder!r} (../shared/data or $FLJAX_DATA_DIR)")
    argv = ["--config", name, "--out", str(tmp_path), "--no-progress"]
    for item in [*COMMON, *sets]:
        argv += ["--set", item]
    summary = runner.main(argv)
    assert summary["rounds"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    for file in ("summary.json", "config.json", "run_info.json"):
        json.loads((tmp_path / file).read_text(), parse_constant=_reject)  # strict JSON
    final = summary["final"]
    accuracy = final.get("test_accuracy", final.get("fed_mean_accuracy"))
    assert accuracy is not None and 0.0 <= accuracy <= 1.0
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["name"] == runner.load_config(name).name and stored["rounds"] == 2
    if "private" in name or name.startswith("dp_"):
        assert 0 < summary["privacy"]["epsilon"] < float("inf")


def _reject(token):
    raise ValueError(f"non-standard JSON token {token}")


def test_help_lists_the_configs(capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in SMOKE:
        assert name in text
    first_line = (CONFIGS / "heart_disease.py").read_text().split("\n")[0].strip('"')
    assert first_line[:40] in text


def test_config_name_or_path(tmp_path):
    by_name = runner.load_config("heart_disease")
    by_path = runner.load_config(str(CONFIGS / "heart_disease.py"))
    assert by_name == by_path
    assert isinstance(by_name, runner.experiment.Config)
    assert pathlib.Path(CONFIGS / "heart_disease.py").is_file()
