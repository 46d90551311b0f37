"""The DP MNIST study (experiments/configs/dp_mnist.py) runs through the one trainer and
experiments/summarize.py gathers its sweep (tiny data; skipped without the MNIST copy)."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

from fljax import experiment
from fljax.data.datasets import paths
from fljax.experiment import config as cfg

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
TINY = [
    "data.num_clients=50",
    "data.examples_per_client=20",
    "dp.cohort_size=5",
    "cohort.q=0.1",
    "rounds=2",
    "eval_every=2",
    "checkpoint_every=0",
]
SWEEP = {  # run name -> its own overrides (applied after TINY, as --set on the command line)
    "dp_mnist_z1": ["dp.noise_multiplier=1.0"],
    "dp_mnist_z2": ["dp.noise_multiplier=2.0"],
    "dp_mnist_nonprivate": ["dp=None"],
}


def _summarize_module():
    spec = importlib.util.spec_from_file_location("summarize", REPO / "experiments" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mnist_or_skip():
    """Skip unless MNIST is where the loader looks for it (``paths.find``, as images.mnist)."""
    for required in (["mnist.npz"], ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]):
        try:
            return paths.find("mnist", required)
        except FileNotFoundError:
            continue
    where = ", ".join(str(f.resolve()) for f in paths.candidates("mnist"))
    pytest.skip(f"MNIST not available: no mnist.npz in {where} (set {paths.ENV_VAR}=ROOT holding mnist/)")


def test_config_builds_the_documented_dp_config():
    config = experiment.load_config("dp_mnist", configs_dir=CONFIGS)
    dp = cfg.dp_config(config, config.data.num_clients)
    assert dp.population_size == 1000 and dp.cohort_size == 100 and dp.sampling == "poisson"
    assert dp.target_delta == pytest.approx(1e-5) and dp.unit_of_privacy == "client"  # min(1e-5, N**-1.1)
    nonprivate = experiment.load_config("dp_mnist", ["dp=None"], configs_dir=CONFIGS)
    assert nonprivate.dp is None and nonprivate.cohort == config.cohort  # same sampling


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The tiny sweep, run in process as the docstring's commands run it, then summarized."""
    _mnist_or_skip()
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        for name, own in SWEEP.items():
            sets = [a for s in [*TINY, *own, f"name={name}"] for a in ("--set", s)]
            argv = ["--config", "dp_mnist", *sets, "--out", str(root / name), "--no-progress"]
            mp.setattr(sys, "argv", ["experiments/run.py", *argv])  # what run_info.json records
            experiment.main(argv, configs_dir=CONFIGS)
    prefix = tmp_path_factory.mktemp("results") / "dp_mnist"
    payload = _summarize_module().main([*(str(root / n) for n in SWEEP), "--out", str(prefix)])
    return root, prefix, payload


def test_summary_files_are_written(sweep):
    root, prefix, _ = sweep
    for ext in ("json", "md", "png"):
        assert prefix.with_suffix(f".{ext}").stat().st_size > 0
    strict = json.loads(prefix.with_suffix(".json").read_text(), parse_constant=pytest.fail)
    md = prefix.with_suffix(".md").read_text()
    assert "epsilon (RDP)" in md and "epsilon (PLD)" in md
    # the commands are the documented ones (runs/<name>), not the folders the test wrote into
    assert str(root) not in md and str(root) not in json.dumps(strict["commands"])
    assert "python experiments/run.py --config dp_mnist" in md and "runs/dp_mnist_z1" in md
    assert all("--out" not in c and "--no-progress" not in c for c in strict["commands"][:-1])


def test_rows_are_labelled_sorted_and_accounted(sweep):
    _, prefix, payload = sweep
    rows = payload["runs"]
    assert [r["name"] for r in rows] == ["dp_mnist_nonprivate", "dp_mnist_z1", "dp_mnist_z2"]
    assert [r["label"] for r in rows] == ["dp=None", "dp.noise_multiplier=1.0", "dp.noise_multiplier=2.0"]
    # the non-private run has no epsilon: infinite here, null plus a flag in the strict JSON
    stored = json.loads(prefix.with_suffix(".json").read_text())["runs"][0]
    assert math.isinf(rows[0]["epsilon"]) and stored["epsilon"] is None
    assert stored["epsilon_nonfinite"] == "inf" and stored["epsilon_pld_nonfinite"] == "inf"
    z1, z2 = rows[1], rows[2]
    assert math.inf > z1["epsilon"] > z2["epsilon"] > 0  # more noise, less privacy spent
    for r in (z1, z2):
        assert 0 < r["epsilon_pld"] <= r["epsilon"]  # PLD is tighter than RDP
        assert r["epsilon"] == r["privacy"]["epsilon"] and r["delta"] == pytest.approx(1e-5)
        assert r["rounds"] == 2 and 0 <= r["final_test_accuracy"] <= 1
    assert all(r["wall_sec"] > 0 and r["curve"][-1]["round"] == 2 for r in rows)


def test_unfinished_run_is_an_error_naming_it(sweep, tmp_path, capsys):
    root, _, _ = sweep
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (unfinished / name).write_bytes((root / "dp_mnist_z1" / name).read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        _summarize_module().main([str(root / "dp_mnist_z1"), str(unfinished), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(unfinished) in err and "summary.json" in err
    assert not (tmp_path / "x.md").exists()
