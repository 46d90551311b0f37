"""Running a cohort: ``map_clients`` and the jitted averaging round.

``map_clients`` vmaps a one-client update over the cohort, or, with
``chunk_size``, runs ``lax.map`` over chunks of vmapped clients to bound
memory; both give the same result (up to float reassociation).

``averaging_algorithm`` builds the round shared by FedAvg, FedSGD, FedAvgM,
FedProx and the adaptive FedOpt family: clients train locally, an
:class:`~fljax.base.Aggregator` combines their deltas, and any optax optimizer
applies the combined delta as a pseudo-gradient. Algorithms in
:mod:`fljax.algorithms` are thin factories over it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fljax import aggregators as aggregators_lib
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientOutput,
    ClientUpdate,
    Cohort,
    FederatedAlgorithm,
    Params,
    ServerState,
)


def map_clients(
    fn: Callable, *args, chunk_size: int | None = None
) -> jax.Array:
    """Apply a one-client function to every client of the cohort.

    Args:
      fn: function of one client's slices of ``args``.
      *args: pytrees whose leaves all have the same leading ``[clients]`` axis.
      chunk_size: ``None`` vmaps all clients at once; an integer runs
        ``lax.map`` over chunks of that many vmapped clients (the cohort size
        must be a multiple of it), trading speed for peak memory.

    Returns:
      ``fn``'s outputs stacked along a leading ``[clients]`` axis.
    """
    leaves = jax.tree.leaves(args)
    if not leaves:
        raise ValueError("map_clients needs at least one array argument")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.shape[:1] != (n,):
            raise ValueError(f"every argument needs the same leading clients axis {n}, got shape {leaf.shape}")
    vfn = jax.vmap(fn)
    if chunk_size is None or chunk_size >= n:
        return vfn(*args)
    if chunk_size <= 0 or n % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be positive and divide the cohort size {n}")
    chunked = jax.tree.map(lambda a: a.reshape((n // chunk_size, chunk_size) + a.shape[1:]), args)
    out = jax.lax.map(lambda a: vfn(*a), chunked)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)


def run_clients(
    client_update: ClientUpdate,
    params: Params,
    cohort: Cohort,
    key: jax.Array,
    *,
    chunk_size: int | None = None,
) -> ClientOutput:
    """Run ``client_update`` for every slot of ``cohort`` from the same ``params``.

    Client ``i`` gets the key ``fold_in(stream(key, "clients"), client_ids[i])``.
    Padding slots (``client_mask`` False) get weight 0.
    """
    keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
    out = map_clients(lambda d, k: client_update(params, d, k), cohort.data, keys, chunk_size=chunk_size)
    weight = jnp.where(cohort.client_mask, out.weight, 0.0).astype(jnp.float32)
    return out._replace(weight=weight)


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


def averaging_algorithm(
    client_update: ClientUpdate,
    server_optimizer: optax.GradientTransformation,
    *,
    aggregator: Aggregator | None = None,
    chunk_size: int | None = None,
) -> FederatedAlgorithm:
    """The generalised FedAvg round (Reddi et al. 2021, Algorithm 1).

    ``update(state, cohort, key)``: every cohort client runs ``client_update``
    from ``state.params``; ``aggregator`` combines the deltas (default:
    example-weighted mean, dropping non-finite clients); the server optimizer
    treats the combined delta as a gradient. With ``optax.sgd(1.0)`` the new
    model is the weighted average of the local models (FedAvg).

    Args:
      client_update: one client's update (e.g. :func:`fljax.client.local_sgd`).
      server_optimizer: any optax optimizer.
      aggregator: an :class:`Aggregator`; default :func:`aggregators.weighted_mean`.
      chunk_size: see :func:`map_clients`.

    Returns:
      A :class:`FederatedAlgorithm` whose state is :class:`ServerState`. Round
      metrics: client metrics averaged over participating clients (example-
      weighted), aggregator metrics, and ``delta_norm``.
    """
    aggregator = aggregator if aggregator is not None else aggregators_lib.weighted_mean()

    def init(params: Params) -> ServerState:
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def update(state: ServerState, cohort: Cohort, key: jax.Array) -> tuple[ServerState, dict]:
        check_cohort(cohort)
        out = run_clients(client_update, state.params, cohort, key, chunk_size=chunk_size)
        agg_key = fl_random.stream(key, "aggregate")
        agg_state, delta, agg_metrics = aggregator.aggregate(state.aggregator_state, out.delta, out.weight, agg_key)
        updates, opt_state = server_optimizer.update(delta, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        present = out.weight > 0
        w = jnp.where(present, out.weight, 0.0)
        wsum = jnp.maximum(jnp.sum(w), 1e-12)
        metrics = {
            f"client_{k}": jnp.sum(jnp.where(present, v, 0.0) * w) / wsum for k, v in out.metrics.items()
        }
        metrics.update(agg_metrics)
        metrics["delta_norm"] = optax.global_norm(delta)
        new_state = ServerState(params, opt_state, agg_state, state.round + 1)
        return new_state, metrics

    return FederatedAlgorithm(init, update)
