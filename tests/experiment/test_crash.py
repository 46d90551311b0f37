"""The trainer under kill -9: resume gives the uninterrupted run bit for bit; results are never lost.

The trainer runs as a real subprocess and is killed with SIGKILL at seeded random moments and at
forced points (half-way through a metrics line, inside a checkpoint save, through the test hook
``FLJAX_TEST_CRASH`` of fljax.experiment.trainer). Subprocesses share a JAX compilation cache to
start faster; the reference run compiles afresh, so the comparisons also check that a cached
executable computes the same bits.
"""

import fcntl
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fljax import checkpoint
from tests import helpers
from tests.experiment import runner
from tests.test_checkpoint import _flip_a_byte

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN = str(REPO / "experiments" / "run.py")
HEART = str(REPO / "experiments" / "configs" / "heart_disease.py")
ARGS = [
    "--config",
    HEART,
    "--set",
    "rounds=6",
    "--set",
    "repeats=1",
    "--set",
    "checkpoint_every=2",
    "--set",
    "eval_every=2",
    "--set",
    "baselines=()",
    "--no-progress",
]
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    env = {k: v for k, v in os.environ.items() if k != "FLJAX_TEST_CRASH"}
    return env | {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _start(env, out, *extra, crash=None):
    env = env | ({"FLJAX_TEST_CRASH": crash} if crash else {})
    with (out.parent / f"{out.name}.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, RUN, *ARGS, "--out", str(out), *extra], env=env, stdout=log, stderr=log, cwd=REPO
        )


def _run(env, out, *extra, crash=None):
    """Runs the trainer to its end; returns (exit code, what it printed this time)."""
    log = out.parent / f"{out.name}.log"
    before = log.stat().st_size if log.exists() else 0
    proc = _start(env, out, *extra, crash=crash)
    try:
        code = proc.wait(TIMEOUT)
    finally:
        proc.kill()  # only if it hangs; a no-op once it has ended
    return code, log.read_bytes()[before:].decode()


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """One uninterrupted run, shared by the tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, printed = _run(env, out)
    assert code == 0, printed
    return out


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("round_sec")
    return rows


def _runner():
    return runner


def _state_template():
    import jax

    from fljax import models

    run = _runner()
    config = run.load_config(HEART, [])
    model = run.build_model(config.model, 2)
    params = models.init_params(model, (29,), jax.random.key(0))
    return run.build_algorithm(config, model).init(params)


def _assert_same_run(out, reference):
    assert _metrics(out) == _metrics(reference)  # every field but the timing, bit for bit
    assert checkpoint.steps(out / "checkpoints") == checkpoint.steps(reference / "checkpoints") == [2, 4, 6]
    template = _state_template()
    a, extra_a = checkpoint.restore(reference / "checkpoints", 6, template)
    b, extra_b = checkpoint.restore(out / "checkpoints", 6, template)
    helpers.assert_trees_equal(a, b)
    assert extra_a == extra_b
    assert json.loads((out / "summary.json").read_text())["final"]["round"] == 6


def test_torn_metrics_line_and_kill_inside_a_checkpoint_save(env, reference, tmp_path):
    out = tmp_path / "run"
    code, printed = _run(env, out, crash="metrics:3")  # dies half-way through round 3's line
    assert code == -signal.SIGKILL, printed
    text = (out / "metrics.jsonl").read_text()
    assert text.count("\n") == 2 and not text.endswith("\n")  # rounds 1-2 and a torn line
    code, printed = _run(env, out, "--resume", crash="save:4")  # dies inside round 4's save
    assert code == -signal.SIGKILL, printed
    assert "dropped 1 torn or unreadable metrics line(s) after round 2" in printed
    assert checkpoint.latest_step(out / "checkpoints") == 2
    assert any(".orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").iterdir())
    code, printed = _run(env, out, "--resume")
    assert code == 0, printed
    assert "resuming after round 2; recomputing rounds 3, 4" in printed
    _assert_same_run(out, reference)


def _resume_and_kill(env, out, rows, delay):
    """--resume, then SIGKILL ``delay`` seconds after this process's metrics.jsonl has ``rows`` rows."""
    path = out / "metrics.jsonl"
    old = path.stat().st_ino if path.exists() else None
    proc = _start(env, out, "--resume")
    while proc.poll() is None:  # a resumed run first rewrites the file (a new inode), then appends
        if path.exists() and path.stat().st_ino != old and path.read_bytes().count(b"\n") >= rows:
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    return proc.wait(TIMEOUT)


def test_kill_at_random_moments_then_resume(env, reference, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    proc = _start(env, out)  # early: while it imports, compiles or starts
    time.sleep(rng.uniform(0.5, 3.0))
    proc.kill()
    proc.wait(TIMEOUT)
    for _ in range(2):  # mid-training: a random moment after a random round (often in a save)
        code = _resume_and_kill(env, out, rng.randint(1, 4), rng.uniform(0.0, 0.15))
        assert code == -signal.SIGKILL
    code, printed = _run(env, out, "--resume")
    assert code == 0, printed
    _assert_same_run(out, reference)


def test_corrupted_latest_checkpoint_falls_back_with_one_warning(env, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _flip_a_byte(out / "checkpoints" / "round_000006")
    code, printed = _run(env, out, "--resume")
    assert code == 0, printed
    warnings = [line for line in printed.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, printed
    assert "checkpoint round 6 is unreadable (CorruptCheckpointError" in warnings[0]
    assert "falling back to round 4" in warnings[0]
    assert "recomputing rounds 5, 6" in printed
    _assert_same_run(out, reference)


def _tree(out):
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.name != ".lock"
    }


def test_rerun_of_a_finished_run_refuses_and_deletes_nothing(reference, capsys):
    before = _tree(reference)
    with pytest.raises(SystemExit) as exit_:
        _runner().main([*ARGS, "--out", str(reference)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert _tree(reference) == before


def test_second_run_in_the_same_folder_is_refused(reference, capsys):
    before = _tree(reference)
    with (reference / ".lock").open("a") as held:  # as a running trainer holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_:
            _runner().main([*ARGS, "--set", "seed=1", "--out", str(reference), "--resume"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another run" in err, err
    assert _tree(reference) == before  # config.json is written only under the lock


def test_resume_with_another_config_is_refused_with_a_diff(reference, capsys):
    before = _tree(reference)
    run = _runner()
    with pytest.raises(SystemExit) as exit_:
        run.main(
            [
                *ARGS,
                "--set",
                "client.learning_rate=0.02",
                "--set",
                "rounds=4",
                "--out",
                str(reference),
                "--resume",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "client.learning_rate: 0.01 -> 0.02" in err and "rounds: 6 -> 4" in err
    assert _tree(reference) == before


def test_overwrite_replaces_only_what_a_run_wrote(env, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "metrics.jsonl").write_text('{"round": 1, "stale": true}\n')
    (out / "notes.txt").write_text("the researcher's own file")
    code, printed = _run(env, out, "--overwrite")
    assert code == 0, printed
    _assert_same_run(out, reference)
    assert (out / "notes.txt").read_text() == "the researcher's own file"
