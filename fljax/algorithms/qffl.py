"""q-FFL by q-FedAvg: fair resource allocation through a q-weighted objective.

q-FFL minimises ``f_q(w) = sum_i p_i F_i(w)^(q+1) / (q+1)``: ``q = 0`` is the
usual objective, a larger ``q`` weighs clients with high loss more and makes
the clients' losses more uniform. q-FedAvg (Algorithm 3 of the paper) solves
it: from the server model ``w`` each client computes its loss ``F_i = F_i(w)``
on all its data, trains locally to ``w_i`` and sends

    Delta_i = F_i^q * L (w - w_i),
    h_i     = q F_i^(q-1) ||L (w - w_i)||^2 + L F_i^q,

where ``L`` estimates the Lipschitz constant of the gradients (the paper's
code uses ``1 / learning_rate``). The server steps

    w <- w - sum_i Delta_i / sum_i h_i.

With ``q = 0``, ``Delta_i = L (w - w_i)`` and ``h_i = L``: the step is the
unweighted mean of ``w - w_i`` whatever ``L`` is, so q-FedAvg with ``q = 0``
is FedAvg with uniform client weights and server learning rate 1.

Both sums run through the aggregator as the pair ``(Delta_i, h_i)`` with
weight 1 per participating client (default: the unweighted mean, whose ratio
is the ratio of sums), so padding contributes exactly zero.

References:
  Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated
  Learning". ICLR 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fljax import aggregators, client, losses, simulation
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientData,
    ClientOutput,
    ClientUpdate,
    Cohort,
    FederatedAlgorithm,
    Params,
    Performance,
    ServerState,
    optimizer_update,
)


def qffl_client(
    model,
    learning_rate: float,
    *,
    q: float,
    batch_size: int,
    num_epochs: int = 1,
    lipschitz: float | None = None,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    max_steps: int | None = None,
) -> ClientUpdate:
    """q-FedAvg's client: local SGD, then ``(Delta_i, h_i)`` from its loss at the server model.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      learning_rate: local SGD step size.
      q: fairness parameter ``q >= 0`` (0: FedAvg with uniform weights).
      batch_size: minibatch size.
      num_epochs: local epochs.
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      max_steps: optional cap on minibatches per epoch (as :func:`fljax.client.local_sgd`).
      lipschitz: ``L``; default ``1 / learning_rate`` (as the paper's code).

    Returns:
      A client update whose ``delta`` is the pair ``(Delta_i, h_i)`` (``h_i``
      a float32 scalar), weight 1 for a client with data (0 otherwise) and
      metrics ``train_loss``, ``num_examples`` and ``start_loss`` (``F_i``).
    """
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    lip = 1.0 / learning_rate if lipschitz is None else lipschitz
    if not lip > 0:
        raise ValueError(f"lipschitz must be positive, got {lipschitz}")
    optimizer = optax.sgd(learning_rate)
    client.local_sgd(model, optimizer, batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps)

    def build(performance: Performance) -> ClientUpdate:
        apply_fn = client.fast_apply(model, performance)
        grad_fn = client.masked_mean_gradient(apply_fn, loss_fn)

        def update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
            per_example = loss_fn(apply_fn(server_params, data.x), data.y)
            m = data.mask.astype(per_example.dtype)
            start_loss = (jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)).astype(jnp.float32)
            params, loss, _ = client.train_locally(
                grad_fn,
                optimizer,
                server_params,
                data,
                key,
                batch_size=batch_size,
                num_epochs=num_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
            )
            step = jax.tree.map(lambda s, p: lip * (s - p), server_params, params)  # L (w - w_i)
            if q == 0:
                fq, h = jnp.ones((), jnp.float32), jnp.full((), lip, jnp.float32)
            else:
                f = jnp.maximum(start_loss, 1e-12)
                fq = f**q
                h = q * f ** (q - 1.0) * jnp.square(optax.tree.norm(step)).astype(jnp.float32) + lip * fq
            delta = (jax.tree.map(lambda s: s * fq.astype(s.dtype), step), h)
            n = jnp.sum(data.mask.astype(jnp.float32))
            metrics = {"train_loss": loss, "num_examples": n, "start_loss": start_loss}
            return ClientOutput(delta, client.client_weight(n, "uniform"), metrics)

        return update

    return client.Configurable(build)


def qffl(client_update: ClientUpdate, *, aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """q-FedAvg over clients built by :func:`qffl_client`: ``w <- w - sum Delta_i / sum h_i``.

    Args:
      client_update: :func:`qffl_client`.
      aggregator: combines the pairs ``(Delta_i, h_i)``; default the unweighted
        mean over participating clients (the step is the ratio of its two
        parts, so any common factor of the aggregator cancels).

    Returns:
      ``FederatedAlgorithm`` with state :class:`~fljax.base.ServerState`
      (its optimizer is ``optax.sgd(1.0)``); metrics as the averaging round's
      plus ``client_start_loss_variance`` (the spread q-FFL reduces).

    Examples:
      >>> import jax, numpy as np
      >>> from fljax import models
      >>> from fljax.algorithms import qffl
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> algo = qffl.qffl(qffl.qffl_client(model, 0.1, q=1.0, batch_size=3))
      >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
      >>> state, metrics = jax.jit(algo.update)(state, data.cohort([0, 1]), jax.random.key(1))
      >>> int(state.round), bool(np.isfinite(metrics["client_start_loss_variance"]))
      (1, True)
    """
    return _qffl(client_update, aggregator, Performance())


def _qffl(client_update, aggregator, perf) -> FederatedAlgorithm:
    agg = aggregator if aggregator is not None else aggregators.uniform_mean()
    optimizer = optax.sgd(1.0)

    def init(params: Params) -> ServerState:
        h = jnp.zeros((), jnp.float32)
        return ServerState(params, optimizer.init(params), agg.init((params, h)), jnp.zeros((), jnp.int32))

    def update(state: ServerState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        _, out = simulation.run_clients(client_update, state.params, cohort, key, perf)
        agg_state, (num, h), metrics = agg.aggregate(
            state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
        )
        scale = jnp.where(h > 0, 1.0 / jnp.maximum(h, 1e-30), 0.0)
        delta = jax.tree.map(lambda x: x * scale.astype(x.dtype), num)
        updates, opt_state = optimizer_update(optimizer, delta, state.opt_state, state.params)
        present = out.weight > 0
        count = jnp.maximum(jnp.sum(present), 1).astype(jnp.float32)
        f = jnp.where(present, out.metrics["start_loss"], 0.0)
        mean_f = jnp.sum(f) / count
        variance = jnp.sum(jnp.where(present, jnp.square(f - mean_f), 0.0)) / count
        metrics = simulation.client_metrics(out) | metrics
        metrics |= {"client_start_loss_variance": variance, "delta_norm": optax.tree.norm(delta)}
        new = ServerState(optax.apply_updates(state.params, updates), opt_state, agg_state, state.round + 1)
        return new, metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _qffl(client_update, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
