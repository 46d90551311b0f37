"""FedDyn: federated learning with dynamic regularization.

Each client ``i`` keeps a gradient state ``g_i`` across rounds (client state,
:class:`fljax.data.ClientStates`; zeros at first). From the server model
``w`` it minimises, by local training, the dynamically regularised objective

    L_i(v) - <g_i, v> + alpha/2 ||v - w||^2

(each minibatch gradient gets ``- g_i + alpha (v - w)``), reaching ``w_i``,
then updates ``g_i <- g_i - alpha (w_i - w)`` and sends ``w - w_i``. The
server keeps ``h`` and, over the population of ``m`` clients,

    h <- h - alpha/m sum_{i in cohort} (w_i - w),      w <- mean_i(w_i) - h / alpha.

Only ``h / alpha`` enters the server model, and its update is
``h/alpha <- h/alpha + (1/m) sum_i (w - w_i)``: ``alpha`` cancels, so the
server needs none and keeps ``correction = h / alpha``. Since every ``g_i``
and ``h`` start at zero, ``h`` stays the population mean of the ``g_i``. At
a fixed point every ``w_i = w``, so ``g_i = grad L_i(w)`` and ``h = 0``:
``sum_i grad L_i(w) = 0``, the global optimum, however heterogeneous the
clients (FedAvg's fixed point is biased by client drift).

References:
  Acar, Zhao, Matas, Mattina, Whatmough, Saligrama. "Federated Learning
  Based on Dynamic Regularization". ICLR 2021.
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
)


class FedDynState(NamedTuple):
    """FedDyn's server state.

    Attributes:
      params: the global model ``w``.
      aggregator_state: the aggregator's state (it combines ``w - w_i``).
      round: int32, rounds completed.
      correction: ``h / alpha`` (shaped like ``params``).
      client_states: the last cohort's new ``g_i`` (``[clients, ...]``), for
        :meth:`fljax.data.ClientStates.scatter`.
    """

    params: Params
    aggregator_state: PyTree
    round: jax.Array
    correction: Params
    client_states: PyTree = ()


def feddyn_client(
    model,
    optimizer: optax.GradientTransformation,
    *,
    alpha: float,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> StatefulClientUpdate:
    """FedDyn's client: local training on the dynamically regularised objective; its state is ``g_i``.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      optimizer: the local optimizer (the paper: SGD); it sees the corrected
        gradients ``grad - g_i + alpha (v - w)``.
      alpha: the regularisation strength ``alpha > 0``.
      batch_size: minibatch size.
      num_epochs: local epochs.
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` or ``"uniform"`` (as :func:`fljax.client.local_sgd`).
      max_steps: optional cap on minibatches per epoch (as :func:`fljax.client.local_sgd`).

    Returns:
      A :class:`~fljax.base.StatefulClientUpdate` whose state (``g_i``) starts
      at zeros shaped like the params; ``delta = w - w_i``.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    client.local_sgd(
        model,
        optimizer,
        batch_size=batch_size,
        num_epochs=num_epochs,
        weighting=weighting,
        max_steps=max_steps,
    )  # validates the options

    def build(performance: Performance):
        grad_fn = client.masked_mean_gradient(client.fast_apply(model, performance), loss_fn)

        def update(server_params: Params, g_i: Params, data: ClientData, key: jax.Array):
            correct = lambda g, p: jax.tree.map(
                lambda gi, si, pi, wi: gi - si + alpha * (pi - wi), g, g_i, p, server_params
            )
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
                correct=correct,
            )
            delta = jax.tree.map(jnp.subtract, server_params, params)
            new_g_i = jax.tree.map(lambda si, d: si + alpha * d, g_i, delta)  # g_i - alpha (w_i - w)
            n = jnp.sum(data.mask.astype(jnp.float32))
            metrics = {"train_loss": loss, "num_examples": n}
            return new_g_i, ClientOutput(delta, client.client_weight(n, weighting), metrics)

        return update

    return StatefulClientUpdate(
        lambda params: jax.tree.map(jnp.zeros_like, params), client.Configurable(build)
    )


def feddyn(
    client_update: StatefulClientUpdate,
    *,
    population_size: int,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedDyn over clients built by :func:`feddyn_client`.

    Args:
      client_update: :func:`feddyn_client`.
      population_size: ``m``, the number of clients (for the ``h`` update).
      aggregator: combines ``w - w_i``; default the unweighted mean over
        participating clients, as in the paper.

    Returns:
      ``FederatedAlgorithm`` with state :class:`FedDynState`; metrics as the
      averaging round's plus ``correction_norm``.

    Examples:
      Two rounds over three clients, client states kept on the host:

      >>> import jax, numpy as np, optax
      >>> from fljax import models
      >>> from fljax.algorithms import feddyn
      >>> from fljax.data import ClientStates, FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9, 4)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> update = feddyn.feddyn_client(model, optax.sgd(0.1), alpha=0.1, batch_size=3)
      >>> states = ClientStates(update.init(params), data.num_clients)
      >>> algo = feddyn.feddyn(update, population_size=3)
      >>> state, step = algo.init(params), jax.jit(algo.update)
      >>> for r in range(2):
      ...     cohort = states.attach(data.cohort([r, 2]))
      ...     state, metrics = step(state, cohort, jax.random.key(r))
      ...     state = states.scatter(cohort, state)
      >>> int(state.round), bool(np.isfinite(metrics["correction_norm"]))
      (2, True)
    """
    return _feddyn(client_update, population_size, aggregator, Performance())


def _feddyn(client_update, population_size, aggregator, perf) -> FederatedAlgorithm:
    if population_size <= 0:
        raise ValueError(f"population_size must be positive, got {population_size}")
    if not isinstance(client_update, StatefulClientUpdate):
        raise TypeError("feddyn needs a stateful client update: feddyn_client(...)")
    agg = aggregator if aggregator is not None else aggregators.uniform_mean()

    def init(params: Params) -> FedDynState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return FedDynState(params, agg.init(params), jnp.zeros((), jnp.int32), zeros)

    def update(state: FedDynState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        states, out = simulation.run_clients(client_update, state.params, cohort, key, perf)
        agg_state, delta, metrics = agg.aggregate(
            state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
        )
        participating = jnp.sum(out.weight > 0).astype(jnp.float32)
        frac = participating / jnp.float32(population_size)
        correction = jax.tree.map(lambda c, d: c + d * frac.astype(d.dtype), state.correction, delta)
        params = jax.tree.map(lambda w, d, c: w - d - c, state.params, delta, correction)
        metrics = simulation.client_metrics(out) | metrics
        metrics |= {"delta_norm": optax.tree.norm(delta), "correction_norm": optax.tree.norm(correction)}
        return FedDynState(params, agg_state, state.round + 1, correction, states), metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _feddyn(client_update, population_size, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
