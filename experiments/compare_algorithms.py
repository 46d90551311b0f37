"""Every federated algorithm of the trainer on two real federated tasks, 3 seeds each.

Command (writes experiments/results/compare_algorithms.{md,json}):
  python experiments/compare_algorithms.py [--tasks femnist heart_disease] [--seeds 0 1 2]
      [--algorithms fedavg scaffold ...] [--out runs/compare_algorithms]

Tasks (both split by the real owner of the data, never re-partitioned):

* ``femnist``: the 105 writers of the shared FEMNIST subset (``experiments/configs/femnist.py``)
  with the LeNet CNN instead of the larger EMNIST CNN, 10 writers sampled uniformly per round,
  1 local epoch of SGD (learning rate 0.1, batch 10), 100 rounds, evaluated every 10 rounds on
  the 4,088 test examples of writers the federation never trained on.
* ``heart_disease``: the main job's 4 hospitals (``experiments/configs/heart_disease.py``), all
  4 every round, 30 rounds, evaluated every round on the 230 held-out patients; the 3 seeds
  also redraw the train/test split.

Hyperparameters are the task's client settings for every algorithm plus ONE server setting per
algorithm taken from its paper's recommendations (:data:`SERVER`), not tuned per task: the
table compares the algorithms as a researcher would first run them. Rounds to target is the
first evaluated round whose test accuracy reaches the task's target (``--target``), averaged
over the seeds that reach it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time

import jax

from fljax import experiment
from fljax.experiment import outputs

HERE = pathlib.Path(__file__).resolve().parent
ALGORITHMS = experiment.config.ALGORITHMS

# One server setting per algorithm (overrides of the task config), from the papers:
# FedAvgM server momentum 0.9 with server learning rate 1 - momentum's effective step (Hsu et
# al. 2019); FedAdam/FedYogi/FedAdagrad as Reddi et al. 2021 (server lr 10^-2 .. 10^-1,
# tau 10^-3); FedProx mu = 0.01 (Li et al. 2020); FedDyn alpha = 0.01 (Acar et al. 2021);
# q-FFL q = 1 (Li et al. 2020); FedSGD one full-batch gradient per client and round.
SERVER = {
    "fedavg": [],
    "fedavgm": ["server.learning_rate=0.3", "server.momentum=0.9"],
    "fedprox": ["server.mu=0.01"],
    "fedsgd": ["server.learning_rate=0.3"],
    "scaffold": [],
    "fedadam": ["server.learning_rate=0.01", "server.tau=0.001"],
    "fedyogi": ["server.learning_rate=0.01", "server.tau=0.001"],
    "fedadagrad": ["server.learning_rate=0.1", "server.tau=0.001"],
    "fednova": [],
    "qffl": ["server.q=1.0"],
    "feddyn": ["server.alpha=0.01"],
    "mimelite": [],
}

TASKS = {
    "femnist": {
        "config": "femnist",
        "overrides": [
            "model.name=lenet",
            "client.learning_rate=0.1",
            "client.batch_size=10",
            "rounds=100",
            "eval_every=10",
            "checkpoint_every=100",
        ],
        "target": 0.6,
        "metric": "test_accuracy",
    },
    "heart_disease": {
        "config": "heart_disease",
        "overrides": ["baselines=()", "repeats=1", "eval_every=1", "checkpoint_every=30"],
        "target": 0.8,
        "metric": "fed_weighted_accuracy",  # over all held-out patients; per hospital: worst column
    },
}


def _config(task: str, algorithm: str, seed: int, extra: list[str]) -> experiment.Config:
    spec = TASKS[task]
    sets = [*spec["overrides"], f"server.algorithm={algorithm}", *SERVER[algorithm], f"seed={seed}"]
    if task == "heart_disease":
        sets.append(f"data.split_seed={seed}")
    # SCAFFOLD's control variates and q-FFL's Lipschitz estimate assume plain SGD clients.
    if algorithm in ("scaffold", "qffl") and task == "heart_disease":
        sets.append("client.momentum=None")
    return experiment.load_config(HERE / "configs" / f"{spec['config']}.py", [*sets, *extra])


def _finished(out: pathlib.Path, config: experiment.Config) -> dict | None:
    """The summary of a finished run of exactly ``config`` in ``out``, else None."""
    try:
        stored = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except FileNotFoundError:
        return None
    new = json.loads(outputs.dumps(experiment.config.to_dict(config)))
    # Sections added to Config after the run (with defaults that change nothing) are not compared.
    same = all(new.get(k) == v for k, v in stored.items())
    return summary if same and summary.get("rounds") == config.rounds else None


def _curve(out: pathlib.Path, metric: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["round"], r[metric]) for r in rows if metric in r]


def _diverged(out: pathlib.Path) -> bool:
    """Whether the run blew up: a client sent a non-finite update, or the update norm exceeded 1e3."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return any(r.get("num_nonfinite", 0) > 0 or not (r.get("delta_norm") or 0.0) < 1e3 for r in rows)


def _rounds_to(curve, target: float) -> int | None:
    return next((r for r, acc in curve if acc >= target), None)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", action="append", default=[], metavar="TASK=ACC")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of every run"
    )
    parser.add_argument("--out", default=str(HERE.parent / "runs" / "compare_algorithms"))
    parser.add_argument("--results", default=str(HERE / "results" / "compare_algorithms"))
    args = parser.parse_args(argv)
    targets = {t: TASKS[t]["target"] for t in TASKS}
    for item in args.target:
        task, value = item.split("=")
        targets[task] = float(value)
    rows = []
    for task in args.tasks:
        for algorithm in args.algorithms:
            runs = []
            for seed in args.seeds:
                config = _config(task, algorithm, seed, args.set)
                out = pathlib.Path(args.out) / task / f"{algorithm}_seed{seed}"
                config = dataclasses.replace(config, name=out.name)
                t0 = time.perf_counter()
                summary = _finished(out, config)  # a finished run of this exact config is reused
                if summary is None:
                    summary = experiment.run(config, out, overwrite=True, progress=False)
                metric = TASKS[task]["metric"]
                curve = _curve(out, metric)
                per_client = summary["final"].get("fed_per_client_accuracy")
                runs.append(
                    {
                        "seed": seed,
                        "test_accuracy": summary["final"][metric],
                        "worst_client_accuracy": None if per_client is None else min(per_client),
                        "rounds_to_target": _rounds_to(curve, targets[task]),
                        "diverged": _diverged(out),
                        "curve": curve,
                        "seconds": summary.get("wall_sec", time.perf_counter() - t0),
                    }
                )
                print(task, algorithm, {k: v for k, v in runs[-1].items() if k != "curve"}, flush=True)
            accs = [r["test_accuracy"] for r in runs]
            reached = [r["rounds_to_target"] for r in runs if r["rounds_to_target"] is not None]
            mean, sd = _mean_sd(accs)
            worst = [r["worst_client_accuracy"] for r in runs if r["worst_client_accuracy"] is not None]
            rows.append(
                {
                    "task": task,
                    "algorithm": algorithm,
                    "rounds": config.rounds,
                    "target": targets[task],
                    "test_accuracy_mean": mean,
                    "test_accuracy_sd": sd,
                    "worst_client_accuracy_mean": statistics.fmean(worst) if worst else None,
                    "rounds_to_target_mean": statistics.fmean(reached) if reached else None,
                    "seeds_reaching_target": len(reached),
                    "seeds_diverged": sum(r["diverged"] for r in runs),
                    "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
                    "runs": runs,
                }
            )
    _write(pathlib.Path(args.results), rows, args)
    return rows


def _write(results: pathlib.Path, rows: list[dict], args) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    facts = {"jax": jax.__version__, "cpus": os.cpu_count(), "seeds": args.seeds, "server": SERVER}
    results.with_suffix(".json").write_text(outputs.dumps({"rows": rows, "run": facts}, indent=1) + "\n")
    lines = [
        "# Federated algorithms compared on two real federated tasks",
        "",
        f"Mean +- sd over seeds {', '.join(map(str, args.seeds))}. FEMNIST: 105 writers, 10 per round,"
        " LeNet, 100 rounds, test on 4,088 examples of unseen writers. Heart disease: 4 hospitals,"
        " all per round, MLP (32), 30 rounds, 230 held-out patients (the seed also redraws the"
        " split). One server setting per algorithm from its paper (experiments/compare_algorithms.py,"
        " `SERVER`), not tuned per task. Rounds to target: first evaluated round reaching the"
        " target accuracy, mean over the seeds that reach it (k/n: k of the n seeds do). Worst client:"
        " the lowest per-hospital held-out accuracy (mean over seeds; FEMNIST is evaluated"
        " centrally, so none). Diverged: seeds in which some client sent a non-finite update"
        " (rejected by the aggregator) or the update norm passed 1e3; their accuracy is in the"
        " mean, so a large sd flags an unstable algorithm at these settings, not a tuned result.",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task]
        lines += [
            "",
            f"## {task} (target accuracy {part[0]['target']:g}, {part[0]['rounds']} rounds)",
            "",
            "| algorithm | test accuracy | worst client | rounds to target | diverged | seconds per run |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(part, key=lambda r: -r["test_accuracy_mean"]):
            n = len(r["runs"])
            reach = (
                f"{r['rounds_to_target_mean']:.0f} ({r['seeds_reaching_target']}/{n})"
                if r["rounds_to_target_mean"] is not None
                else f"not reached (0/{n})"
            )
            worst = r["worst_client_accuracy_mean"]
            lines.append(
                f"| {r['algorithm']} | {r['test_accuracy_mean']:.3f} +- {r['test_accuracy_sd']:.3f} | "
                f"{'-' if worst is None else f'{worst:.3f}'} | {reach} | {r['seeds_diverged']}/{n} | "
                f"{r['seconds_per_run']:.0f} |"
            )
    lines += [
        "",
        f"{facts['cpus']} CPU cores shared with other jobs, jax {facts['jax']}."
        " Command: `python experiments/compare_algorithms.py`.",
    ]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
