"""Benchmark: the ``shakespeare_lstm`` round (see ../shared/BENCHMARKS.md), a workload where the
time goes into recurrence.

Workload: the character LSTM of Reddi et al. 2021 (:class:`fljax.models.CharLSTM`: embedding 8,
two LSTM layers of 256, dense to the 90-token vocabulary; 820,522 parameters) on sequences of 80
characters. Population: the 715 speakers of TFF's federated Shakespeare; each client holds as
many sequences as the real speaker has (counted with :mod:`fljax.data.datasets.shakespeare`'s
preprocessing when the data set is on disk, else drawn from a log-normal fitted to it: median 17,
sigma 1.65), capped at 64; the characters themselves are synthetic (uniform tokens; the timing
does not depend on them). One round: a cohort of C speakers drawn uniformly without replacement;
each runs one local epoch over its sequences in shuffled minibatches of 4 (the last one
partial), SGD lr 1.0 (the ``shakespeare`` config), mean cross-entropy over every position;
example-weighted FedAvg.

Prints one JSON object per measurement, with ``seed_cifar``'s fields (``bench``, ``system``,
``cohort``, ``sec_per_round``, ``examples_per_sec``, ``compile_sec``, ``rounds``, ``device``,
``jax``):

* ``system: "fljax"``: the trainer's client update (:func:`fljax.client.local_sgd`) vmapped
  over the cohort inside one jitted FedAvg round, with ``formulation`` (how the LSTM is
  computed, same parameters and values up to float reassociation) and ``layout``:

  - ``flax``: the model as the trainer builds it (``flax.linen.RNN`` over
    ``OptimizedLSTMCell``: the four gates' kernels fused in the cell, input projection
    inside the time scan);
  - ``hoisted``: the gates' kernels concatenated once per call and the input projection
    of the whole sequence taken out of the time scan (one ``[batch * time, in] x [in, 4h]``
    matmul), only ``h @ W_h`` left in the scan; gradients by autodiff;
  - ``fused``: ``hoisted`` plus a hand-written backward pass of the recurrence
    (``jax.custom_vjp``): the reverse scan computes only the gates' gradients, and the
    recurrent kernel's gradient is ONE ``[h, batch * time] x [batch * time, 4h]`` matmul after
    it, where autodiff accumulates an outer product into the ``[h, 4h]`` kernel at every step;
  - ``layout: "padded"``: every client padded to the cohort's largest (up to 64 sequences,
    16 steps); ``"bucketed"``: :mod:`fljax.data.bucketing` size buckets (the padding steps
    the round still computes are in ``padding_fraction``).

* ``system: "pytorch_loop"``: the same clients, sizes, minibatches and local steps as a plain
  sequential PyTorch loop (``nn.LSTM``; ``experiments/torch_reference.py``), measured in the
  same run when ``torch`` is installed (otherwise a ``skipped`` line); fljax lines then carry
  ``speedup_vs_pytorch``.
* ``system: "check"``: the largest difference between the gradients of each formulation and
  of the flax model on one minibatch (the run fails if it exceeds ``1e-4`` times the gradient's
  scale).

``sec_per_round`` is the median over the measured rounds after one warm-up round;
``compile_sec`` (first call: trace + compile + one round) is separate; ``examples_per_sec``
counts real sequences.

Command::

    .venv/bin/python experiments/bench_lstm.py              # cohorts 10 and 100
    .venv/bin/python experiments/bench_lstm.py --quick      # seconds-long smoke run (tiny sizes)
    .venv/bin/python experiments/bench_lstm.py --cohorts 10 --formulations flax,hoisted,fused \\
        --layouts padded,bucketed

Results on the project's 2-core CPU machine: experiments/results/bench_lstm.md and
docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, losses, simulation
from fljax.algorithms import fedavg
from fljax.base import Cohort, Performance
from fljax.data import FederatedData, bucketing
from fljax.models import zoo

BENCH = "shakespeare_lstm"
NUM_SPEAKERS = 715
GATES = ("i", "f", "g", "o")  # flax's OptimizedLSTMCell order
FORMULATIONS = ("flax", "hoisted", "fused")
LAYOUTS = ("padded", "bucketed")


def _load_torch_reference():
    path = pathlib.Path(__file__).with_name("torch_reference.py")
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_reference = _load_torch_reference()


def emit(**fields) -> None:
    base = {"bench": BENCH, "device": jax.default_backend(), "jax": jax.__version__}
    base.update(fields)
    print(json.dumps(base), flush=True)


# ----------------------------------------------------------------------------- the LSTM formulations


def _activations(z):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _recurrence_forward(w_h, xp, unroll):
    """The LSTM over ``xp[time, batch, 4h]`` (input projections plus bias): ``(hs, residuals)``."""

    def step(carry, xp_t):
        c, h = carry
        i, f, g, o = _activations(xp_t + h @ w_h)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (h, c, jnp.concatenate([i, f, g, o], axis=-1))

    zero = jnp.zeros((xp.shape[1], w_h.shape[0]), xp.dtype)
    _, (hs, cs, acts) = jax.lax.scan(step, (zero, zero), xp, unroll=unroll)
    return hs, (w_h, hs, cs, acts)


def _recurrence_plain(w_h, xp, unroll):
    return _recurrence_forward(w_h, xp, unroll)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence_fused(w_h, xp, unroll):
    return _recurrence_forward(w_h, xp, unroll)[0]


def _recurrence_bwd(unroll, residuals, d_hs):
    w_h, hs, cs, acts = residuals
    w_h_t = w_h.T  # transposed once, outside the scan: XLA:CPU's dot with a transposed operand
    # inside the loop took twice as long (measured: 7.6-8.6 ms against 3.8-4.1 for this
    # backward pass of one layer, 80 steps of batch 4)
    zero = jnp.zeros_like(hs[:1])
    h_prev = jnp.concatenate([zero, hs[:-1]], axis=0)
    c_prev = jnp.concatenate([zero, cs[:-1]], axis=0)

    def step(carry, inputs):
        dh, dc = carry
        dh_t, c, c_before, a = inputs
        i, f, g, o = jnp.split(a, 4, axis=-1)
        dh = dh + dh_t
        tanh_c = jnp.tanh(c)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc * g * i * (1 - i),
                dc * c_before * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        return (dz @ w_h_t, dc * f), dz

    _, dz = jax.lax.scan(step, (zero[0], zero[0]), (d_hs, cs, c_prev, acts), reverse=True, unroll=unroll)
    d_w_h = jnp.einsum("tbh,tbg->hg", h_prev, dz)  # one matmul over every (time, batch) pair
    return d_w_h, dz


_recurrence_fused.defvjp(lambda w_h, xp, unroll: _recurrence_forward(w_h, xp, unroll), _recurrence_bwd)


def char_lstm_apply(formulation: str, unroll: int = 1):
    """``apply(params, tokens[batch, time]) -> logits[batch, time, vocab]`` for CharLSTM's params.

    ``"flax"`` is :class:`fljax.models.CharLSTM` itself; ``"hoisted"`` and ``"fused"`` compute the
    same function from the same parameter tree (module docstring). ``unroll``: the time scan's.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    recurrence = _recurrence_fused if formulation == "fused" else _recurrence_plain

    def apply(params, x):
        p = params["params"]
        h = p["Embed_0"]["embedding"][jnp.asarray(x, jnp.int32)]  # [batch, time, embed]
        h = jnp.swapaxes(h, 0, 1)  # time-major: [time, batch, features]
        layer = 0
        while f"OptimizedLSTMCell_{layer}" in p:
            cell = p[f"OptimizedLSTMCell_{layer}"]
            w_i = jnp.concatenate([cell[f"i{g}"]["kernel"] for g in GATES], axis=-1)
            w_h = jnp.concatenate([cell[f"h{g}"]["kernel"] for g in GATES], axis=-1)
            b = jnp.concatenate([cell[f"h{g}"]["bias"] for g in GATES], axis=-1)
            h = recurrence(w_h, h @ w_i + b, unroll)  # input projection of the whole sequence
            layer += 1
        logits = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        return jnp.swapaxes(logits, 0, 1)

    return apply


def check_gradients(model, params, x, y, formulations, unroll: int) -> None:
    """Emit each formulation's largest gradient difference to the flax model's; raise if too large."""

    def grad(apply):
        loss = lambda p: jnp.mean(losses.softmax_cross_entropy(apply(p, x), y))
        return jax.jit(jax.grad(loss))(params)

    with jax.default_matmul_precision("float32"):  # GPUs would otherwise multiply in TF32
        ref = grad(model.apply)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
    for formulation in formulations:
        if formulation == "flax":
            continue
        with jax.default_matmul_precision("float32"):
            other = grad(char_lstm_apply(formulation, unroll))
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(other), strict=True)
        )
        emit(system="check", formulation=formulation, grad_max_abs_diff=diff, grad_max_abs=scale)
        if not diff <= 1e-4 * scale:
            raise AssertionError(
                f"{formulation}: gradient differs from the flax model's by {diff} (scale {scale})"
            )


# ----------------------------------------------------------------------------- workload


def speaker_sizes(num_speakers: int, seed: int, *, use_data: bool = True) -> tuple[np.ndarray, str]:
    """Sequences of 80 characters per speaker (uncapped) and where they came from."""
    if use_data:
        try:
            from fljax.data.datasets import shakespeare

            snippets = shakespeare.read_snippets("train")
        except (FileNotFoundError, ValueError, OSError):
            pass
        else:
            counts = [sum(len(shakespeare.tokenize(s)) for s in snippets[c]) for c in sorted(snippets)]
            return np.asarray(counts, np.int64), "shakespeare_tff train"
    rng = np.random.default_rng(seed)
    sizes = np.maximum(np.rint(rng.lognormal(np.log(17.0), 1.65, num_speakers)), 1).astype(np.int64)
    return sizes, "log-normal (median 17, sigma 1.65)"


def make_population(sizes: np.ndarray, seq_len: int, vocab: int, seed: int) -> FederatedData:
    """Clients holding ``sizes[c]`` synthetic sequences each (tokens and next-token targets)."""
    rng = np.random.default_rng(seed)
    clients = []
    for n in sizes:
        tokens = rng.integers(1, vocab, (int(n), seq_len + 1)).astype(np.int32)
        clients.append((tokens[:, :-1], tokens[:, 1:]))
    return FederatedData.from_clients(clients, num_classes=vocab)


def cohort_layout(data: FederatedData, layout: str, batch_size: int, num_buckets: int, slots: int):
    """The cohort as one padded :class:`~fljax.base.Cohort` or a tuple of size buckets."""
    ids = np.arange(data.num_clients)
    if layout == "padded":
        return data.cohort(ids, num_examples=int(data.sizes.max()))
    plan = bucketing.plan(data.sizes, batch_size, num_buckets=num_buckets)
    return tuple(bucketing.split(data, ids, None, plan, slots=slots))


def computed_steps(cohort, batch_size: int) -> int:
    cohorts = (cohort,) if isinstance(cohort, Cohort) else cohort
    return sum(c.data.mask.shape[0] * -(-c.data.mask.shape[1] // batch_size) for c in cohorts)


# ----------------------------------------------------------------------------- timing


def bench_torch(args, data: FederatedData, cohort_size: int) -> float | None:
    if args.no_torch or not torch_reference.available():
        emit(
            system="pytorch_loop",
            cohort=cohort_size,
            skipped="--no-torch" if args.no_torch else "torch not installed",
        )
        return None
    padded = data.cohort(np.arange(data.num_clients), num_examples=int(data.sizes.max()))
    sec, times, threads, device, cpu = torch_reference.lstm_round_seconds(
        np.asarray(padded.data.x),
        np.asarray(padded.data.y),
        data.sizes,
        args.rounds,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        vocab_size=args.vocab,
        embed_dim=8,
        lstm_sizes=args.lstm_sizes,
        threads=args.torch_threads,
        device=args.torch_device,
    )
    examples = int(data.sizes.sum())
    emit(
        system="pytorch_loop",
        cohort=cohort_size,
        sec_per_round=round(sec, 4),
        examples_per_sec=round(examples / sec, 1),
        rounds=len(times),
        round_times=[round(t, 3) for t in times],
        cpu_sec_per_round=round(statistics.median(cpu), 4),
        threads=threads,
        torch=torch_reference.torch.__version__,
        torch_device=device,
        local_steps=int(bucketing.num_steps(data.sizes, args.batch_size).sum()),
    )
    return sec


def bench_fljax(
    args, data, model, params, cohort_size: int, formulation: str, layout: str, slots: int, torch_sec
):
    apply = model if formulation == "flax" else char_lstm_apply(formulation, args.time_unroll)
    perf = Performance(
        chunk_size=args.chunk_size, unroll=args.unroll, mesh=args.mesh, skip_padding=not args.every_slot
    )
    update = client.local_sgd(
        apply,
        optax.sgd(args.learning_rate),
        batch_size=args.batch_size,
        num_epochs=1,
        loss_fn=losses.softmax_cross_entropy,
    ).with_performance(perf)
    algo = fedavg.fedavg(update).with_performance(perf)
    cohort = jax.device_put(cohort_layout(data, layout, args.batch_size, args.num_buckets, slots))
    step = jax.jit(algo.update)
    t = time.perf_counter()
    state, _ = step(algo.init(params), cohort, jax.random.key(0))
    jax.block_until_ready(state)
    compile_sec = time.perf_counter() - t
    state, _ = step(state, cohort, jax.random.key(1))  # warm-up round
    jax.block_until_ready(state)
    times, cpu = [], []
    for r in range(args.rounds):
        t, c = time.perf_counter(), time.process_time()
        state, metrics = step(state, cohort, jax.random.key(2 + r))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    loss = float(metrics["client_train_loss_weighted_mean"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{formulation}/{layout}: non-finite training loss {loss}")
    sec = statistics.median(times)
    examples = int(data.sizes.sum())
    real_steps = int(bucketing.num_steps(data.sizes, args.batch_size).sum())
    steps = computed_steps(cohort, args.batch_size)
    first = cohort if isinstance(cohort, Cohort) else cohort[-1]
    fields = dict(
        system="fljax",
        formulation=formulation,
        layout=layout,
        cohort=cohort_size,
        sec_per_round=round(sec, 4),
        examples_per_sec=round(examples / sec, 1),
        compile_sec=round(compile_sec, 2),
        rounds=len(times),
        round_times=[round(t, 3) for t in times],
        cpu_sec_per_round=round(statistics.median(cpu), 4),
        local_steps=real_steps,
        computed_steps=steps,
        padding_fraction=round(1 - real_steps / steps, 4),
        buckets=[list(c.data.mask.shape) for c in cohort] if not isinstance(cohort, Cohort) else None,
        chunk_size=args.chunk_size,
        chunk_used=(
            simulation.auto_chunk_size(
                lambda d, k: update(params, d, k),
                first.data,
                jax.random.split(jax.random.key(0), first.data.mask.shape[0]),
            )
            if args.chunk_size == "auto"
            else args.chunk_size
        ),
        unroll=args.unroll,
        skip_padding=not args.every_slot,
        devices=1 if args.mesh is None else args.mesh.size,
        slots=slots if layout == "bucketed" else None,
        time_unroll=args.time_unroll if formulation != "flax" else 1,
        train_loss=round(loss, 4),
    )
    if torch_sec is not None:
        fields["speedup_vs_pytorch"] = round(torch_sec / sec, 3)
    emit(**fields)
    return sec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny sizes)")
    parser.add_argument("--cohorts", default="10,100")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--formulations", default="fused", help=f"comma list of {FORMULATIONS}")
    parser.add_argument("--layouts", default="bucketed", help=f"comma list of {LAYOUTS}")
    parser.add_argument("--num-buckets", type=int, default=8, help="bucketed layout: size buckets")
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="bucketed layout: clients per call (0: cohort/10 rounded down to a multiple of the "
        "devices, at least one per device)",
    )
    parser.add_argument(
        "--chunk-size", default="auto", help="clients per vmapped chunk: 'auto', an int, or 0 for none"
    )
    parser.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of the local steps")
    parser.add_argument("--time-unroll", type=int, default=1, help="unroll of the time scan (hoisted, fused)")
    parser.add_argument("--max-examples", type=int, default=64, help="sequences per client at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-data", action="store_true", help="log-normal sizes even if the data set is on disk"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop reference")
    parser.add_argument(
        "--every-slot",
        action="store_true",
        help="Performance(skip_padding=False): no chunk skipped or dealt to the devices in turn",
    )
    parser.add_argument("--torch-device", default=None, help="'cpu' or 'cuda' (default: see torch_reference)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: cores)")
    parser.add_argument(
        "--devices",
        default="auto",
        help="devices the clients are spread over, as the trainer's Config.devices: 'auto' (one "
        "CPU device per core) or a count",
    )
    args = parser.parse_args(argv)
    if args.devices == "auto":
        from fljax.experiment.cli import one_device_per_core

        one_device_per_core()  # before jax starts; keeps a count set in XLA_FLAGS
    from fljax.experiment.trainer import round_devices

    devices = round_devices("auto" if args.devices == "auto" else int(args.devices))
    args.mesh = simulation.client_mesh(jax.devices()[:devices]) if devices > 1 else None
    args.chunk_size = (
        None
        if args.chunk_size in ("0", "none")
        else ("auto" if args.chunk_size == "auto" else int(args.chunk_size))
    )
    formulations = [f for f in args.formulations.split(",") if f]
    layouts = [layout for layout in args.layouts.split(",") if layout]
    for name, given, allowed in (("formulation", formulations, FORMULATIONS), ("layout", layouts, LAYOUTS)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ValueError(f"unknown {name} {bad}: expected a comma list of {allowed}")
    args.batch_size, args.learning_rate, args.vocab = 4, 1.0, 90
    seq_len, args.lstm_sizes, cohorts = 80, (256, 256), [int(c) for c in args.cohorts.split(",")]
    if args.quick:  # tiny sizes: compiles in seconds
        seq_len, args.lstm_sizes, cohorts, args.rounds, args.max_examples = 8, (16, 16), [2], 1, 8
        args.slots = 2  # one bucket call: one compiled copy of the client update
        args.no_data = True

    model = zoo.CharLSTM(vocab_size=args.vocab, embed_dim=8, lstm_sizes=args.lstm_sizes)
    params = zoo.init_params(model, (seq_len,), jax.random.key(args.seed))
    sizes, source = speaker_sizes(NUM_SPEAKERS, args.seed, use_data=not args.no_data)
    capped = np.minimum(sizes, args.max_examples)
    emit(
        system="info",
        python=platform.python_version(),
        cores=os.cpu_count(),
        params=zoo.num_params(params),
        sequence_length=seq_len,
        lstm_sizes=list(args.lstm_sizes),
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        speakers=len(sizes),
        sizes_from=source,
        median_sequences=float(np.median(sizes)),
        mean_sequences_capped=round(float(capped.mean()), 2),
        load_average=[round(v, 2) for v in os.getloadavg()],
    )
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(1, args.vocab, (args.batch_size, seq_len + 1)).astype(np.int32)
    check_gradients(
        model, params, jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), formulations, args.time_unroll
    )

    for cohort_size in cohorts:
        if not 1 <= cohort_size <= len(sizes):
            raise ValueError(f"cohort must be in [1, {len(sizes)}], got {cohort_size}")
        picked = np.sort(rng.choice(len(sizes), cohort_size, replace=False))
        data = make_population(capped[picked], seq_len, args.vocab, args.seed + cohort_size)
        slots = args.slots or devices * max(1, cohort_size // (10 * devices))  # whole rows of devices
        torch_sec = bench_torch(args, data, cohort_size)
        for formulation in formulations:
            for layout in layouts:
                bench_fljax(args, data, model, params, cohort_size, formulation, layout, slots, torch_sec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
