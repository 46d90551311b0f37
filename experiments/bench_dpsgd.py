"""DP-SGD overhead: a round whose clients run example-level DP-SGD against the plain round.

Workloads:

* ``seed_cifar`` (default): LeNet (62,006 params) on 32x32x3 inputs, 500 examples per client,
  batch 32 (16 steps, the last partial), 1 local epoch, SGD lr 0.01 momentum 0.9, FedAvg,
  cohort 10, the round as the trainer runs it (``jax.jit(fedavg(update).update)`` with the
  default :class:`fljax.base.Performance`, ``chunk_size="auto"``).
* ``mlp``: the same round with an MLP 784-200-200-62 on 784 features.

Variants: ``plain`` (:func:`fljax.client.local_sgd`), ``dp_sgd_vmap`` (the reference
per-example gradients by ``vmap``, ``method="vmap"``) and ``dp_sgd`` (the default,
``method="auto"``: layer-wise clipping, :mod:`fljax.privacy.ghost_clipping`), all with
``l2_norm_clip=1``, ``noise_multiplier=1``. The variants are compiled first, then timed
INTERLEAVED (round r of every variant in turn) and each DP line reports the median of the
per-round ratios to the plain round measured next to it (``ratio_to_plain``, wall clock, and
``cpu_ratio_to_plain``, CPU seconds of this process), so the ratios hold on a shared machine.

Command::

  nice -n 10 .venv/bin/python experiments/bench_dpsgd.py                 # seed_cifar, cohort 10
  nice -n 10 .venv/bin/python experiments/bench_dpsgd.py --workload mlp
  .venv/bin/python experiments/bench_dpsgd.py --quick                     # seconds-long smoke run

Prints one JSON line per variant, e.g.
  {"bench": "dpsgd_overhead", "workload": "seed_cifar", "variant": "dp_sgd", "sec_per_round": ...,
   "ratio_to_plain": ...}
``sec_per_round`` is the median over the measured rounds after one warm-up round; compilation
is reported apart (``compile_sec``). Results: experiments/results/bench_dpsgd.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=("seed_cifar", "mlp"), default="seed_cifar")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke run)")
    parser.add_argument("--clients", type=int, default=None, help="cohort size (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 5)")
    parser.add_argument("--variants", default="plain,dp_sgd_vmap,dp_sgd")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fljax import client
    from fljax.algorithms import fedavg
    from fljax.base import ClientData, Cohort, Performance
    from fljax.models import zoo
    from fljax.privacy import DPSGDConfig, dp_sgd_client

    quick = args.quick
    clients = args.clients or (2 if quick else 10)
    rounds = args.rounds or (1 if quick else 5)
    batch = 16 if quick else 32
    num_examples = 48 if quick else 500
    if args.workload == "seed_cifar":
        image = 16 if quick else 32
        model, input_shape, classes = zoo.LeNet(), (image, image, 3), 10
    else:
        hidden = (32,) if quick else (200, 200)
        model, input_shape, classes = zoo.MLP(hidden=hidden, num_classes=62), (784,), 62
    params = zoo.init_params(model, input_shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((clients, num_examples, *input_shape), dtype=np.float32)
    y = rng.integers(0, classes, (clients, num_examples)).astype(np.int32)
    cohort = Cohort(
        ClientData(jnp.asarray(x), jnp.asarray(y), jnp.ones((clients, num_examples), bool)),
        jnp.arange(clients, dtype=jnp.int32),
        jnp.ones((clients,), bool),
    )
    opt = optax.sgd(0.01, momentum=0.9)
    cfg = DPSGDConfig(l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch, num_examples=num_examples)
    builders = {
        "plain": lambda: client.local_sgd(model, opt, batch_size=batch),
        "dp_sgd_vmap": lambda: dp_sgd_client(model, opt, cfg, method="vmap"),
        "dp_sgd": lambda: dp_sgd_client(model, opt, cfg),
    }
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(builders))
    if unknown or "plain" not in variants:
        raise SystemExit(f"--variants must include plain and only {sorted(builders)}, got {variants}")
    perf = Performance()
    runs = {}
    for name in variants:
        algo = fedavg.fedavg(builders[name]()).with_performance(perf)
        step = jax.jit(algo.update)
        t0 = time.perf_counter()
        state, _ = step(algo.init(params), cohort, jax.random.key(0))
        jax.block_until_ready(state)
        compile_sec = time.perf_counter() - t0
        state, _ = step(state, cohort, jax.random.key(1))  # warm-up round
        jax.block_until_ready(state)
        runs[name] = dict(step=step, state=state, compile=compile_sec, times=[], cpu=[])
    for r in range(rounds):
        for run in runs.values():
            t, c = time.perf_counter(), time.process_time()
            run["state"], _ = run["step"](run["state"], cohort, jax.random.key(2 + r))
            jax.block_until_ready(run["state"])
            run["times"].append(time.perf_counter() - t)
            run["cpu"].append(time.process_time() - c)
    plain = runs["plain"]
    for name, run in runs.items():
        sec = statistics.median(run["times"])
        fields = {
            "bench": "dpsgd_overhead",
            "system": "fljax",
            "workload": args.workload,
            "variant": name,
            "model": type(model).__name__,
            "clients": clients,
            "num_examples": num_examples,
            "batch_size": batch,
            "sec_per_round": round(sec, 4),
            "examples_per_sec": round(clients * num_examples / sec, 1),
            "round_times": [round(t, 3) for t in run["times"]],
            "compile_sec": round(run["compile"], 2),
            "rounds": rounds,
        }
        if name != "plain":
            pairs = zip(run["times"], plain["times"], strict=True)
            cpu_pairs = zip(run["cpu"], plain["cpu"], strict=True)
            fields["ratio_to_plain"] = round(statistics.median(t / p for t, p in pairs), 3)
            fields["cpu_ratio_to_plain"] = round(statistics.median(c / p for c, p in cpu_pairs), 3)
        fields.update(
            device=jax.devices()[0].platform,
            jax=jax.__version__,
            load_average=[round(v, 2) for v in os.getloadavg()],
        )
        print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    main()
