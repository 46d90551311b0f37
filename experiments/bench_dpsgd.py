"""DP-SGD overhead: one client's local epoch with per-example clipping + noise vs plain local SGD.

Command:
  .venv/bin/python experiments/bench_dpsgd.py            # MLP 784-200-200-62, 500 examples, batch 32
  .venv/bin/python experiments/bench_dpsgd.py --quick    # seconds-long smoke run

Prints one JSON line per measurement, e.g.
  {"bench": "dpsgd_overhead", "variant": "dp_sgd", "sec_per_update": ..., "ratio_to_plain": ...}
``sec_per_update`` is the median over repeats after one warm-up (compilation excluded,
reported as ``compile_sec``). The clients are vmapped as in a round (``clients``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    from fljax import client, simulation
    from fljax.base import ClientData, Cohort
    from fljax.models import zoo
    from fljax.privacy import DPSGDConfig, dp_sgd_client

    quick = args.quick
    num_examples, batch, hidden, classes = (64, 16, (32,), 10) if quick else (500, 32, (200, 200), 62)
    clients = args.clients or (2 if quick else 10)
    repeats = args.repeats or (2 if quick else 5)
    model = zoo.MLP(hidden=hidden, num_classes=classes)
    keys = jax.random.split(jax.random.key(0), 4)
    params = zoo.init_params(model, (784,), keys[0])
    x = jax.random.normal(keys[1], (clients, num_examples, 784), jnp.float32)
    y = jax.random.randint(keys[2], (clients, num_examples), 0, classes, jnp.int32)
    cohort = Cohort(
        ClientData(x, y, jnp.ones((clients, num_examples), bool)),
        jnp.arange(clients, dtype=jnp.int32),
        jnp.ones((clients,), bool),
    )
    opt = optax.sgd(0.01, momentum=0.9)
    cfg = DPSGDConfig(l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch, num_examples=num_examples)
    variants = {
        "plain": client.local_sgd(model, opt, batch_size=batch),
        "dp_sgd": dp_sgd_client(model, opt, cfg),
    }
    results = {}
    round_keys = jax.random.split(keys[3], 1 + repeats)
    for name, update in variants.items():
        fn = jax.jit(lambda p, c, k, u=update: simulation.run_clients(u, p, c, k).delta)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, cohort, jax.random.clone(round_keys[0])))
        compile_sec = time.perf_counter() - t0
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, cohort, jax.random.clone(round_keys[1 + r])))
            times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times), compile_sec)
    plain = results["plain"][0]
    for name, (sec, compile_sec) in results.items():
        print(
            json.dumps(
                {
                    "bench": "dpsgd_overhead",
                    "system": "fljax",
                    "variant": name,
                    "model": f"mlp{hidden}",
                    "clients": clients,
                    "num_examples": num_examples,
                    "batch_size": batch,
                    "sec_per_update": sec,
                    "examples_per_sec": clients * num_examples / sec,
                    "ratio_to_plain": sec / plain,
                    "compile_sec": compile_sec,
                    "repeats": repeats,
                    "device": jax.devices()[0].platform,
                    "jax": jax.__version__,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
