"""The trainer over several processes: ``experiments/run.py --processes 2`` (``jax.distributed``,
gloo CPU collectives, one device each) against the same run in one process over 2 devices."""

import json
import shutil

import jax
import numpy as np
import pytest

from fljax import checkpoint
from fljax.experiment import trainer
from tests.experiment import runner

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="local CPU processes")

COMMON = [
    "--config",
    "heart_disease",
    "--set",
    "baselines=()",
    "--set",
    "repeats=1",
    "--set",
    "eval_every=1",
    "--set",
    "checkpoint_every=1",
    "--no-progress",
]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(row):
    return {k: v for k, v in row.items() if k != "round_sec"}


def _two_processes(capfd, *argv):
    summary = runner.main([*COMMON, *argv, "--processes", "2", "--devices-per-process", "1"])
    printed = capfd.readouterr()
    assert summary == {"processes": [0, 0]}, printed
    return printed.out + printed.err  # process 0's stdout and stderr, then process 1's


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    runner.main([*COMMON, "--set", "rounds=2", "--set", "devices=2", "--out", str(out)])
    return out


def test_two_processes_equal_one_process_written_once_and_resume(tmp_path, capfd, one_process):
    out = tmp_path / "two"
    printed = _two_processes(capfd, "--set", "rounds=2", "--out", str(out))
    # Only process 0 prints and writes; the folder is a normal run folder.
    first, second = printed.split("--- process 1 of 2", 1)
    assert "done in" in first and "done in" not in second and "heart_disease" not in second
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert checkpoint.steps(out / "checkpoints") == [1, 2]
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == 2 and info["round_devices"] == 2
    assert (out / "summary.json").exists()
    # The same clients, keys and model as one process with 2 devices, up to float reassociation
    # of the cross-process sum.
    ref = _rows(one_process)
    assert json.loads((one_process / "run_info.json").read_text())["processes"] == 1
    for got, want in zip(rows, ref, strict=True):
        assert got.keys() == want.keys()
        for k, v in _numbers(want).items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    # A crash after round 1's metrics (later checkpoints on disk without their metrics lines):
    # resumed over 2 processes, the later checkpoints are dropped once and the rounds recomputed
    # bit for bit.
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    (crashed / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"round": 2, "cli')
    printed = _two_processes(capfd, "--set", "rounds=2", "--out", str(crashed), "--resume")
    assert "resuming after round 1; recomputing rounds 2;" in printed
    assert [_numbers(r) for r in _rows(crashed)] == [_numbers(r) for r in rows]
    assert checkpoint.steps(crashed / "checkpoints") == [1, 2]
    resumed = json.loads((crashed / "run_info.json").read_text())["resumed"]
    assert [r["processes"] for r in resumed] == [2]


def test_what_several_processes_refuse(tmp_path, capfd):
    with pytest.raises(SystemExit) as e:
        runner.main([*COMMON, "--processes", "2", "--distributed", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--distributed is for a cluster's launcher" in capfd.readouterr().err
    with pytest.MonkeyPatch.context() as mp:  # as in a process of a job
        mp.setattr(trainer, "multi_process", lambda: True)
        with pytest.raises(trainer.cfg.ConfigError, match="baselines"):  # before anything is loaded
            trainer.run(runner.load_config(runner.HEART), tmp_path / "x")
        single = ["baselines=()", "repeats=1", "rounds=1"]
        for sets, match in (
            (["server.algorithm=scaffold", "client.momentum=None"], "keep state between rounds"),
            (["secagg={}", "secagg_protocol=True"], "host protocol runs in one process"),
        ):
            with pytest.raises(trainer.cfg.ConfigError, match=match):
                trainer.run(runner.load_config(runner.HEART, single + sets), tmp_path / sets[0][:6])
