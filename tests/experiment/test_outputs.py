"""Honest outputs of the trainer: strict JSON files, run facts, curves over repeats,
TensorBoard event files and plain progress lines in non-terminal logs."""

import importlib.metadata
import json
import math
import re
import struct

import numpy as np
import pytest

from tests.experiment.test_run import HEART, _runner

DP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling": "poisson", "cohort_size": 2}


def _reject(name):
    raise ValueError(f"not strict JSON: {name}")


def _strict_load(text):
    return json.loads(text, parse_constant=_reject)


def _strict_files(out):
    """Every JSON file a run wrote under ``out`` (repeats included), each parsed strictly."""
    parsed = {}
    for p in sorted(out.rglob("*.json")) + sorted(out.rglob("metrics.jsonl")):
        if "checkpoints" in p.parts:
            continue
        rel = str(p.relative_to(out))
        if p.suffix == ".jsonl":
            parsed[rel] = [_strict_load(line) for line in p.read_text().splitlines()]
        else:
            parsed[rel] = _strict_load(p.read_text())
    return parsed


def _scalars(logdir):
    """{tag: {step: value}} from the TFRecord event files in ``logdir`` (no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                found.setdefault(v.tag, {})[event.step] = v.simple_value
    return found


def test_strict_json_convention():
    run = _runner()
    obj = {"a": math.inf, "b": [1.0, math.nan, -math.inf], "c": np.float32(-np.inf), "d": {"e": 2}}
    text = run.dumps(obj)
    back = _strict_load(text)
    assert back["a"] is None and back["a_nonfinite"] == "inf"
    assert back["b"] == [1.0, None, None] and back["b_nonfinite"] == [None, "nan", "-inf"]
    assert back["c"] is None and back["c_nonfinite"] == "-inf"
    assert back["d"] == {"e": 2} and "d_nonfinite" not in back
    restored = run.restore(back)
    assert restored["a"] == math.inf and restored["c"] == -math.inf
    assert run.strict(back) == back  # idempotent: a record read back is written the same way
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)


def test_non_dp_run_files_are_strict_with_facts_tensorboard_and_plain_progress(tmp_path, capsys):
    run = _runner()
    out = tmp_path / "run"
    args = ["--config", HEART, "--set", "rounds=3", "--set", "eval_every=3", "--out", str(out)]
    summary = run.main(args + ["--set", "baselines=()", "--set", "repeats=2"])  # progress on
    files = _strict_files(out)
    for name in ("config.json", "run_info.json", "summary.json", "metrics.jsonl", "repeats/1/summary.json"):
        assert name in files, name
    # no DP: epsilon is infinite, written as null with its flag
    assert summary["privacy"]["epsilon"] == math.inf
    privacy = files["summary.json"]["privacy"]
    assert privacy["epsilon"] is None and privacy["epsilon_nonfinite"] == "inf"

    info = files["run_info.json"]
    assert {"argv", "git_sha", "git_dirty", "python", "platform", "jax", "jaxlib", "cpu_count"} <= set(info)
    assert (
        info["devices"]["count"] >= 1 and sum(info["devices"]["kinds"].values()) == info["devices"]["count"]
    )
    for req in importlib.metadata.requires("fljax"):
        assert re.match(r"[A-Za-z0-9._-]+", req).group(0) in info["dependencies"], req
    assert info["dependencies"]["tensorboardX"]

    # TensorBoard: every metric of every round, for each run folder
    for folder in (out, out / "repeats" / "1"):
        rows = files[str((folder / "metrics.jsonl").relative_to(out))]
        scalars = _scalars(folder / "tensorboard")
        for row in rows:
            for k, v in row.items():
                if k != "round" and isinstance(v, float):
                    assert scalars[k][row["round"]] == pytest.approx(v, rel=1e-6), k

    # stderr is not a terminal here: plain lines, no carriage returns
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(
        r"federated: round 3/3: client_train_loss_weighted_mean=\d\.\d{3} .*\(.* s/round\)", err
    ), err
    assert (out / "curves.png").stat().st_size > 0


def test_dp_run_files_are_strict_and_epsilon_is_plotted(tmp_path):
    run = _runner()
    out = tmp_path / "dp"
    run.main(
        ["--config", HEART, "--set", "rounds=2", "--set", "baselines=()", "--set", "repeats=1"]
        + ["--set", f"dp={DP!r}", "--out", str(out), "--no-progress"]
    )
    files = _strict_files(out)
    rows = files["metrics.jsonl"]
    assert [r["round"] for r in rows] == [1, 2] and all(0 < r["epsilon"] < math.inf for r in rows)
    assert files["summary.json"]["privacy"]["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    assert _scalars(out / "tensorboard")["epsilon"][2] == pytest.approx(rows[-1]["epsilon"], rel=1e-6)


def test_plot_averages_repeats_and_shows_epsilon(tmp_path):
    run = _runner()
    runs = [
        [
            {
                "round": t,
                "client_train_loss_weighted_mean": 1.0 / t + s,
                "epsilon": 0.5 * t,
                "fed_mean_accuracy": 0.5,
            }
            for t in range(1, 5 - s)
        ]
        for s in range(3)  # repeats of different lengths (a budget stop) still plot
    ]
    rounds, mean, lo, hi, n = run.curve(runs, "client_train_loss_weighted_mean")
    np.testing.assert_array_equal(rounds, [1, 2, 3, 4])
    assert n == 3 and mean[0] == pytest.approx(2.0) and lo[0] == 1.0 and hi[0] == 3.0
    assert mean[3] == pytest.approx(0.25)  # only the repeat that reached round 4
    run.plot(runs, None, tmp_path / "curves.png", "synthetic")
    assert (tmp_path / "curves.png").stat().st_size > 0
