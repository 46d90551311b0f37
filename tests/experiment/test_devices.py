"""``Config.devices``: spreading a round's clients over devices changes its speed, never its result.

A client's bits depend on the width of the vmapped chunk it runs in, not on the device, so the
sharded round runs the one-device chunks (padding the cohort to whole chunks per device) and
aggregates the replicated outputs: bit for bit the one-device model, also with a padded cohort
and stateful clients (the suite has 4 CPU devices, conftest.py; 2, 3 and 4 devices under DP and
secure aggregation were checked the same way, and tests/test_fast.py covers 3 devices). The
clients' reported metrics (``client_*``: weighted means of what each client reports) are
reductions that XLA may fuse differently around the sharded part: equal up to float
reassociation.
"""

import json

import numpy as np
import pytest

from fljax import simulation
from fljax.experiment import ConfigError, trainer
from tests.experiment import runner

BASE = ["rounds=2", "eval_every=1", "baselines=()", "repeats=1", "checkpoint_every=0", "chunk_size=1"]
CASES = {
    # 3 of 4 hospitals a round: over 2 devices one chunk of 1 is padding.
    "fedavg_padded": (runner.HEART, ["cohort.sampling='uniform'", "cohort.size=3"], (2,)),
    "scaffold": (runner.HEART, ["server.algorithm='scaffold'", "client.momentum=None"], (2,)),
}


@pytest.fixture(autouse=True)
def pad_freely(monkeypatch):
    """Pad the cohort rather than use fewer devices (simulation.MAX_PAD_FRACTION), so that the
    padded sharded path runs: 3 clients over 2 devices is one padding slot in 4."""
    monkeypatch.setattr(simulation, "MAX_PAD_FRACTION", 1.0)


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("round_sec")
    return rows


def _split(rows):
    """(what the model determines, the clients' reported metrics)"""
    model = [{k: v for k, v in r.items() if not k.startswith("client_")} for r in rows]
    reported = [{k: v for k, v in r.items() if k.startswith("client_")} for r in rows]
    return model, reported


def _run(out, config, sets):
    argv = ["--config", config, "--out", str(out), "--no-progress"]
    for item in [*BASE, *sets]:
        argv += ["--set", item]
    runner.main(argv)
    return _rows(out), json.loads((out / "run_info.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_rounds_over_two_and_four_devices_equal_one_device_bit_for_bit(case, tmp_path):
    config, sets, counts = CASES[case]
    one, info = _run(tmp_path / "1", config, [*sets, "devices=1"])
    assert info["round_devices"] == 1 and len(one) == 2
    model, reported = _split(one)
    assert any(k.startswith("test_") or k.startswith("fed_") for k in model[-1])
    for n in counts:
        rows, info = _run(tmp_path / str(n), config, [*sets, f"devices={n}"])
        assert info["round_devices"] == n
        got_model, got_reported = _split(rows)
        assert got_model == model, f"devices={n} changed the model"
        for a, b in zip(got_reported, reported, strict=True):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-6)


def test_auto_is_every_core_and_too_many_devices_is_named():
    import os

    import jax

    assert trainer.round_devices("auto") == min(jax.device_count(), os.cpu_count() or 1)
    assert trainer.round_devices(3) == 3
    with pytest.raises(ConfigError, match="devices=99.*jax sees 4 cpu device"):
        trainer.round_devices(99)
    with pytest.raises(ConfigError, match="devices"):
        runner.load_config(runner.HEART, ["devices=0"])


def test_pad_slots_adds_masked_slots_only_when_needed():
    ids, mask = np.array([5, 2, 7], np.int32), np.array([True, True, False])
    padded, pmask = trainer.pad_slots(ids, mask, 2)
    np.testing.assert_array_equal(padded, [5, 2, 7, -1])
    np.testing.assert_array_equal(pmask, [True, True, False, False])
    same, smask = trainer.pad_slots(ids, mask, 3)
    assert same is ids and smask is mask
