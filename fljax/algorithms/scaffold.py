"""SCAFFOLD: stochastic controlled averaging (control variates against client drift).

Each client ``i`` keeps a control variate ``c_i`` across rounds (client state,
:class:`fljax.data.ClientStates`); the server keeps ``c``. A client trains
from the server model ``x`` with corrected gradients ``g_i(y) - c_i + c`` for
``K`` local SGD steps of size ``eta_l``, then (option II of the paper)
``c_i+ = c_i - c + (x - y) / (K eta_l)`` and it sends ``(x - y, c_i+ - c_i)``.
The server moves ``x`` by the server learning rate times the mean of ``x - y``
and ``c <- c + (1/N) sum_i (c_i+ - c_i)`` over the cohort (``N``: the
population size), so ``c`` stays the mean of the clients' variates.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic
  Controlled Averaging for Federated Learning". ICML 2020.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fljax import aggregators, client, losses, simulation
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientData,
    ClientOutput,
    Cohort,
    FederatedAlgorithm,
    Params,
    Performance,
    PyTree,
    StatefulClientUpdate,
    optimizer_update,
)


class ScaffoldState(NamedTuple):
    """SCAFFOLD's server state.

    Attributes:
      params: the global model ``x``.
      opt_state: the server optimizer's state.
      aggregator_state: the aggregator's state (it combines ``(x - y, delta c_i)``).
      round: int32, rounds completed.
      control: the server control variate ``c`` (shaped like ``params``).
      client_states: the last cohort's new ``c_i`` (``[clients, ...]``), for
        :meth:`fljax.data.ClientStates.scatter`.
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    control: Params
    client_states: PyTree = ()


def scaffold_client(
    model,
    learning_rate: float,
    *,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> StatefulClientUpdate:
    """SCAFFOLD's client: corrected local SGD; its state is ``c_i`` (zeros at first).

    The options are those of :func:`fljax.client.local_sgd`; local steps are
    plain SGD with ``learning_rate`` (option II's control update assumes it).
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    client.local_sgd(
        model,
        optax.sgd(learning_rate),
        batch_size=batch_size,
        num_epochs=num_epochs,
        weighting=weighting,
        max_steps=max_steps,
    )  # validates the options
    optimizer = optax.sgd(learning_rate)

    def build(performance: Performance):
        grad_fn = client.masked_mean_gradient(client.fast_apply(model, performance), loss_fn)

        def update(broadcast, c_i: Params, data: ClientData, key: jax.Array):
            x, c = broadcast
            correct = lambda g, p: jax.tree.map(lambda gi, ci, si: gi - ci + si, g, c_i, c)
            y, loss, steps = client.train_locally(
                grad_fn,
                optimizer,
                x,
                data,
                key,
                batch_size=batch_size,
                num_epochs=num_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
                correct=correct,
            )
            scale = jnp.where(steps > 0, 1.0 / (jnp.maximum(steps, 1.0) * learning_rate), 0.0)
            new_c_i = jax.tree.map(
                lambda ci, si, xi, yi: jnp.where(steps > 0, ci - si + (xi - yi) * scale.astype(xi.dtype), ci),
                c_i,
                c,
                x,
                y,
            )
            delta = (jax.tree.map(jnp.subtract, x, y), jax.tree.map(jnp.subtract, new_c_i, c_i))
            n = jnp.sum(data.mask.astype(jnp.float32))
            metrics = {"train_loss": loss, "num_examples": n}
            return new_c_i, ClientOutput(delta, client.client_weight(n, weighting), metrics)

        return update

    return StatefulClientUpdate(
        lambda params: jax.tree.map(jnp.zeros_like, params), client.Configurable(build)
    )


def scaffold(
    client_update: StatefulClientUpdate,
    *,
    population_size: int,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """SCAFFOLD over clients built by :func:`scaffold_client`.

    Args:
      client_update: :func:`scaffold_client`.
      population_size: ``N``, the number of clients (for the control update).
      server_learning_rate: ``eta_g``.
      aggregator: combines the pairs ``(x - y, delta c_i)``; default the
        unweighted mean over participating clients, as in the paper. A DP
        aggregator clips the pair jointly.

    Returns:
      ``FederatedAlgorithm`` with state :class:`ScaffoldState`; metrics as the
      averaging round's; performance settings through ``algo.with_performance``.
    """
    return _scaffold(client_update, population_size, server_learning_rate, aggregator, Performance())


def _scaffold(client_update, population_size, server_learning_rate, aggregator, perf) -> FederatedAlgorithm:
    if population_size <= 0:
        raise ValueError(f"population_size must be positive, got {population_size}")
    if not isinstance(client_update, StatefulClientUpdate):
        raise TypeError("scaffold needs a stateful client update: scaffold_client(...)")
    agg = aggregator if aggregator is not None else aggregators.uniform_mean()
    optimizer = optax.sgd(server_learning_rate)

    def init(params: Params) -> ScaffoldState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaffoldState(
            params, optimizer.init(params), agg.init((params, zeros)), jnp.zeros((), jnp.int32), zeros
        )

    def update(state: ScaffoldState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        states, out = simulation.run_clients(client_update, (state.params, state.control), cohort, key, perf)
        agg_state, (dx, dc), metrics = agg.aggregate(
            state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
        )
        updates, opt_state = optimizer_update(optimizer, dx, state.opt_state, state.params)
        participating = jnp.sum(out.weight > 0).astype(jnp.float32)
        frac = participating / jnp.float32(population_size)
        control = jax.tree.map(lambda c, d: c + d * frac.astype(d.dtype), state.control, dc)
        metrics = simulation.client_metrics(out) | metrics | {"delta_norm": optax.tree.norm(dx)}
        new = ScaffoldState(
            optax.apply_updates(state.params, updates), opt_state, agg_state, state.round + 1, control, states
        )
        return new, metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _scaffold(client_update, population_size, server_learning_rate, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
