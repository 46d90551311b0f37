"""Audited epsilon against the accountant's: one-run audits of fljax's DP mechanisms.

Command (writes experiments/results/audit.{md,json}):
  python experiments/audit_study.py [--quick] [--seeds 5] [--results experiments/results/audit]

Three settings, each with 1,000 random-direction canary clients included with probability 1/2
(:mod:`fljax.leakage.audit`, Steinke et al. 2023 through ``jax_privacy.auditing``, 95% confidence):

1. The Gaussian mechanism alone: one DP-FedAvg aggregation (clip 1, every client every round)
   of the canaries in 20,000 dimensions, at noise multipliers 0.3, 1, 3 and 10, and the same
   with the noise 10x smaller than the accountant is told (a broken mechanism). ``--seeds``
   repetitions each (different canaries and noise).
2. The heart-disease hospitals through the trainer (``experiments/configs/heart_disease_private.py``:
   4 hospitals, every hospital every round, 30 rounds, clip 0.1; MLP hidden layer widened to 256 so
   that the model has 8,194 parameters and canary directions are nearly orthogonal).
3. CIFAR-10 (JPEG copy) through the trainer: 100 clients of 50 images (IID), LeNet, 10 rounds,
   every client every round, 1 local epoch, clip 1.

The scores are the canaries' projections on what the server released (``theta_0 - theta_T``).
A lower bound above the accountant's epsilon would be a bug; a bound far below it is the known
looseness of one-run audits of the Gaussian mechanism (Steinke et al. section 7).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from fljax import experiment, privacy
from fljax import random as fl_random
from fljax.experiment import Audit, Images, Model, trainer
from fljax.experiment import data as data_lib
from fljax.leakage import audit

HERE = pathlib.Path(__file__).resolve().parent
NOISE = (0.3, 1.0, 3.0, 10.0)
DIM = 20_000


def gaussian(z: float, seed: int, *, broken: bool, num_canaries: int = 1000) -> dict:
    """One Gaussian-mechanism release of the canaries (noise ``z`` or ``z / 10`` if broken)."""
    claimed = privacy.DPConfig(
        clip_norm=1.0,
        noise_multiplier=z,
        population_size=100,
        cohort_size=100,
        sampling="poisson",
        delta=1e-5,
    )
    actual = claimed.replace(noise_multiplier=z / 10 if broken else z)
    config = audit.AuditConfig(num_canaries=num_canaries)
    key = jax.random.key(seed)
    agg = audit.with_canaries(privacy.dp(actual), config, key)
    params = {"w": jnp.zeros((DIM,))}
    deltas = {"w": jnp.zeros((1, DIM))}
    _, delta, _ = jax.jit(agg.aggregate)(
        agg.init(params), deltas, jnp.zeros(1), jax.random.key(10_000 + seed)
    )
    eps = privacy.accounting.epsilon(claimed, 1)
    r = audit.run_audit(delta, config, key, delta=claimed.target_delta, accountant_epsilon=eps)
    return {
        "setting": "Gaussian mechanism" + (" (noise 10x too small)" if broken else ""),
        "z": z,
        "seed": seed,
    } | (r.report())


def trained(name: str, config: experiment.Config, prepared, z: float, out: pathlib.Path) -> dict:
    """One audited training run at noise multiplier ``z``."""
    config = dataclasses.replace(
        config, dp=dataclasses.replace(config.dp, noise_multiplier=z), audit=Audit(num_canaries=1000)
    )
    t0 = time.perf_counter()
    res = trainer.run_once(config, out / f"{name}_z{z}", progress=False, verbose=False, data=prepared)
    last = res["records"][-1]
    acc = last.get("fed_mean_accuracy", last.get("test_accuracy"))
    a = res["summary"]["privacy"]["audit"]
    return {
        "setting": name,
        "z": z,
        "seed": config.seed,
        "accuracy": acc,
        "sec": time.perf_counter() - t0,
    } | a


def heart(quick: bool):
    config = experiment.load_config(HERE / "configs" / "heart_disease_private.py")
    config = dataclasses.replace(
        config,
        name="audit_heart",
        repeats=1,
        baselines=(),
        checkpoint_every=0,
        eval_every=config.rounds,
        model=dataclasses.replace(config.model, hidden=(256,)),
        rounds=3 if quick else config.rounds,
    )
    return config


def cifar(quick: bool):
    base = experiment.load_config(HERE / "configs" / "cifar10_founding.py")
    n = 20 if quick else 100
    return dataclasses.replace(
        base,
        name="audit_cifar10",
        data=Images(name="cifar10", num_clients=n, partition="iid", examples_per_client=50),
        model=Model(name="lenet"),
        client=dataclasses.replace(base.client, num_epochs=1),
        cohort=experiment.Cohort(),
        rounds=2 if quick else 10,
        eval_every=2 if quick else 10,
        checkpoint_every=0,
        dp=experiment.DP(
            clip_norm=1.0, noise_multiplier=1.0, sampling="poisson", delta=1e-5, reproducible=True
        ),
    )


def _table(rows: list[dict]) -> str:
    lines = [
        "| setting | z | accountant epsilon | audited epsilon (95% lower bound) | canary AUROC | passed | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["setting"], r["z"]), []).append(r)
    for (setting, z), rs in groups.items():
        lb = [r["epsilon_lower_bound"] for r in rs]
        au = [r["auroc"] for r in rs]
        acc = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        lb_text = f"{np.mean(lb):.2f}" + (f" (max {max(lb):.2f} over {len(lb)})" if len(lb) > 1 else "")
        lines.append(
            f"| {setting} | {z:g} | {rs[0]['accountant_epsilon']:.3g} | {lb_text} | {np.mean(au):.3f} | "
            f"{sum(r['passed'] for r in rs)}/{len(rs)} | {f'{np.mean(acc):.3f}' if acc else '-'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small settings, nothing written")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--results", default=str(HERE / "results" / "audit"))
    parser.add_argument("--out", default="runs/audit_study")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    rows = []
    seeds = 1 if args.quick else args.seeds
    for broken in (False, True):
        for z in NOISE[1:2] if args.quick else NOISE:
            rows += [gaussian(z, s, broken=broken) for s in range(seeds)]
            print(_table(rows).splitlines()[-1], flush=True)
    for name, make in (("heart disease, 4 hospitals", heart), ("CIFAR-10, 100 clients", cifar)):
        config = make(args.quick)
        try:
            prepared = data_lib.load(config.data, fl_random.stream(fl_random.run_key(config.seed), "data"))
        except experiment.ConfigError as e:  # a data set that is not on this machine
            print(f"skipping {name}: {e}", flush=True)
            continue
        for z in NOISE[1:2] if args.quick else NOISE:
            rows.append(trained(name, config, prepared, z, out))
            print(_table(rows).splitlines()[-1], flush=True)
    wall = time.perf_counter() - t0
    if args.quick:
        return rows
    results = pathlib.Path(args.results)
    results.with_suffix(".json").write_text(json.dumps({"rows": rows, "wall_sec": wall}, indent=1))
    md = [
        "# One-run privacy audits: audited epsilon vs the accountant's",
        "",
        "Command: `python experiments/audit_study.py` "
        f"(2-core CPU, jax {jax.__version__}, {wall / 60:.1f} min).",
        "",
        "1,000 random-direction canary clients, each included with probability 1/2; empirical epsilon "
        "lower bound at 95% confidence (Steinke et al. 2023, `jax_privacy.auditing`), delta 1e-5; "
        f"Gaussian-mechanism rows: {args.seeds} seeds (mean, and the largest bound seen). "
        "Accuracy: the audited run's held-out accuracy (hospitals: mean over hospitals; CIFAR-10: "
        "the 10,000 test images); canaries move the model, so it is below an unaudited run's.",
        "",
        _table(rows),
        "",
    ]
    results.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {results}.md/.json in {wall:.0f}s", flush=True)
    return rows


if __name__ == "__main__":
    main()
