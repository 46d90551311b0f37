"""No wasted slots: Poisson cohorts with their padding chunks skipped, or padded to a capacity ladder.

Prints one JSON object per line:

* ``"bench": "poisson_slots"``, one per expected cohort (10, 100, 1,000) over a population of
  10,000: the ladder (:func:`fljax.data.sampling.poisson_capacities`), the mean sampled clients
  and computed slots over ``--draws`` Poisson draws (``sampling.poisson``, the keys a run uses),
  the exact ``E[slots] / E[sampled]`` from the binomial distribution, for the ladder and for the
  single Chernoff capacity, how many capacities the draws hit (= compiled round shapes), and
  ``exact_computed_per_sampled_skip``: ``E[computed] / E[sampled]`` at the Chernoff capacity
  when chunks of 1, 2, 4 or 8 clients holding no sampled client are skipped.
* ``"bench": "dp_round"``, one per mode and config (``--configs``, default ``dp_mnist`` and
  ``femnist_private``; ``--rounds`` rounds): the config's round (the trainer's compiled round,
  one device) on the cohorts its DP sampling draws. ``"chernoff"`` pads every round to the
  Chernoff capacity and computes every slot (``Performance(skip_padding=False)``, the trainer
  before skipping); ``"skip"`` is the same cohort with the chunks of padding slots skipped (the
  trainer's default, ``cohort_layout="auto"``); ``"ladder"`` is ``cohort_layout="compact"``
  (:func:`fljax.experiment.trainer.cohort_layout`: the ladder, and size buckets for a
  heavy-tailed population). Every shape is compiled first (``compile_sec``,
  ``compiled_shapes``), then the modes' rounds run interleaved from the same state; median
  wall and CPU seconds per round, their median ratio to ``"chernoff"``, mean slots, slots
  computed and clients sampled per round, and whether ``"skip"`` gave ``"chernoff"``'s models
  bit for bit.

Command: ``.venv/bin/python experiments/bench_padding.py``
(``--quick``: the slots lines and 3 rounds of ``dp_mnist``; ``--devices 2``: the clients spread
over 2 CPU devices, as the trainer's default does on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np

from fljax import models, privacy, simulation
from fljax import random as fl_random
from fljax.base import Cohort, Performance
from fljax.data import sampling
from fljax.experiment import data as data_lib
from fljax.experiment import trainer
from fljax.experiment.cli import load_config


def binomial_pmf(k: np.ndarray, n: int, q: float) -> np.ndarray:
    logc = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
    return np.exp(logc + k * math.log(q) + (n - k) * math.log1p(-q))


def slots_per_sampled(n: int, q: float, ladder) -> float:
    ladder = np.asarray(ladder)
    k = np.arange(ladder[-1] + 1)
    return float(np.sum(binomial_pmf(k, n, q) * ladder[np.searchsorted(ladder, k)]) / (n * q))


def skip_computed_per_sampled(n: int, q: float, capacity: int, chunk: int) -> float:
    """E[computed] / E[sampled] with chunks of ``chunk`` clients whose all-padding chunks are skipped."""
    k = np.arange(capacity + 1)
    return float(np.sum(binomial_pmf(k, n, q) * np.ceil(k / chunk) * chunk) / (n * q))


def slots_lines(draws: int, num_clients: int = 10_000) -> None:
    for expected in (10, 100, 1000):
        q = expected / num_clients
        ladder = sampling.poisson_capacities(num_clients, q)
        chernoff = sampling.poisson_max_cohort(num_clients, q)
        run_key = fl_random.run_key(0)
        sampled, slots = [], []
        for r in range(draws):
            key = fl_random.stream(fl_random.round_key(run_key, r), "sample")
            ids, mask = sampling.poisson(key, num_clients, q, capacities=ladder)
            sampled.append(int(mask.sum()))
            slots.append(len(ids))
        print(
            json.dumps(
                {
                    "bench": "poisson_slots",
                    "num_clients": num_clients,
                    "expected_cohort": expected,
                    "ladder": list(ladder),
                    "draws": draws,
                    "mean_sampled": round(float(np.mean(sampled)), 2),
                    "mean_slots_ladder": round(float(np.mean(slots)), 2),
                    "slots_chernoff": chernoff,
                    "measured_slots_per_sampled_ladder": round(float(np.sum(slots) / np.sum(sampled)), 4),
                    "measured_slots_per_sampled_chernoff": round(
                        chernoff * draws / float(np.sum(sampled)), 4
                    ),
                    "exact_slots_per_sampled_ladder": round(slots_per_sampled(num_clients, q, ladder), 4),
                    "exact_slots_per_sampled_chernoff": round(chernoff / expected, 4),
                    "exact_computed_per_sampled_skip": {
                        chunk: round(skip_computed_per_sampled(num_clients, q, chernoff, chunk), 4)
                        for chunk in (1, 2, 4, 8)
                    },
                    "capacities_hit": len(set(slots)),
                }
            ),
            flush=True,
        )


def round_lines(name: str, rounds: int, devices: int = 1) -> None:
    config = load_config(name, configs_dir=pathlib.Path(__file__).parent / "configs")
    config = dataclasses.replace(config, devices=devices)
    data = data_lib.load(config.data, fl_random.stream(fl_random.run_key(config.seed), "data")).train
    model = trainer.build_model(config.model, data.num_classes)
    dp_config = trainer.cfg.dp_config(config, data.num_clients)
    params = models.init_params(model, data.x.shape[1:], fl_random.stream(fl_random.run_key(0), "init"))
    algo, jitted = trainer._compiled_round(config, model, dp_config, data.num_clients)
    compact = dataclasses.replace(config, cohort_layout="compact")
    layouts = {
        "chernoff": trainer.CohortLayout(),  # every slot of the Chernoff capacity computed
        "skip": trainer.CohortLayout(),  # the same cohort, chunks of padding slots skipped
        "ladder": trainer.cohort_layout(compact, dp_config, data, stateful=False),
    }
    mesh = trainer.device_mesh(config)
    every_slot = algo.with_performance(
        Performance(chunk_size=config.chunk_size, mesh=mesh, skip_padding=False)
    )
    steps = {
        "chernoff": jax.jit(every_slot.update),
        "skip": jitted,
        "ladder": trainer.bucketed_round(compact, algo) if layouts["ladder"].plan is not None else jitted,
    }
    multiple = 4 * config.client.batch_size  # as trainer.train pads examples
    num_examples = -(-int(data.sizes.max()) // multiple) * multiple
    data_key = fl_random.stream(fl_random.run_key(0), "data")
    cohorts = {m: [] for m in layouts}
    sampled = []
    for r in range(rounds):
        key = fl_random.stream(fl_random.round_key(fl_random.run_key(0), r), "sample")
        ids, mask = privacy.sample_cohort(dp_config, key, num_clients=data.num_clients)
        sampled.append(int(mask.sum()))
        for m, lay in layouts.items():
            cohorts[m].append(lay.cohort(data, ids, mask, num_examples, devices, key=data_key))

    def slots(c):
        return sum(int(x.client_mask.shape[0]) for x in ((c,) if isinstance(c, Cohort) else c))

    def computed(m, c):
        """Slots computed: with skipping, the chunks that hold a sampled client."""
        if m != "skip":
            return slots(c)
        n = slots(c)
        chunk = config.chunk_size if config.chunk_size != "auto" else CHUNKS[n]
        if chunk is None or chunk >= n:
            return slots(c)
        active = np.asarray(c.client_mask).reshape(-1, chunk).any(axis=1)
        return int(active.sum()) * chunk

    def shape(c):
        return tuple(x.data.mask.shape for x in ((c,) if isinstance(c, Cohort) else c))

    state = algo.init(params)
    compile_sec = {}
    for m in layouts:  # compile every shape the timed rounds use, once
        t0, seen = time.perf_counter(), set()
        for c in cohorts[m]:
            if shape(c) not in seen:
                seen.add(shape(c))
                jax.block_until_ready(steps[m](state, c, fl_random.round_key(fl_random.run_key(0), 0)))
        compile_sec[m] = (time.perf_counter() - t0, len(seen))
    wall = {m: [] for m in layouts}
    cpu = {m: [] for m in layouts}
    outs = {m: [] for m in layouts}
    for r in range(rounds):  # interleaved: the machine's drift hits both modes alike
        rkey = fl_random.round_key(fl_random.run_key(0), 1 + r)
        for m in layouts:
            t0, c0 = time.perf_counter(), time.process_time()
            out, _ = steps[m](state, cohorts[m][r], rkey)
            jax.block_until_ready(out.params)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
            outs[m].append(out.params)
        state = out
    bitwise = all(
        all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
        for x, y in zip(outs["skip"], outs["chernoff"], strict=True)
    )
    for m in layouts:
        print(
            json.dumps(
                {
                    "bench": "dp_round",
                    "config": name,
                    "mode": m,
                    "devices": devices,
                    "rounds": rounds,
                    "median_round_sec": round(float(np.median(wall[m])), 3),
                    "median_round_cpu_sec": round(float(np.median(cpu[m])), 3),
                    "ratio_to_chernoff": round(
                        float(np.median(np.array(wall[m]) / np.array(wall["chernoff"]))), 3
                    ),
                    "cpu_ratio_to_chernoff": round(
                        float(np.median(np.array(cpu[m]) / np.array(cpu["chernoff"]))), 3
                    ),
                    "compile_sec": round(compile_sec[m][0], 2),
                    "compiled_shapes": compile_sec[m][1],
                    "mean_slots": round(float(np.mean([slots(c) for c in cohorts[m]])), 2),
                    "mean_computed_slots": round(float(np.mean([computed(m, c) for c in cohorts[m]])), 2),
                    "bitwise_equal_to_chernoff": bitwise if m == "skip" else None,
                    "mean_sampled": round(float(np.mean(sampled)), 2),
                    "bucketed": layouts[m].plan is not None,
                    "capacities": layouts[m].capacities,
                }
            ),
            flush=True,
        )


CHUNKS: dict[int, int | None] = {}
"""The chunk size ``chunk_size="auto"`` picked for each cohort width (recorded while tracing)."""
_auto_chunk_size = simulation.auto_chunk_size


def _recording_auto_chunk_size(fn, *args):
    chunk = _auto_chunk_size(fn, *args)
    CHUNKS[jax.tree.leaves(args)[0].shape[0]] = chunk
    return chunk


simulation.auto_chunk_size = _recording_auto_chunk_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--configs", nargs="*", default=["dp_mnist", "femnist_private"])
    ap.add_argument("--devices", type=int, default=1, help="CPU devices the clients are spread over")
    ap.add_argument("--no-slots", action="store_true", help="skip the poisson_slots lines")
    args = ap.parse_args()
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)
    if not args.no_slots:
        slots_lines(200 if args.quick else args.draws)
    for name in ["dp_mnist"] if args.quick else args.configs:
        round_lines(name, 3 if args.quick else args.rounds, args.devices)


if __name__ == "__main__":
    main()
