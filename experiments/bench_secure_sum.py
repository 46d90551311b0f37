"""Secure sums side by side: plaintext, secure aggregation (the real protocol) and CKKS encryption.

One round of summing LeNet-sized client updates (62,006 float32 parameters,
the seed_cifar CNN, plus the weight) at 10 and 100 clients, all three backends
in one process, the same updates for each:

* ``plaintext``: each client sends its float32 update and weight
  (``ndarray.tobytes``); the server parses and adds them.
* ``secagg``: the fixed-point encoding of :mod:`fljax.secagg.encoding`
  (``SecAggConfig()``: clip 1, 16 fractional bits, 16 weight bits), then
  :func:`fljax.secagg.protocol.run_round` (Bonawitz et al. 2017, complete
  graph, no dropout, every message signed).
* ``he``: the same encoding, then :func:`fljax.secagg.he.run_round` (CKKS,
  TenSEAL, ``N = 8192``, one 60-bit data prime, fresh keys): clients encrypt,
  the server adds ciphertexts, the key holder decrypts and rounds.

Seconds are wall-clock seconds of one thread, medians over ``--rounds`` rounds. ``client_sec`` is the mean per
client from its encoded vector (its float32 vector for plaintext) to the
bytes it sends; the encoding itself, identical for ``secagg`` and ``he``, is
reported apart (``encode_sec``, per client). ``server_sec`` is the server's
time to the sum (for ``he`` without the key holder's decryption, reported as
``keyholder_sec``). ``client_bytes_received`` is what one client downloads for
the sum's sake: the protocol's server messages for ``secagg``, the public key
for ``he`` (once per key, reusable across rounds), nothing for plaintext. The
three sums are checked against each other (exact integer sums).

Prints one JSON line per measurement (``bench: "secure_sum"``; BENCHMARKS.md),
with ``*_ratio`` fields against plaintext, and writes
experiments/results/bench_secure_sum.{md,json} unless ``--quick``.

Usage:
  python experiments/bench_secure_sum.py          # 10 and 100 clients (about 3 minutes on a shared 2-core CPU)
  python experiments/bench_secure_sum.py --quick  # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fljax.secagg import SecAggConfig, encoding, he, protocol

DIM = 62_006  # LeNet (fljax.models.LeNet) parameters
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _median_sec(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def plaintext(x: np.ndarray, w: np.ndarray) -> tuple[dict, np.ndarray]:
    n, dim = x.shape
    msgs = [np.append(x[u], w[u]).astype(np.float32).tobytes() for u in range(n)]
    client_sec = _median_sec(lambda: np.append(x[0], w[0]).astype(np.float32).tobytes())

    def server():
        return np.sum([np.frombuffer(m, np.float32) for m in msgs], axis=0, dtype=np.float32)

    total = server()
    return {
        "client_sec": client_sec,
        "server_sec": _median_sec(server),
        "client_bytes_sent": len(msgs[0]),
        "client_bytes_received": 0,
        "server_bytes_received": sum(len(m) for m in msgs),
    }, total


def encode(x: np.ndarray, w: np.ndarray, cfg: SecAggConfig, bits: int) -> tuple[np.ndarray, float]:
    fn = jax.jit(lambda x, w, key: encoding.encode(x, w, key, cfg, bits).values)
    warm_key, key = jax.random.split(jax.random.key(0))
    fn(jnp.asarray(x), jnp.asarray(w), warm_key).block_until_ready()  # compile
    start = time.perf_counter()
    values = np.asarray(fn(jnp.asarray(x), jnp.asarray(w), key).block_until_ready())
    return values, (time.perf_counter() - start) / x.shape[0]


def secagg(values: np.ndarray, cfg: SecAggConfig, bits: int) -> tuple[dict, np.ndarray]:
    n = values.shape[0]
    result = protocol.run_round(values, cfg)
    s = result.stats
    return {
        "client_sec": s["client_sec"],
        "server_sec": s["server_sec"],
        "client_bytes_sent": int(s["client_bytes_sent"]),
        "client_bytes_received": int(s["server_bytes_sent"] / n),
        "server_bytes_received": int(s["server_bytes_received"]),
        "bits": bits,
        "threshold": s["threshold"],
    }, result.total


def encrypted(
    values: np.ndarray, cfg: SecAggConfig, bits: int, he_cfg: he.HEConfig
) -> tuple[dict, np.ndarray]:
    half = 1 << (bits - 1)
    signed = ((values.astype(np.int64) + half) % (1 << bits)) - half
    max_abs = max(cfg.max_abs_int, cfg.weight_levels)
    result = he.run_round(signed, he_cfg, max_abs=max_abs)
    s = dict(result.stats)
    s.update(poly_modulus_degree=he_cfg.poly_modulus_degree, data_primes=he_cfg.data_primes, bits=bits)
    del s["num_clients"]
    return s, (result.total % (1 << bits)).astype(np.uint32)


def _median_rounds(fn, rounds: int) -> tuple[dict, np.ndarray]:
    """Run ``fn`` (a fresh round each time) ``rounds`` times: the median of each number, the last sum."""
    runs = [fn() for _ in range(rounds)]
    stats = {
        k: (float(np.median([r[0][k] for r in runs])) if isinstance(v, float) else v)
        for k, v in runs[0][0].items()
    }
    return stats, runs[-1][1]


def run(n: int, dim: int, he_cfg: he.HEConfig, rng: np.random.Generator, rounds: int) -> list[dict]:
    cfg = SecAggConfig()
    bits = cfg.ring_bits(n)
    x = (rng.standard_normal((n, dim)) * 0.01).astype(np.float32)
    w = np.ones(n, np.float32)
    rows = {}
    rows["plaintext"], plain_total = plaintext(x, w)
    values, encode_sec = encode(x, w, cfg, bits)
    rows["secagg"], sa_total = _median_rounds(lambda: secagg(values, cfg, bits), rounds)
    rows["he"], he_total = _median_rounds(lambda: encrypted(values, cfg, bits, he_cfg), rounds)
    ring_total = values.sum(axis=0, dtype=np.uint64) % (1 << bits)
    if not (np.array_equal(sa_total, ring_total) and np.array_equal(he_total, ring_total)):
        raise AssertionError("secure aggregation, encryption and the plain ring sum disagree")
    decoded, _ = encoding.decode(jnp.asarray(he_total), cfg, bits)
    err = float(np.max(np.abs(np.asarray(decoded) - plain_total[:-1])))
    if err > n / cfg.scale_value:
        raise AssertionError(f"decoded sum off the float sum by {err} > n / scale")
    base = rows["plaintext"]
    out = []
    for backend, r in rows.items():
        line = {"bench": "secure_sum", "backend": backend, "clients": n, "dim": dim}
        line.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
        if backend != "plaintext":
            line["encode_sec"] = round(encode_sec, 6)
            line["decoded_max_abs_error"] = err
        for field in ("client_sec", "server_sec", "client_bytes_sent"):
            line[f"{field}_ratio"] = round(r[field] / base[field], 1)
        line.update(device="cpu", load_avg_1min=round(os.getloadavg()[0], 1))
        line.update(python=platform.python_version(), jax=jax.__version__)
        out.append(line)
    return out


def write_results(lines: list[dict], command: str, wall: float, rounds: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_secure_sum.json").write_text(json.dumps(lines, indent=1) + "\n")
    rows = [
        "| clients | backend | client s | server s | key holder s | client bytes sent | client bytes received |"
        " client s / plaintext | server s / plaintext | bytes sent / plaintext |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        holder = f"{r['keyholder_sec']:.3g}" if "keyholder_sec" in r else "-"
        rows.append(
            f"| {r['clients']} | {r['backend']} | {r['client_sec']:.3g} | {r['server_sec']:.3g} | {holder} | "
            f"{int(r['client_bytes_sent']):,} | {int(r['client_bytes_received']):,} | "
            f"{r['client_sec_ratio']:,} | {r['server_sec_ratio']:,} | {r['client_bytes_sent_ratio']:,} |"
        )
    versus = ["| clients | client s | server s (HE: + key holder) | client bytes sent |", "|---|---|---|---|"]
    for n in sorted({r["clients"] for r in lines}):
        sa, enc = (
            next(r for r in lines if r["clients"] == n and r["backend"] == b) for b in ("secagg", "he")
        )
        server = (enc["server_sec"] + enc["keyholder_sec"]) / sa["server_sec"]
        versus.append(
            f"| {n} | {enc['client_sec'] / sa['client_sec']:.1f} | {server:.2f} | "
            f"{enc['client_bytes_sent'] / sa['client_bytes_sent']:.1f} |"
        )
    text = f"""# Secure sums side by side: plaintext, secure aggregation, CKKS encryption

Command: `{command}` (2-core shared CPU VM, Python {platform.python_version()}, one thread per
party; total wall time {wall:.0f} s; 1-minute load average {os.getloadavg()[0]:.1f} at the end, as the
machine is shared). Medians over {rounds} rounds (fresh keys each), LeNet-sized updates
({DIM:,} float32 + weight).
Ratios are against plaintext in the same run. `client s`: one client's computing time from its
encoded vector to its bytes (encoding apart: `encode_sec` in the JSON); `server s`: time to the
sum (HE: adding ciphertexts; decryption by the key holder is its own column); bytes received: the
protocol's server messages (secagg), the public key, once per key (HE). All three sums are checked
equal (exact integers).

{chr(10).join(rows)}

HE against secure aggregation (ratios, same run):

{chr(10).join(versus)}
"""
    (RESULTS / "bench_secure_sum.md").write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (small vectors, no files)")
    p.add_argument("--clients", default="10,100", help="comma-separated cohort sizes")
    p.add_argument("--rounds", type=int, default=3, help="rounds per backend; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.quick:
        settings, he_cfg, args.rounds = [(4, 3000)], he.HEConfig(poly_modulus_degree=4096), 1
    else:
        settings, he_cfg = [(int(c), DIM) for c in args.clients.split(",")], he.HEConfig()
    start, lines = time.perf_counter(), []
    for n, dim in settings:
        for line in run(n, dim, he_cfg, rng, args.rounds):
            print(json.dumps(line), flush=True)
            lines.append(line)
    if not args.quick:
        command = "python experiments/bench_secure_sum.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        write_results(lines, command.strip(), time.perf_counter() - start, args.rounds)


if __name__ == "__main__":
    main()
