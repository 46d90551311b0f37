"""The runner end to end: the main job's outputs, overrides, and resume == uninterrupted."""

import json
import pathlib

import numpy as np
import pytest

from fljax import checkpoint
from tests import helpers
from tests.experiment import runner

REPO = pathlib.Path(__file__).resolve().parents[2]
HEART = str(REPO / "experiments" / "configs" / "heart_disease.py")


def _runner():
    return runner


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("round_sec")
    return rows


def test_main_job_writes_everything_and_prints_the_table(tmp_path, capsys):
    run = _runner()
    summary = run.main(
        [
            "--config",
            HEART,
            "--set",
            "rounds=3",
            "--set",
            "eval_every=3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    for name in ("config.json", "run_info.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (tmp_path / name).exists(), name
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert {"git_sha", "jax", "jaxlib"} <= set(info)
    table = summary["per_client_test_accuracy"]
    assert table["client"] == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    for col in ("local", "federated", "pooled"):
        assert len(table[col]) == 4 and all(0.0 <= a <= 1.0 for a in table[col])
    printed = capsys.readouterr().out
    assert "Switzerland" in printed and "pooled data" in printed
    assert len(_metrics(tmp_path)) == 3
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 3


def test_resumed_run_matches_uninterrupted(tmp_path):
    run = _runner()
    common = [
        "--config",
        HEART,
        "--set",
        "baselines=()",
        "--set",
        "eval_every=2",
        "--set",
        "checkpoint_every=2",
        "--no-progress",
        "--set",
        "cohort={'sampling': 'uniform', 'size': 2}",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run.main(common + ["--set", "rounds=4", "--out", str(straight)])
    run.main(common + ["--set", "rounds=2", "--out", str(resumed)])
    run.main(common + ["--set", "rounds=4", "--out", str(resumed), "--resume"])
    assert _metrics(straight) == _metrics(resumed)
    template = _final_state_template(run)
    a, _ = checkpoint.restore(straight / "checkpoints", 4, template)
    b, _ = checkpoint.restore(resumed / "checkpoints", 4, template)
    helpers.assert_trees_equal(a, b)


def _final_state_template(run):
    import jax

    from fljax import models

    config = run.load_config(HEART, [])
    model = run.build_model(config.model, 2)
    params = models.init_params(model, (29,), jax.random.key(0))
    return run.build_algorithm(config, model).init(params)


def test_set_overrides_are_checked():
    run = _runner()
    cfg = run.load_config(HEART, ["client.learning_rate=0.5", "rounds=7"])
    assert cfg.client.learning_rate == 0.5 and cfg.rounds == 7
    with pytest.raises(run.ConfigError, match="unknown key"):
        run.load_config(HEART, ["client.learning_rat=0.5"])
    with pytest.raises(run.ConfigError, match="expected a positive number"):
        run.load_config(HEART, ["client.learning_rate=fast"])


def test_heart_disease_data_shipped_in_package():
    from fljax.data.datasets import heart_disease

    d = heart_disease.load()
    np.testing.assert_array_equal(d.train.sizes + d.test.sizes, [303, 294, 123, 200])
    assert d.train.num_classes == 2
    assert np.all(np.isfinite(d.train.x))
    # the split is stratified and disjoint, and fixed by the seed
    e = heart_disease.load()
    np.testing.assert_array_equal(d.test.x, e.test.x)


def test_dp_run_logs_epsilon_and_stops_at_its_budget(tmp_path, capsys):
    from fljax import privacy

    run = _runner()
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling": "poisson", "cohort_size": 2}
    cfg = privacy.DPConfig(population_size=4, **dp)
    budget = (privacy.epsilon(cfg, 3) + privacy.epsilon(cfg, 4)) / 2  # room for 3 rounds, not 4
    args = [
        "--config",
        HEART,
        "--set",
        "baselines=()",
        "--set",
        "rounds=6",
        "--set",
        "eval_every=1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    summary = run.main(args + ["--set", f"dp={dict(dp, budget_epsilon=budget)!r}"])
    rows = _metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["epsilon"] <= budget for r in rows)
    assert rows[0]["epsilon"] < rows[-1]["epsilon"]
    assert summary["privacy"]["stopped"] and "budget" in summary["privacy"]["stopped"]
    assert summary["privacy"]["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    # the state where the budget stopped it is checkpointed; resuming spends nothing more
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 3
    again = run.main(args + ["--set", f"dp={dict(dp, budget_epsilon=budget)!r}", "--resume"])
    assert _metrics(tmp_path) == rows
    assert again["privacy"]["epsilon"] == summary["privacy"]["epsilon"]
    # resuming with other DP settings would mis-account the rounds already run: refused
    cheaper = dict(dp, noise_multiplier=2.0, budget_epsilon=budget)
    with pytest.raises(SystemExit) as exit_:
        run.main(args + ["--set", f"dp={cheaper!r}", "--resume"])
    assert exit_.value.code == 2
    assert "dp.noise_multiplier: 1.0 -> 2.0" in capsys.readouterr().err
    assert _metrics(tmp_path) == rows


def test_secure_aggregation_run_tracks_the_plain_run(tmp_path):
    run = _runner()
    common = [
        "--config",
        HEART,
        "--set",
        "baselines=()",
        "--set",
        "rounds=4",
        "--set",
        "repeats=1",
        "--no-progress",
    ]
    plain = run.main(common + ["--out", str(tmp_path / "plain")])
    secure = run.main(
        common
        + [
            "--out",
            str(tmp_path / "secure"),
            "--set",
            "secagg={'clip_range': 1.0, 'frac_bits': 16, 'max_weight': 300.0}",
        ]
    )
    rows = _metrics(tmp_path / "secure")
    assert all(r["aborted"] == 0 and r["num_clients"] == 4 for r in rows)
    # fixed-point rounding only: the secure run's loss follows the plain one closely
    assert (
        abs(
            secure["final"]["client_train_loss_weighted_mean"]
            - plain["final"]["client_train_loss_weighted_mean"]
        )
        < 1e-3
    )


def test_resume_accepts_a_run_saved_before_a_field_existed_only_at_its_default(tmp_path, capsys):
    """A config.json written before a field was added (the field absent) resumes when the field is
    at its default, the behaviour that run had; any other value is refused."""
    run = _runner()
    out = tmp_path / "older"
    common = ["--config", HEART, "--set", "baselines=()", "--set", "repeats=1", "--no-progress"]
    run.main(common + ["--set", "rounds=1", "--out", str(out)])
    stored = json.loads((out / "config.json").read_text())
    del stored["audit"], stored["data"]["standardize_noise_multiplier"]
    (out / "config.json").write_text(json.dumps(stored))
    run.main(common + ["--set", "rounds=2", "--out", str(out), "--resume"])
    assert len(_metrics(out)) == 2
    (out / "config.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit):
        run.main(
            common
            + [
                "--set",
                "rounds=3",
                "--set",
                "data.standardize_noise_multiplier=0.0",
                "--out",
                str(out),
                "--resume",
            ]
        )
    assert "data.standardize_noise_multiplier: None -> 0.0" in capsys.readouterr().err
