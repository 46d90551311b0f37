"""Running a cohort: ``map_clients``, ``run_clients`` and the jitted averaging round.

``map_clients`` vmaps a one-client update over the cohort, or, with
``chunk_size``, runs ``lax.map`` over chunks of vmapped clients to bound
memory; both give the same result (up to float reassociation).

``averaging_algorithm`` builds the round shared by FedAvg, FedSGD, FedAvgM,
FedProx and the adaptive FedOpt family: clients train locally (stateless, or
with state that lives with each client across rounds), an
:class:`~fljax.base.Aggregator` combines their deltas, and any optax optimizer
applies the combined delta as a pseudo-gradient. Algorithms in
:mod:`fljax.algorithms` are thin factories over it. Performance settings
(:class:`~fljax.base.Performance`) are given once, to the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import aggregators as aggregators_lib
from fljax import fast, tree
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientOutput,
    ClientUpdate,
    Cohort,
    FederatedAlgorithm,
    Params,
    Performance,
    PyTree,
    ServerState,
    StatefulClientUpdate,
    optimizer_update,
)
from fljax.data import bucketing

CHUNK_BYTES = 256 * 2**20
"""Per-step working set that ``chunk_size="auto"`` aims for (all chunk clients together)."""

ChunkSize = int | Literal["auto"] | None
Mesh = jax.sharding.Mesh


def step_bytes(fn: Callable, *args) -> int:
    """Bytes of the values one call of ``fn(*args)`` creates per loop iteration.

    Traces ``fn`` (nothing runs) and sums the sizes of the values made inside
    its largest ``lax.scan``/``while`` body (for a client update: one local
    step), or of all its values when it has no loop. An upper bound on what
    one client keeps live at once, used by :func:`auto_chunk_size`.
    """
    closed = jax.make_jaxpr(fn)(*args)

    def walk(jaxpr) -> tuple[int, int]:
        once, per_iter = 0, 0
        for eqn in jaxpr.eqns:
            for sub in fast.sub_jaxprs(eqn.params):
                o, it = walk(sub)
                if eqn.primitive.name in ("scan", "while"):
                    per_iter = max(per_iter, o + it)
                else:
                    once, per_iter = once + o, max(per_iter, it)
            for v in eqn.outvars:
                aval = v.aval
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    once += int(np.prod(aval.shape)) * getattr(aval.dtype, "itemsize", 8)
        return once, per_iter

    once, per_iter = walk(closed.jaxpr)
    return per_iter or once


def auto_chunk_size(fn: Callable, *args) -> int | None:
    """The ``chunk_size`` that ``"auto"`` picks for :func:`map_clients`.

    On GPU/TPU: ``None`` (vmap everything; large batches are what they are
    for). On CPU: the largest divisor of the cohort size whose clients'
    per-step working set (:func:`step_bytes` of one client) fits in
    :data:`CHUNK_BYTES`; ``None`` when the whole cohort fits. Measured on the
    project's 2-core CPU: LeNet (~60 MB per client step) -> 4 at cohort 100,
    4.9 s per round against 6.8 s for one vmap of all 100 clients.
    """
    if jax.default_backend() != "cpu":
        return None
    n = jax.tree.leaves(args)[0].shape[0]
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), args)
    cap = max(1, CHUNK_BYTES // max(step_bytes(fn, *one), 1))
    if cap >= n:
        return None
    return max(d for d in range(1, cap + 1) if n % d == 0)


def map_clients(
    fn: Callable, *args, chunk_size: ChunkSize = None, active: jax.Array | None = None
) -> jax.Array:
    """Apply a one-client function to every client of the cohort.

    Args:
      fn: function of one client's slices of ``args``.
      *args: pytrees whose leaves all have the same leading ``[clients]`` axis.
      chunk_size: ``None`` vmaps all clients at once; an integer runs
        ``lax.map`` over chunks of that many vmapped clients (the cohort size
        must be a multiple of it), bounding peak memory and, on CPU, keeping
        each step's working set in cache; ``"auto"`` picks it with
        :func:`auto_chunk_size`. A performance setting: results are the same
        up to float reassociation.
      active: optional ``bool[clients]``. With chunks, a chunk none of whose
        clients is active is not computed (``lax.cond``): its outputs are
        zeros. A padded cohort (the sampled clients first, then masked slots,
        as :func:`fljax.data.sampling.poisson` pads them) then costs about its
        sampled clients, and every computed chunk's bits are unchanged.

    Returns:
      ``fn``'s outputs stacked along a leading ``[clients]`` axis.
    """
    leaves = jax.tree.leaves(args)
    if not leaves:
        raise ValueError("map_clients needs at least one array argument")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.shape[:1] != (n,):
            raise ValueError(
                f"every argument needs the same leading clients axis {n}, got shape {leaf.shape}"
            )
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(fn, *args)
    elif isinstance(chunk_size, str):
        raise ValueError(f"chunk_size must be an int, None or 'auto', got {chunk_size!r}")
    vfn = jax.vmap(fn)
    if chunk_size is None or chunk_size >= n:
        return vfn(*args)
    if chunk_size <= 0 or n % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be positive and divide the cohort size {n}")
    chunked = jax.tree.map(lambda a: a.reshape((n // chunk_size, chunk_size) + a.shape[1:]), args)
    if active is None:
        out = jax.lax.map(lambda a: vfn(*a), chunked)
    else:
        if jnp.shape(active) != (n,):
            raise ValueError(f"active must be bool[{n}] (one flag per client), got {jnp.shape(active)}")
        shapes = jax.eval_shape(vfn, *jax.tree.map(lambda a: a[0], chunked))

        def chunk(a_and_active):
            a, act = a_and_active
            return jax.lax.cond(jnp.any(act), lambda a: vfn(*a), lambda a: _zeros(shapes), a)

        out = jax.lax.map(chunk, (chunked, jnp.reshape(active, (n // chunk_size, chunk_size))))
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)


def _zeros(shapes):
    """Zeros of ``jax.eval_shape`` output ``shapes`` (typed keys: keys of zero data)."""

    def zero(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, s)
            return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype))  # the default impl
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(zero, shapes)


def shard_clients(
    fn: Callable,
    mesh: jax.sharding.Mesh,
    shared,
    *args,
    chunk_size: ChunkSize = "auto",
    axis: str = "clients",
    active: jax.Array | None = None,
):
    """:func:`map_clients` with the clients spread over the devices of ``mesh``.

    Every device runs ``fn(shared, *one_client_slices)`` for its own block of
    clients (``jax.shard_map`` over ``axis``; inside, :func:`map_clients` with
    ``chunk_size`` over the local clients), so no device waits on another until
    the outputs, sharded along the clients axis, are combined. ``shared`` (the
    server params) is replicated. On CPU, give the process one device per core
    (``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`` before jax
    starts) and pass :func:`client_mesh`: measured on the 2-core machine, the
    LeNet round runs 1.3x faster than on one device. A performance setting:
    the same outputs up to float reassociation. ``active``: as in
    :func:`map_clients`, per device.

    Raises:
      ValueError: the cohort does not divide evenly over the devices.
    """
    n = jax.tree.leaves(args)[0].shape[0]
    devices = mesh.shape[axis]
    if n % devices:
        raise ValueError(
            f"a cohort of {n} clients does not divide over {devices} devices (mesh axis {axis!r})"
        )
    spec = jax.sharding.PartitionSpec(axis)
    if active is None:
        local = lambda shared, *a: map_clients(lambda *b: fn(shared, *b), *a, chunk_size=chunk_size)
    else:
        args = (*args, active)
        local = lambda shared, *a: map_clients(
            lambda *b: fn(shared, *b), *a[:-1], chunk_size=chunk_size, active=a[-1]
        )
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), *([spec] * len(args))),
        out_specs=spec,
        check_vma=False,
    )(shared, *args)


MAX_PAD_FRACTION = 1 / 16
"""Sharded rounds that compute every slot (``Performance(skip_padding=False)``) use fewer devices
of the mesh rather than pad the cohort by more than this fraction (:func:`run_clients` on CPU);
measured on the 2-core machine: cohort 10 in chunks of 2 padded to 12 over 2 devices ran 0.89x
as fast as one device, cohort 100 padded to 104 1.00x. With skipping (the default) the padding
chunks are not computed, so every device of the mesh is used."""


def _shard_like_one_device(
    fn: Callable,
    mesh: jax.sharding.Mesh,
    shared,
    args,
    chunk_size: ChunkSize,
    active: jax.Array | None = None,
):
    """:func:`shard_clients` computing each client bit for bit as on one device (CPU).

    A client's bits depend on the width of the vmapped chunk it runs in (XLA:CPU picks kernels
    by shape), not on the device. So the chunk size is the one-device choice for the WHOLE
    cohort (``"auto"``: :func:`auto_chunk_size` of ``n`` clients), the cohort is padded with
    copies of slot 0 to a multiple of ``chunk * devices`` (at most :data:`MAX_PAD_FRACTION` of
    ``n``: otherwise fewer devices are used; every device runs whole chunks, the
    same chunks as one device), and the outputs are cut back to ``n`` and replicated, so what
    follows (aggregation, the server step) runs on the same arrays as on one device. When the
    cohort fits in one vmap: under ``"auto"`` it runs on one device (exact; such rounds are too
    small to gain from splitting), with ``chunk_size=None`` the devices split it. On GPU/TPU
    (no chunks, and replicating every client's output would cost memory) and over several
    processes the devices always split the cohort: equal up to float reassociation.

    With ``active`` (:func:`map_clients`) the chunks are dealt to the devices in turn (chunk
    ``j`` to device ``j % devices``), so a cohort whose sampled clients come first spreads
    them over every device; the padding slots are inactive and skipped. Without it, the
    devices run contiguous blocks of chunks.
    """
    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        # GPU/TPU: no chunks, and replicating every output costs memory; several processes:
        # gathering every client's output in every process costs traffic. Split the cohort.
        return shard_clients(fn, mesh, shared, *args, chunk_size=chunk_size, active=active)
    n = jax.tree.leaves(args)[0].shape[0]
    devices = mesh.shape["clients"]
    chunk = auto_chunk_size(lambda *a: fn(shared, *a), *args) if chunk_size == "auto" else chunk_size
    if chunk is None or chunk >= n:
        if chunk_size == "auto":
            # The whole cohort's working set fits in cache: one device is exact, and faster
            # (measured: the heart-disease MLP round 0.003 s on one device, 0.08 s on two).
            return map_clients(lambda *a: fn(shared, *a), *args, chunk_size=None)
        return shard_clients(fn, mesh, shared, *args, chunk_size=None)
    while active is None and devices > 1 and (-n % (chunk * devices)) > MAX_PAD_FRACTION * n:
        devices -= 1  # fewer devices rather than many padding slots (same result)
    if devices == 1:
        return map_clients(lambda *a: fn(shared, *a), *args, chunk_size=chunk, active=active)
    if devices < mesh.shape["clients"]:
        mesh = jax.sharding.Mesh(mesh.devices.reshape(-1)[:devices], ("clients",))
    pad = -n % (chunk * devices)
    index = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])  # copies of slot 0
    if active is not None:  # padding slots inactive (skipped); chunk j on device j % devices
        active = jnp.concatenate([jnp.asarray(active, bool), jnp.zeros(pad, bool)])
        per_device = (n + pad) // (chunk * devices)
        order = np.arange(n + pad).reshape(per_device, devices, chunk).transpose(1, 0, 2).reshape(-1)
        index, active = index[order], active[order]
    if pad or active is not None:
        args = jax.tree.map(lambda a: a[index], args)
    out = shard_clients(fn, mesh, shared, *args, chunk_size=chunk, active=active)
    if active is not None:
        out = jax.tree.map(lambda a: a[np.argsort(order)], out)  # back to the slots' order
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a[:n], replicated), out)


def client_mesh(devices=None, axis: str = "clients") -> jax.sharding.Mesh:
    """A one-axis mesh over ``devices`` (default: all) for :func:`shard_clients`."""
    return jax.sharding.Mesh(np.array(jax.devices() if devices is None else devices), (axis,))


def apply_performance(client_update, performance: Performance):
    """``client_update`` built with ``performance`` (the fast conv path, compute dtype, unroll).

    Builders of :mod:`fljax.client` return updates with ``with_performance``;
    any other callable is used as it is.
    """
    if isinstance(client_update, StatefulClientUpdate):
        return client_update._replace(update=apply_performance(client_update.update, performance))
    configure = getattr(client_update, "with_performance", None)
    return configure(performance) if configure is not None else client_update


def run_clients(
    client_update: ClientUpdate | StatefulClientUpdate,
    params: PyTree,
    cohort: Cohort,
    key: jax.Array,
    performance: Performance | None = None,
) -> tuple[PyTree, ClientOutput]:
    """Run ``client_update`` for every slot of ``cohort`` from the same ``params``.

    Client ``i`` gets the key ``fold_in(stream(key, "clients"), client_ids[i])``.
    Padding slots (``client_mask`` False) get weight 0 and keep their state; with
    chunks, a chunk of padding slots only is not computed (its outputs are zeros;
    ``performance.skip_padding``), and over a mesh the chunks are dealt to the
    devices in turn, so the sampled clients (first in a Poisson cohort) spread over
    every device.
    ``params`` is what the server broadcasts (the model, or e.g. SCAFFOLD's
    ``(model, control)``). With ``performance.mesh`` the clients are spread over
    its devices (:func:`shard_clients`).

    Returns:
      ``(client_states, outputs)``: the cohort's new client states (``()`` for
      a stateless update) and the stacked :class:`ClientOutput`.
    """
    perf = performance if performance is not None else Performance()
    update = apply_performance(client_update, perf)
    keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
    stateful = isinstance(update, StatefulClientUpdate)
    if stateful:
        if not jax.tree.leaves(cohort.client_states):
            raise ValueError(
                "a stateful client update needs the cohort's client states: "
                "cohort = client_states.attach(data.cohort(...)) (fljax.data.ClientStates)"
            )
        fn, args = update.update, (cohort.client_states, cohort.data, keys)
    else:
        fn, args = (lambda p, d, k: ((), update(p, d, k))), (cohort.data, keys)
    active = cohort.client_mask if perf.skip_padding else None  # chunks of padding only: skipped
    if perf.mesh is None:
        states, out = map_clients(lambda *a: fn(params, *a), *args, chunk_size=perf.chunk_size, active=active)
    else:
        states, out = _shard_like_one_device(fn, perf.mesh, params, args, perf.chunk_size, active)
    weight = jnp.where(cohort.client_mask, out.weight, 0.0).astype(jnp.float32)
    if stateful:
        keep = lambda new, old: jnp.where(cohort.client_mask.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        states = jax.tree.map(keep, states, cohort.client_states)
    return states, out._replace(weight=weight)


def check_cohort(cohort: Cohort) -> None:
    """Raise a clear error for cohorts whose shapes do not line up (trace-time check)."""
    n = cohort.client_mask.shape[0]
    if cohort.client_ids.shape != (n,):
        raise ValueError(f"client_ids must be [{n}], got {cohort.client_ids.shape}")
    m = cohort.data.mask
    if m.ndim != 2 or m.shape[0] != n:
        raise ValueError(f"data.mask must be [clients={n}, num_examples], got {m.shape}")
    for leaf in jax.tree.leaves((cohort.data.x, cohort.data.y)):
        if leaf.shape[:2] != m.shape:
            raise ValueError(
                f"client data leaves must start with [clients, num_examples] = {m.shape}, got {leaf.shape}"
            )
    for leaf in jax.tree.leaves(cohort.client_states):
        if leaf.shape[:1] != (n,):
            raise ValueError(f"client_states leaves must start with [clients={n}], got {leaf.shape}")


def client_metrics(out: ClientOutput) -> dict:
    """Client metrics averaged over participating clients, weighted by the clients' weights.

    Each metric ``k`` of the clients becomes ``client_{k}_weighted_mean``: the mean over the
    participating clients weighted by their aggregation weights (the example counts under
    ``weighting="num_examples"``, so ``client_train_loss_weighted_mean`` is then the mean over
    examples; 1 each under uniform weighting).
    """
    present = out.weight > 0
    w = jnp.where(present, out.weight, 0.0)
    wsum = jnp.maximum(jnp.sum(w), 1e-12)
    return {
        f"client_{k}_weighted_mean": jnp.sum(jnp.where(present, v, 0.0) * w) / wsum
        for k, v in out.metrics.items()
    }


def server_step(state: ServerState, delta: Params, server_optimizer, aggregator_state, metrics):
    """Apply the combined ``delta`` with the server optimizer; count the round."""
    updates, opt_state = optimizer_update(server_optimizer, delta, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, delta_norm=optax.tree.norm(delta))
    return ServerState(params, opt_state, aggregator_state, state.round + 1), metrics


def server_update(
    state: ServerState,
    out: ClientOutput,
    key: jax.Array,
    aggregator: Aggregator,
    server_optimizer: optax.GradientTransformation,
) -> tuple[ServerState, dict]:
    """The server half of a round: aggregate the clients' outputs, apply the optimizer.

    Returns the new state and the round's metrics: client metrics averaged over
    participating clients (weighted by the clients' weights), the aggregator's
    metrics and ``delta_norm``.
    """
    agg_state, delta, agg_metrics = aggregator.aggregate(
        state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
    )
    return server_step(state, delta, server_optimizer, agg_state, client_metrics(out) | agg_metrics)


def _chunked_sum(fn, args, n: int, chunk_size: int | None):
    """Sum ``fn(*chunk)`` over chunks of clients with a scan (memory O(chunk))."""
    if chunk_size is None or chunk_size >= n:
        return fn(*args)
    if n % chunk_size:
        raise ValueError(f"bucket of {n} slots is not a multiple of chunk_size {chunk_size}")
    chunks = jax.tree.map(lambda a: a.reshape((n // chunk_size, chunk_size) + a.shape[1:]), args)
    first = jax.tree.map(lambda a: a[0], chunks)
    rest = jax.tree.map(lambda a: a[1:], chunks)

    def body(carry, chunk):
        return jax.tree.map(jnp.add, carry, fn(*chunk)), None

    total, _ = jax.lax.scan(body, fn(*first), rest)
    return total


def averaging_algorithm(
    client_update: ClientUpdate | StatefulClientUpdate,
    server_optimizer: optax.GradientTransformation,
    *,
    aggregator: Aggregator | None = None,
    performance: Performance | None = None,
) -> FederatedAlgorithm:
    """The generalised FedAvg round (Reddi et al. 2021, Algorithm 1).

    ``update(state, cohort, key)``: every cohort client runs ``client_update``
    from ``state.params``; ``aggregator`` combines the deltas (default:
    example-weighted mean, dropping non-finite clients); the server optimizer
    treats the combined delta as a gradient. With ``optax.sgd(1.0)`` the new
    model is the weighted average of the local models (FedAvg).

    ``cohort`` may also be a tuple of bucket cohorts (:func:`fljax.data.bucketing.split`
    or ``merge``) for heavy-tailed populations: with the default aggregator the
    weighted sum is accumulated bucket by bucket (chunks of
    ``performance.chunk_size`` clients, memory O(chunk)) and divided once; any
    other aggregator gets all buckets' outputs at once. Called outside ``jit``,
    each bucket shape compiles once; under ``jit`` the whole round is one
    computation.

    With a :class:`~fljax.base.StatefulClientUpdate`, ``cohort.client_states``
    (gathered by :class:`fljax.data.ClientStates`) flow through the round and
    the new ones come back as ``state.client_states``.

    Args:
      client_update: one client's update (e.g. :func:`fljax.client.local_sgd`).
      server_optimizer: any optax optimizer.
      aggregator: an :class:`Aggregator`; default :func:`aggregators.weighted_mean`.
      performance: :class:`~fljax.base.Performance` settings (default: all
        defaults); also ``algo.with_performance(perf)``.

    Returns:
      A :class:`FederatedAlgorithm` whose state is :class:`ServerState`. Round
      metrics: client metrics averaged over participating clients (weighted by
      the clients' weights), aggregator metrics, and ``delta_norm``.
    """
    perf = performance if performance is not None else Performance()
    streaming = aggregator is None
    agg = aggregator if aggregator is not None else aggregators_lib.weighted_mean()
    stateful = isinstance(client_update, StatefulClientUpdate)

    def init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), agg.init(params), jnp.zeros((), jnp.int32))

    def round_(state: ServerState, cohort: Cohort, key: jax.Array) -> tuple[ServerState, dict]:
        check_cohort(cohort)
        states, out = run_clients(client_update, state.params, cohort, key, perf)
        state, metrics = server_update(state, out, key, agg, server_optimizer)
        return state._replace(client_states=states), metrics

    chunk = None if perf.chunk_size == "auto" else perf.chunk_size
    summer = aggregators_lib.weighted_sum()

    def sums(params, agg_key, data, keys, mask):
        out = jax.vmap(apply_performance(client_update, perf), in_axes=(None, 0, 0))(params, data, keys)
        weight = jnp.where(mask, out.weight, 0.0).astype(jnp.float32)
        _, total, m = summer.aggregate((), out.delta, weight, agg_key)
        w, _ = aggregators_lib.sanitize(out.delta, weight)
        metric_sums = {k: tree.weighted_sum(v, w) for k, v in out.metrics.items()}
        return total, metric_sums, {k: m[k] for k in ("total_weight", "num_nonfinite", "num_clients")}

    @jax.jit
    def bucket_sums(params, cohort, key):
        check_cohort(cohort)
        keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
        args = (cohort.data, keys, cohort.client_mask)
        agg_key = fl_random.stream(key, "aggregate")
        return _chunked_sum(lambda *a: sums(params, agg_key, *a), args, cohort.client_mask.shape[0], chunk)

    @jax.jit
    def finish_sums(state, total):
        delta_sum, metric_sums, m = total
        wsum = m["total_weight"]
        denom = jnp.where(wsum > 0, wsum, 1.0)
        delta = jax.tree.map(lambda s: s / denom.astype(s.dtype), delta_sum)
        metrics = {f"client_{k}_weighted_mean": v / denom for k, v in metric_sums.items()} | m
        return server_step(state, delta, server_optimizer, state.aggregator_state, metrics)

    @jax.jit
    def bucket_outputs(params, cohort, key):
        check_cohort(cohort)
        return run_clients(client_update, params, cohort, key, dataclasses.replace(perf, chunk_size=chunk))[1]

    finish_outputs = jax.jit(lambda state, out, key: server_update(state, out, key, agg, server_optimizer))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

    def buckets(state: ServerState, cohorts, key: jax.Array) -> tuple[ServerState, dict]:
        if not cohorts:
            raise ValueError("no bucket cohorts given")
        if stateful:
            raise ValueError("stateful client updates take one Cohort per round, not size buckets")
        if streaming:
            total = bucket_sums(state.params, cohorts[0], key)
            for c in cohorts[1:]:  # one compiled add, whatever the number of calls
                total = add(total, bucket_sums(state.params, c, key))
            return finish_sums(state, total)
        outs = [bucket_outputs(state.params, c, key) for c in cohorts]
        total = sum(int(o.weight.shape[0]) for o in outs)
        pad = bucketing.capacity(total) - total  # zero-weight slots: few distinct aggregation shapes
        if pad:
            outs.append(jax.tree.map(lambda a: jnp.zeros((pad,) + a.shape[1:], a.dtype), outs[0]))
        out = jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
        return finish_outputs(state, out, key)

    def update(state: ServerState, cohort, key: jax.Array) -> tuple[ServerState, dict]:
        if isinstance(cohort, list | tuple) and not isinstance(cohort, Cohort):
            return buckets(state, list(cohort), key)
        return round_(state, cohort, key)

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return averaging_algorithm(
            client_update, server_optimizer, aggregator=aggregator, performance=performance
        )

    return FederatedAlgorithm(init, update, with_performance)
