"""``experiments/bench_data.py --quick`` runs and prints the many_small JSON lines."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_data_quick():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_data.py"), "--quick", "--rounds", "1", "--cohorts", "16"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # the sampled cohort, then the whole (quick) population as one jitted round
    assert [line["cohort"] for line in lines] == [16, 300]
    assert lines[-1]["mode"] == "one_jit" and lines[-1]["client_updates_per_sec"] > 0
    for line in lines:
        assert line["bench"] == "many_small"
        for field in ("padding_fraction", "naive_padding_fraction", "client_updates_per_sec", "peak_rss_mb"):
            assert isinstance(line[field], float)
        assert 0.0 <= line["padding_fraction"] < line["naive_padding_fraction"] < 1.0
