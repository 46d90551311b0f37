"""The private main job: DP over secure aggregation through the runner, next to the plain federation."""

import json
import math

from tests.experiment.test_run import REPO, _runner

PRIVATE = str(REPO / "experiments" / "configs" / "heart_disease_private.py")


def test_dp_over_secure_aggregation_runs_and_reports_epsilon_delta_and_secagg(tmp_path, capsys):
    out = tmp_path / "private"
    summary = _runner().main(
        ["--config", PRIVATE, "--set", "rounds=2", "--set", "eval_every=2", "--set", "repeats=1",
         "--set", "checkpoint_every=0", "--set", "dp.release_unnoised_metrics=True",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    privacy = summary["privacy"]
    assert privacy["secure_aggregation"] is True
    assert math.isfinite(privacy["epsilon"]) and privacy["epsilon"] > 0
    assert privacy["delta"] == 1e-5
    table = summary["per_client_test_accuracy"]
    assert {"local", "nonprivate", "federated", "pooled"} <= set(table)
    printed = capsys.readouterr().out
    assert "fed., no DP" in printed and "federated" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Secure aggregation ran under DP: nothing range-clipped, no abort, noise on the sum. The
    # range-clipped count is exact (data-dependent): released only when asked, and labelled.
    assert all(
        r["unnoised_num_range_clipped"] == 0 and r["aborted"] == 0 and r["dp_noise_std"] > 0 for r in rows
    )
    assert not any("num_range_clipped" in r for r in rows)
    assert "unnoised_num_range_clipped" in privacy["unnoised_metrics_released"]
    assert json.loads((out / "summary.json").read_text())["privacy"]["secure_aggregation"] is True
