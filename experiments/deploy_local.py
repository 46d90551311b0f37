"""Seconds and bytes per round of a local Flower deployment: plaintext vs masking vs CKKS.

Command:
  python experiments/deploy_local.py [--config heart_disease] [--modes none,secagg,he] [--rounds 3]
      [--name deploy_local] [--out experiments/results]

Runs experiments/configs/<config>.py (heart_disease: 4 hospitals; banks_credit: 5 banks; one
SuperNode each, TLS on 127.0.0.1, no baselines, one repeat) once per mode with
``fljax.deploy.local``: plaintext updates (``none``), the masking protocol (``secagg``) and
CKKS (``he``); reads each run's ``summary.json`` and writes ``<name>.md`` and ``<name>.json``: per message
round (train, and each secure-sum step) the mean seconds and the server's bytes sent and
received per round, rounds after the first (which compiles), and the largest difference from
the simulation's final parameters.
"""

import argparse
import dataclasses
import json
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np

from fljax.deploy import local, server
from fljax.experiment import cli, trainer
from fljax.experiment import config as cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="heart_disease")
    p.add_argument("--modes", default="none,secagg,he")
    p.add_argument("--name", default="deploy_local")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    overrides = [
        f"rounds={args.rounds}",
        "baselines=()",
        "repeats=1",
        "checkpoint_every=0",
        f"eval_every={args.rounds}",
    ]
    base = cli.load_config(f"experiments/configs/{args.config}.py", overrides)
    rows, raw = [], {}
    for secure in args.modes.split(","):
        config = dataclasses.replace(base, deploy=cfg.Deploy(secure=secure, timeout=120.0))
        if secure != "none" and config.secagg is None:
            config = dataclasses.replace(config, secagg=cfg.SecAgg())
        if secure == "none":  # plaintext updates: no encoding
            config = dataclasses.replace(config, secagg=None, secagg_protocol=False)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = local.run(config, tmp)
            wall = time.perf_counter() - start
            shape = summary["deployment"]["nodes"]["0"]["feature_shape"]
            sim_config = dataclasses.replace(config, deploy=None)
            train_data, num_classes = local.load_train_data(sim_config)
            params = server.load_params(
                pathlib.Path(tmp) / "final_params.npz", server.init_template(config, shape, num_classes)
            )
        # The simulation as the config runs it (banks_credit: the real protocol on the host, the
        # same sums bit for bit as the masking simulation, and one cohort, no size buckets).
        sim = trainer.train(
            sim_config, train_data, trainer.build_model(sim_config.model, num_classes), progress=False
        )
        diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sim.state.params), strict=True)
        )
        later = summary["deployment"]["rounds"][1:]
        # Training rounds only: the federated evaluation (one message round after the last
        # round, when the nodes hold held-out data) is reported on its own.
        phases = [k for k, v in later[0].items() if isinstance(v, dict) and k != "evaluate"]
        per = {
            ph: {
                k: float(np.mean([r[ph][k] for r in later])) for k in ("sec", "bytes_sent", "bytes_received")
            }
            for ph in phases
        }
        round_sec = float(np.mean([sum(r[ph]["sec"] for ph in phases) for r in later]))
        rows.append((secure, round_sec, per, diff, wall))
        raw[secure] = {
            "summary": summary,
            "per_phase": per,
            "round_sec": round_sec,
            "max_abs_diff": diff,
            "wall_sec": wall,
        }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(raw, indent=1, default=str))
    lines = [
        "# Local Flower deployment: seconds and bytes per round",
        "",
        f"Command: `python experiments/deploy_local.py --config {args.config} --modes {args.modes} "
        f"--rounds {args.rounds} --name {args.name}` ({args.config}, "
        f"{len(summary['deployment']['nodes'])} SuperNodes, TLS on 127.0.0.1, flwr 1.42.0, jax {jax.__version__}).",
        f"Hardware: 2-core CPU shared with other jobs ({platform.machine()}); seconds are wall time",
        "under that load. Rounds after the first (the first compiles on every node) are averaged.",
        "",
        "| mode | s / round | message rounds | server sent B / round | server received B / round | max abs diff vs simulation | run wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for secure, round_sec, per, diff, wall in rows:
        sent = sum(v["bytes_sent"] for v in per.values())
        got = sum(v["bytes_received"] for v in per.values())
        lines.append(
            f"| {secure} | {round_sec:.1f} | {len(per)} | {sent:,.0f} | {got:,.0f} | {diff:.3g} | {wall:.0f} |"
        )
    lines += ["", "Per message round (mean s; server bytes sent / received):", ""]
    for secure, _, per, _, _ in rows:
        detail = ", ".join(
            f"{ph} {v['sec']:.1f}s {v['bytes_sent']:,.0f}/{v['bytes_received']:,.0f}" for ph, v in per.items()
        )
        lines.append(f"- {secure}: {detail}")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
