"""The DP MNIST study's script runs end to end on tiny data (skipped without the data set)."""

import importlib.util
import json
import math
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "mnist" / "mnist.npz"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "dp_mnist", REPO / "experiments" / "configs" / "dp_mnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_is_consistent():
    cfg = _load_script().get_config()
    assert cfg["dp"]["cohort_size"] <= cfg["data"]["num_clients"]
    assert 0.0 in cfg["sweep"]["noise_multipliers"] and cfg["sweep"]["baseline"]


def test_partitions_are_disjoint_and_sized():
    import numpy as np

    script = _load_script()
    y = np.repeat(np.arange(10), 50)
    for kind in ("iid", "shards"):
        parts = script.partition(y, 20, 10, kind, 0)
        flat = np.concatenate(parts)
        assert len(parts) == 20 and all(len(p) == 10 for p in parts) and len(set(flat.tolist())) == 200
    shards = script.partition(y, 20, 10, "shards", 0)
    # two label-sorted shards: at most 2 labels each side of a shard boundary
    assert max(len(set(y[p].tolist())) for p in shards) <= 4
    assert np.mean([len(set(y[p].tolist())) for p in shards]) < 3


@pytest.mark.skipif(not DATA.exists(), reason="MNIST not found at ../shared/data/mnist")
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_quick_sweep_runs(tmp_path):
    script = _load_script()
    cfg = script.quick_config()
    cfg["data"].update(num_clients=40, examples_per_client=10)
    cfg["dp"].update(cohort_size=5)
    cfg["rounds"], cfg["eval_every"] = 2, 2
    cfg["model"]["hidden"] = (8,)
    cfg["sweep"] = {"noise_multipliers": (1.0,), "baseline": False}
    runs = script.run_sweep(cfg, tmp_path, "dp_mnist_test")
    payload = json.loads((tmp_path / "dp_mnist_test.json").read_text())
    assert (tmp_path / "dp_mnist_test.png").stat().st_size > 0
    assert "epsilon" in (tmp_path / "dp_mnist_test.md").read_text()
    assert 0 < runs[0]["epsilon"] < math.inf
    assert runs[0]["epsilon_per_round"][0] < runs[0]["epsilon_per_round"][1]
    assert payload["runs"][0]["privacy"]["unit_of_privacy"] == "client"
