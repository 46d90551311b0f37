"""The protocol benchmark keeps working: ``--quick`` prints valid JSON lines."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_secagg_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_secagg.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    rows = [r for r in lines if r["bench"] == "secagg_protocol"]
    assert len(rows) >= 2
    for r in rows:
        for field in (
            "clients",
            "dim",
            "dropout",
            "client_sec",
            "server_sec",
            "client_bytes_sent",
            "server_bytes_received",
        ):
            assert field in r
        assert r["client_sec"] > 0 and r["server_bytes_received"] > 0
    assert {r["graph"] for r in rows} >= {"complete"}
