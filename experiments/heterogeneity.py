"""Stragglers on MNIST: FedAvg, FedAvg with a deadline, FedNova and FedBuff against simulated time.

Command (writes experiments/results/heterogeneity.{md,json}):
  nice python experiments/heterogeneity.py [--rounds 30] [--seed 0]

Setting: 12,000 MNIST training images split over 100 clients with a Dirichlet(0.3)
label partition (non-IID; client sizes vary), a 784-64-10 MLP, local SGD (learning rate
0.05, batch 20, 2 epochs: a client's full work is ``2 * ceil(n_i / 20)`` steps, 12 for
the median client). Devices: one local step takes ``1 / speed`` simulated seconds, with
``speed = exp(N(0, 1))`` drawn per client and round (``fljax.heterogeneity.SystemProfile``,
lognormal, sigma 1). Synchronous runs sample 20 clients per round:

* ``fedavg_wait``: FedAvg that waits for its slowest client (round time: the largest
  ``full_steps_i / speed_i`` of the cohort).
* ``fedavg_deadline``: FedAvg with a 6 s deadline; stragglers send the steps they managed
  (``fljax.heterogeneity.with_deadline``); round time 6 s.
* ``fedavg_drop``: the same deadline, clients that manage fewer than 6 steps are dropped.
* ``fednova_deadline``: FedNova with the same deadline (normalises each client's update by
  the steps it took).
* ``fedbuff``: FedBuff with 20 clients in flight and a server step every 10 arrivals, client
  latencies lognormal with median 12 s and sigma 1 (the median client's full work at the
  same device speeds), staleness weight ``1/sqrt(1 + tau)``; twice as many server steps as
  synchronous rounds, so every run trains the same number of clients. Each flush refills
  the freed slots with clients sampled uniformly (a client may then be in flight twice).

Each run reports test accuracy (the 10,000 MNIST test images) against simulated seconds.

Hardware and runtime: 2 CPU cores shared with other jobs, jax 0.10.2: 274 s for the five runs.
Measured result (experiments/results/heterogeneity.md), test accuracy after 30 rounds (60
FedBuff steps) and simulated seconds: fedavg_wait 0.8876 (3164 s; 0.7937 at 752 s),
fedavg_deadline 0.8690 (180 s), fedavg_drop 0.8833 (180 s, 10.2 of 20 clients dropped per
round), fednova_deadline 0.8596 (180 s), fedbuff 0.8940 (752 s; 0.8522 at 180 s). Speeds are
drawn afresh each round, so no client is a persistent straggler: dropping the slow ones
loses little data over 30 rounds, and FedNova has no lasting objective inconsistency to
correct here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fljax import client, evaluation, heterogeneity, models  # noqa: E402
from fljax import random as fl_random  # noqa: E402
from fljax.algorithms import fedavg, fedbuff, fednova  # noqa: E402
from fljax.data import FederatedData, partition, sampling  # noqa: E402
from fljax.data.datasets import images  # noqa: E402

NUM_CLIENTS = 100
NUM_TRAIN = 12_000
COHORT = 20
BATCH = 20
EPOCHS = 2
LR = 0.05
DEADLINE = 6.0
SPEED_SIGMA = 1.0
BUFFER, CONCURRENCY = 10, 20
MODEL = models.MLP(hidden=(64,), num_classes=10)


def load(seed: int):
    x, y = images.mnist("train")
    xt, yt = images.mnist("test")
    run = fl_random.run_key(seed)
    rng = fl_random.host_rng(fl_random.stream(run, "data"))
    keep = rng.permutation(len(y))[:NUM_TRAIN]
    x, y = x[keep], y[keep]
    part = partition.dirichlet(y, NUM_CLIENTS, 0.3, fl_random.stream(run, "data"), min_size=5)
    data = FederatedData.from_partition(x, y, part.indices, num_classes=10)
    return data, (xt, yt)


def full_steps(data: FederatedData) -> np.ndarray:
    sizes = np.diff(data.offsets)
    return EPOCHS * -(-sizes // BATCH)


def run(name: str, data, test, seed: int, rounds: int) -> dict:
    run_key = fl_random.run_key(seed)
    params = models.init_params(MODEL, (28, 28, 1), fl_random.stream(run_key, "init"))
    local = client.local_sgd(MODEL, optax.sgd(LR), batch_size=BATCH, num_epochs=EPOCHS)
    profile = heterogeneity.SystemProfile(deadline=DEADLINE, speed_spread=SPEED_SIGMA)
    wait = heterogeneity.SystemProfile(speed_spread=SPEED_SIGMA)  # no deadline: same speed draws
    dropping = heterogeneity.SystemProfile(deadline=DEADLINE, speed_spread=SPEED_SIGMA, min_steps=6)
    max_examples = int(np.diff(data.offsets).max())
    steps = full_steps(data)
    if name == "fedavg_wait":
        algo = fedavg.fedavg(local)
    elif name == "fedavg_deadline":
        algo = fedavg.fedavg(heterogeneity.with_deadline(local, profile))
    elif name == "fedavg_drop":
        algo = fedavg.fedavg(heterogeneity.with_deadline(local, dropping))
    elif name == "fednova_deadline":
        nova = fednova.fednova_client(MODEL, LR, batch_size=BATCH, num_epochs=EPOCHS)
        algo = fednova.fednova(heterogeneity.with_deadline(nova, profile))
    elif name == "fedbuff":
        median_work = float(np.median(steps))
        algo = fedbuff.fedbuff(
            local,
            buffer_size=BUFFER,
            concurrency=CONCURRENCY,
            latency_mean=median_work,
            latency_sigma=SPEED_SIGMA,
        )
    else:
        raise ValueError(f"unknown run {name!r}")
    update = jax.jit(algo.update)
    speeds = jax.jit(jax.vmap(lambda k: heterogeneity.speed(wait, k)))
    deadline_metrics = jax.jit(lambda c, k: heterogeneity.deadline_metrics(dropping, c, k))
    state = algo.init(params)
    calls = 2 * rounds if name == "fedbuff" else rounds
    eval_every = max(1, calls // 10)
    clock, curve, dropped, steps_done = 0.0, [], [], []
    t0 = time.time()
    for r in range(calls):
        key = fl_random.round_key(run_key, r)
        size = CONCURRENCY if (name == "fedbuff" and r == 0) else (BUFFER if name == "fedbuff" else COHORT)
        ids, mask = sampling.uniform(fl_random.stream(key, "sample"), data.num_clients, size)
        cohort = data.cohort(ids, num_examples=max_examples, client_mask=mask)
        state, metrics = update(state, cohort, key)
        if name == "fedbuff":
            clock = float(metrics["clock"])
        elif name == "fedavg_wait":
            keys = fl_random.client_keys(fl_random.stream(key, "clients"), jnp.asarray(ids))
            clock += float(np.max(steps[np.asarray(ids)] / np.asarray(speeds(keys))))
        else:
            clock += DEADLINE
        if name == "fedavg_drop":
            dropped.append(int(deadline_metrics(cohort, key)["num_dropped"]))
        if "client_num_steps_weighted_mean" in metrics:
            steps_done.append(float(metrics["client_num_steps_weighted_mean"]))
        if (r + 1) % eval_every == 0 or r + 1 == calls:
            acc = evaluation.evaluate(MODEL, state.params, *test)["accuracy"]
            curve.append({"server_steps": r + 1, "sim_seconds": round(clock, 2), "test_accuracy": acc})
    return {
        "name": name,
        "curve": curve,
        "final_accuracy": curve[-1]["test_accuracy"],
        "sim_seconds": round(clock, 2),
        "mean_dropped_per_round": float(np.mean(dropped)) if dropped else 0.0,
        "mean_steps_done": float(np.mean(steps_done)) if steps_done else None,
        "host_seconds": round(time.time() - t0, 1),
    }


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    seen = [c["test_accuracy"] for c in curve if c["sim_seconds"] <= seconds]
    return seen[-1] if seen else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "heterogeneity"))
    args = parser.parse_args()
    data, test = load(args.seed)
    names = ["fedavg_wait", "fedavg_deadline", "fedavg_drop", "fednova_deadline", "fedbuff"]
    results = []
    for name in names:
        res = run(name, data, test, args.seed, args.rounds)
        print(json.dumps({k: v for k, v in res.items() if k != "curve"}), flush=True)
        results.append(res)
    ends = sorted({r["sim_seconds"] for r in results})
    budgets = ends[:-1] or ends  # compare at the end of every run but the slowest
    command = f"nice python experiments/heterogeneity.py --rounds {args.rounds} --seed {args.seed}"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "jax": jax.__version__,
        "setting": __doc__.split("Setting:")[1].split("Each run")[0].strip(),
        "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    at_cols = " | ".join(f"accuracy at {b:.0f} s" for b in budgets)
    lines = [
        "# Stragglers on MNIST: accuracy against simulated time",
        "",
        f"Command: `{command}` (jax {jax.__version__}, CPU, {sum(r['host_seconds'] for r in results):.0f} s "
        "on 2 shared cores). Setting: see the docstring of `experiments/heterogeneity.py`.",
        "One seed: differences of a point or two are within noise. Accuracy at a time: the last",
        "evaluation (every tenth of the run) at or before it; empty if none. Mean local steps:",
        "example-weighted mean over the clients kept (dispatched, for FedBuff).",
        "",
        f"| run | server steps | simulated s | test accuracy | {at_cols} | mean local steps | dropped per round |",
        "|---|---|---|---|" + "---|" * len(budgets) + "---|---|",
    ]
    for r in results:
        ats = []
        for b in budgets:
            at = accuracy_at(r["curve"], b)
            ats.append("" if at is None else f"{at:.4f}")
        steps = "" if r["mean_steps_done"] is None else f"{r['mean_steps_done']:.1f}"
        lines.append(
            f"| {r['name']} | {r['curve'][-1]['server_steps']} | {r['sim_seconds']:.0f} | "
            f"{r['final_accuracy']:.4f} | {' | '.join(ats)} | {steps} | "
            f"{r['mean_dropped_per_round']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
