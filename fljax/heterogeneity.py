"""System heterogeneity: stragglers that stop at a round's deadline.

Devices differ in speed, so within a round's deadline a slow client manages
fewer local steps than a fast one. This module simulates that under ``jit``,
with masks rather than Python branches:

* A :class:`SystemProfile` (frozen, hashable config) describes the population's
  devices: a deadline in simulated seconds, the time one local step takes on a
  device of speed 1, the distribution of device speeds (lognormal or uniform
  around 1) and the minimum number of steps a client must finish to be kept.
* :func:`work_budget` draws one client's step budget for the round from its
  key: ``floor(deadline * speed / step_time)`` with ``speed`` drawn from the
  client's ``"dropout"`` key stream (``fljax.random.stream(key, "dropout")``).
  Client keys are ``fold_in(round_key, client_id)`` (:func:`fljax.random.client_keys`),
  so a client's budget depends on its id and the round, not on its slot in the
  cohort, and is drawn afresh each round.
* :func:`with_deadline` wraps a client update built by :mod:`fljax.client`
  (``local_sgd``, ``fednova_client``, any update taking a ``step_budget``
  keyword): the client runs its usual local training, but every step after its
  budget is masked exactly like a padding minibatch
  (:func:`fljax.client.train_locally`). A client whose budget is below
  ``min_steps`` is dropped: weight 0, so it contributes exactly zero.
* :func:`deadline_metrics` recomputes, for a whole cohort, the round's number
  of dropped clients and the mean budget (the same draws the clients make),
  for logging next to the algorithm's metrics. The mean number of steps the
  kept clients actually took is the round's ``client_num_steps_weighted_mean``
  (reported by :func:`fljax.client.local_sgd` and FedNova's client).

With an infinite deadline (the default) every budget is :data:`MAX_BUDGET`,
no step is masked, and a wrapped update gives bit for bit the same result as
the plain one. FedNova (:mod:`fljax.algorithms.fednova`) normalises each
client's delta by the steps it actually took, so it is the algorithm that
stays consistent when budgets differ; FedAvg weights fast clients more.

The speed draw is per client and per round (the :data:`~fljax.base.ClientUpdate`
protocol passes a client its key, not its id). A client's speed therefore
varies from round to round around the population's distribution.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
  Heterogeneous Networks" (FedProx: partial work from stragglers). MLSys 2020.

  Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency
  Problem in Heterogeneous Federated Optimization". NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from fljax import client, simulation
from fljax import random as fl_random
from fljax.base import (
    ClientData,
    ClientOutput,
    ClientUpdate,
    Cohort,
    Params,
    Performance,
    StatefulClientUpdate,
)

MAX_BUDGET = 2**30
"""Step budget of a client that no deadline stops (an infinite deadline)."""

STEP_BUDGET = "step_budget"
"""Metric key under which a wrapped client reports its budget for the round."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SystemProfile:
    """The devices of a simulated population and the round's deadline.

    Attributes:
      deadline: simulated seconds a round waits for its clients; ``math.inf``
        (the default) waits for everyone.
      step_time: seconds one local step takes on a device of speed 1.
      speed_distribution: ``"lognormal"``: ``speed = exp(speed_spread * N(0, 1))``
        (median 1); ``"uniform"``: ``speed ~ U[1 - speed_spread, 1 + speed_spread]``.
      speed_spread: the lognormal's sigma (``>= 0``) or the uniform's half width
        (in ``[0, 1)``); 0 gives every device speed 1.
      min_steps: a client that cannot finish this many steps by the deadline is
        dropped (weight 0); 0 keeps every client, even one that took no step.

    Examples:
      A deadline of 10 s at 1 s per step on identical devices: 10 steps each.

      >>> import jax
      >>> from fljax import heterogeneity
      >>> profile = heterogeneity.SystemProfile(deadline=10.0, step_time=1.0)
      >>> int(heterogeneity.work_budget(profile, jax.random.key(0)))
      10
    """

    deadline: float = math.inf
    step_time: float = 1.0
    speed_distribution: Literal["lognormal", "uniform"] = "lognormal"
    speed_spread: float = 0.0
    min_steps: int = 0

    def __post_init__(self):
        if not self.deadline > 0:
            raise ValueError(f"deadline must be positive (math.inf: no deadline), got {self.deadline}")
        if not (self.step_time > 0 and math.isfinite(self.step_time)):
            raise ValueError(f"step_time must be positive and finite, got {self.step_time}")
        if self.speed_distribution not in ("lognormal", "uniform"):
            raise ValueError(
                f"speed_distribution must be 'lognormal' or 'uniform', got {self.speed_distribution!r}"
            )
        if not (self.speed_spread >= 0 and math.isfinite(self.speed_spread)):
            raise ValueError(f"speed_spread must be >= 0 and finite, got {self.speed_spread}")
        if self.speed_distribution == "uniform" and not self.speed_spread < 1:
            raise ValueError(f"a uniform speed_spread must be < 1, got {self.speed_spread}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an int >= 0, got {self.min_steps!r}")


def speed(profile: SystemProfile, key: jax.Array) -> jax.Array:
    """One client's device speed for the round (float32 scalar), from its client key."""
    k = fl_random.stream(key, "dropout")
    if profile.speed_distribution == "lognormal":
        return jnp.exp(jnp.float32(profile.speed_spread) * jax.random.normal(k, (), jnp.float32))
    half = jnp.float32(profile.speed_spread)
    return jax.random.uniform(k, (), jnp.float32, 1.0 - half, 1.0 + half)


def work_budget(profile: SystemProfile, key: jax.Array) -> jax.Array:
    """One client's step budget for the round: ``floor(deadline * speed / step_time)``.

    Args:
      profile: the population's :class:`SystemProfile`.
      key: the client's key for the round (what its client update receives).

    Returns:
      int32 scalar in ``[0, MAX_BUDGET]``; :data:`MAX_BUDGET` for an infinite deadline.
    """
    if math.isinf(profile.deadline):
        return jnp.int32(MAX_BUDGET)
    steps = jnp.floor(jnp.float32(profile.deadline / profile.step_time) * speed(profile, key))
    return jnp.clip(steps, 0.0, float(MAX_BUDGET)).astype(jnp.int32)


def with_deadline(client_update, profile: SystemProfile) -> ClientUpdate:
    """``client_update`` run by a device that stops at the round's deadline.

    The client's budget is :func:`work_budget` of its key; the wrapped update
    is called with the same key and ``step_budget=budget``, so its local
    training takes at most ``budget`` real steps (the rest are masked, see
    :func:`fljax.client.train_locally`) and otherwise draws exactly what the
    plain update draws. A client with ``budget < profile.min_steps`` is
    dropped: its weight is 0.

    Args:
      client_update: a stateless update that takes a ``step_budget`` keyword
        (:func:`fljax.client.local_sgd`, :func:`fljax.algorithms.fednova.fednova_client`).
      profile: the population's :class:`SystemProfile`.

    Returns:
      A :class:`fljax.client.Configurable` client update; its metrics add
      ``step_budget`` (float32, :data:`MAX_BUDGET` without a deadline) to the
      wrapped update's (``num_steps`` there counts the steps actually done).

    Examples:
      A client with 12 examples (3 minibatches of 4) and a budget of 2 steps:

      >>> import jax, numpy as np, optax
      >>> from fljax import client, heterogeneity, models
      >>> from fljax.base import ClientData
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> rng = np.random.default_rng(0)
      >>> data = ClientData(
      ...     x=rng.normal(size=(12, 4)).astype(np.float32),
      ...     y=rng.integers(0, 3, 12).astype(np.int32),
      ...     mask=np.ones(12, bool),
      ... )
      >>> profile = heterogeneity.SystemProfile(deadline=2.0)
      >>> update = heterogeneity.with_deadline(client.local_sgd(model, optax.sgd(0.1), batch_size=4), profile)
      >>> out = update(params, data, jax.random.key(1))
      >>> float(out.metrics["num_steps"]), float(out.metrics["step_budget"])
      (2.0, 2.0)
    """
    if not isinstance(profile, SystemProfile):
        raise ValueError(f"profile must be a SystemProfile, got {type(profile).__name__}")
    if isinstance(client_update, StatefulClientUpdate):
        raise ValueError("with_deadline wraps a stateless client update, got a StatefulClientUpdate")

    def build(performance: Performance) -> ClientUpdate:
        inner = simulation.apply_performance(client_update, performance)

        def update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
            budget = work_budget(profile, key)
            try:
                out = inner(server_params, data, key, step_budget=budget)
            except TypeError as e:
                if "step_budget" not in str(e):
                    raise
                raise ValueError(
                    "with_deadline needs a client update that takes a step_budget keyword "
                    f"(fljax.client.local_sgd, fednova_client), got {client_update!r}"
                ) from e
            weight = jnp.where(budget < profile.min_steps, jnp.zeros_like(out.weight), out.weight)
            metrics = out.metrics | {STEP_BUDGET: budget.astype(jnp.float32)}
            return ClientOutput(out.delta, weight, metrics)

        return update

    return client.Configurable(build)


def deadline_metrics(profile: SystemProfile, cohort: Cohort, key: jax.Array) -> dict[str, jax.Array]:
    """The round's straggler statistics, from the same draws the cohort's clients make.

    ``key`` is the round key given to the algorithm's ``update``; each client's
    key is derived as :func:`fljax.simulation.run_clients` derives it. Jittable.

    Returns:
      ``num_dropped`` (int32: real clients whose budget is below
      ``min_steps``) and ``mean_step_budget`` (float32 mean budget of the real
      clients, capped at :data:`MAX_BUDGET`).

    Examples:
      >>> import jax, numpy as np
      >>> from fljax import heterogeneity
      >>> from fljax.data import FederatedData
      >>> data = FederatedData.from_clients([(np.ones((4, 2), np.float32), np.zeros(4, np.int32))] * 3)
      >>> profile = heterogeneity.SystemProfile(deadline=3.0, min_steps=4)
      >>> m = heterogeneity.deadline_metrics(profile, data.cohort([0, 2, -1]), jax.random.key(0))
      >>> int(m["num_dropped"]), float(m["mean_step_budget"])
      (2, 3.0)
    """
    keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)
    budgets = jax.vmap(lambda k: work_budget(profile, k))(keys)
    real = cohort.client_mask
    num_real = jnp.sum(real.astype(jnp.float32))
    dropped = real & (budgets < profile.min_steps)
    mean = jnp.sum(jnp.where(real, budgets.astype(jnp.float32), 0.0)) / jnp.maximum(num_real, 1.0)
    return {"num_dropped": jnp.sum(dropped).astype(jnp.int32), "mean_step_budget": mean}
