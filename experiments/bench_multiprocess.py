"""Benchmark: the ``seed_cifar`` round on 1 process x 2 devices against 2 processes x 1 device.

The same workload as ``experiments/bench_round.py`` (LeNet, 62,006 params, 32x32x3 inputs, 500
examples per client, batch 32, 1 local epoch, SGD 0.01 momentum 0.9, FedAvg; synthetic data from
a seed), run with :mod:`fljax.distributed` two ways on this machine:

* ``processes: 1, devices_per_process: 2``: one process, two CPU devices, the clients axis
  sharded over both (the in-process ``shard_map`` path);
* ``processes: 2, devices_per_process: 1``: two processes started by
  :func:`fljax.distributed.launch_local` (gloo CPU collectives), each gathering only its half
  of the cohort; the aggregation is a cross-process all-reduce.

Each prints one JSON line (from process 0): ``sec_per_round`` (median of the measured rounds
after one warm-up round), ``compile_sec`` (first call), ``gather_sec`` (this process's
share of the cohort gathered from the population and placed on its devices), and the 2-process
line carries ``ratio_to_one_process`` (its ``sec_per_round`` over the 1-process run just
before it). The two settings alternate ``--repeats`` times (A, B, A, B, ...) and a last line
gives the median of the paired ratios, since the machine's load drifts between minutes.
Target: ratio within 1.15.

Command::

    nice -n 10 .venv/bin/python experiments/bench_multiprocess.py --cohorts 10 --rounds 3
    .venv/bin/python experiments/bench_multiprocess.py --quick   # seconds-long smoke run

Results: ``experiments/results/bench_multiprocess.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def worker(args) -> None:
    from fljax import distributed

    distributed.initialize()
    import jax
    import optax

    from fljax import client, losses, models, random
    from fljax.algorithms import fedavg
    from fljax.base import Performance
    from fljax.data import FederatedData
    from fljax.models import zoo

    rng = np.random.default_rng(0)
    n, e = args.cohort, args.examples
    clients = [
        (
            rng.standard_normal((e, args.image, args.image, 3), dtype=np.float32),
            rng.integers(0, 10, e).astype(np.int32),
        )
        for _ in range(n)
    ]
    data = FederatedData.from_clients(clients, num_classes=10)
    model = zoo.LeNet()
    update = client.local_sgd(
        model,
        optax.sgd(0.01, momentum=0.9),
        batch_size=32,
        num_epochs=1,
        loss_fn=losses.softmax_cross_entropy,
    )
    algo = fedavg.fedavg(update)
    mesh = distributed.client_mesh()
    step = distributed.jit_round(algo, mesh, Performance())
    params = models.init_params(model, (args.image, args.image, 3), jax.random.key(0))
    run_key = random.run_key(seed=0)
    t = time.perf_counter()
    cohort = distributed.gather_cohort(data, np.arange(n), mesh=mesh)
    jax.block_until_ready(cohort)
    gather_sec = time.perf_counter() - t
    t = time.perf_counter()
    state, _ = step(algo.init(params), cohort, random.round_key(run_key, 0))
    jax.block_until_ready(state)
    compile_sec = time.perf_counter() - t
    state, _ = step(state, cohort, random.round_key(run_key, 1))  # warm-up
    jax.block_until_ready(state)
    times, cpu = [], []
    for r in range(args.rounds):
        t, c = time.perf_counter(), time.process_time()
        state, _ = step(state, cohort, random.round_key(run_key, 2 + r))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    sec = statistics.median(times)
    if distributed.is_writer():
        line = {
            "bench": "seed_cifar",
            "system": "fljax_multiprocess",
            "processes": jax.process_count(),
            "devices_per_process": jax.local_device_count(),
            "cohort": n,
            "sec_per_round": round(sec, 4),
            "examples_per_sec": round(n * e / sec, 1),
            "compile_sec": round(compile_sec, 2),
            "gather_sec": round(gather_sec, 3),
            "rounds": len(times),
            "round_times": [round(x, 3) for x in times],
            "cpu_sec_per_round_process0": round(statistics.median(cpu), 4),
            "device": jax.default_backend(),
            "jax": jax.__version__,
        }
        print("RESULT " + json.dumps(line), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="10", help="comma-separated cohort sizes (even)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="A, B, A, B, ...: runs of each setting")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="cohort 2, 40 examples, 1 round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cohort", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from fljax import distributed

    if args.quick:
        args.cohorts, args.rounds, args.examples = "2", 1, 40
    for cohort in [int(c) for c in args.cohorts.split(",")]:
        base, ratios = None, []
        for processes, devices in ((1, 2), (2, 1)) * args.repeats:
            cmd = [__file__, "--worker", f"--cohort={cohort}", f"--rounds={args.rounds}"]
            cmd += [f"--examples={args.examples}", f"--image={args.image}"]
            done = distributed.launch_local(cmd, processes, local_device_count=devices, timeout=3600)
            for p in done:
                if p.returncode != 0:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
            (line,) = [x for x in done[0].stdout.splitlines() if x.startswith("RESULT ")]
            result = json.loads(line[len("RESULT ") :])
            if processes == 1:
                base = result["sec_per_round"]
            else:  # against the 1-process run just before it
                ratios.append(result["sec_per_round"] / base)
                result["ratio_to_one_process"] = round(ratios[-1], 3)
            print(json.dumps(result), flush=True)
        summary = {"bench": "seed_cifar", "system": "fljax_multiprocess_summary", "cohort": cohort}
        print(json.dumps(summary | {"median_ratio_2x1_to_1x2": round(statistics.median(ratios), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
