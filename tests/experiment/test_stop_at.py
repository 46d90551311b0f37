"""``stop_at_accuracy``: a run stops at the first evaluated round that reaches the target, and
that run is the uninterrupted run cut at that round."""

import json

import pytest

from fljax.experiment import ConfigError
from tests.experiment import runner

BASE = ["rounds=8", "eval_every=1", "baselines=()", "repeats=1", "checkpoint_every=3"]


def _run(out, sets, *extra):
    argv = ["--config", runner.HEART, "--out", str(out), "--no-progress", *extra]
    for item in [*BASE, *sets]:
        argv += ["--set", item]
    return runner.main(argv)


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("round_sec")
    return rows


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 8-round run, evaluated every round."""
    out = tmp_path_factory.mktemp("full")
    summary = _run(out, [])
    return summary, _rows(out)


def test_without_a_target_nothing_changes(full):
    summary, rows = full
    assert "stop_at_accuracy" not in summary and len(rows) == 8


def test_stops_at_the_first_round_reaching_the_target_and_equals_the_prefix(full, tmp_path):
    _, rows = full
    curve = [r["fed_weighted_accuracy"] for r in rows]
    # A target the full run reaches after round 1, so that stopping is visible.
    target = next((a for a in sorted(set(curve)) if curve.index(a) > 0 and a > curve[0]), None)
    assert target is not None, f"accuracy never rose above round 1's: {curve}"
    first = next(i + 1 for i, a in enumerate(curve) if a >= target)
    summary = _run(tmp_path, [f"stop_at_accuracy={target}"])
    assert summary["stop_at_accuracy"] == {"target": target, "reached_round": first, "rounds_run": first}
    assert _rows(tmp_path) == rows[:first]  # the same rounds, bit for bit, then nothing
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["stop_at_accuracy"]["reached_round"] == first
    # Resuming a run that already reached its target trains nothing more.
    again = _run(tmp_path, [f"stop_at_accuracy={target}"], "--resume")
    assert again["stop_at_accuracy"]["reached_round"] == first and len(_rows(tmp_path)) == first


def test_only_evaluated_rounds_count_and_an_unreached_target_runs_all_rounds(tmp_path):
    # Any accuracy >= 1e-9 reaches the target, but only evaluated rounds (every 3rd) are compared.
    summary = _run(tmp_path / "low", ["stop_at_accuracy=1e-9", "eval_every=3"])
    assert summary["stop_at_accuracy"]["reached_round"] == 3 and len(_rows(tmp_path / "low")) == 3
    # 230 held-out patients: a small MLP does not classify every one of them correctly.
    summary = _run(tmp_path / "high", ["stop_at_accuracy=1.0", "rounds=4"])
    assert summary["stop_at_accuracy"] == {"target": 1.0, "reached_round": None, "rounds_run": 4}


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "'high'"])
def test_bad_target_is_named(value):
    with pytest.raises(ConfigError, match="stop_at_accuracy"):
        runner.load_config(runner.HEART, [f"stop_at_accuracy={value}"])
