"""Distributed DP at each ring width: granularity, noise, sensitivity, decoding error and epsilon.

Command (prints the two tables of docs/privacy.md, discrete Gaussian and Skellam):
  python experiments/distributed_dp_table.py [--bits 12 14 16 18 20] [--keys 5]

Setting: 100 clients per round, all present (``min_clients = 100``), ``d = 1000`` (padded to
1024), ``C = 1``, ``z = 1``, population 10,000, random updates of L2 norm 0.9, the heuristic
``gamma`` (``k_stddevs = 4``). Error: RMS over coordinates and keys of the decoded sum minus the
clipped sum, against the continuous Gaussian's noise std ``z C = 1``; wrapped: coordinates of the
integer sum outside the ring, over all keys. Epsilon at delta = 1e-5: Poisson sampling at
``q = 0.01`` for 100 rounds (amplified), and one round without sampling.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from fljax import privacy
from fljax.privacy import distributed

N, D = 100, 1000


def row(bits: int, mechanism: str, keys: int) -> dict:
    cfg = privacy.DistributedDPConfig(
        clip_norm=1.0, noise_multiplier=1.0, dim=D, cohort_size=N, population_size=10_000,
        bits=bits, min_clients=N, delta=1e-5, mechanism=mechanism,
    )  # fmt: skip
    agg = privacy.distributed_dp(cfg, masking=None)
    step = jax.jit(lambda x, k: agg.aggregate((), {"w": x}, jnp.ones((N,), jnp.float32), k))
    sq, wrapped = [], 0
    for i in range(keys):
        x = jax.random.normal(jax.random.key(1000 + i), (N, D), jnp.float32)
        x = 0.9 * x / jnp.linalg.norm(x, axis=1, keepdims=True)
        _, mean, metrics = step(x, jax.random.key(i))
        err = np.asarray(mean["w"], np.float64) * N - np.asarray(x, np.float64).sum(0)
        sq.append(np.mean(err**2))
        wrapped += int(metrics["dp_wrapped_coordinates"])
    one_round = cfg.replace(amplification=False)
    return {
        "bits": bits,
        "gamma": cfg.gamma_value,
        "s": cfg.local_sigma,
        "delta_2": cfg.sensitivity,
        "rms_error": math.sqrt(float(np.mean(sq))),
        "wrapped": wrapped,
        "epsilon_sampled": distributed.epsilon(cfg, 100),
        "epsilon_one_round": distributed.epsilon(one_round, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 14, 16, 18, 20])
    parser.add_argument("--keys", type=int, default=5)
    args = parser.parse_args(argv)
    for mechanism in distributed.MECHANISMS:
        print(f"\n{mechanism}\n")
        print(
            "| bits | gamma | s | Delta_2 | RMS error | wrapped | epsilon, q = 0.01, 100 rounds |"
            " epsilon, 1 round, no sampling |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for bits in args.bits:
            r = row(bits, mechanism, args.keys)
            s = f"{r['s']:.3g}" if r["s"] < 1000 else f"{r['s']:.0f}"
            print(
                f"| {bits} | {r['gamma']:.3g} | {s} | {r['delta_2']:.4f} | {r['rms_error']:.3f} | "
                f"{r['wrapped']} | {r['epsilon_sampled']:.4f} | {r['epsilon_one_round']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
