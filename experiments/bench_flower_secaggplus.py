"""Flower's own SecAgg+ workflow beside fljax's masking protocol over Flower: seconds and bytes.

Command:
  nice -n 5 python experiments/bench_flower_secaggplus.py [--nodes 4] [--rounds 3]
      [--sizes heart_mlp,lenet] [--fljax-json PATH [--fljax-load MEAN,MAX]] [--name flower_secaggplus]
      [--out experiments/results]

1. fljax over Flower: runs ``python experiments/deploy_local.py --modes none,secagg --rounds R
   --name deploy_local_cmp --out TMP`` (heart_disease, 4 SuperNodes) and reads its JSON; with
   ``--fljax-json`` it reads the JSON of that command's finished run instead (``--fljax-load``: the
   load average sampled during it).
2. Flower SecAgg+: for each update size, a local TLS deployment (a SuperLink and N plain
   SuperNodes on 127.0.0.1, started like :mod:`fljax.deploy.local`) runs
   ``experiments/flower_secaggplus_app.py``: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
   num_shares=N, reconstruction_threshold=3))`` on a legacy FedAvg, and a numpy-only ClientApp
   (``mods=[size_mod, secaggplus_mod]``) whose update has the parameter shapes of fljax's
   heart-disease MLP (1,026 float32) or of fljax's LeNet-5 (62,006 float32). The update is
   drawn from the node id and the round (timing only; no training).

Writes ``<name>.md`` and ``<name>.json``: per system, seconds per FL round (rounds after the
first), message rounds, and the server's bytes sent and received per FL round, with the load
average sampled every 5 s during each run. Bytes: fljax's figures are its server's payload
bytes (``summary.json``), plus the ``RecordDict`` framing around each payload computed with
``flwr.common.serde``; Flower's are the serialized ``RecordDict`` content of every message the
server sends and receives (``serde.recorddict_to_proto(...).ByteSize()``), and, separately, the
whole ``Message`` protos (content plus metadata), cross-checked by the nodes' own records.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from fljax.deploy import certs as certs_lib
from fljax.deploy import local, server
from fljax.experiment import cli
from fljax.models import zoo

APP = pathlib.Path(__file__).with_name("flower_secaggplus_app.py")
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flower-secaggplus-bench"
version = "1.0.0"
description = "Flower's SecAgg+ workflow, measured"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fljax"

[tool.flwr.app.components]
serverapp = "secaggplus_app:server"
clientapp = "secaggplus_app:client"

[tool.flwr.app.config]
spec = ""
out = ""
"""


def param_shapes(size: str) -> list[tuple[int, ...]]:
    """Parameter shapes of fljax's heart-disease MLP (``heart_mlp``) or LeNet-5 (``lenet``)."""
    if size == "heart_mlp":
        config = cli.load_config("experiments/configs/heart_disease.py", [])
        data, num_classes = local.load_train_data(config)
        params = server.init_template(config, data.x.shape[1:], num_classes)
    elif size == "lenet":
        params = zoo.init_params(zoo.LeNet(num_classes=10), (32, 32, 3), jax.random.key(0))
    else:
        raise ValueError(f"unknown update size {size!r}: expected 'heart_mlp' or 'lenet'")
    return [tuple(int(d) for d in a.shape) for a in jax.tree.leaves(params)]


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds while in a ``with`` block."""

    def __init__(self, period: float = 5.0):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples))}


def run_flower(shapes, *, nodes: int, rounds: int, threshold: int, workdir: pathlib.Path) -> dict:
    """One SecAgg+ run on a local TLS deployment; the ServerApp's and the nodes' records."""
    for d in ("logs", "app", "flwr_home", "nodes"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    certs = certs_lib.generate(workdir / "certs")
    shutil.copyfile(APP, workdir / "app" / "secaggplus_app.py")
    (workdir / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    port = local.free_port()
    (workdir / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n'
    )
    spec = {
        "shapes": [list(s) for s in shapes],
        "rounds": rounds,
        "num-nodes": nodes,
        "num-shares": nodes,
        "reconstruction-threshold": threshold,
        "timeout": 300.0,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    deployment = local.Deployment(workdir, port, local._env(workdir / "flwr_home"))
    try:
        deployment.start_superlink()
        deployment.wait_ready()  # the SuperLink only: plain SuperNodes have no node runtime
        for i in range(nodes):
            log = workdir / "nodes" / f"node_{i}.jsonl"
            deployment.nodes[i] = deployment._start(
                f"node_{i}",
                [
                    local._bin("flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(certs.ca_cert),
                    "--node-config",
                    f'log="{log}"',
                    "--port",
                    str(local.free_port()),
                ],
            )
        result = deployment.submit(
            {"spec": str(workdir / "spec.json"), "out": str(workdir / "server.json")},
            timeout=600.0 + rounds * 4 * 300.0,
        )
        (workdir / "logs" / "flwr_run.log").write_text(result.stdout + result.stderr)
    finally:
        deployment.stop()
    if not (workdir / "server.json").exists():
        raise RuntimeError(f"the SecAgg+ ServerApp wrote no results; see {workdir / 'logs'}")
    node_lines = [
        json.loads(line)
        for f in sorted((workdir / "nodes").glob("node_*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    return {"server": json.loads((workdir / "server.json").read_text()), "nodes": node_lines, "spec": spec}


def summarize_flower(raw: dict) -> dict:
    """Per stage and per FL round (rounds after the first): seconds, bytes, ClientApp times."""
    stages = [s for s in raw["server"]["stages"] if s["round"] >= 2]
    names = list(dict.fromkeys(s["stage"] for s in stages))
    rounds = sorted({s["round"] for s in stages})
    per = {}
    for name in names:
        rows = [s for s in stages if s["stage"] == name]
        client = [m for m in raw["nodes"] if m["stage"] == name and int(m["round"]) >= 2]
        per[name] = {
            "sec": float(np.mean([s["sec"] for s in rows])),
            "messages": float(np.mean([s["messages"] for s in rows])),
            "bytes_sent": float(np.mean([s["sent"]["content"] for s in rows])),
            "bytes_received": float(np.mean([s["received"]["content"] for s in rows])),
            "message_bytes_sent": float(np.mean([s["sent"]["message"] for s in rows])),
            "message_bytes_received": float(np.mean([s["received"]["message"] for s in rows])),
            # the nodes' own records of the same messages (content as the ClientApp saw it)
            "node_bytes_received": sum(m["received"]["content"] for m in client) / len(rounds),
            "node_bytes_sent": sum(m["sent"]["content"] for m in client) / len(rounds),
            "clientapp_sec_in_mods": float(np.mean([m["sec_in_mods"] for m in client])),
            "clientapp_age_on_entry": float(np.mean([m["process_age_on_entry"] for m in client])),
        }
    round_sec = float(np.mean([sum(s["sec"] for s in stages if s["round"] == r) for r in rounds]))
    messages = sum(v["messages"] for v in per.values())
    return {
        "num_params": raw["server"]["num_params"],
        "round_sec": round_sec,
        "message_rounds": len(names),
        "bytes_sent": sum(v["bytes_sent"] for v in per.values()),
        "bytes_received": sum(v["bytes_received"] for v in per.values()),
        "message_bytes_sent": sum(v["message_bytes_sent"] for v in per.values()),
        "message_bytes_received": sum(v["message_bytes_received"] for v in per.values()),
        "metadata_bytes_per_message": sum(
            v["message_bytes_sent"] + v["message_bytes_received"] - v["bytes_sent"] - v["bytes_received"]
            for v in per.values()
        )
        / (2 * messages),
        "per_stage": per,
        "checks": raw["server"]["checks"],
    }


def fljax_framing(payload: int) -> int:
    """Bytes a ``RecordDict({"fljax": ConfigRecord({"payload": ...})})`` adds around a payload."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common import serde

    content = RecordDict({"fljax": ConfigRecord({"payload": b"\0" * payload})})
    return serde.recorddict_to_proto(content).ByteSize() - payload


def summarize_fljax(raw: dict, nodes: int) -> dict:
    """deploy_local's per-mode figures, payload bytes plus the RecordDict framing per message."""
    out = {}
    for mode, r in raw.items():
        per = r["per_phase"]
        sent = received = 0.0
        for v in per.values():
            sent += v["bytes_sent"] + nodes * fljax_framing(int(v["bytes_sent"] / nodes))
            received += v["bytes_received"] + nodes * fljax_framing(int(v["bytes_received"] / nodes))
        out[mode] = {
            "round_sec": r["round_sec"],
            "message_rounds": len(per),
            "payload_bytes_sent": sum(v["bytes_sent"] for v in per.values()),
            "payload_bytes_received": sum(v["bytes_received"] for v in per.values()),
            "bytes_sent": sent,
            "bytes_received": received,
            "per_phase": per,
            "wall_sec": r["wall_sec"],
            "max_abs_diff": r["max_abs_diff"],
        }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threshold", type=int, default=3, help="SecAgg+ reconstruction threshold")
    p.add_argument("--sizes", default="heart_mlp,lenet")
    p.add_argument("--fljax-json", default=None, help="reuse a finished deploy_local.py run's JSON")
    p.add_argument(
        "--fljax-load",
        default=None,
        metavar="MEAN,MAX",
        help="1-minute load average during that run, if sampled",
    )
    p.add_argument("--name", default="flower_secaggplus")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    if args.rounds < 2:
        raise ValueError(f"--rounds {args.rounds}: at least 2 (rounds after the first are averaged)")
    if not 2 <= args.threshold < args.nodes:
        raise ValueError(f"--threshold {args.threshold}: SecAgg+ needs 2 <= threshold < nodes ({args.nodes})")
    commands, loads = [], {}
    fljax_cmd = [
        sys.executable,
        "experiments/deploy_local.py",
        "--modes",
        "none,secagg",
        "--rounds",
        str(args.rounds),
        "--name",
        "deploy_local_cmp",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.fljax_json is None:
            with LoadSampler() as load:
                subprocess.run([*fljax_cmd, "--out", tmp], check=True, capture_output=True)
            loads["fljax"] = load.summary()
            fljax_raw = json.loads((pathlib.Path(tmp) / "deploy_local_cmp.json").read_text())
            commands.append(" ".join(["python", *fljax_cmd[1:], "--out", "TMP"]))
        else:
            fljax_raw = json.loads(pathlib.Path(args.fljax_json).read_text())
            commands.append(
                " ".join(["python", *fljax_cmd[1:], "--out", str(pathlib.Path(args.fljax_json).parent)])
            )
            if args.fljax_load:
                mean, peak = (float(v) for v in args.fljax_load.split(","))
                loads["fljax"] = {"mean": mean, "max": peak}
        fljax = summarize_fljax(fljax_raw, args.nodes)
        flower, flower_raw = {}, {}
        for size in args.sizes.split(","):
            shapes = param_shapes(size)
            with LoadSampler() as load:
                start = time.perf_counter()
                raw = run_flower(
                    shapes,
                    nodes=args.nodes,
                    rounds=args.rounds,
                    threshold=args.threshold,
                    workdir=pathlib.Path(tmp) / f"flower_{size}",
                )
                wall = time.perf_counter() - start
            loads[f"flower_{size}"] = load.summary()
            flower[size] = summarize_flower(raw) | {"wall_sec": wall}
            flower_raw[size] = raw
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "commands": commands,
        "nodes": args.nodes,
        "rounds": args.rounds,
        "threshold": args.threshold,
        "load_average_1min": loads,
        "fljax": fljax,
        "flower_secaggplus": flower,
        "flower_raw": flower_raw,
        "flwr": _flwr_version(),
        "machine": platform.machine(),
        "command": "python experiments/bench_flower_secaggplus.py " + " ".join(sys.argv[1:]),
    }
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    lines = markdown(record)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _flwr_version() -> str:
    import flwr

    return flwr.__version__


def _load(record, key) -> str:
    v = record["load_average_1min"].get(key)
    return f"{v['mean']:.1f} (max {v['max']:.1f})" if v else "not sampled"


def markdown(record: dict) -> list[str]:
    """The results page's header and tables (the reading is written below them)."""
    flower = ", ".join(
        f"{v['num_params']:,} parameters {v['wall_sec']:.0f} s" for v in record["flower_secaggplus"].values()
    )
    fljax = ", ".join(f"{m} {v['wall_sec']:.0f} s" for m, v in record["fljax"].items())
    return [
        "# Flower's own SecAgg+ workflow beside fljax's masking protocol over Flower",
        "",
        f"Command: `nice -n 5 {record.get('command', 'python experiments/bench_flower_secaggplus.py')}`; "
        f"fljax rows: `{record['commands'][0]}` (heart_disease); Flower rows: Flower's SecAgg+ workflow "
        f"(`experiments/flower_secaggplus_app.py`). One session, same machine, one run per row: "
        f"{record['nodes']} SuperNodes, TLS on 127.0.0.1, {record['rounds']} rounds, flwr {record['flwr']}, "
        f"SecAgg+ `num_shares={record['nodes']}, reconstruction_threshold={record['threshold']}`.",
        f"Hardware: 2-core CPU ({record['machine']}) shared with other jobs; the load average column is "
        "the 1-minute load sampled every 5 s during each run. Seconds are wall time, rounds after "
        f"the first averaged. Run wall time: fljax {fljax}; Flower SecAgg+ {flower}.",
        "",
        *table(record),
    ]


def table(record: dict) -> list[str]:
    """The measured table and per-stage lines (the reading is written around them)."""
    heart = 1026
    lines = [
        "| system | update size | s / round | message rounds | server sent B / round | server received B / round | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, v in record["fljax"].items():
        lines.append(
            f"| fljax {mode} | {heart:,} float32 | {v['round_sec']:.1f} | {v['message_rounds']} | "
            f"{v['bytes_sent']:,.0f} | {v['bytes_received']:,.0f} | {_load(record, 'fljax')} |"
        )
    for size, v in record["flower_secaggplus"].items():
        lines.append(
            f"| Flower SecAgg+ | {v['num_params']:,} float32 | {v['round_sec']:.1f} | {v['message_rounds']} | "
            f"{v['bytes_sent']:,.0f} | {v['bytes_received']:,.0f} | {_load(record, 'flower_' + size)} |"
        )
    lines += ["", "Per message round (mean s; server content bytes sent / received per FL round):", ""]
    for mode, v in record["fljax"].items():
        detail = ", ".join(
            f"{ph} {s['sec']:.1f}s {s['bytes_sent']:,.0f}/{s['bytes_received']:,.0f}"
            for ph, s in v["per_phase"].items()
        )
        lines.append(f"- fljax {mode} (payload bytes): {detail}")
    for _, v in record["flower_secaggplus"].items():
        detail = ", ".join(
            f"{st} {s['sec']:.1f}s {s['bytes_sent']:,.0f}/{s['bytes_received']:,.0f}"
            for st, s in v["per_stage"].items()
        )
        lines.append(f"- Flower SecAgg+ {v['num_params']:,}: {detail}")
    lines += [
        "",
        "Flower SecAgg+, whole `Message` protos and the ClientApp processes (rounds after the first):",
        "",
        "| update size | Message B sent / round | Message B received / round | metadata B / message "
        "| ClientApp s in mods (setup, share, collect, unmask) | ClientApp age on entry s | max abs err vs plaintext mean (bound) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, v in record["flower_secaggplus"].items():
        st = v["per_stage"].values()
        errs = [c["max_abs_err"] for c in v["checks"]]
        bound = min(c["bound"] for c in v["checks"])
        lines.append(
            f"| {v['num_params']:,} | {v['message_bytes_sent']:,.0f} | {v['message_bytes_received']:,.0f} | "
            f"{v['metadata_bytes_per_message']:.0f} | "
            + ", ".join(f"{s['clientapp_sec_in_mods']:.2f}" for s in st)
            + f" | {np.mean([s['clientapp_age_on_entry'] for s in st]):.1f} | {max(errs):.2g} ({bound:.2g}) |"
        )
    return lines


if __name__ == "__main__":
    main()
