"""MimeLite: local steps that mimic a centralised optimizer with server statistics.

Mime lets any centralised optimizer (momentum, Adam, ...) run in the
federation without client state: the server keeps the optimizer state ``s``
and broadcasts it with the model ``x``. Each client runs local steps with the
optimizer's update rule under the FROZEN state,

    y <- y - U(g_i(y), s)            (s is not updated locally),

so every client takes the steps the centralised optimizer would take, and
sends ``x - y_i`` together with the full-batch gradient of its loss at the
server model, ``grad f_i(x)``. The server averages both: the model moves to
the average of the local models (times the server learning rate), and the
state is updated once with the average full-batch gradient,
``s <- V(mean_i grad f_i(x), s)``.

Here the optimizer is any optax one: ``U(g, s)`` is the update it returns
from state ``s`` (its new state is dropped), ``V`` its new state. With
``optax.sgd(lr, momentum=beta)`` a local step is ``y - lr (g + beta m)`` and
the server's momentum is ``m <- mean grad + beta m`` (the paper's
``(1 - beta)``-damped momentum is the same with ``lr`` scaled by
``1 - beta``). Without momentum, MimeLite is FedAvg.

References:
  Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh. "Breaking the
  centralized barrier for cross-device federated learning". NeurIPS 2021
  (arXiv:2008.03606, "Mime: Mimicking Centralized Stochastic Algorithms in
  Federated Learning").
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


def frozen(optimizer: optax.GradientTransformation, state) -> optax.GradientTransformation:
    """``optimizer``'s updates from the fixed ``state``; its own state is empty and never changes."""

    def update(grads, empty, params=None):
        updates, _ = optimizer_update(optimizer, grads, state, params)
        return updates, empty

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class MimeLiteClient(client.Configurable):
    """A MimeLite client update that carries the optimizer it mimics (the server keeps its state)."""

    def __init__(
        self, build, optimizer: optax.GradientTransformation, performance: Performance | None = None
    ):
        super().__init__(build, performance)
        self.optimizer = optimizer

    def with_performance(self, performance: Performance) -> MimeLiteClient:
        return MimeLiteClient(self._build, self.optimizer, performance)


def mimelite_client(
    model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> MimeLiteClient:
    """MimeLite's client: local steps with the server's frozen optimizer state.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      optimizer: the optimizer being mimicked (e.g. ``optax.sgd(lr,
        momentum=0.9)``); :func:`mimelite` reads it from the returned update
        (``client_update.optimizer``) to keep the server's state, so it is
        given once.
      batch_size: minibatch size.
      num_epochs: local epochs.
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` or ``"uniform"`` (as :func:`fljax.client.local_sgd`).
      max_steps: optional cap on minibatches per epoch (as :func:`fljax.client.local_sgd`).

    Returns:
      ``client_update((x, s), data, key) -> ClientOutput`` whose ``delta`` is
      the pair ``(x - y_i, grad f_i(x))`` (the gradient of the mean loss over
      all the client's examples).
    """
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

        def update(broadcast, data: ClientData, key: jax.Array) -> ClientOutput:
            x, s = broadcast
            full_grad, _ = grad_fn(x, data.x, data.y, data.mask, key)
            y, loss, _ = client.train_locally(
                grad_fn,
                frozen(optimizer, s),
                x,
                data,
                key,
                batch_size=batch_size,
                num_epochs=num_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
            )
            n = jnp.sum(data.mask.astype(jnp.float32))
            delta = (jax.tree.map(jnp.subtract, x, y), full_grad)
            metrics = {"train_loss": loss, "num_examples": n}
            return ClientOutput(delta, client.client_weight(n, weighting), metrics)

        return update

    return MimeLiteClient(build, optimizer)


def mimelite(
    client_update: MimeLiteClient,
    *,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """MimeLite over clients built by :func:`mimelite_client`.

    Args:
      client_update: :func:`mimelite_client` (its ``optimizer`` is the one
        whose state the server keeps).
      server_learning_rate: the model moves by this times the aggregated
        ``x - y_i`` (1: to the average of the local models, as in the paper).
      aggregator: combines the pairs ``(x - y_i, grad f_i(x))``; default the
        weighted mean (a DP aggregator clips the pair jointly).

    Returns:
      ``FederatedAlgorithm`` with state :class:`~fljax.base.ServerState`
      whose ``opt_state`` is the mimicked optimizer's state; metrics as the
      averaging round's plus ``full_grad_norm``.

    Examples:
      >>> import jax, numpy as np, optax
      >>> from fljax import models
      >>> from fljax.algorithms import mimelite
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> update = mimelite.mimelite_client(model, optax.sgd(0.1, momentum=0.9), batch_size=3)
      >>> algo = mimelite.mimelite(update)
      >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
      >>> state, metrics = jax.jit(algo.update)(state, data.cohort([0, 1]), jax.random.key(1))
      >>> int(state.round), bool(np.isfinite(metrics["full_grad_norm"]))
      (1, True)
    """
    return _mimelite(client_update, server_learning_rate, aggregator, Performance())


def _mimelite(client_update, server_learning_rate, aggregator, perf) -> FederatedAlgorithm:
    if not isinstance(client_update, MimeLiteClient):
        raise TypeError("mimelite needs a client update built by mimelite_client(...)")
    optimizer = client_update.optimizer
    agg = aggregator if aggregator is not None else aggregators.weighted_mean()

    def init(params: Params) -> ServerState:
        return ServerState(
            params, optimizer.init(params), agg.init((params, params)), jnp.zeros((), jnp.int32)
        )

    def update(state: ServerState, cohort: Cohort, key: jax.Array):
        simulation.check_cohort(cohort)
        _, out = simulation.run_clients(client_update, (state.params, state.opt_state), cohort, key, perf)
        agg_state, (delta, grad), metrics = agg.aggregate(
            state.aggregator_state, out.delta, out.weight, fl_random.stream(key, "aggregate")
        )
        _, opt_state = optimizer_update(optimizer, grad, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, state.params, delta)
        metrics = simulation.client_metrics(out) | metrics
        metrics |= {"delta_norm": optax.tree.norm(delta), "full_grad_norm": optax.tree.norm(grad)}
        return ServerState(params, opt_state, agg_state, state.round + 1), metrics

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _mimelite(client_update, server_learning_rate, aggregator, performance)

    return FederatedAlgorithm(init, update, with_performance)
