"""DP mechanisms at equal epsilon on one task: DP-FedAvg with Poisson sampling, banded and BLT
matrix-factorization DP (DP-FTRL family, no sampling amplification), independent noise, and
distributed DP (each client adds integer noise before the masked modular sum: the distributed
discrete Gaussian and the Skellam mechanism), plus the same task without privacy.

Command (writes experiments/results/dp_mechanisms.{md,json}; rows already in the JSON file are
kept unless recomputed, so the table can be filled in parts with ``--mechanisms``):
  python experiments/dp_mechanisms.py [--epsilons 1 4 8] [--mechanisms ...] [--out runs/dp_mechanisms]
  python experiments/dp_mechanisms.py --config femnist_private --results experiments/results/dp_mechanisms_femnist

The default task is ``experiments/configs/dp_mnist.py`` (MNIST, 1,000 clients of 60 examples, 100 per
round, 100 rounds, MLP 784-100-10, DP-FedAvgM server, clip 0.3). For each target epsilon (delta
1e-5, one client, add/remove or zero-out) each mechanism's noise multiplier is calibrated with
its own accounting, then the run is trained once (seed 0, seeded noise: a reproducible
simulation). DP-FedAvg samples each client with probability 0.1 and is accounted with sampling
amplification (RDP); the matrix mechanisms use a cyclic schedule (each client every 10th round,
10 times) and claim no amplification (PLD). Distributed DP samples as DP-FedAvg does and is
accounted with its own RDP bounds (the papers', with the rounding and modular slack), 18-bit ring.
``--config femnist_private`` runs the same mechanisms on FEMNIST's 105 writers (one client per
writer, ``experiments/configs/femnist_private.py``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pathlib
import time

import jax

from fljax import experiment, models, privacy
from fljax.experiment import outputs
from fljax.privacy import matrix_factorization as mf

HERE = pathlib.Path(__file__).resolve().parent
NONPRIVATE = "no DP (reference)"
MECHANISMS = {  # name -> dp_ftrl fields (None: DP-FedAvg with Poisson sampling)
    "DP-FedAvg, Poisson sampling": None,
    "independent noise, cyclic": {"strategy": "independent"},
    "banded MF, 10 bands": {"strategy": "banded", "num_bands": 10},
    "BLT, 2 buffers": {"strategy": "blt", "num_buffers": 2},
}
DISTRIBUTED = {  # name -> distributed_dp fields
    "distributed discrete Gaussian, 18 bits": {"mechanism": "discrete_gaussian", "bits": 18},
    "distributed Skellam, 18 bits": {"mechanism": "skellam", "bits": 18},
}
ALL = [*MECHANISMS, *DISTRIBUTED]


def _calibrate_distributed(config, target: float, rounds: int) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose distributed-DP epsilon after
    ``rounds`` is at most ``target``: bisection on :func:`fljax.privacy.distributed.epsilon`."""
    eps = lambda z: privacy.distributed.epsilon(dataclasses.replace(config, noise_multiplier=z), rounds)
    lo, hi = 1e-2, 1.0
    while eps(hi) > target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def _configs(base: experiment.Config, target: float, population: int, dim: int, wanted):
    """(name, calibrated z, config) for each wanted mechanism at epsilon ``target``."""
    dp = experiment.config.dp_config(base, population)
    if "DP-FedAvg, Poisson sampling" in wanted:
        z = privacy.calibrate_noise_multiplier(dp, target_epsilon=target, rounds=base.rounds)
        yield "DP-FedAvg, Poisson sampling", z, experiment.override(base, f"dp.noise_multiplier={z}")
    for name, fields in DISTRIBUTED.items():
        if name not in wanted:
            continue
        section = {"clip_norm": base.dp.clip_norm, "noise_multiplier": 1.0, "reproducible": True, **fields}
        trial = experiment.apply_overrides(base, ["dp=None", f"distributed_dp={section!r}"])
        ddp = experiment.config.distributed_dp_config(trial, population, dim=dim)
        z = _calibrate_distributed(ddp, target, base.rounds)
        yield name, z, experiment.override(trial, f"distributed_dp.noise_multiplier={z}")
    cyclic = experiment.apply_overrides(
        base, ["dp=None", f"cohort={{'sampling': 'uniform', 'size': {dp.cohort_size}}}"]
    )
    for name, fields in MECHANISMS.items():
        if fields is None or name not in wanted:
            continue
        section = {"clip_norm": base.dp.clip_norm, "noise_multiplier": 1.0, "reproducible": True, **fields}
        trial = experiment.override(cyclic, f"dp_ftrl={section!r}")
        z = mf.calibrate_noise_multiplier(
            experiment.config.dp_ftrl_config(trial, population), target_epsilon=target
        )
        yield name, z, experiment.override(trial, f"dp_ftrl.noise_multiplier={z}")


def _row_key(row: dict) -> tuple:
    return (row["target_epsilon"], row["mechanism"])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="dp_mnist", help="a config of experiments/configs with a dp section"
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument(
        "--mechanisms", nargs="+", default=[*ALL, NONPRIVATE], choices=[*ALL, NONPRIVATE], metavar="NAME"
    )
    parser.add_argument("--out", default=str(HERE.parent / "runs" / "dp_mechanisms"))
    parser.add_argument("--results", default=str(HERE / "results" / "dp_mechanisms"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of the config"
    )
    args = parser.parse_args(argv)
    path = HERE / "configs" / f"{args.config}.py"
    base = experiment.load_config(path, args.set)
    prepared = experiment.data.load(base.data, jax.random.key(0))
    population = prepared.train.num_clients
    model = experiment.trainer.build_model(base.model, prepared.num_classes)
    dim = models.num_params(models.init_params(model, prepared.train.x.shape[1:], jax.random.key(0)))
    results = pathlib.Path(args.results)
    old = results.with_suffix(".json")
    rows = {_row_key(r): r for r in (json.loads(old.read_text())["rows"] if old.exists() else [])}
    plan = [(t, *c) for t in args.epsilons for c in _configs(base, t, population, dim, args.mechanisms)]
    if NONPRIVATE in args.mechanisms:
        plan.append((None, NONPRIVATE, 0.0, experiment.override(base, "dp=None")))
    for target, name, z, cfg in plan:
        tag = "nonprivate" if target is None else f"eps{target:g}_{name.split(',')[0].replace(' ', '_')}"
        out = pathlib.Path(args.out) / args.config / tag
        t0 = time.perf_counter()
        summary = experiment.run(dataclasses.replace(cfg, name=out.name), out, overwrite=True, progress=False)
        row = {
            "target_epsilon": target,
            "mechanism": name,
            "noise_multiplier": z,
            "epsilon": summary["privacy"]["epsilon"],
            "test_accuracy": summary["final"]["test_accuracy"],
            "seconds": time.perf_counter() - t0,
        }
        rows[_row_key(row)] = row
        print(row, flush=True)
        _write(results, _sorted(rows), base, path)  # after every run: an interrupted sweep keeps its rows
    _write(results, _sorted(rows), base, path, show=True)
    return _sorted(rows)


def _sorted(rows: dict) -> list[dict]:
    order = {m: i for i, m in enumerate([*ALL, NONPRIVATE])}
    return sorted(rows.values(), key=lambda r: (r["target_epsilon"] or float("inf"), order[r["mechanism"]]))


def _write(
    results: pathlib.Path, rows: list[dict], base: experiment.Config, path: pathlib.Path, show=False
) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    facts = {"jax": jax.__version__, "cpus": os.cpu_count(), "config": path.stem}
    results.with_suffix(".json").write_text(outputs.dumps({"rows": rows, "run": facts}, indent=1) + "\n")
    title = ast.get_docstring(ast.parse(path.read_text())).split("\n")[0].rstrip(".")
    lines = [
        f"# DP mechanisms at equal epsilon: {title}",
        "",
        f"Task: `experiments/configs/{path.stem}.py`, {base.rounds} rounds. delta = {base.dp.delta or 1e-5:g}, one"
        " client (add/remove, or zero-out for the matrix mechanisms). DP-FedAvg: Poisson sampling, amplification"
        " (RDP). Distributed DP: each client adds integer noise (distributed discrete Gaussian or Skellam) to"
        " its rotated, scaled, rounded update before the masked sum in an 18-bit ring; Poisson sampling,"
        " amplification (the papers' RDP bounds with Zhu and Wang's general subsampling bound at"
        " integer orders, looser than the exact subsampled Gaussian's at small epsilon); the noise is"
        " sized for the default m shares (3 sd below the expected cohort), so with the expected n"
        " clients present the sum carries about sqrt(n/m) times z C. Matrix mechanisms: cyclic schedule, each client once every"
        " 1/q rounds, no amplification (PLD). Each noise multiplier calibrated to the target epsilon by the"
        " mechanism's own accounting; one run each (seed 0, seeded noise: a reproducible simulation).",
        "",
        "| target epsilon | mechanism | noise multiplier | epsilon spent | test accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {target} | {r['mechanism']} | {r['noise_multiplier']:.3f} | {spent} | "
            f"{r['test_accuracy']:.4f} | {r['seconds']:.0f} |"
        )
    cmd = "python experiments/dp_mechanisms.py" + (
        ""
        if path.stem == "dp_mnist"
        else f" --config {path.stem} --results experiments/results/{results.name}"
    )
    lines += ["", f"{facts['cpus']} CPU cores shared with other jobs, jax {facts['jax']}. Command: `{cmd}`."]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
