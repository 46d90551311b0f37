"""FedBuff: asynchronous federated learning with buffered aggregation.

Clients train asynchronously on whatever model version was current when they
started; the server keeps a buffer and takes a step whenever ``K`` updates have
arrived, down-weighting each by its staleness (how many server steps happened
while the client trained).

Simulation semantics (one ``update`` call is one buffer flush):

* The state holds ``C = concurrency`` in-flight slots and a simulated clock
  (float32 seconds, starting at 0). A slot is free or holds one dispatched
  client: its delta (computed at dispatch time from the model of that time,
  which is equivalent to training on that model and finishing later), its
  weight, the server version it started from and its finish time.
* ``update(state, cohort, key)`` first dispatches the cohort: every real client
  of ``cohort`` (in slot order; padding slots are never dispatched) takes the
  next free slot, trains from ``state.params`` with the key
  :func:`fljax.simulation.run_clients` gives it, and finishes at
  ``clock + latency``. Its latency is drawn from the key
  ``fold_in(stream(key, "dropout"), client_id)`` (:func:`fljax.random.client_keys`
  of the round's ``"dropout"`` stream, independent of the training key):
  ``latency_mean * exp(latency_sigma * N(0, 1))``
  (lognormal, median ``latency_mean``; ``latency_sigma = 0``: all equal). Real
  clients beyond the free slots are not dispatched (``num_not_dispatched``). The
  first call has ``C`` free slots and every later one has exactly the ``K``
  slots the previous flush freed, so the natural cohort sizes are ``C`` for the
  first call and ``K`` afterwards; one jitted ``update`` per cohort size.
* It then flushes the buffer: the ``K`` in-flight clients that finish first
  (ties broken by slot index) arrive, the clock moves to the last of their
  finish times (so it never goes back), and each arrived delta ``delta_i``
  started at server version ``v_i`` has staleness ``tau_i = round - v_i``. The
  aggregator combines ``s(tau_i) * delta_i`` with the clients' weights ``w_i``
  (default: weighted mean, ``sum_i w_i s(tau_i) delta_i / sum_i w_i``: with
  ``w_i = 1`` the paper's ``(1/K) sum_i s(tau_i) delta_i``), the server optimizer
  ``optax.sgd(server_learning_rate)`` applies it and ``round`` (the server
  version) counts the step. If fewer than ``K`` clients are in flight (an
  under-filled or padded cohort) the flush takes all of them: the simulation
  never waits for clients that were not dispatched. A flush with no client
  changes nothing.

With equal latencies and ``K = C`` equal to the cohort size every client
starts from the current model and arrives in the same flush with staleness 0,
so FedBuff is FedAvg exactly (``s(0) = 1``).

Client metrics (``client_*_weighted_mean``) are those of the clients dispatched
in the call; the flush adds ``clock``, ``num_buffered``, ``num_in_flight``
(after the flush), ``num_dispatched``, ``num_not_dispatched``, ``mean_staleness``
and ``max_staleness`` over the arrived clients, the aggregator's metrics and
``delta_norm``.

References:
  Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning
  with Buffered Asynchronous Aggregation". AISTATS 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fljax import aggregators, simulation
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientUpdate,
    Cohort,
    FederatedAlgorithm,
    Params,
    Performance,
    PyTree,
    StatefulClientUpdate,
    optimizer_update,
)

StalenessFn = Callable[[jax.Array], jax.Array]
"""``s(staleness) -> weight``: float32 ``[clients]`` from int32 ``[clients]``; ``s(0)`` should be 1."""


def polynomial_staleness(exponent: float = 0.5) -> StalenessFn:
    """``s(tau) = (1 + tau) ** -exponent``; the paper's default is ``exponent = 0.5``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fljax.algorithms import fedbuff
      >>> fedbuff.polynomial_staleness(0.5)(jnp.array([0, 3], jnp.int32)).tolist()
      [1.0, 0.5]
    """
    if not (exponent >= 0 and math.isfinite(exponent)):
        raise ValueError(f"exponent must be >= 0 and finite, got {exponent}")

    def weight(staleness: jax.Array) -> jax.Array:
        return (1.0 + staleness.astype(jnp.float32)) ** jnp.float32(-exponent)

    return weight


class InFlight(NamedTuple):
    """The ``C`` concurrency slots of clients that are training.

    Attributes:
      delta: leaves ``[C, ...]``, each slot's delta (computed at dispatch).
      weight: ``[C]`` float32 aggregation weights (0 for a free slot).
      start_round: ``[C]`` int32 server version each client started from.
      finish_time: ``[C]`` float32 simulated arrival times; ``inf`` marks a free slot.
    """

    delta: Params
    weight: jax.Array
    start_round: jax.Array
    finish_time: jax.Array


class FedBuffState(NamedTuple):
    """FedBuff's server state.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's state.
      aggregator_state: the aggregator's state.
      round: int32 scalar, server steps taken (the model version).
      clock: float32 scalar, simulated seconds at the last flush.
      in_flight: the :class:`InFlight` slots.
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    clock: jax.Array
    in_flight: InFlight


def latency(key: jax.Array, latency_mean: float, latency_sigma: float) -> jax.Array:
    """One client's simulated training latency (float32 seconds), lognormal with median ``latency_mean``.

    ``key`` is the client's latency key: ``fold_in(stream(round_key, "dropout"), client_id)``.
    """
    z = jax.random.normal(key, (), jnp.float32)
    return jnp.float32(latency_mean) * jnp.exp(jnp.float32(latency_sigma) * z)


def fedbuff(
    client_update: ClientUpdate,
    *,
    buffer_size: int,
    concurrency: int,
    server_learning_rate: float = 1.0,
    latency_mean: float = 1.0,
    latency_sigma: float = 1.0,
    staleness: StalenessFn | None = None,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedBuff: buffered asynchronous aggregation with a simulated clock.

    Args:
      client_update: a stateless client update (e.g. :func:`fljax.client.local_sgd`).
      buffer_size: ``K``, client updates per server step.
      concurrency: ``C >= K``, clients training at once.
      server_learning_rate: server SGD step size on the aggregated delta.
      latency_mean: median simulated training time of a client (seconds).
      latency_sigma: lognormal sigma of the latency; 0 makes every latency equal.
      staleness: ``s(tau)``; default :func:`polynomial_staleness` ``(0.5)``, ``1/sqrt(1 + tau)``.
      aggregator: combines the staleness-scaled deltas; default weighted mean.

    Returns:
      ``FederatedAlgorithm`` with state :class:`FedBuffState`; see the module
      docstring for the simulation and the metrics.

    Examples:
      Four clients in flight, a server step every two arrivals:

      >>> import jax, numpy as np, optax
      >>> from fljax import client, models
      >>> from fljax.algorithms import fedbuff
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32))
      ...     for _ in range(8)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> local = client.local_sgd(model, optax.sgd(0.1), batch_size=3)
      >>> algo = fedbuff.fedbuff(local, buffer_size=2, concurrency=4)
      >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
      >>> update = jax.jit(algo.update)
      >>> state, metrics = update(state, data.cohort([0, 1, 2, 3]), jax.random.key(1))
      >>> state, metrics = update(state, data.cohort([4, 5]), jax.random.key(2))
      >>> int(state.round), int(metrics["num_buffered"]), int(metrics["num_in_flight"])
      (2, 2, 2)
    """
    for name, value in (("buffer_size", buffer_size), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if buffer_size > concurrency:
        raise ValueError(f"buffer_size ({buffer_size}) must not exceed concurrency ({concurrency})")
    if not (latency_mean >= 0 and math.isfinite(latency_mean)):
        raise ValueError(f"latency_mean must be >= 0 and finite, got {latency_mean}")
    if not (latency_sigma >= 0 and math.isfinite(latency_sigma)):
        raise ValueError(f"latency_sigma must be >= 0 and finite, got {latency_sigma}")
    if isinstance(client_update, StatefulClientUpdate):
        raise ValueError("fedbuff takes a stateless client update, got a StatefulClientUpdate")
    settings = (buffer_size, concurrency, server_learning_rate, latency_mean, latency_sigma)
    s = staleness if staleness is not None else polynomial_staleness(0.5)
    return _fedbuff(client_update, settings, s, aggregator, Performance())


def _dispatch(in_flight: InFlight, out, cohort: Cohort, start: jax.Array, finish: jax.Array):
    """Put the cohort's real clients into the free slots, in order; returns the slots and who went."""
    free = ~jnp.isfinite(in_flight.finish_time)
    free_rank = jnp.cumsum(free.astype(jnp.int32)) - 1  # [C]
    real = cohort.client_mask
    real_rank = jnp.where(real, jnp.cumsum(real.astype(jnp.int32)) - 1, -1)  # [n]
    match = free[:, None] & (free_rank[:, None] == real_rank[None, :])  # [C, n]
    take = jnp.any(match, axis=1)  # slot j receives a client
    src = jnp.argmax(match, axis=1)  # which cohort slot

    def put(new, old):
        t = take.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(t, new[src], old)

    slots = InFlight(
        delta=jax.tree.map(put, out.delta, in_flight.delta),
        weight=put(out.weight, in_flight.weight),
        start_round=jnp.where(take, start, in_flight.start_round),
        finish_time=put(finish, in_flight.finish_time),
    )
    sent = real & (real_rank < jnp.sum(free.astype(jnp.int32)))  # [n] cohort clients given a slot
    return slots, sent


def _fedbuff(client_update, settings, staleness, aggregator, perf) -> FederatedAlgorithm:
    buffer_size, concurrency, server_learning_rate, latency_mean, latency_sigma = settings
    agg = aggregator if aggregator is not None else aggregators.weighted_mean()
    optimizer = optax.sgd(server_learning_rate)

    def init(params: Params) -> FedBuffState:
        slots = InFlight(
            delta=jax.tree.map(
                lambda p: jnp.zeros((concurrency,) + jnp.shape(p), jnp.result_type(p)), params
            ),
            weight=jnp.zeros((concurrency,), jnp.float32),
            start_round=jnp.zeros((concurrency,), jnp.int32),
            finish_time=jnp.full((concurrency,), jnp.inf, jnp.float32),
        )
        zero = jnp.zeros((), jnp.int32)
        return FedBuffState(params, optimizer.init(params), agg.init(params), zero, jnp.float32(0.0), slots)

    def update(state: FedBuffState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        n = cohort.client_mask.shape[0]
        if n > concurrency:
            raise ValueError(f"a cohort of {n} clients exceeds concurrency={concurrency}")
        _, out = simulation.run_clients(client_update, state.params, cohort, key, perf)
        keys = fl_random.client_keys(fl_random.stream(key, "dropout"), cohort.client_ids)
        lat = jax.vmap(lambda k: latency(k, latency_mean, latency_sigma))(keys)
        slots, sent = _dispatch(state.in_flight, out, cohort, state.round, state.clock + lat)

        # Flush: the K earliest arrivals among the busy slots (stable: ties by slot index).
        busy = jnp.isfinite(slots.finish_time)
        order = jnp.argsort(slots.finish_time, stable=True)
        rank = jnp.zeros((concurrency,), jnp.int32).at[order].set(jnp.arange(concurrency, dtype=jnp.int32))
        arrived = busy & (rank < buffer_size)
        any_arrived = jnp.any(arrived)
        clock = jnp.maximum(state.clock, jnp.max(jnp.where(arrived, slots.finish_time, -jnp.inf)))
        tau = jnp.where(arrived, state.round - slots.start_round, 0)
        scale = staleness(tau)
        deltas = jax.tree.map(
            lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype), slots.delta
        )
        weights = jnp.where(arrived, slots.weight, 0.0)
        agg_state, delta, agg_metrics = agg.aggregate(
            state.aggregator_state, deltas, weights, fl_random.stream(key, "aggregate")
        )
        updates, opt_state = optimizer_update(optimizer, delta, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(any_arrived, new, old)
        new_state = FedBuffState(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            aggregator_state=jax.tree.map(keep, agg_state, state.aggregator_state),
            round=state.round + any_arrived.astype(jnp.int32),
            clock=jnp.where(any_arrived, clock, state.clock),
            in_flight=slots._replace(
                weight=jnp.where(arrived, 0.0, slots.weight),
                finish_time=jnp.where(arrived, jnp.inf, slots.finish_time),
            ),
        )
        num_arrived = jnp.sum(arrived.astype(jnp.int32))
        tau_f = tau.astype(jnp.float32)
        metrics = (
            simulation.client_metrics(out._replace(weight=jnp.where(sent, out.weight, 0.0)))
            | agg_metrics
            | {
                "clock": new_state.clock,
                "num_buffered": num_arrived,
                "num_in_flight": jnp.sum(jnp.isfinite(new_state.in_flight.finish_time).astype(jnp.int32)),
                "num_dispatched": jnp.sum(sent.astype(jnp.int32)),
                "num_not_dispatched": jnp.sum((cohort.client_mask & ~sent).astype(jnp.int32)),
                "mean_staleness": jnp.sum(tau_f) / jnp.maximum(num_arrived.astype(jnp.float32), 1.0),
                "max_staleness": jnp.max(tau_f),
                "delta_norm": optax.tree.norm(delta),
            }
        )
        return new_state, metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _fedbuff(client_update, settings, staleness, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
