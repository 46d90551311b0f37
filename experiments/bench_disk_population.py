"""A population larger than memory: 1,000,000 clients on disk, rounds of 1,000 (many_small-like).

The many_small workload (:mod:`experiments.bench_data`: 28x28x1 uint8 inputs,
62 classes, MLP 784-200-200-62, 1 local epoch of SGD at batch 20, size
buckets, FedAvg's example-weighted mean) on a population written to disk by
:class:`fljax.data.disk.PopulationWriter` and read back with
:class:`fljax.data.disk.DiskPopulation`. Client sizes are log-normal (median
8, largest 100 examples) rather than many_small's median 100, so that a
million clients fit in ~7 GB of disk (at median 100 they would take 78 GB);
per client there is less training, so client updates/s are not comparable to
bench_data's, and every run also times the same rounds with their cohorts
already in memory (``mode: "in_memory"``) to isolate what the disk costs.

1. Build (streamed): chunks of ``--chunk-clients`` clients are generated and
   appended; nothing but the chunk and the sizes is held in memory. Inputs
   are slices of one 256 MB random pool at random offsets, labels are fresh
   random draws (timing only). The files are then synced and dropped from the
   page cache (``posix_fadvise(DONTNEED)`` on this population's files only),
   so every round reads its clients from the disk.
2. Rounds: ``--rounds`` cohorts of ``--cohort`` clients drawn with
   :func:`fljax.data.sampling.uniform` (drawn before timing, like
   bench_data; ``sample_sec`` reports their cost), split into size buckets
   and read from disk in :func:`fljax.data.prefetch.prefetch`'s background
   thread while the previous round trains. A warm-up round first compiles
   every ``[slots, bucket length]`` shape.
3. The population directory is deleted (unless ``--keep``).

Prints one JSON line per phase: ``{"bench": "disk_population", "mode":
"build" | "disk" | "in_memory", ...}`` with ``client_updates_per_sec`` (all
rounds' clients over the wall time of the rounds, waits for the disk
included), ``client_updates_per_cpu_sec`` (over the CPU seconds of the whole
process, reading thread included: steadier than wall time on a shared
machine), ``sec_per_round`` (median), ``gather_sec`` (median seconds to read
one round's cohort in the background thread) and ``peak_rss_mb``
(``resource.getrusage``, the whole process so far).

Command (results: experiments/results/bench_disk_population.md)::

    nice -n 10 .venv/bin/python experiments/bench_disk_population.py
    .venv/bin/python experiments/bench_disk_population.py --quick   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, models
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.data import bucketing, disk, prefetch, sampling

EXAMPLE = (28, 28, 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(**fields) -> None:
    line = {"bench": "disk_population", "system": "fljax", **fields}
    line.update(peak_rss_mb=round(peak_rss_mb(), 1), device=jax.devices()[0].platform, jax=jax.__version__)
    print(json.dumps(line), flush=True)


def client_sizes(
    rng: np.random.Generator, n: int, median: int, max_size: int, num_clients: int
) -> np.ndarray:
    """Log-normal sizes whose largest over ``num_clients`` draws lands near ``max_size``."""
    z = np.sqrt(2 * np.log(num_clients))  # ~ the largest of num_clients standard normals
    sigma = np.log(max_size / median) / z
    return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), 1, max_size).astype(np.int64)


def build(path: pathlib.Path, args) -> disk.DiskPopulation:
    rng = np.random.default_rng(args.seed)
    row = int(np.prod(EXAMPLE))
    pool = rng.integers(0, 256, (32 if args.quick else 256) << 20, dtype=np.uint8)
    with disk.PopulationWriter(path, num_classes=62) as w:
        for start in range(0, args.num_clients, args.chunk_clients):
            count = min(args.chunk_clients, args.num_clients - start)
            sizes = client_sizes(rng, count, args.median, args.max_size, args.num_clients)
            if start == 0:
                sizes[0] = args.max_size  # the plan's longest bucket
            n = int(sizes.sum())
            offset = int(rng.integers(0, pool.size - n * row + 1)) if pool.size > n * row else 0
            x = np.resize(pool[offset:], n * row) if pool.size < n * row else pool[offset : offset + n * row]
            w.add_many(x.reshape((n, *EXAMPLE)), rng.integers(0, 62, n).astype(np.int32), sizes)
    for name in ("x.npy", "y.npy"):  # write back, then forget this population's pages
        fd = os.open(path / name, os.O_RDONLY)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # Linux
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return disk.DiskPopulation.open(path)


def _timed_rounds(algo, state, rounds, run_key):
    """Runs ``algo.update`` on each round's cohorts (rounds numbered from 1); returns the final
    state and metrics, each round's seconds, and the loop's wall and process CPU seconds."""
    times, metrics = [], None
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for r, cohorts in enumerate(rounds, start=1):
        t = time.perf_counter()
        state, metrics = algo.update(state, cohorts, fl_random.round_key(run_key, r))
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t)
    return state, metrics, times, time.perf_counter() - t_all, time.process_time() - cpu_all


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run (20,000 clients, cohort 100)"
    )
    ap.add_argument("--num-clients", type=int, default=1_000_000)
    ap.add_argument("--median", type=int, default=8, help="median examples per client")
    ap.add_argument("--max-size", type=int, default=100, help="largest client")
    ap.add_argument("--cohort", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10, help="measured rounds (after one warm-up round)")
    ap.add_argument("--slots", type=int, default=32, help="clients per compiled call (bucketing.split)")
    ap.add_argument("--num-buckets", type=int, default=12)
    ap.add_argument("--chunk-clients", type=int, default=20_000, help="clients generated per write")
    ap.add_argument("--dir", default=None, help="parent directory of the population (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the population directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.num_clients, args.cohort, args.rounds, args.chunk_clients = 20_000, 100, 2, 5_000
    parent = tempfile.mkdtemp(prefix="fljax-disk-population-", dir=args.dir)
    try:
        run(pathlib.Path(parent) / "population", args)
    finally:
        if not args.keep:
            shutil.rmtree(parent)


def run(path: pathlib.Path, args) -> None:
    t0 = time.perf_counter()
    pop = build(path, args)
    build_sec = time.perf_counter() - t0
    disk_bytes = sum(f.stat().st_size for f in path.iterdir())
    emit(
        mode="build",
        num_clients=pop.num_clients,
        num_examples=int(pop.offsets[-1]),
        median_size=float(np.median(pop.sizes)),
        max_size=int(pop.sizes.max()),
        disk_gb=round(disk_bytes / 1e9, 3),
        build_sec=round(build_sec, 2),
    )
    batch = 20
    model = models.MLP(hidden=(200, 200), num_classes=62)
    apply = lambda p, x: model.apply(p, x.astype(jnp.float32) / 255.0)
    run_key = fl_random.run_key(args.seed)
    params = models.init_params(model, EXAMPLE, fl_random.stream(run_key, "init"))
    algo = fedavg.fedavg(client.local_sgd(apply, optax.sgd(0.05), batch_size=batch))
    plan = bucketing.plan(pop.sizes, batch, num_buckets=args.num_buckets)

    t0 = time.perf_counter()
    picks = [
        sampling.uniform(
            fl_random.stream(fl_random.round_key(run_key, r), "sample"), pop.num_clients, args.cohort
        )
        for r in range(args.rounds + 1)
    ]
    sample_sec = (time.perf_counter() - t0) / len(picks)
    gather = {}

    def make(r):
        t = time.perf_counter()
        out = tuple(bucketing.split(pop, picks[r][0], picks[r][1], plan, slots=args.slots))
        gather[r] = time.perf_counter() - t
        return out

    # warm-up: one client of every bucket length compiles every [slots, length] shape, then one round
    steps = bucketing.num_steps(pop.sizes, batch)
    lengths = np.array(plan.lengths) // batch
    first = [int(np.flatnonzero(lengths[np.searchsorted(lengths, steps)] == b)[0]) for b in lengths]
    t0 = time.perf_counter()
    state = algo.init(params)
    warm = tuple(bucketing.split(pop, np.array(first), None, plan, slots=args.slots))
    state, m = algo.update(state, warm, fl_random.round_key(run_key, 0))
    state, m = algo.update(state, make(0), fl_random.round_key(run_key, 0))
    jax.block_until_ready(state.params)
    compile_sec = time.perf_counter() - t0

    rounds = prefetch.prefetch(make, range(1, args.rounds + 1))
    state, metrics, times, wall, cpu = _timed_rounds(algo, state, rounds, run_key)
    emit(
        mode="disk",
        num_clients=pop.num_clients,
        cohort=args.cohort,
        rounds=args.rounds,
        client_updates_per_sec=round(args.cohort * args.rounds / wall, 1),
        sec_per_round=round(statistics.median(times), 3),
        cpu_sec_per_round=round(cpu / args.rounds, 3),
        client_updates_per_cpu_sec=round(args.cohort * args.rounds / cpu, 1),
        gather_sec=round(statistics.median(gather[r] for r in range(1, args.rounds + 1)), 3),
        sample_sec=round(sample_sec, 3),
        compile_sec=round(compile_sec, 2),
        num_buckets=len(plan.lengths),
        slots=args.slots,
        padding_fraction=round(bucketing.padding_fraction(list(make(1)), batch), 4),
        train_loss=round(float(metrics["client_train_loss_weighted_mean"]), 4),
    )

    # the same rounds with their cohorts gathered into memory first: what the disk costs
    held = [jax.device_put(make(r)) for r in range(1, args.rounds + 1)]
    _, _, times, wall_memory, cpu_memory = _timed_rounds(algo, algo.init(params), held, run_key)
    emit(
        mode="in_memory",
        num_clients=pop.num_clients,
        cohort=args.cohort,
        rounds=args.rounds,
        client_updates_per_sec=round(args.cohort * args.rounds / wall_memory, 1),
        sec_per_round=round(statistics.median(times), 3),
        cpu_sec_per_round=round(cpu_memory / args.rounds, 3),
        client_updates_per_cpu_sec=round(args.cohort * args.rounds / cpu_memory, 1),
        disk_over_memory=round(wall / wall_memory, 3),
        disk_over_memory_cpu=round(cpu / cpu_memory, 3),
    )


if __name__ == "__main__":
    main()
