"""Compression study: MNIST accuracy against cumulative megabytes uploaded.

Command (writes experiments/results/compression.{md,json,png}; about 8 minutes on 2 CPU cores
shared with other jobs, at nice 10, jax 0.10.2):
  nice -n 10 python experiments/compression_study.py

Setting: MNIST (the offline copy found through FLJAX_DATA_DIR or ../shared/data/mnist) split IID
into 100 clients of 600 training examples. Each round 10 clients chosen uniformly without
replacement run 1 local epoch of SGD (learning rate 0.1, batch 50) on a 784-100-10 MLP (79,510
float32 parameters) and upload their delta through a compressor
(:mod:`fljax.compression`); the server averages the DECODED deltas, weighted by examples (FedAvg,
server learning rate 1). Every variant sees the same clients and the same local-training keys
each round (seed 0). Bytes are the exact sizes of the packed upload formats
(``Compressor.num_bytes``, checked against ``len(pack(...))`` in tests/test_compression.py);
the download is the float32 model, the same for every variant. Test accuracy on the 10,000
MNIST test images every ``--eval-every`` rounds. ``--render-only`` rewrites the .md and .png from
the .json.

Measured (experiments/results/compression.md, 490 s on 2 shared CPU cores): final accuracy and
upload per client and round: float32 0.9416 (318.0 KB); QSGD s=1 0.9414 (20.5 KB), s=7 0.9413
(40.4 KB); rotation + 1 bit 0.9428 (10.3 KB), 2 bits 0.9422, 4 bits 0.9416; top-k 1% 0.9147
without and 0.9219 with error feedback (6.4 KB).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np
import optax

from fljax import client, evaluation, models
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.compression import compressors, rounds
from fljax.data import ClientStates, FederatedData, partition, sampling
from fljax.data.datasets import images

HERE = pathlib.Path(__file__).resolve().parent
BUDGETS_MB = (2.0, 8.0, 32.0, 128.0)


def variants(dim: int, top_fraction: float) -> list[tuple[str, str, compressors.Compressor]]:
    """``(label, wrapper, compressor)``: wrapper ``"compressed"`` or ``"error_feedback"``."""
    k = max(1, round(top_fraction * dim))
    pct = f"{100 * top_fraction:g}%"
    return [
        ("none (float32)", "compressed", compressors.identity()),
        ("QSGD s=1, bucket 512 (2 bits)", "compressed", compressors.qsgd(1, bucket_size=512)),
        ("QSGD s=7, bucket 512 (4 bits)", "compressed", compressors.qsgd(7, bucket_size=512)),
        ("rotation + 1 bit", "compressed", compressors.rotated_quantization(1, block_size=16384)),
        ("rotation + 2 bits", "compressed", compressors.rotated_quantization(2, block_size=16384)),
        ("rotation + 4 bits", "compressed", compressors.rotated_quantization(4, block_size=16384)),
        (f"top-k {pct}, no error feedback", "compressed", compressors.top_k(k)),
        (f"top-k {pct} + error feedback", "error_feedback", compressors.top_k(k)),
    ]


def run_variant(label, wrapper, compressor, *, data, test, model, params, args) -> dict:
    local = client.local_sgd(model, optax.sgd(args.learning_rate), batch_size=args.batch_size)
    wrap = rounds.compressed if wrapper == "compressed" else rounds.error_feedback
    update = wrap(local, compressor)
    algo = fedavg.fedavg(update)
    states = ClientStates(update.init(params), data.num_clients) if wrapper == "error_feedback" else None
    step = jax.jit(algo.update)
    state = algo.init(params)
    run = fl_random.run_key(args.seed)
    curve, mb_up, mb_down = [], 0.0, 0.0
    t0 = time.perf_counter()
    for r in range(args.rounds):
        key = fl_random.round_key(run, r)
        ids, mask = sampling.uniform(fl_random.stream(key, "sample"), data.num_clients, args.cohort)
        cohort = data.cohort(ids, client_mask=mask)
        if states is not None:
            cohort = states.attach(cohort)
        state, metrics = step(state, cohort, key)
        if states is not None:
            state = states.scatter(cohort, state)
        n = int(metrics["num_clients"])
        mb_up += float(metrics["client_upload_bytes_weighted_mean"]) * n / 1e6
        mb_down += float(metrics["client_download_bytes_weighted_mean"]) * n / 1e6
        if (r + 1) % args.eval_every == 0 or r + 1 == args.rounds:
            acc = evaluation.evaluate(model, state.params, *test)["accuracy"]
            curve.append({"round": r + 1, "upload_mb": mb_up, "download_mb": mb_down, "accuracy": acc})
    per_client = compressors.upload_bytes(compressor, params)
    return {
        "run": label,
        "upload_bytes_per_client_round": per_client,
        "compression_ratio": compressors.download_bytes(params) / per_client,
        "final_accuracy": curve[-1]["accuracy"],
        "total_upload_mb": mb_up,
        "total_download_mb": mb_down,
        "at_budget": {str(b): _at_budget(curve, b) for b in BUDGETS_MB},
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def _at_budget(curve: list[dict], budget_mb: float) -> float | None:
    """Accuracy of the last evaluation whose cumulative upload is within the budget."""
    inside = [c["accuracy"] for c in curve if c["upload_mb"] <= budget_mb + 1e-9]
    return inside[-1] if inside else None


def write(rows: list[dict], args, command: str, dim: int, down: int) -> None:
    results = pathlib.Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    facts = {
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "command": command,
        "num_params": dim,
        "download_bytes_per_client_round": down,
        "settings": vars(args),
    }
    results.with_suffix(".json").write_text(json.dumps({"rows": rows, "run": facts}, indent=1) + "\n")
    budgets = " | ".join(f"acc. at {b:g} MB" for b in BUDGETS_MB)
    lines = [
        "# Compression: MNIST accuracy against megabytes uploaded",
        "",
        f"Command: `{command}` ({sum(r['seconds'] for r in rows):.0f} s on {os.cpu_count()} shared CPU"
        f" cores, jax {jax.__version__}).",
        "",
        f"MNIST, IID over {args.num_clients} clients of 600 examples, {args.cohort} clients a round"
        f" (uniform), {args.rounds} rounds, 1 local epoch of SGD (lr {args.learning_rate}, batch"
        f" {args.batch_size}), 784-100-10 MLP ({dim:,} float32 parameters), FedAvg over the decoded"
        " uploads; one seed, the same clients and local-training keys for every row. Upload bytes are"
        " the exact packed sizes (fljax.compression); every row downloads the float32 model,"
        f" {down:,} bytes per client and round ({rows[0]['total_download_mb']:.1f} MB in total)."
        " Accuracy at a budget: the last evaluation (every"
        f" {args.eval_every} rounds) whose cumulative upload is within it; '-' where the first"
        " evaluation is already past it; '*' where the run ended below the budget (its final"
        " accuracy).",
        "",
        f"| compressor | final accuracy | KB per client and round | ratio | total MB uploaded | {budgets} |",
        "|---|---|---|---|---|" + "---|" * len(BUDGETS_MB),
    ]
    for r in rows:
        at = " | ".join(_budget_cell(r, b) for b in BUDGETS_MB)
        lines.append(
            f"| {r['run']} | {r['final_accuracy']:.4f} | {r['upload_bytes_per_client_round'] / 1e3:.2f} |"
            f" {r['compression_ratio']:.1f}x | {r['total_upload_mb']:.2f} | {at} |"
        )
    lines += ["", "Curves: `compression.json` (`rows[i].curve`)."]
    if _plot(rows, results.with_suffix(".png")):
        lines += ["", "![accuracy against MB uploaded](compression.png)"]
    else:
        lines += ["", "matplotlib is not installed: no plot."]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _budget_cell(row: dict, budget_mb: float) -> str:
    acc = row["at_budget"][str(budget_mb)]
    if acc is None:
        return "-"
    return f"{acc:.4f}" + ("*" if row["total_upload_mb"] < budget_mb else "")


def _plot(rows: list[dict], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        c = r["curve"]
        ax.plot([p["upload_mb"] for p in c], [p["accuracy"] for p in c], marker=".", label=r["run"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB uploaded (all clients)")
    ax.set_ylabel("MNIST test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--top-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only the variants at these indices")
    parser.add_argument("--results", default=str(HERE / "results" / "compression"))
    parser.add_argument("--render-only", action="store_true", help="rewrite .md/.png from the .json")
    args = parser.parse_args(argv)
    if args.render_only:
        saved = json.loads(pathlib.Path(args.results).with_suffix(".json").read_text())
        facts = saved["run"]
        stored = argparse.Namespace(**dict(facts["settings"], results=args.results))
        write(
            saved["rows"],
            stored,
            facts["command"],
            facts["num_params"],
            facts["download_bytes_per_client_round"],
        )
        return saved["rows"]
    command = "python experiments/compression_study.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None:
        import sys

        command = "python experiments/compression_study.py " + " ".join(sys.argv[1:])
    x, y = images.mnist("train", data_dir=args.data_dir, source="local")
    test = images.mnist("test", data_dir=args.data_dir, source="local")
    run = fl_random.run_key(args.seed)
    parts = partition.iid(y, args.num_clients, fl_random.stream(run, "data"))
    data = FederatedData.from_clients([(x[i], y[i].astype(np.int32)) for i in parts.indices], num_classes=10)
    model = models.MLP(hidden=(100,), num_classes=10)
    params = models.init_params(model, x.shape[1:], fl_random.stream(run, "init"))
    dim = compressors.num_params(params)
    chosen = variants(dim, args.top_fraction)
    if args.only is not None:
        chosen = [chosen[int(i)] for i in args.only]
    rows = []
    for label, wrapper, comp in chosen:
        row = run_variant(label, wrapper, comp, data=data, test=test, model=model, params=params, args=args)
        print(
            f"{label}: acc {row['final_accuracy']:.4f}, {row['total_upload_mb']:.2f} MB, {row['seconds']:.0f} s",
            flush=True,
        )
        rows.append(row)
    write(rows, args, command.strip(), dim, compressors.download_bytes(params))
    return rows


if __name__ == "__main__":
    main()
