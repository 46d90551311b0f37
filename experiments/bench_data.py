"""many_small benchmark: heavy-tailed cross-device cohorts (BENCHMARKS.md).

28x28x1 inputs (uint8, cast in the model), 62 classes, MLP 784-200-200-62;
10,000 clients with log-normal sizes (median 100, largest 1,000); 1 local
epoch of SGD at batch 20; cohorts of 100, 1,000 and 10,000 clients. Random
synthetic data (timing only). fljax's strategy: size buckets
(:mod:`fljax.data.bucketing`, 12 bucket lengths from the population), with
the next cohort gathered in a background thread (:mod:`fljax.data.prefetch`).
The naive strategy pads every client to the largest (1,000 examples = 50
steps); its padding fraction is computed for the same cohorts.

Prints one JSON object per cohort:
  {"bench": "many_small", "cohort", "padding_fraction", "naive_padding_fraction",
   "client_updates_per_sec", "sec_per_round", "compile_sec", "rounds", "peak_rss_mb", ...}

Command: ``python experiments/bench_data.py`` (``--quick``: a seconds-long smoke run).
Every call has shape ``[slots, bucket length]``, so each shape compiles
once, in a warm-up with one client of every bucket and then every measured
round's calls (``compile_sec``: warm-up time, compilation included); cohort
10,000 is timed over one round, smaller cohorts over ``--rounds`` rounds
(median).

A last line (``"mode": "one_jit"``) runs the whole population (10,000 clients)
as ONE jitted round: the bucket calls merged per length
(:func:`fljax.data.bucketing.merge`), ``jax.jit(algo.update)`` with
``chunk_size=--one-jit-chunk`` (8); its first call (trace + compile + one round) is
``compile_sec``, then ``--rounds`` rounds are timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, models
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.base import Performance
from fljax.data import FederatedData, bucketing, prefetch, sampling


def population(num_clients: int, median: int, max_size: int, seed: int) -> FederatedData:
    rng = np.random.default_rng(seed)
    sigma = np.log(max_size / median) / 3.7  # the largest of ~10,000 draws lands near max_size
    sizes = np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, num_clients))), 1, max_size).astype(
        np.int64
    )
    sizes[np.argmax(sizes)] = max_size
    n = int(sizes.sum())
    x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 62, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return FederatedData(x=x, y=y, offsets=offsets, num_classes=62)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(**fields) -> None:
    """One JSON line: ``fields`` plus the fields every many_small line carries."""
    line = {"bench": "many_small", "system": "fljax", **fields}
    line.update(peak_rss_mb=round(peak_rss_mb(), 1), device=jax.devices()[0].platform, jax=jax.__version__)
    print(json.dumps(line), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--cohorts", type=int, nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (cohorts <= 1,000)")
    ap.add_argument("--num-buckets", type=int, default=24)
    ap.add_argument(
        "--slots",
        type=int,
        default=256,
        help="clients per compiled call for cohorts over 1,000 (capped at 64)",
    )
    ap.add_argument(
        "--one-jit-chunk",
        type=int,
        default=8,
        help="clients per vmapped chunk in the one-jit round (8: fastest measured)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        num_clients, median, max_size, cohorts, hidden = 300, 20, 200, args.cohorts or [16, 64], (32, 32)
    else:
        num_clients, median, max_size, cohorts, hidden = (
            10_000,
            100,
            1000,
            args.cohorts or [100, 1000, 10_000],
            (200, 200),
        )
    batch = 20
    data = population(num_clients, median, max_size, args.seed)
    model = models.MLP(hidden=hidden, num_classes=62)
    apply = lambda p, x: model.apply(p, x.astype(jnp.float32) / 255.0)
    run_key = fl_random.run_key(args.seed)
    params = models.init_params(model, (28, 28, 1), fl_random.stream(run_key, "init"))
    update = client.local_sgd(apply, optax.sgd(0.05), batch_size=batch)
    plan = bucketing.plan(data.sizes, batch, num_buckets=args.num_buckets)
    for cohort_size in cohorts:
        # Slot granularity drives padding: at 24 buckets, 4 / 8 / 64 slots per call give
        # about 7% / 3% / 3% padding steps at cohorts 100 / 1,000 / 10,000 on this population.
        slots = 4 if cohort_size <= 100 else 8 if cohort_size <= 1000 else min(args.slots, 64)
        algo = fedavg.fedavg(update)
        state = algo.init(params)
        big = cohort_size >= 10_000 and not args.quick
        rounds = 1 if big else args.rounds
        sample_keys = [fl_random.stream(fl_random.round_key(run_key, r), "sample") for r in range(rounds)]
        picks = [sampling.uniform(sample_keys[r], num_clients, cohort_size) for r in range(rounds)]
        make = lambda r: bucketing.split(data, picks[r][0], picks[r][1], plan, slots=slots)  # noqa: B023
        # warm-up: one client of every bucket length compiles every shape once
        steps = bucketing.num_steps(data.sizes, batch)
        lengths = np.array(plan.lengths) // batch
        first = [int(np.flatnonzero(lengths[np.searchsorted(lengths, steps)] == b)[0]) for b in lengths]
        t0 = time.perf_counter()
        warm = bucketing.split(data, np.array(first), None, plan, slots=slots)
        _, m = algo.update(state, tuple(warm), fl_random.round_key(run_key, 0))
        jax.block_until_ready(m)
        # ... and every [slots, length] shape the measured rounds will use, so that
        # they time training, not compilation
        for r in range(rounds):
            _, m = algo.update(state, tuple(make(r)), fl_random.round_key(run_key, 0))
            jax.block_until_ready(m)
        compile_sec = time.perf_counter() - t0
        times, fractions, naive = [], [], []
        for r, cohorts_r in enumerate(prefetch.prefetch(make, range(rounds))):
            t0 = time.perf_counter()
            state, metrics = algo.update(state, tuple(cohorts_r), fl_random.round_key(run_key, r))
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - t0)
            fractions.append(bucketing.padding_fraction(cohorts_r, batch))
            naive.append(
                bucketing.naive_padding_fraction(data.sizes[picks[r][0]], batch, int(data.sizes.max()))
            )
        measured = times
        sec = float(np.median(measured))
        emit(
            cohort=cohort_size,
            padding_fraction=round(float(np.mean(fractions)), 4),
            naive_padding_fraction=round(float(np.mean(naive)), 4),
            client_updates_per_sec=round(cohort_size / sec, 2),
            sec_per_round=round(sec, 3),
            compile_sec=round(compile_sec, 3),
            rounds=len(measured),
            num_buckets=len(plan.lengths),
            slots=slots,
            train_loss=round(float(metrics["client_train_loss_weighted_mean"]), 4),
        )

    # The whole population in ONE jitted round: same cohort every round, so one compile.
    slots = 4 if args.quick else args.one_jit_chunk
    algo = fedavg.fedavg(update).with_performance(Performance(chunk_size=slots))
    state = algo.init(params)
    everyone = np.arange(num_clients)
    merged = tuple(bucketing.merge(bucketing.split(data, everyone, None, plan, slots=slots)))
    merged = jax.device_put(merged)
    step = jax.jit(algo.update)
    t0 = time.perf_counter()
    state, metrics = step(state, merged, fl_random.round_key(run_key, 0))
    jax.block_until_ready(state.params)
    compile_sec = time.perf_counter() - t0
    times = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        state, metrics = step(state, merged, fl_random.round_key(run_key, 1 + r))
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    emit(
        mode="one_jit",
        cohort=num_clients,
        padding_fraction=round(bucketing.padding_fraction(merged, batch), 4),
        naive_padding_fraction=round(
            bucketing.naive_padding_fraction(data.sizes, batch, int(data.sizes.max())), 4
        ),
        client_updates_per_sec=round(num_clients / sec, 2),
        examples_per_sec=round(float(data.sizes.sum()) / sec, 1),
        sec_per_round=round(sec, 3),
        compile_sec=round(compile_sec, 3),
        rounds=len(times),
        num_buckets=len(merged),
        slots=slots,
        train_loss=round(float(metrics["client_train_loss_weighted_mean"]), 4),
    )


if __name__ == "__main__":
    main()
