"""Gradient inversion of one client's update on CIFAR-10 (JPEG) with LeNet: how much do DP and secure sums hide?

Command (the results in experiments/results/inversion.md; 2-core CPU)::

    nice -n 10 .venv/bin/python experiments/inversion_study.py

Attack iterations: 800 on FedSGD updates, 200 on FedAvg updates (each one
unrolls the 5 local steps); about 10 minutes on a shared 2-core CPU. ``--quick``
runs a smoke version (batch size 1, 2 targets, a few attack steps, minutes of
compilation) and writes to ``/tmp/inversion_quick`` unless ``--out`` says otherwise.

Setting: the server attacks ONE round at the untrained LeNet (seed 0). Each
target client holds ``B`` CIFAR-10 training images (B in 1, 4, 16) and sends
either a FedSGD update (the gradient of its mean loss,
:func:`fljax.client.local_gradient`) or a FedAvg update (5 full-batch SGD
steps at learning rate 0.05, :func:`fljax.client.local_sgd`). The attacker
infers the labels from the output bias (:func:`fljax.leakage.inversion.infer_labels`)
and runs Inverting Gradients (:func:`fljax.leakage.inversion.geiping`) on
what it observes under each threat model:

* ``none``: the target's update;
* ``dp_z{z}``: the update clipped to ``C`` plus Gaussian noise of std ``z C``
  (DP-FedAvg's noised sum for a cohort of one), ``C`` the median update norm
  of 99 other clients of the cell (what adaptive clipping at quantile 0.5
  tracks), z in 0.01, 0.1, 1;
* ``sum10`` / ``sum100``: only the secure sum (:func:`fljax.secagg.secure_sum`)
  of the target's and 9 / 99 other clients' updates, attacked as if it were
  the target's (labels inferred from the sum divided by the cohort size).

Reported per cell: mean over targets of the PSNR and SSIM of the reconstructed
images matched to the target's images (PSNR-maximising assignment), and the
share of the target's labels recovered.
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
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fljax import client, models, secagg  # noqa: E402
from fljax import random as fl_random  # noqa: E402
from fljax.data.datasets import cifar10  # noqa: E402
from fljax.leakage import image_metrics, inversion  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
FEDAVG_LR = 0.05
FEDAVG_STEPS = 5
SUM_SIZES = (10, 100)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--out", default=None, help="output folder (default experiments/results)")
    p.add_argument("--targets", type=int, default=3, help="target clients per cell")
    p.add_argument("--steps-fedsgd", type=int, default=800, help="attack iterations on FedSGD updates")
    p.add_argument("--steps-fedavg", type=int, default=200, help="attack iterations on FedAvg updates")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--noise", default="0.01,0.1,1", help="DP noise multipliers z")
    p.add_argument("--data-dir", default=None, help="folder of cifar10_jpeg_q75.tar.gz")
    return p.parse_args()


def _label_recall(inferred: np.ndarray, true: np.ndarray) -> float:
    """Share of the true labels (as a multiset) that the inferred labels contain."""
    k = max(int(true.max()), int(inferred.max())) + 1
    return float(
        np.minimum(np.bincount(inferred, minlength=k), np.bincount(true, minlength=k)).sum() / true.size
    )


def _to_pixels(x: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(x) * cifar10.STD + cifar10.MEAN, 0.0, 1.0).astype(np.float32)


def save_grid(path: pathlib.Path, true: np.ndarray, rows: dict[str, np.ndarray], title: str) -> None:
    """Picture grid: the true images on the first row, one row per reconstruction (pixels in [0, 1])."""
    images = true.reshape(-1, *true.shape[-3:])
    n = images.shape[0]
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.1 * n + 1.5, 1.15 * (1 + len(rows))), squeeze=False)
    for r, (name, recon) in enumerate([("true", images), *rows.items()]):
        recon = recon.reshape(-1, *true.shape[-3:])
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(recon[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = _parse()
    out = (
        pathlib.Path(args.out)
        if args.out
        else (pathlib.Path("/tmp/inversion_quick") if args.quick else RESULTS)
    )
    out.mkdir(parents=True, exist_ok=True)
    batch_sizes = (1,) if args.quick else tuple(int(b) for b in args.batch_sizes.split(","))
    dp_z = tuple(float(z) for z in args.noise.split(","))
    num_targets = 2 if args.quick else args.targets
    steps = (
        {"fedsgd": 10, "fedavg": 5}
        if args.quick
        else {"fedsgd": args.steps_fedsgd, "fedavg": args.steps_fedavg}
    )
    sum_sizes = (3,) if args.quick else SUM_SIZES
    try:
        raw = cifar10.load_raw(args.data_dir, source="jpeg")
    except FileNotFoundError as e:
        print(f"skipping the inversion study: CIFAR-10 JPEG archive not found ({e})")
        return 0
    start = time.time()
    run_key = fl_random.run_key(0)
    model = models.LeNet()
    params = models.init_params(model, (32, 32, 3), fl_random.stream(run_key, "init"))
    round_key = fl_random.round_key(run_key, 0)
    attack_key = fl_random.stream(run_key, "eval")
    rng = fl_random.host_rng(fl_random.stream(run_key, "data"))
    lo = (0.0 - cifar10.MEAN) / cifar10.STD
    hi = (1.0 - cifar10.MEAN) / cifar10.STD
    num_others = max(sum_sizes) - 1
    # The attacker's estimate of the mean softmax: the model on 64 random images in the box.
    noise_images = lo + (hi - lo) * rng.uniform(size=(64, 32, 32, 3)).astype(np.float32)
    mean_probs = np.asarray(inversion.mean_probabilities(model.apply, params, jnp.asarray(noise_images)))

    results = []
    for b, algorithm in [(size, alg) for size in batch_sizes for alg in ("fedsgd", "fedavg")]:
        if algorithm == "fedsgd":
            make_update = lambda b: client.local_gradient(model, loss_fn=inversion.cross_entropy)  # noqa: E731
            grad_scale = 1.0
        else:
            make_update = lambda b: client.local_sgd(  # noqa: E731
                model,
                optax.sgd(FEDAVG_LR),
                batch_size=b,
                num_epochs=FEDAVG_STEPS,
                loss_fn=inversion.cross_entropy,
            )
            grad_scale = FEDAVG_LR * FEDAVG_STEPS
        config = inversion.geiping(num_steps=steps[algorithm], tv_weight=0.1, learning_rate=0.1)
        cell_start = time.time()
        idx = rng.choice(raw["x_train"].shape[0], (num_targets + num_others) * b, replace=False)
        x_all = cifar10.normalize(raw["x_train"][idx]).reshape(-1, b, 32, 32, 3)
        y_all = raw["y_train"][idx].reshape(-1, b).astype(np.int32)
        ids = jnp.arange(x_all.shape[0], dtype=jnp.int32)
        keys = fl_random.client_keys(fl_random.stream(round_key, "clients"), ids)
        client_update = make_update(b)
        per_client = jax.jit(
            jax.vmap(lambda x, y, k, u=client_update: inversion.update_function(u, params, k)(x, y))
        )
        deltas = per_client(jnp.asarray(x_all), jnp.asarray(y_all), keys)
        norms = np.asarray(jax.vmap(optax.tree.norm)(deltas))
        clip_norm = float(np.median(norms[num_targets:]))
        max_abs = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(deltas))
        sa_config = secagg.SecAggConfig(clip_range=float(2.0 ** np.ceil(np.log2(max_abs))), frac_bits=16)
        secure_sum = secagg.secure_sum(sa_config)
        sum_fn = jax.jit(lambda d, k, secure_sum=secure_sum: inversion.summed(d, k, sum=secure_sum))
        noise_fn = jax.jit(inversion.clip_and_noise, static_argnums=(1, 2))

        # The attacker simulates the client with the target's key (shuffling; irrelevant at full batch).
        def attack(observed, labels, client_key, init_key, client_update=client_update, b=b, config=config):
            update = inversion.update_function(client_update, params, client_key)
            return inversion.reconstruct(
                update, observed, labels, (b, 32, 32, 3), (lo, hi), init_key, config=config
            )

        attack_batch = jax.jit(jax.vmap(attack))
        target = lambda t, d=deltas: jax.tree.map(lambda a: a[t], d)  # noqa: E731
        threats = {"none": lambda t, k, target=target: target(t)}
        for z in dp_z:
            threats[f"dp_z{z:g}"] = lambda t, k, z=z, c=clip_norm, f=noise_fn, target=target: f(
                target(t), c, z, k
            )
        for n in sum_sizes:
            others = np.concatenate([[0], num_targets + np.arange(n - 1)])

            def observe_sum(t, k, others=others, f=sum_fn, d=deltas):
                members = others.copy()
                members[0] = t
                return f(jax.tree.map(lambda a: a[members], d), k)

            threats[f"sum{n}"] = observe_sum
        grid_rows = {}
        for threat, observe in threats.items():
            scale = grad_scale * (int(threat[3:]) if threat.startswith("sum") else 1)
            observed, labels = [], []
            for t in range(num_targets):
                agg_key = jax.random.fold_in(fl_random.stream(round_key, "aggregate"), t)
                obs = observe(t, agg_key)
                observed.append(obs)
                bias = np.asarray(inversion.output_bias(obs, 10)) / scale
                labels.append(inversion.infer_labels(bias, b, mean_probs))
            observed = jax.tree.map(lambda *a: jnp.stack(a), *observed)
            init_keys = jax.vmap(lambda t: jax.random.fold_in(attack_key, t))(jnp.arange(num_targets))
            rec = attack_batch(observed, jnp.asarray(np.stack(labels)), keys[:num_targets], init_keys)
            recon = _to_pixels(rec.x)
            true = _to_pixels(x_all[:num_targets])
            grey_psnr = float(np.mean(image_metrics.psnr(np.full_like(true, 0.5), true)))
            matches = [image_metrics.match(recon[t], true[t]) for t in range(num_targets)]
            row = {
                "algorithm": algorithm,
                "batch_size": b,
                "threat": threat,
                "psnr": float(np.mean([m.psnr.mean() for m in matches])),
                "ssim": float(np.mean([m.ssim.mean() for m in matches])),
                "psnr_per_target": [float(m.psnr.mean()) for m in matches],
                "label_recall": float(
                    np.mean([_label_recall(labels[t], y_all[t]) for t in range(num_targets)])
                ),
                "grey_psnr": grey_psnr,
                "attack_steps": config.num_steps,
                "clip_norm": clip_norm,
                "median_update_norm": clip_norm,
                "target_update_norms": [float(v) for v in norms[:num_targets]],
            }
            results.append(row)
            print(
                f"{algorithm:6s} B={b:2d} {threat:9s} PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.3f} "
                f"labels {row['label_recall']:.2f}  [{time.time() - start:.0f}s]",
                flush=True,
            )
            grid_rows[threat] = np.stack([recon[t][m.order] for t, m in enumerate(matches)])
        if algorithm == "fedsgd" and b in (1, 4):
            save_grid(
                out / f"inversion_fedsgd_b{b}.png",
                true,
                grid_rows,
                f"FedSGD, LeNet, CIFAR-10 (JPEG), batch {b}:\ntrue (top), reconstructions per threat model",
            )
        print(f"cell {algorithm} B={b}: {time.time() - cell_start:.0f}s", flush=True)
        _write(out, args, raw, steps, num_targets, sum_sizes, results, time.time() - start)
    print(f"wrote {out}/inversion.md, .json ({time.time() - start:.0f}s)")
    return 0


def _write(out, args, raw, steps, num_targets, sum_sizes, results, runtime) -> None:
    """Write the md and json (after every cell, so an interrupted run keeps what it measured)."""
    meta = {
        "command": " ".join(["nice -n 10 .venv/bin/python experiments/inversion_study.py", *sys.argv[1:]]),
        "hardware": f"2-core CPU ({platform.processor() or platform.machine()}), shared",
        "runtime_s": round(runtime, 1),
        "jax": jax.__version__,
        "data": str(raw["source"]),
        "model": "LeNet (untrained, seed 0)",
        "attack": "Inverting Gradients: cosine distance, TV weight 0.1, signed Adam lr 0.1, step decay, box",
        "attack_steps": steps,
        "labels": "inferred from the output-bias gradient (infer_labels), never given",
        "fedavg": {"learning_rate": FEDAVG_LR, "local_steps": FEDAVG_STEPS, "local_batch": "all B images"},
        "num_targets": num_targets,
        "dp_noise_multipliers": tuple(float(z) for z in args.noise.split(",")),
        "secure_sum_sizes": sum_sizes,
    }
    (out / "inversion.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "inversion.md").write_text(_markdown(meta, results))


def _markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Gradient inversion of one client's update (LeNet, CIFAR-10 JPEG)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}; runtime {meta['runtime_s']:.0f} s; jax {meta['jax']}.  ",
        f"Data: {meta['data']}; model: {meta['model']}; {meta['num_targets']} target clients per cell.  ",
        f"Attack: {meta['attack']}; iterations {meta['attack_steps']}.  ",
        f"Labels: {meta['labels']}.  ",
        f"FedAvg client: {meta['fedavg']['local_steps']} full-batch SGD steps at learning rate "
        f"{meta['fedavg']['learning_rate']}.  ",
        "DP: clip norm C = median update norm of 99 other clients of the cell (column C), noise std z C "
        "(a cohort of one).  Secure sum: the target's update plus 9 or 99 other clients' (fljax.secagg.secure_sum).",
        "",
        "Mean PSNR (dB) / SSIM of the target's images, matched to the reconstructions; label recall in brackets.",
        "",
    ]
    threats = list(dict.fromkeys(r["threat"] for r in results))
    lines.append("| algorithm | B | C | " + " | ".join(threats) + " |")
    lines.append("|---|---|---|" + "---|" * len(threats))
    cells = dict.fromkeys((r["algorithm"], r["batch_size"]) for r in results)
    for alg, b in cells:
        rows = {r["threat"]: r for r in results if r["algorithm"] == alg and r["batch_size"] == b}
        c = next(iter(rows.values()))["clip_norm"]
        entries = [
            f"{rows[t]['psnr']:.1f} / {rows[t]['ssim']:.2f} ({rows[t]['label_recall']:.2f})"
            if t in rows
            else "-"
            for t in threats
        ]
        lines.append(f"| {alg} | {b} | {c:.3g} | " + " | ".join(entries) + " |")
    grey = np.mean([r["grey_psnr"] for r in results])
    lines += [
        "",
        f"Reference level: a flat grey image (0.5) scores {grey:.1f} dB PSNR against the targets' images.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
