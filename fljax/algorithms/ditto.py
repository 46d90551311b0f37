"""Ditto: fair and robust federated learning through personalization.

Two models are trained at once. The global model ``w`` is trained exactly as FedAvg trains it:
each cohort client runs local training from ``w`` and sends ``w - w_i``; the server averages
and applies its optimizer. Each client ``k`` also keeps a PERSONAL model ``v_k`` (client state,
:class:`fljax.data.ClientStates`; the initial model at first) and, in each round it takes part
in, trains it on its own data against the regularised objective

    F_k(v_k) + lambda/2 ||v_k - w||^2

(each minibatch gradient gets ``+ lambda (v_k - w)``, ``w`` the global model the round
started from). ``lambda = 0`` is pure local training of ``v_k``; a large ``lambda`` pins
``v_k`` to the global model (with plain SGD of rate ``eta`` the penalty alone contracts
``v_k - w`` by ``1 - eta lambda`` per step, so ``eta lambda = 1`` puts ``v_k`` one gradient
step from ``w``; ``eta lambda >= 2`` diverges). The paper picks ``lambda`` per task
(0.05 to 2) and shows a moderate value to be both fairer across clients and more robust to
corrupted clients than either extreme.

The personal model never leaves the client: only the global update is aggregated (any
aggregator, DP or secure aggregation included), so what the server sees is FedAvg's. Evaluate
the personal models with :func:`fljax.personalization.personalized_evaluate` on
``ClientStates.tree``.

References:
  Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
  Personalization". ICML 2021.
"""

from __future__ import annotations

from typing import Literal

import jax
import optax

from fljax import client, losses, simulation
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientData,
    FederatedAlgorithm,
    Params,
    Performance,
    StatefulClientUpdate,
)


def ditto_client(
    model,
    optimizer: optax.GradientTransformation,
    *,
    lam: float,
    batch_size: int,
    num_epochs: int = 1,
    personal_epochs: int | None = None,
    personal_optimizer: optax.GradientTransformation | None = None,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> StatefulClientUpdate:
    """Ditto's client: FedAvg's local training for the global model; its state is ``v_k``.

    The global half is :func:`fljax.client.local_sgd` with the client's key, so the deltas (and
    the global model) are FedAvg's. The personal half trains ``v_k`` for ``personal_epochs``
    with the gradient ``grad F_k(v_k) + lam (v_k - w)`` and the key
    ``stream(key, "clients")``, a sub-stream of the client's key that no epoch or step index
    reaches.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      optimizer: the local optimizer of the global half.
      lam: ``lambda >= 0``, the pull of the personal model towards the global one.
      batch_size: minibatch size (both halves).
      num_epochs: local epochs of the global half.
      personal_epochs: local epochs of the personal half (default ``num_epochs``).
      personal_optimizer: the personal half's optimizer (default ``optimizer``; a fresh state
        each round).
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` or ``"uniform"`` (as :func:`fljax.client.local_sgd`).
      max_steps: optional cap on minibatches per epoch (both halves).

    Returns:
      A :class:`~fljax.base.StatefulClientUpdate` whose state, the personal model, starts as
      the params template (the initial model); metrics ``train_loss`` (global half),
      ``personal_train_loss`` and ``num_examples``.

    Raises:
      ValueError: ``lam`` negative or not finite, ``personal_epochs < 1``, or a bad local
        training option.
    """
    if not 0 <= lam < float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    personal_epochs = num_epochs if personal_epochs is None else personal_epochs
    if isinstance(personal_epochs, bool) or not isinstance(personal_epochs, int) or personal_epochs < 1:
        raise ValueError(f"personal_epochs must be a positive integer, got {personal_epochs!r}")
    personal_opt = optimizer if personal_optimizer is None else personal_optimizer
    global_update = client.local_sgd(
        model,
        optimizer,
        batch_size=batch_size,
        num_epochs=num_epochs,
        loss_fn=loss_fn,
        weighting=weighting,
        max_steps=max_steps,
    )  # also validates the options

    def build(performance: Performance):
        local = global_update.with_performance(performance)
        grad_fn = client.masked_mean_gradient(client.fast_apply(model, performance), loss_fn)

        def update(server_params: Params, personal: Params, data: ClientData, key: jax.Array):
            out = local(server_params, data, key)
            correct = None
            if lam:
                correct = lambda g, v: jax.tree.map(
                    lambda gi, vi, wi: gi + lam * (vi - wi), g, v, server_params
                )
            personal, personal_loss, _ = client.train_locally(
                grad_fn,
                personal_opt,
                personal,
                data,
                fl_random.stream(key, "clients"),
                batch_size=batch_size,
                num_epochs=personal_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
                correct=correct,
            )
            return personal, out._replace(metrics=out.metrics | {"personal_train_loss": personal_loss})

        return update

    return StatefulClientUpdate(lambda params: params, client.Configurable(build))


def ditto(
    client_update: StatefulClientUpdate,
    *,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """Ditto over clients built by :func:`ditto_client`: the global model is FedAvg's.

    Args:
      client_update: :func:`ditto_client`.
      server_learning_rate: server step size on the averaged delta (1: FedAvg's average).
      aggregator: combines the global deltas; default the example-weighted mean (the personal
        models are never aggregated).

    Returns:
      ``FederatedAlgorithm`` with state :class:`~fljax.base.ServerState`, whose
      ``client_states`` after a round hold the cohort's new personal models (padding slots
      unchanged) for :meth:`fljax.data.ClientStates.scatter`; metrics as FedAvg's plus
      ``client_personal_train_loss_weighted_mean``.

    Raises:
      TypeError: a stateless client update.

    Examples:
      Two rounds over three clients; the personal models live on the host:

      >>> import jax, numpy as np, optax
      >>> from fljax import models
      >>> from fljax.algorithms import ditto
      >>> from fljax.data import ClientStates, FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9, 4)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> update = ditto.ditto_client(model, optax.sgd(0.1), lam=0.5, batch_size=3)
      >>> personal = ClientStates(update.init(params), data.num_clients)
      >>> algo = ditto.ditto(update)
      >>> state, step = algo.init(params), jax.jit(algo.update)
      >>> for r in range(2):
      ...     cohort = personal.attach(data.cohort([r, 2]))
      ...     state, metrics = step(state, cohort, jax.random.key(r))
      ...     state = personal.scatter(cohort, state)
      >>> [leaf.shape for leaf in jax.tree.leaves(personal.tree)][:2]  # one model per client
      [(3, 8), (3, 4, 8)]
    """
    return _ditto(client_update, server_learning_rate, aggregator, Performance())


def _ditto(client_update, server_learning_rate, aggregator, perf) -> FederatedAlgorithm:
    if not isinstance(client_update, StatefulClientUpdate):
        raise TypeError("ditto needs a stateful client update: ditto_client(...)")
    if not server_learning_rate > 0:
        raise ValueError(f"server_learning_rate must be positive, got {server_learning_rate!r}")
    return simulation.averaging_algorithm(
        client_update, optax.sgd(server_learning_rate), aggregator=aggregator, performance=perf
    )
