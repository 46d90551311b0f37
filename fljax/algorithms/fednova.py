"""FedNova: normalized averaging against objective inconsistency.

Clients that take different numbers of local steps ``tau_i`` move different
distances, so FedAvg's average ``sum_i p_i delta_i`` weights client ``i`` by
about ``p_i tau_i`` and converges to the optimum of the surrogate
``sum_i p_i tau_i F_i / sum_i p_i tau_i`` instead of ``sum_i p_i F_i``.
FedNova divides each client's delta by its own step budget ``a_i`` (``tau_i``
for vanilla SGD; for heavy-ball momentum ``rho``
``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``, the total
weight the local updates give to one constant gradient), averages the
normalized updates ``d_i = delta_i / a_i`` with the weights ``p_i``, and
rescales by the effective number of steps ``tau_eff = sum_i p_i a_i``:

    x <- x - server_learning_rate * tau_eff * sum_i p_i d_i      (sum_i p_i = 1)

With equal ``a_i`` this is FedAvg exactly; with unequal ones the fixed point
is no longer pulled towards the clients that take more steps (for a small
local learning rate it is the optimum of ``sum_i p_i F_i``).

``tau_i`` is the number of real local steps the client took
(:func:`fljax.client.train_locally`: ``num_epochs * ceil(n_i / batch_size)``,
or ``num_epochs * max_steps`` when capped); padding minibatches are not steps.
The server learns every participating client's ``a_i`` (as in the paper).

References:
  Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency
  Problem in Heterogeneous Federated Optimization". NeurIPS 2020.
"""

from __future__ import annotations

from typing import Literal

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

NORMALIZER = "normalizer"
"""Metric key under which a FedNova client reports ``a_i`` (the server reads it)."""


def normalizer(num_steps: jax.Array, momentum: float = 0.0) -> jax.Array:
    """``a_i``: the total weight ``tau_i`` local steps give to one constant gradient.

    Vanilla SGD: ``tau``. Heavy-ball momentum ``rho`` (optax's ``trace``, which
    starts at zero): the ``k``-th step moves ``(1 - rho^k) / (1 - rho)``
    gradients, so ``a = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fljax.algorithms import fednova
      >>> float(fednova.normalizer(jnp.float32(5.0)))
      5.0
      >>> round(float(fednova.normalizer(jnp.float32(2.0), momentum=0.5)), 6)  # 1 + (1 + 0.5)
      2.5
    """
    tau = jnp.asarray(num_steps, jnp.float32)
    if momentum == 0.0:
        return tau
    rho = jnp.float32(momentum)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def fednova_client(
    model,
    learning_rate: float,
    *,
    batch_size: int,
    num_epochs: int = 1,
    momentum: float = 0.0,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> ClientUpdate:
    """FedNova's client: local SGD (optionally with momentum), delta normalized by ``a_i``.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      learning_rate: local SGD step size.
      batch_size: minibatch size.
      num_epochs: local epochs.
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` or ``"uniform"`` (as :func:`fljax.client.local_sgd`).
      max_steps: optional cap on minibatches per epoch (as :func:`fljax.client.local_sgd`).
      momentum: heavy-ball momentum ``rho`` in ``[0, 1)`` (``optax.sgd``'s).

    Returns:
      A client update whose ``delta`` is ``(x - y_i) / a_i`` (zero for a client
      that took no step) and whose metrics add ``num_steps`` (``tau_i``) and
      ``normalizer`` (``a_i``, read by :func:`fednova`). It takes an optional
      traced ``step_budget`` keyword (:func:`fljax.heterogeneity.with_deadline`):
      ``tau_i`` is then the steps done before the deadline.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    optimizer = optax.sgd(learning_rate, momentum=momentum or None)
    client.local_sgd(
        model,
        optimizer,
        batch_size=batch_size,
        num_epochs=num_epochs,
        weighting=weighting,
        max_steps=max_steps,
    )  # validates the options

    def build(performance: Performance) -> ClientUpdate:
        grad_fn = client.masked_mean_gradient(client.fast_apply(model, performance), loss_fn)

        def update(
            server_params: Params, data: ClientData, key: jax.Array, step_budget: jax.Array | None = None
        ) -> ClientOutput:
            params, loss, steps = client.train_locally(
                grad_fn,
                optimizer,
                server_params,
                data,
                key,
                batch_size=batch_size,
                num_epochs=num_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
                step_budget=step_budget,
            )
            a = normalizer(steps, momentum)
            scale = jnp.where(a > 0, 1.0 / jnp.maximum(a, 1e-12), 0.0)
            delta = jax.tree.map(lambda s, p: (s - p) * scale.astype(s.dtype), server_params, params)
            n = jnp.sum(data.mask.astype(jnp.float32))
            metrics = {"train_loss": loss, "num_examples": n, "num_steps": steps, NORMALIZER: a}
            return ClientOutput(delta, client.client_weight(n, weighting), metrics)

        return update

    return client.Configurable(build)


def fednova(
    client_update: ClientUpdate,
    *,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedNova over clients built by :func:`fednova_client`.

    The aggregator combines the normalized updates ``d_i`` with the clients'
    weights ``p_i`` (default: example-weighted mean); ``tau_eff`` is the mean
    of the reported ``a_i`` under the same weights, over the clients the
    aggregator keeps (finite deltas, weight > 0). The server takes
    ``optax.sgd(server_learning_rate)`` on ``tau_eff * aggregate(d)``.

    Args:
      client_update: :func:`fednova_client` (any update reporting ``normalizer``).
      server_learning_rate: server step size (1: the paper's FedNova).
      aggregator: combines ``d_i``; default weighted mean.

    Returns:
      ``FederatedAlgorithm`` with state :class:`~fljax.base.ServerState`;
      metrics as the averaging round's plus ``tau_eff``.

    Examples:
      Two clients with 2 and 3 local steps (batch size 3):

      >>> import jax, numpy as np
      >>> from fljax import models
      >>> from fljax.algorithms import fednova
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> algo = fednova.fednova(fednova.fednova_client(model, 0.1, batch_size=3))
      >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
      >>> state, metrics = jax.jit(algo.update)(state, data.cohort([0, 1]), jax.random.key(1))
      >>> round(float(metrics["tau_eff"]), 4)  # (6 * 2 + 9 * 3) / 15
      2.6
    """
    return _fednova(client_update, server_learning_rate, aggregator, Performance())


def _fednova(client_update, server_learning_rate, aggregator, perf) -> FederatedAlgorithm:
    agg = aggregator if aggregator is not None else aggregators.weighted_mean()
    optimizer = optax.sgd(server_learning_rate)

    def init(params: Params) -> ServerState:
        return ServerState(params, optimizer.init(params), agg.init(params), jnp.zeros((), jnp.int32))

    def update(state: ServerState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        _, out = simulation.run_clients(client_update, state.params, cohort, key, perf)
        if NORMALIZER not in out.metrics:
            raise ValueError(f"fednova needs clients that report {NORMALIZER!r}: fednova_client(...)")
        agg_state, d, metrics = agg.aggregate(
            state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
        )
        w, _ = aggregators.sanitize(out.delta, out.weight)
        wsum = jnp.sum(w)
        tau_eff = jnp.where(wsum > 0, jnp.sum(w * out.metrics[NORMALIZER]) / jnp.maximum(wsum, 1e-30), 0.0)
        delta = jax.tree.map(lambda x: x * tau_eff.astype(x.dtype), d)
        updates, opt_state = optimizer_update(optimizer, delta, state.opt_state, state.params)
        metrics = (
            simulation.client_metrics(out)
            | metrics
            | {"tau_eff": tau_eff, "delta_norm": optax.tree.norm(delta)}
        )
        new = ServerState(optax.apply_updates(state.params, updates), opt_state, agg_state, state.round + 1)
        return new, metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _fednova(client_update, server_learning_rate, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
