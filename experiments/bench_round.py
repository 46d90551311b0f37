"""Benchmark: the ``seed_cifar`` round (see /work/shared/BENCHMARKS.md).

LeNet (62,006 params) on 32x32x3 inputs, 500 examples per client, batch 32
(16 steps, the last partial), 1 local epoch, SGD lr 0.01 momentum 0.9, FedAvg;
cohorts of 10 and 100 clients. Prints one JSON object per measurement:

* ``system: "fljax"``, ``variant`` ``"plain"`` / ``"dp"`` (client-level DP,
  :func:`fljax.privacy.dp`) / ``"secagg"``
  (mean of :func:`fljax.secagg.secure_sum`) / ``"plain_every_slot"`` (the plain round with
  ``Performance(skip_padding=False)``: no chunk skipped, no chunk dealt to the devices in
  turn), with ``ratio_to_plain`` measured in the same run; ``formulation`` names the round's
  settings.
* ``--algorithms``: other federated algorithms' plain rounds on the same cohort (built by the
  trainer's :func:`fljax.experiment.trainer.build_algorithm` from the same client settings;
  stateful ones carry their client states), each line with ``algorithm`` and
  ``ratio_to_fedavg`` measured interleaved with FedAvg's plain round.
* ``system: "hw_bound"``: the same number of examples through the same CNN
  trained centrally at batch 3,200 (best JAX formulation measured; every
  formulation tried is printed with ``system: "central"``).
* ``system: "matmul_peak"``: GFLOP/s of a 2048x2048 float32 matmul, so every
  number reads as a fraction of the machine's arithmetic limit:
  ``system: "model_flops"`` gives the CNN's forward + backward FLOPs per
  example (XLA's cost analysis of the plain model), and every fljax and
  reference line carries ``fraction_of_peak`` (achieved model GFLOP/s over the
  matmul peak).
* ``system: "pytorch_loop"``: the same round as a plain sequential PyTorch loop
  over clients (``experiments/torch_reference.py``, the founding example's way),
  measured in the same run when ``torch`` is installed (a CPU build is enough;
  otherwise a ``skipped`` line); fljax lines then carry ``speedup_vs_pytorch``.

``sec_per_round`` is the median over the measured rounds after one warm-up
round; ``compile_sec`` (first call: trace + compile + one round) is separate.

Command::

    .venv/bin/python experiments/bench_round.py            # cohorts 10 and 100, chunk_size "auto"
    .venv/bin/python experiments/bench_round.py --quick    # seconds-long smoke run
    .venv/bin/python experiments/bench_round.py --cohorts 10 --formulations fast,xla,fast_bf16
    .venv/bin/python experiments/bench_round.py --variants plain --algorithms all --no-torch --no-central

Results on the project's 2-core CPU machine: docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, fast, losses, simulation
from fljax.algorithms import fedavg
from fljax.base import ClientData, Cohort, Performance
from fljax.models import zoo

BENCH = "seed_cifar"


def _load_torch_reference():
    path = pathlib.Path(__file__).with_name("torch_reference.py")
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_reference = _load_torch_reference()

# formulation name -> Performance fields (performance settings only)
FORMULATIONS = {
    "fast": dict(accelerate=True),  # default: conv as im2col + matmul, pool as maxima (on CPU)
    "xla": dict(accelerate=False),  # XLA's convolution and reduce_window (the naive vmap)
    # mixed precision (params, optimizer state and deltas stay float32): NOT the same
    # result as float32, so never the default; measured for reference
    "fast_bf16": dict(accelerate=True, compute_dtype=jnp.bfloat16),
}


def emit(**fields) -> None:
    base = {"bench": BENCH, "device": jax.default_backend(), "jax": jax.__version__}
    base.update(fields)
    print(json.dumps(base), flush=True)


def make_cohort(num_clients: int, num_examples: int, image: int, seed: int = 0) -> Cohort:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_clients, num_examples, image, image, 3), dtype=np.float32)
    y = rng.integers(0, 10, (num_clients, num_examples)).astype(np.int32)
    data = ClientData(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.ones((num_clients, num_examples), bool))
    return Cohort(
        data=data,
        client_ids=jnp.arange(num_clients, dtype=jnp.int32),
        client_mask=jnp.ones(num_clients, bool),
    )


def compile_and_warm(step, state, cohort):
    """(compile_sec, state): the first call timed apart, then one warm-up round."""
    t = time.perf_counter()
    state, _ = step(state, cohort, jax.random.key(0))
    jax.block_until_ready(state)
    compile_sec = time.perf_counter() - t
    state, _ = step(state, cohort, jax.random.key(1))  # warm-up round
    jax.block_until_ready(state)
    return compile_sec, state


def timed_round(step, state, cohort, r: int):
    """(state, wall seconds, CPU seconds) of one round. CPU seconds (this process, all threads)
    are less sensitive than wall seconds to other processes sharing the machine."""
    t, c = time.perf_counter(), time.process_time()
    state, _ = step(state, cohort, jax.random.key(2 + r))
    jax.block_until_ready(state)
    return state, time.perf_counter() - t, time.process_time() - c


def aggregator_for(variant: str, cohort_size: int, num_examples: int, dim: int = 62_006):
    """The round's aggregator; raises ImportError when the module is not available.

    ``ddp``: the distributed discrete Gaussian (16-bit ring, masked modular sum simulated in the
    round); ``dp_ftrl``: banded matrix-factorization DP (4 bands, 100 rounds planned).
    """
    if variant in ("plain", "plain_every_slot"):  # every_slot: Performance(skip_padding=False)
        return None
    if variant == "ddp":
        from fljax import privacy

        cfg = privacy.DistributedDPConfig(
            clip_norm=1.0, noise_multiplier=1.0, dim=dim, cohort_size=cohort_size,
            population_size=max(cohort_size, 100), bits=16, amplification=False,
        )  # fmt: skip
        return privacy.distributed_dp(cfg)
    if variant == "dp_ftrl":
        from fljax import privacy

        cfg = privacy.MFConfig(
            clip_norm=1.0, noise_multiplier=1.0, total_rounds=100, cohort_size=cohort_size,
            population_size=100 * cohort_size, strategy="banded", num_bands=4,
        )  # fmt: skip
        return privacy.dp_ftrl(cfg)
    if variant in ("dp", "dp_secagg"):  # dp_secagg: DP over the secure sum (clip, secure sum, noise once)
        from fljax import privacy, secagg

        cfg = privacy.DPConfig(
            clip_norm=1.0,
            noise_multiplier=1.0,
            population_size=max(cohort_size, 100),
            cohort_size=cohort_size,
            sampling="fixed",
        )
        secure = secagg.secure_sum(secagg.SecAggConfig(clip_range=1.0, frac_bits=16))
        return privacy.dp(cfg, sum=secure if variant == "dp_secagg" else None)
    if variant == "secagg":
        from fljax import aggregators, secagg

        max_weight = float(2 ** int(np.ceil(np.log2(num_examples))))
        return aggregators.mean(
            secagg.secure_sum(secagg.SecAggConfig(clip_range=1.0, frac_bits=16, max_weight=max_weight))
        )
    raise ValueError(f"unknown variant {variant!r}")


def algorithm_for(name: str, model, params, perf: Performance, cohort_size: int):
    """``(algorithm, client states or None)``: the trainer's ``name`` algorithm with the round's
    client settings (SGD lr 0.01, momentum 0.9 except SCAFFOLD's plain SGD, batch 32, 1 epoch)."""
    from fljax import experiment
    from fljax.experiment import trainer

    momentum = None if name == "scaffold" else 0.9
    config = experiment.Config(
        client=experiment.Client(learning_rate=0.01, momentum=momentum, batch_size=32, num_epochs=1),
        server=experiment.Server(algorithm=name, learning_rate=0.01 if name.startswith("fedad") else 1.0),
    )
    algo = trainer.build_algorithm(config, model, None, cohort_size).with_performance(perf)
    states = trainer.build_client_states(config, model, params, cohort_size)
    return algo, None if states is None else states.gather(np.arange(cohort_size))


def fraction_of_peak(args, examples_per_sec: float) -> float:
    flops, gflops = args.peak
    return round(examples_per_sec * flops / 1e9 / gflops, 4)


def bench_torch(args, cohort: Cohort, cohort_size: int) -> float | None:
    """Seconds per round of the PyTorch loop on the same data, or None without torch."""
    if not torch_reference.available() or args.no_torch:
        emit(
            system="pytorch_loop",
            cohort=cohort_size,
            skipped="torch not installed" if not args.no_torch else "--no-torch",
        )
        return None
    x, y = np.asarray(cohort.data.x), np.asarray(cohort.data.y)
    sec, times, threads = torch_reference.round_seconds(x, y, args.rounds)
    num_examples = y.shape[1]
    emit(
        system="pytorch_loop",
        cohort=cohort_size,
        sec_per_round=round(sec, 4),
        examples_per_sec=round(cohort_size * num_examples / sec, 1),
        rounds=len(times),
        round_times=[round(t, 3) for t in times],
        threads=threads,
        torch=torch_reference.torch.__version__,
        fraction_of_peak=fraction_of_peak(args, cohort_size * num_examples / sec),
    )
    return sec


def bench_fljax(
    args, cohort_size: int, cohort: Cohort, model, params, formulation: str, variants, torch_sec=None
) -> dict:
    """Every variant's round, timed INTERLEAVED (round r of each variant in turn), so that the
    ratios to the plain round are measured under the same load even on a noisy shared machine."""
    num_examples = cohort.data.mask.shape[1]
    runs = {}
    for variant in variants:
        try:
            aggregator = aggregator_for(variant, cohort_size, num_examples, zoo.num_params(params))
        except (ImportError, AttributeError) as e:  # module being written concurrently
            emit(system="fljax", variant=variant, cohort=cohort_size, skipped=f"{type(e).__name__}: {e}")
            continue
        xla = not FORMULATIONS[formulation].get("accelerate", True)
        update = client.local_sgd(
            zoo.LeNet(conv_impl="xla") if xla else model,  # same params; XLA's conv and pool ops
            optax.sgd(0.01, momentum=0.9),
            batch_size=32,
            num_epochs=1,
            loss_fn=losses.softmax_cross_entropy,
        )
        mesh = args.mesh
        perf = Performance(
            chunk_size=args.chunk_size,
            mesh=mesh,
            unroll=args.unroll,
            skip_padding=variant != "plain_every_slot",  # the padding-skip's cost where none is skipped
            **FORMULATIONS[formulation],
        )
        update = update.with_performance(perf)
        algo = fedavg.fedavg(update, aggregator=aggregator).with_performance(perf)
        step = jax.jit(algo.update)
        compile_sec, state = compile_and_warm(step, algo.init(params), cohort)
        runs[variant] = dict(
            step=step, state=state, update=update, mesh=mesh, compile=compile_sec, times=[], cpu=[]
        )
    for name in args.algorithms if "plain" in runs else ():
        if name == "fedavg":
            continue
        perf, mesh, update = (
            runs["plain"]["update"].performance,
            runs["plain"]["mesh"],
            runs["plain"]["update"],
        )
        algo, states = algorithm_for(
            name, zoo.LeNet(conv_impl="xla") if xla else model, params, perf, cohort_size
        )
        own = cohort if states is None else cohort._replace(client_states=states)
        step = jax.jit(algo.update)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam family mixes int32 and floats
            compile_sec, state = compile_and_warm(step, algo.init(params), own)
        runs[f"algorithm:{name}"] = dict(
            step=step,
            state=state,
            update=update,
            mesh=mesh,
            compile=compile_sec,
            times=[],
            cpu=[],
            cohort=own,
        )
    for r in range(args.rounds):
        for run in runs.values():
            run["state"], t, c = timed_round(run["step"], run["state"], run.get("cohort", cohort), r)
            run["times"].append(t)
            run["cpu"].append(c)
    plain = runs.get("plain")
    results = {}
    for variant, run in runs.items():
        times, cpu, mesh = run["times"], run["cpu"], run["mesh"]
        sec = statistics.median(times)
        algorithm = variant.removeprefix("algorithm:") if variant.startswith("algorithm:") else "fedavg"
        fields = dict(
            system="fljax",
            algorithm=algorithm,
            variant="plain" if algorithm != "fedavg" else variant,
            formulation=formulation,
            cohort=cohort_size,
            sec_per_round=round(sec, 4),
            examples_per_sec=round(cohort_size * num_examples / sec, 1),
            compile_sec=round(run["compile"], 2),
            rounds=len(times),
            round_times=[round(t, 3) for t in times],
            cpu_sec_per_round=round(statistics.median(cpu), 4),
            fraction_of_peak=fraction_of_peak(args, cohort_size * num_examples / sec),
            chunk_size=args.chunk_size,
            chunk_used=(
                simulation.auto_chunk_size(
                    lambda d, k, update=run["update"]: update(params, d, k),
                    cohort.data,
                    jax.random.split(jax.random.key(0), cohort_size),
                )
                if args.chunk_size == "auto"
                else args.chunk_size
            ),
            unroll=args.unroll,
            devices=1 if mesh is None else mesh.size,
        )
        if torch_sec is not None:
            fields["speedup_vs_pytorch"] = round(torch_sec / sec, 3)
        if plain is not None and algorithm != "fedavg":
            fields["ratio_to_fedavg"] = round(
                statistics.median(t / p for t, p in zip(times, plain["times"], strict=True)), 3
            )
        elif plain is not None and variant != "plain":
            # per-round pairs measured back to back: the median of the paired ratios
            fields["ratio_to_plain"] = round(
                statistics.median(t / p for t, p in zip(times, plain["times"], strict=True)), 3
            )
            fields["cpu_ratio_to_plain"] = round(
                statistics.median(c / p for c, p in zip(cpu, plain["cpu"], strict=True)), 3
            )
        emit(**fields)
        results[variant] = sec
    return results


def central_examples_per_sec(
    model, params, image: int, batch: int, steps: int, accelerate: bool, driver: str
):
    """Examples/s of the CNN trained centrally (one model) at ``batch``: a jitted step
    driven by a Python loop (``driver="loop"``) or ``steps`` steps in one jitted ``lax.scan``."""
    # The zoo's LeNet uses fljax.nn's matmul forms on CPU; the XLA formulation is the same model with XLA's ops.
    apply = fast.accelerate(model.apply) if accelerate else zoo.LeNet(conv_impl="xla").apply
    opt = optax.sgd(0.01, momentum=0.9)

    def train_step(carry, xy):
        p, s = carry
        x, y = xy
        g = jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(apply(p, x), y)))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((steps, batch, image, image, 3), dtype=np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (steps, batch)).astype(np.int32))
    carry = (params, opt.init(params))
    if driver == "loop":
        step = jax.jit(lambda c, x, y: train_step(c, (x, y))[0])

        def run(c):
            for i in range(steps):
                c = step(c, xs[i], ys[i])
            return c
    else:
        run = jax.jit(lambda c: jax.lax.scan(train_step, c, (xs, ys))[0])
    t = time.perf_counter()
    carry = jax.block_until_ready(run(carry))
    compile_sec = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        carry = jax.block_until_ready(run(carry))
        times.append(time.perf_counter() - t)
    return batch * steps / statistics.median(times), compile_sec


def model_flops_per_example(model, params, image: int) -> float:
    """Forward + backward FLOPs of one example through the plain model (XLA's count)."""
    x = jnp.zeros((1, image, image, 3), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    grad = jax.jit(jax.grad(lambda p: jnp.mean(losses.softmax_cross_entropy(model.apply(p, x), y))))
    cost = grad.lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def matmul_gflops(n: int) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run (small images, few clients)"
    )
    parser.add_argument("--cohorts", default="10,100")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--variants", default="plain,dp,secagg,dp_secagg,ddp,dp_ftrl")
    parser.add_argument(
        "--algorithms",
        default="fedavg",
        help="comma list of the trainer's algorithms (fljax.experiment.config.ALGORITHMS) or 'all'",
    )
    parser.add_argument("--formulations", default="fast", help=f"comma list of {sorted(FORMULATIONS)}")
    parser.add_argument(
        "--chunk-size",
        default="auto",
        help="clients per vmapped chunk: 'auto' (fljax's default), an int, or 0 for none",
    )
    parser.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of the local steps")
    parser.add_argument("--central-batch", type=int, default=3200)
    parser.add_argument("--central-steps", type=int, default=3)
    parser.add_argument("--no-central", action="store_true", help="skip the hw_bound measurement")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop reference")
    parser.add_argument(
        "--devices",
        default="auto",
        help="devices the clients are spread over, as the trainer's Config.devices: 'auto' (the "
        "default: one CPU device per core, bit for bit the one-device round) or a count; 1: one device",
    )
    parser.add_argument("--shard", action="store_true", help="the same as --devices auto (older commands)")
    args = parser.parse_args(argv)
    if args.devices == "auto":
        from fljax.experiment.cli import one_device_per_core

        one_device_per_core()  # before jax starts; keeps a count set in XLA_FLAGS
    from fljax.experiment.trainer import round_devices

    devices = round_devices("auto" if args.devices == "auto" else int(args.devices))
    if args.algorithms == "all":
        from fljax.experiment.config import ALGORITHMS

        args.algorithms = ",".join(ALGORITHMS)
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.mesh = simulation.client_mesh(jax.devices()[:devices]) if devices > 1 else None
    args.chunk_size = (
        None
        if args.chunk_size in ("0", "none")
        else ("auto" if args.chunk_size == "auto" else int(args.chunk_size))
    )

    image, num_examples = 32, 500
    cohorts = [int(c) for c in args.cohorts.split(",")]
    if args.quick:
        image, num_examples, cohorts = 16, 32, [2]
        args.rounds, args.central_batch, args.central_steps = 1, 32, 1
    variants = [v for v in args.variants.split(",") if v]
    model = zoo.LeNet()
    params = zoo.init_params(model, (image, image, 3), jax.random.key(0))
    emit(
        system="info",
        jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        python=platform.python_version(),
        devices=jax.device_count(),
        cores=__import__("os").cpu_count(),
        params=zoo.num_params(params),
        image=image,
        num_examples=num_examples,
        xla_flags=__import__("os").environ.get("XLA_FLAGS", ""),
    )
    gflops = matmul_gflops(512 if args.quick else 2048)
    emit(system="matmul_peak", n=512 if args.quick else 2048, gflops=round(gflops, 2))
    flops = model_flops_per_example(
        zoo.LeNet(conv_impl="xla"), params, image
    )  # the conv model, as XLA counts it
    emit(system="model_flops", flops_per_example=round(flops), gflops=round(gflops, 2))
    args.peak = (flops, gflops)  # for fraction_of_peak

    central = None
    if not args.no_central:
        best = None
        # XLA's convolution in a scan is the slowest (jax issue #12868); measured once, skipped here.
        combos = [(True, "loop")] if args.quick else [(True, "loop"), (True, "scan"), (False, "loop")]
        for accelerate, driver in combos:
            eps, csec = central_examples_per_sec(
                model, params, image, args.central_batch, args.central_steps, accelerate, driver
            )
            name = f"{'fast' if accelerate else 'xla'}_conv_{driver}"
            emit(
                system="central",
                formulation=name,
                batch=args.central_batch,
                examples_per_sec=round(eps, 1),
                compile_sec=round(csec, 2),
            )
            if best is None or eps > best[0]:
                best = (eps, name)
        central = best

    for cohort_size in cohorts:
        cohort = make_cohort(cohort_size, num_examples, image)
        torch_sec = bench_torch(args, cohort, cohort_size)
        for formulation in args.formulations.split(","):
            res = bench_fljax(
                args,
                cohort_size,
                cohort,
                model,
                params,
                formulation,
                variants if formulation == args.formulations.split(",")[0] else ["plain"],
                torch_sec,
            )
            if central is not None and "plain" in res and formulation == args.formulations.split(",")[0]:
                sec = cohort_size * num_examples / central[0]
                emit(
                    system="hw_bound",
                    cohort=cohort_size,
                    formulation=central[1],
                    batch=args.central_batch,
                    sec_per_round=round(sec, 4),
                    examples_per_sec=round(central[0], 1),
                    fljax_over_hw_bound=round(res["plain"] / sec, 3),
                )
        del cohort
    return 0


if __name__ == "__main__":
    sys.exit(main())
