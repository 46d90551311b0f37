"""DP-FedAvg with fixed and adaptive clipping at equal epsilon on FEMNIST writers (Andrew et al. 2021).

Command (writes experiments/results/adaptive_clipping.{md,json}; rows already in the JSON file
are kept unless recomputed, so the table can be filled in parts with ``--variants``):
  python experiments/reproduce_adaptive_clipping.py [--epsilons 1 4 8] [--variants ...] [--out DIR]

Task: ``experiments/configs/femnist_adaptive_clip.py`` (105 writers, Poisson q = 0.2, expected
cohort m = 21, LeNet, 50 rounds, delta 1e-5, one writer the unit of privacy, add/remove). For each
target epsilon the noise multiplier ``z`` is calibrated by :func:`fljax.privacy.calibrate_noise_multiplier`
on the run's own :class:`fljax.privacy.DPConfig` (RDP, Poisson-subsampled Gaussian; with adaptive
clipping the update sum and the clipped count compose exactly to one Gaussian of multiplier ``z``,
so the same ``z`` is found), then each variant is trained once (seed 0, seeded noise: a
reproducible simulation):

* ``fixed clip 0.5``: DP-FedAvg with the fixed clip norm 0.5 (``femnist_private``'s setting);
* ``adaptive, sigma_b = m/20``: Andrew et al.'s setting, target quantile 0.5, clip learning rate
  0.2, count noise ``sigma_b = m / 20``; infeasible (recorded, not run) when ``2 sigma_b <= z``;
* ``adaptive, sigma_b = 2z``: the same with ``sigma_b = 2z``, so the update sum's multiplier is
  ``z_delta = z / sqrt(1 - 1/16) = 1.033 z``, about the paper's overhead at m = 100.

Rows of ``fixed clip 0.5`` not recomputed are taken from ``--fixed-from`` (default
``experiments/results/dp_mechanisms_femnist.json``: the same config, seed and noise, DP-FedAvg
rows), marked with their source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from fljax import experiment, privacy
from fljax.experiment import outputs

HERE = pathlib.Path(__file__).resolve().parent
FIXED = "fixed clip 0.5"
PAPER = "adaptive, sigma_b = m/20"
SCALED = "adaptive, sigma_b = 2z"
VARIANTS = (FIXED, PAPER, SCALED)
TAGS = {FIXED: "fixed", PAPER: "adaptive_m20", SCALED: "adaptive_2z"}
NOTES = "## Reading"  # the .md's text from this heading on is kept when the table is rewritten


def _variant(base: experiment.Config, name: str, z: float, cohort: int) -> tuple[list[str], float | None]:
    """The ``--set`` overrides of variant ``name`` at multiplier ``z``, and its ``sigma_b``."""
    sets = [f"dp.noise_multiplier={z!r}"]
    if name == FIXED:
        return [*sets, "dp.target_quantile=None"], None
    sigma_b = cohort / 20.0 if name == PAPER else 2.0 * z
    return [*sets, f"dp.clipped_count_stddev={sigma_b!r}"], sigma_b


def _curve(out: pathlib.Path) -> dict:
    """The clip norm and noised unclipped fraction per round, from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clip = [r["dp_clip_norm"] for r in rows]
    frac = [r["dp_unclipped_fraction"] for r in rows if "dp_unclipped_fraction" in r]
    acc = {r["round"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}
    return {"clip_norm": clip, "unclipped_fraction": frac, "test_accuracy_by_round": acc}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--results", default=str(HERE / "results" / "adaptive_clipping"))
    parser.add_argument("--fixed-from", default=str(HERE / "results" / "dp_mechanisms_femnist.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    path = HERE / "configs" / "femnist_adaptive_clip.py"
    base = experiment.load_config(path, args.set)
    population = experiment.data.load(base.data, jax.random.key(0)).train.num_clients
    out_root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="adaptive_clipping_"))
    results = pathlib.Path(args.results)
    old = results.with_suffix(".json")
    rows = {
        (r["target_epsilon"], r["variant"]): r
        for r in (json.loads(old.read_text())["rows"] if old.exists() else [])
    }
    for target in args.epsilons:
        dp = experiment.config.dp_config(base, population)  # adaptive, as configured
        z = privacy.calibrate_noise_multiplier(dp, target_epsilon=target, rounds=base.rounds)
        z_fixed = privacy.calibrate_noise_multiplier(
            dp.replace(target_quantile=None), target_epsilon=target, rounds=base.rounds
        )
        for name in args.variants:
            sets, sigma_b = _variant(base, name, z_fixed if name == FIXED else z, dp.cohort_size)
            row = {
                "target_epsilon": target,
                "variant": name,
                "noise_multiplier": z_fixed if name == FIXED else z,
                "clipped_count_stddev": sigma_b,
                "source": "this script",
            }
            if sigma_b is not None and not 2 * sigma_b > row["noise_multiplier"]:
                row.update(
                    status="infeasible",
                    reason=f"2 sigma_b = {2 * sigma_b:.3g} <= z = {row['noise_multiplier']:.4g}: no update "
                    "noise z_delta gives the pair of queries multiplier z",
                )
                rows[(target, name)] = row
                print(row, flush=True)
                continue
            config = experiment.apply_overrides(base, sets)
            run_dp = experiment.config.dp_config(config, population)
            out = out_root / f"eps{target:g}_{TAGS[name]}"
            t0 = time.perf_counter()
            summary = experiment.run(
                dataclasses.replace(config, name=out.name), out, overwrite=True, progress=False
            )
            curve = _curve(out)
            row.update(
                status="ran",
                update_noise_multiplier=run_dp.update_noise_multiplier,
                epsilon=summary["privacy"]["epsilon"],
                test_accuracy=summary["final"]["test_accuracy"],
                clip_first=curve["clip_norm"][0],
                clip_last=curve["clip_norm"][-1],
                unclipped_fraction_last10=(
                    float(np.mean(curve["unclipped_fraction"][-10:])) if curve["unclipped_fraction"] else None
                ),
                curve=curve,
                seconds=time.perf_counter() - t0,
            )
            rows[(target, name)] = row
            print({k: v for k, v in row.items() if k != "curve"}, flush=True)
            _write(results, rows, base, args.fixed_from)
    return _write(results, rows, base, args.fixed_from, show=True)


def _reused_fixed(path: str, have: dict) -> dict:
    """``fixed clip 0.5`` rows from an earlier DP-FedAvg table of the same config (if present)."""
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    rows = {}
    for r in json.loads(p.read_text())["rows"]:
        key = (r["target_epsilon"], FIXED)
        if r["mechanism"] == "DP-FedAvg, Poisson sampling" and key not in have:
            rows[key] = {
                "target_epsilon": r["target_epsilon"],
                "variant": FIXED,
                "noise_multiplier": r["noise_multiplier"],
                "clipped_count_stddev": None,
                "status": "ran",
                "update_noise_multiplier": r["noise_multiplier"],
                "epsilon": r["epsilon"],
                "test_accuracy": r["test_accuracy"],
                "clip_first": 0.5,
                "clip_last": 0.5,
                "unclipped_fraction_last10": None,
                "seconds": r["seconds"],
                "source": p.name,
            }
    return rows


def _write(results: pathlib.Path, rows: dict, base, fixed_from: str, show: bool = False) -> list[dict]:
    order = {v: i for i, v in enumerate(VARIANTS)}
    every = rows | _reused_fixed(fixed_from, rows)
    ordered = sorted(every.values(), key=lambda r: (r["target_epsilon"], order[r["variant"]]))
    results.parent.mkdir(parents=True, exist_ok=True)
    facts = {"jax": jax.__version__, "cpus": os.cpu_count(), "config": "femnist_adaptive_clip"}
    stored = [r for r in ordered if r["source"] == "this script"]
    results.with_suffix(".json").write_text(outputs.dumps({"rows": stored, "run": facts}, indent=1) + "\n")
    title = ast.get_docstring(ast.parse((HERE / "configs" / "femnist_adaptive_clip.py").read_text()))
    lines = [
        "# Adaptive vs fixed clipping at equal epsilon: DP-FedAvg on FEMNIST writers",
        "",
        f"Task: `experiments/configs/femnist_adaptive_clip.py`: {title.splitlines()[0]} {base.rounds} rounds,"
        " 105 writers, Poisson q = 0.2 (expected cohort m = 21), delta 1e-5, one writer the unit of privacy"
        " (add/remove). z calibrated by fljax's RDP accounting to each target epsilon; with adaptive clipping"
        " the accounted mechanism is the pair (update sum with z_delta, clipped count with 2 sigma_b), which"
        " composes to one Gaussian of multiplier z. One run each (seed 0, seeded noise: a reproducible"
        " simulation).",
        "",
        "| target epsilon | variant | z (accounted) | sigma_b | z_delta (update sum) | epsilon spent |"
        " clip norm round 1 -> 50 | noised unclipped fraction, last 10 rounds | test accuracy | seconds | source |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in ordered:
        if r["status"] != "ran":
            lines.append(
                f"| {r['target_epsilon']:g} | {r['variant']} | {r['noise_multiplier']:.3f} |"
                f" {r['clipped_count_stddev']:.3f} | - | - | - | - | not run: {r['reason']} | - | {r['source']} |"
            )
            continue
        sigma = "-" if r["clipped_count_stddev"] is None else f"{r['clipped_count_stddev']:.3f}"
        frac = "-" if r["unclipped_fraction_last10"] is None else f"{r['unclipped_fraction_last10']:.2f}"
        eps = "-" if r["epsilon"] is None or not math.isfinite(r["epsilon"]) else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['target_epsilon']:g} | {r['variant']} | {r['noise_multiplier']:.3f} | {sigma} |"
            f" {r['update_noise_multiplier']:.3f} | {eps} | {r['clip_first']:.3g} -> {r['clip_last']:.3g} |"
            f" {frac} | {r['test_accuracy']:.4f} | {r['seconds']:.0f} | {r['source']} |"
        )
    lines += [
        "",
        f"{facts['cpus']} CPU cores shared with other jobs, jax {facts['jax']}. Command:"
        " `nice -n 10 python experiments/reproduce_adaptive_clipping.py`.",
    ]
    md = results.with_suffix(".md")
    notes = md.read_text().partition(NOTES) if md.exists() else ("", "", "")
    if notes[1]:
        lines += ["", notes[1] + notes[2].rstrip("\n")]
    md.write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))
    return ordered


if __name__ == "__main__":
    main()
