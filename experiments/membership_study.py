"""Membership inference against FedAvg, with and without client-level DP.

For each task and each privacy setting, ``1 + num_shadows`` federations are trained as ONE vmapped
computation (:func:`fljax.leakage.shadows.train_models`), each admitting a random half of the
candidate clients; every model is attacked in turn with the others as its shadows
(:func:`fljax.leakage.membership.leave_one_out`). Attacks: loss threshold, LiRA online and offline
(global variance: few shadows); example level and client level (mean score of the client's examples).

Tasks:
  heart: the four hospitals' 920 patients (train and held-out parts of
    :func:`fljax.data.datasets.heart_disease.load` together), each hospital's patients shuffled and cut
    into clients of 15 (a remainder under 15 joins the hospital's last client): 60 clients, MLP (32),
    FedAvg.
  cifar10: a class-balanced subset of CIFAR-10's training images split uniformly at random into
    clients of (nearly) equal size, LeNet, FedAvg with enough local epochs to overfit.

Privacy settings: plain FedAvg; client-level DP (:func:`fljax.privacy.dp`, flat clipping, uniform
weights) with noise multipliers 0 (clipping only), 0.3, 1 and 3. Each round every IN client takes part
with probability ``participation`` (Poisson sampling), so a model's population is its IN clients and
the accountant's epsilon (:func:`fljax.privacy.accounting.epsilon`, RDP, Poisson rate
``participation``, ``rounds`` rounds, delta 1e-5) is the one of that federation. The noise is seeded: a
reproducible simulation, not a deployment.

Command: ``python experiments/membership_study.py [--quick]``; writes
experiments/results/membership{.md,.json,.png} (``--quick``: membership_quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import time

import jax
import matplotlib
import numpy as np
import optax

from fljax import client, models, privacy
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.data import FederatedData
from fljax.data.datasets import cifar10, heart_disease
from fljax.leakage import membership, shadows
from fljax.privacy import accounting

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
DELTA = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    num_shadows: int
    num_rounds: int
    num_epochs: int
    batch_size: int
    learning_rate: float
    clip_norm: float
    participation: float = 0.5


def heart_data(seed: int, per_client: int = 15) -> FederatedData:
    hd = heart_disease.load(test_fraction=0.25, seed=0)
    rng = fl_random.host_rng(fl_random.stream(fl_random.run_key(seed), "data"))
    clients = []
    for h in range(hd.train.num_clients):
        (xa, ya), (xb, yb) = hd.train.client(h), hd.test.client(h)
        x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
        order = rng.permutation(len(y))
        cuts = [order[i : i + per_client] for i in range(0, len(y) - len(y) % per_client, per_client)]
        cuts[-1] = np.concatenate([cuts[-1], order[len(cuts) * per_client :]])
        clients += [(x[c].astype(np.float32), y[c].astype(np.int32)) for c in cuts]
    return FederatedData.from_clients(clients, num_classes=2)


def cifar_data(seed: int, num_clients: int, per_client: int) -> FederatedData:
    raw = cifar10.load_raw()
    rng = fl_random.host_rng(fl_random.stream(fl_random.run_key(seed), "data"))
    total = num_clients * per_client
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(raw["y_train"] == k), total // 10, replace=False) for k in range(10)]
    )
    idx = rng.permutation(idx)
    x, y = cifar10.normalize(raw["x_train"][idx]), raw["y_train"][idx].astype(np.int32)
    return FederatedData.from_partition(x, y, np.array_split(np.arange(len(y)), num_clients), num_classes=10)


def run_setting(task: Task, model, input_shape, data: FederatedData, noise, key) -> dict:
    """Train 1 + num_shadows models under one privacy setting and attack each in turn."""
    num_models = task.num_shadows + 1
    in_mask = shadows.membership_masks(num_models, data.num_clients, fl_random.stream(key, "data"))
    population = max(1, round(data.num_clients / 2))  # expected IN clients of a model
    cohort_size = max(1, round(task.participation * population))
    if noise is None:
        aggregator, eps = None, math.inf
    else:
        cfg = privacy.DPConfig(
            clip_norm=task.clip_norm,
            noise_multiplier=noise,
            population_size=population,
            cohort_size=cohort_size,
            delta=DELTA,
        )
        aggregator = privacy.dp(cfg)
        eps = accounting.epsilon(cfg, task.num_rounds)
    update = client.local_sgd(
        model,
        optax.sgd(task.learning_rate, momentum=0.9),
        batch_size=task.batch_size,
        num_epochs=task.num_epochs,
    )
    algo = fedavg.fedavg(update, aggregator=aggregator)
    init = lambda k: models.init_params(model, input_shape, k)  # noqa: E731
    start = time.time()
    state, metrics = shadows.train_models(
        algo,
        init,
        data.cohort(range(data.num_clients)),
        in_mask,
        task.num_rounds,
        fl_random.stream(key, "loop"),
        participation=task.participation,
    )
    phi, loss = shadows.model_statistics(model.apply, state.params, data.x, data.y)
    train_seconds = time.time() - start
    pooled = membership.leave_one_out(phi, loss, in_mask, data.offsets, global_variance=True)
    owner = membership.example_clients(data.offsets)
    member = in_mask[:, owner]
    in_loss = np.asarray([np.mean(loss[m][member[m]]) for m in range(num_models)])
    out_loss = np.asarray([np.mean(loss[m][~member[m]]) for m in range(num_models)])
    result = {
        "noise_multiplier": noise,
        "dp": noise is not None,
        "epsilon": eps,
        "train_seconds": round(train_seconds, 1),
        "member_loss": float(in_loss.mean()),
        "nonmember_loss": float(out_loss.mean()),
        "final_train_loss": float(np.mean(np.asarray(metrics["client_train_loss_weighted_mean"])[:, -1])),
        "attacks": {},
    }
    for level, attacks in pooled.items():
        for attack, (scores, labels) in attacks.items():
            result["attacks"][f"{level}/{attack}"] = membership.attack_metrics(scores, labels)
    result["_roc"] = {
        f"{level}/{attack}": membership.roc_curve(*pooled[level][attack])
        for level in pooled
        for attack in ("loss", "lira_online")
    }
    return result


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def table(task: str, results: list[dict]) -> list[str]:
    lines = [
        f"### {task}",
        "",
        "| setting | epsilon | member / non-member loss | level | attack | AUC | TPR@0.1% | TPR@1% | bal. acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        setting = "no DP" if not r["dp"] else f"DP z={r['noise_multiplier']:g}"
        for key, m in r["attacks"].items():
            level, attack = key.split("/")
            lines.append(
                f"| {setting} | {fmt(r['epsilon'])} | {r['member_loss']:.3f} / {r['nonmember_loss']:.3f} | {level} "
                f"| {attack} | {m['auc']:.3f} | {m['tpr_at_fpr_0.001']:.3f} | {m['tpr_at_fpr_0.01']:.3f} "
                f"| {m['balanced_accuracy']:.3f} |"
            )
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke run of a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="heart,cifar10")
    args = parser.parse_args()
    quick = args.quick
    noises = {"heart": [None, 0.0, 0.3, 1.0, 3.0], "cifar10": [None, 0.0, 0.3, 1.0, 3.0]}
    if quick:
        noises = {"heart": [None, 1.0], "cifar10": [None, 1.0]}
    tasks = {
        "heart": Task(
            name="heart",
            num_shadows=4 if quick else 16,
            num_rounds=5 if quick else 30,
            num_epochs=10,
            batch_size=8,
            learning_rate=0.05,
            clip_norm=1.0,
        ),
        "cifar10": Task(
            name="cifar10",
            num_shadows=2 if quick else 8,
            num_rounds=2 if quick else 8,
            num_epochs=5,
            batch_size=8,
            learning_rate=0.05,
            # Noise std per coordinate of the mean update is z * clip / (8 clients): with clip 2 the
            # models diverged at z >= 1; 0.2 keeps them finite (they still learn little under DP).
            clip_norm=0.2,
        ),
    }
    cifar_clients, cifar_per_client = (20, 16) if quick else (32, 16)
    root = fl_random.run_key(args.seed)
    report: dict = {"command": "", "tasks": {}}
    t0 = time.time()
    for name in args.tasks.split(","):
        task = tasks[name]
        if name == "heart":
            data, model, shape = heart_data(args.seed), models.MLP(hidden=(32,), num_classes=2), (29,)
        else:
            data = cifar_data(args.seed, cifar_clients, cifar_per_client)
            model, shape = models.LeNet(), (32, 32, 3)
        results = []
        for z in noises[name]:
            r = run_setting(task, model, shape, data, z, root)
            print(
                name,
                "no DP" if z is None else f"z={z}",
                "eps",
                fmt(r["epsilon"]),
                r["train_seconds"],
                "s",
                {k: round(v["auc"], 3) for k, v in r["attacks"].items()},
                flush=True,
            )
            results.append(r)
        report["tasks"][name] = {
            "config": dataclasses.asdict(task),
            "num_clients": data.num_clients,
            "num_examples": int(data.y.shape[0]),
            "client_sizes": [int(data.sizes.min()), int(data.sizes.max())],
            "results": results,
        }
    runtime = time.time() - t0
    suffix = "_quick" if quick else ""
    command = "nice -n 10 python experiments/membership_study.py" + (" --quick" if quick else "")
    write(report, runtime, command, RESULTS / f"membership{suffix}")


def finite(value):
    """JSON-safe copy: non-finite floats (epsilon without noise, a diverged loss) become strings."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return str(float(value))
    return float(value) if isinstance(value, np.floating) else value


def write(report: dict, runtime: float, command: str, stem: pathlib.Path) -> None:
    report["command"] = command
    report["hardware"] = f"2-core CPU ({platform.machine()}), jax {jax.__version__}"
    report["runtime_seconds"] = round(runtime, 1)
    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(6 * len(report["tasks"]), 5), squeeze=False)
    for ax, (name, t) in zip(axes[0], report["tasks"].items(), strict=True):
        for r in t["results"]:
            setting = "no DP" if not r["dp"] else f"z={r['noise_multiplier']:g}"
            fpr, tpr = r["_roc"]["example/lira_online"]
            ax.loglog(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=f"LiRA, {setting}")
        fpr, tpr = t["results"][0]["_roc"]["example/loss"]
        ax.loglog(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), "k--", label="loss attack, no DP")
        ax.plot([1e-5, 1], [1e-5, 1], ":", color="grey")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{name}: example level")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(1e-4, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    for t in report["tasks"].values():
        for r in t["results"]:
            r.pop("_roc")
    stem.with_suffix(".json").write_text(json.dumps(finite(report), indent=1, allow_nan=False))
    lines = [
        "# Membership inference against FedAvg, with and without client-level DP",
        "",
        f"Command: `{command}`. Hardware: {report['hardware']}, shared with other jobs. "
        f"Runtime: {runtime / 60:.1f} min.",
        "",
    ]
    for name, t in report["tasks"].items():
        c = t["config"]
        lines.append(
            f"**{name}**: {t['num_clients']} clients ({t['client_sizes'][0]}-{t['client_sizes'][1]} examples, "
            f"{t['num_examples']} in all), {c['num_shadows'] + 1} models (each the target in turn, the others "
            f"its shadows), {c['num_rounds']} rounds, {c['num_epochs']} local epochs, batch {c['batch_size']}, "
            f"client SGD lr {c['learning_rate']} momentum 0.9, participation {c['participation']} of the IN "
            f"clients per round (Poisson), DP clip norm {c['clip_norm']}."
        )
        lines.append("")
    for name, t in report["tasks"].items():
        lines += table(name, t["results"])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
