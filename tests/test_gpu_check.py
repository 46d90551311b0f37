"""``experiments/gpu_check.sh --dry-run``: the GPU check's sequence on CPU at tiny sizes.

It is also the smoke test of the benchmarks it runs: ``bench_round.py --quick`` (plain and DP over the
secure sum at cohort 2), ``bench_data.py --quick`` (a sampled cohort of 16, then the quick population
as one jitted round) and ``bench_lstm.py --quick`` (the fused char-LSTM round at cohort 2,
its gradient checked against the flax model's).

PyTorch is in the ``bench`` extra, not the ``test`` extra: without it the benchmark prints a
``skipped`` line for the PyTorch loop; every other line is checked, then the test is skipped.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 70 CPU seconds: compiling every LeNet round variant and the buckets
def test_gpu_check_dry_run_prints_every_stage():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a GPU machine's host
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    start, done = lines[0], lines[-1]
    assert start["bench"] == done["bench"] == "gpu_check"
    assert start["stage"] == "start" and start["dry_run"] is True and start["backend"] == "cpu"
    assert done["stage"] == "done" and done["budget_sec"] == 60 and done["elapsed_sec"] >= 0
    seed = [line for line in lines if line["bench"] == "seed_cifar"]
    fljax = [line for line in seed if line.get("system") == "fljax"]
    variants = ["plain", "dp_secagg"]  # and central DP over the secure sum
    assert [(line["cohort"], line["variant"]) for line in fljax] == [(2, v) for v in variants]
    for line in fljax:
        assert "skipped" not in line, line
        assert line["sec_per_round"] > 0 and line["examples_per_sec"] > 0
    assert {line["system"] for line in seed} >= {"matmul_peak", "central", "hw_bound"}
    (bound,) = [line for line in seed if line.get("system") == "hw_bound"]
    assert bound["cohort"] == 2 and bound["sec_per_round"] > 0
    (torch_line,) = [line for line in seed if line.get("system") == "pytorch_loop"]
    many = [line for line in lines if line["bench"] == "many_small"]
    assert [line["cohort"] for line in many] == [16, 300]
    assert many[-1]["mode"] == "one_jit"
    for line in many:
        assert line["client_updates_per_sec"] > 0
        for field in ("padding_fraction", "naive_padding_fraction", "client_updates_per_sec", "peak_rss_mb"):
            assert isinstance(line[field], float)
        assert 0.0 <= line["padding_fraction"] < line["naive_padding_fraction"] < 1.0
    lstm = [line for line in lines if line["bench"] == "shakespeare_lstm"]
    (check,) = [line for line in lstm if line["system"] == "check"]  # fused LSTM's gradient vs flax's
    assert check["formulation"] == "fused" and check["grad_max_abs_diff"] <= 1e-4 * check["grad_max_abs"]
    (lstm_fljax,) = [line for line in lstm if line["system"] == "fljax"]
    assert (lstm_fljax["cohort"], lstm_fljax["formulation"], lstm_fljax["layout"]) == (2, "fused", "bucketed")
    assert lstm_fljax["sec_per_round"] > 0 and lstm_fljax["examples_per_sec"] > 0
    assert 0 < lstm_fljax["local_steps"] <= lstm_fljax["computed_steps"]
    (lstm_torch,) = [line for line in lstm if line["system"] == "pytorch_loop"]
    if importlib.util.find_spec("torch") is None:
        assert torch_line["skipped"] == lstm_torch["skipped"] == "torch not installed"
        pytest.skip("torch is not installed (the 'bench' extra, not the 'test' extra): PyTorch loop skipped")
    assert torch_line["sec_per_round"] > 0 and "speedup_vs_pytorch" in fljax[0]
    assert lstm_torch["torch_device"] == "cpu" and lstm_torch["local_steps"] == lstm_fljax["local_steps"]
    assert lstm_torch["sec_per_round"] > 0 and "speedup_vs_pytorch" in lstm_fljax
