"""Shadow federations for membership inference, trained as ONE vmapped computation.

A membership-inference study trains ``num_models`` federations of the same
algorithm over the same candidate clients; model ``m`` admits client ``c`` when
``in_mask[m, c]`` is true (each client IN with probability 1/2, independently:
the design of Carlini et al. 2022, so every client is IN for about half the
models and OUT for the others). The target federation, whose membership an
attacker has to guess, is just one of these models; :mod:`fljax.leakage.membership`
lets each model play the target in turn, with the others as its shadows.

All models run as one ``jax.vmap`` over the algorithm's own ``update`` (the
same jitted round as a normal run), inside one ``lax.scan`` over rounds. The
cohort's data are shared by all models (not copied per model); what differs is
the ``client_mask`` (an OUT client gets weight 0 and contributes exactly zero,
the aggregators' padding contract), the initial parameters and the keys. OUT
clients still run their local training under the vmap (their outputs are
discarded): the price of static shapes.

Keys: model ``m`` is a run whose root key is ``fold_in(key, m)``; its
parameters are drawn from ``stream(run, "init")``, round ``r`` uses
``round_key(run, r)`` and, with partial participation, its Poisson sample of
the IN clients comes from ``stream(round_key(run, r), "sample")``
(:mod:`fljax.random`). Model ``m`` trained alone by ``algorithm.update`` with
these keys gives the same result (tested).

References:
  Shokri, Stronati, Song, Shmatikov. "Membership Inference Attacks Against
  Machine Learning Models". IEEE S&P 2017 (shadow models).
  Carlini, Chien, Nasr, Song, Terzis, Tramèr. "Membership Inference Attacks
  From First Principles". IEEE S&P 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fljax import losses
from fljax import random as fl_random
from fljax.base import ApplyFn, Cohort, FederatedAlgorithm, Params, ServerState


def membership_masks(num_models: int, num_clients: int, key: jax.Array) -> np.ndarray:
    """Which clients each model admits: ``[num_models, num_clients]`` bool, each IN with probability 1/2.

    Independent fair coins (Carlini et al. 2022), drawn on the host from
    ``key`` (e.g. ``fljax.random.stream(run_key, "data")``: which clients a model admits is a
    partition of the population).

    Examples:
      >>> import jax
      >>> m = membership_masks(16, 40, jax.random.key(0))
      >>> m.shape, m.dtype, bool(0.3 < m.mean() < 0.7)
      ((16, 40), dtype('bool'), True)
    """
    if num_models < 1 or num_clients < 1:
        raise ValueError(f"num_models and num_clients must be >= 1, got {num_models}, {num_clients}")
    return fl_random.host_rng(key).random((num_models, num_clients)) < 0.5


def model_keys(key: jax.Array, num_models: int) -> jax.Array:
    """``[num_models]`` run keys, ``fold_in(key, m)`` for model ``m``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_models, dtype=jnp.uint32))


def _check(cohort: Cohort, in_mask, participation: float, num_rounds: int) -> None:
    num_clients = cohort.client_mask.shape[0]
    if in_mask.ndim != 2 or in_mask.shape[1] != num_clients:
        raise ValueError(
            f"in_mask must be [num_models, clients={num_clients}] (the cohort's clients), got {in_mask.shape}"
        )
    if in_mask.dtype != bool:
        raise ValueError(f"in_mask must be bool, got {in_mask.dtype}")
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")


def _one_model(algorithm: FederatedAlgorithm, init_fn, cohort: Cohort, num_rounds: int, participation: float):
    """``train(in_mask[clients], run_key) -> (state, metrics[rounds])`` for ONE model (vmapped by the caller)."""

    def train(in_mask, run):
        state = algorithm.init(init_fn(fl_random.stream(run, "init")))

        def round_(state, r):
            key = fl_random.round_key(run, r)
            mask = cohort.client_mask & in_mask
            if participation < 1.0:
                u = jax.random.uniform(fl_random.stream(key, "sample"), in_mask.shape)
                mask = mask & (u < participation)
            return algorithm.update(state, cohort._replace(client_mask=mask), key)

        return jax.lax.scan(round_, state, jnp.arange(num_rounds, dtype=jnp.uint32))

    return train


def train_models(
    algorithm: FederatedAlgorithm,
    init_fn: Callable[[jax.Array], Params],
    cohort: Cohort,
    in_mask: np.ndarray,
    num_rounds: int,
    key: jax.Array,
    *,
    participation: float = 1.0,
) -> tuple[ServerState, dict]:
    """Train one federation per row of ``in_mask``, all in one ``jax.vmap`` over the round.

    Every round, model ``m`` runs ``algorithm.update`` on ``cohort`` with
    ``client_mask = cohort.client_mask & in_mask[m]`` (and, when
    ``participation < 1``, each IN client takes part with that probability,
    Poisson sampling as :func:`fljax.privacy.aggregation.sample_cohort` does for
    a population of the IN clients). OUT clients get weight 0, so they
    contribute exactly zero to any fljax aggregator (plain or DP).

    Args:
      algorithm: any stateless-client :class:`~fljax.base.FederatedAlgorithm`
        (e.g. ``fedavg.fedavg(...)``, with ``aggregator=privacy.dp(cfg)`` for DP).
      init_fn: ``init_fn(key) -> params`` (e.g. ``lambda k: models.init_params(model, shape, k)``).
      cohort: every candidate client, one slot each (``data.cohort(range(n))``).
      in_mask: ``[num_models, clients]`` bool (:func:`membership_masks`).
      num_rounds: rounds of training.
      key: the study's key; model ``m``'s run key is ``fold_in(key, m)``.
      participation: probability that an IN client takes part in a round.

    Returns:
      ``(state, metrics)``: the final :class:`~fljax.base.ServerState` with a
      leading ``[num_models]`` axis on every leaf, and the round metrics as
      ``[num_models, num_rounds]`` arrays.

    Examples:
      Two models on three clients; model 0 admits clients 0 and 1:

      >>> import jax, numpy as np, optax
      >>> from fljax import client, models
      >>> from fljax.algorithms import fedavg
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> data = FederatedData.from_clients(
      ...     [(rng.normal(size=(5, 3)).astype(np.float32), rng.integers(0, 2, 5).astype(np.int32))] * 3,
      ...     num_classes=2,
      ... )
      >>> model = models.LogisticRegression()
      >>> algo = fedavg.fedavg(client.local_sgd(model, optax.sgd(0.1), batch_size=5))
      >>> in_mask = np.array([[True, True, False], [False, True, True]])
      >>> state, metrics = train_models(
      ...     algo, lambda k: models.init_params(model, (3,), k), data.cohort(range(3)), in_mask, 2,
      ...     jax.random.key(0),
      ... )
      >>> state.params["params"]["Dense_0"]["kernel"].shape, metrics["num_clients"].tolist()
      ((2, 3, 2), [[2, 2], [2, 2]])
    """
    in_mask = np.asarray(in_mask)
    _check(cohort, in_mask, participation, num_rounds)
    cohort = jax.tree.map(jnp.asarray, cohort)
    train = _one_model(algorithm, init_fn, cohort, num_rounds, participation)
    keys = model_keys(key, in_mask.shape[0])
    state, metrics = jax.jit(jax.vmap(train))(jnp.asarray(in_mask), keys)
    return state, metrics


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """LiRA's statistic ``phi = log(p_y / (1 - p_y))`` of the softmax probability of the true label.

    Computed stably as ``z_y - logsumexp_{j != y} z_j`` from the logits ``z``
    (no probability is formed, so ``phi`` stays finite when ``p_y`` rounds to 1).
    A single logit (binary logistic model) is read as ``z`` for class 1,
    so ``phi = z`` for label 1 and ``-z`` for label 0.

    Args:
      logits: ``[..., classes]`` (or ``[..., 1]`` for one binary logit).
      labels: ``[...]`` integer labels.

    Returns:
      ``[...]`` float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = jnp.array([[0.7, 0.2, 0.1]])
      >>> phi = logit_confidence(jnp.log(p), jnp.array([0]))
      >>> round(float(phi[0]), 4), round(float(jnp.log(0.7 / 0.3)), 4)
      (0.8473, 0.8473)
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return jnp.where(labels == 1, z, -z)
    own = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return own - jax.nn.logsumexp(others, axis=-1)


def model_statistics(
    apply_fn: ApplyFn,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 512,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
) -> tuple[np.ndarray, np.ndarray]:
    """Every model's ``phi`` (:func:`logit_confidence`) and loss on every example.

    Args:
      apply_fn: ``apply(params, x) -> logits`` of one model.
      params: parameters with a leading ``[num_models]`` axis (``state.params``
        of :func:`train_models`).
      x: ``[examples, ...]`` inputs (e.g. ``FederatedData.x``).
      y: ``[examples]`` labels.
      batch_size: examples per evaluation batch (the last one is padded).
      loss_fn: per-example loss of the logits.

    Returns:
      ``(phi, loss)``, each ``[num_models, examples]`` float32 numpy.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape or y.ndim != 1:
        raise ValueError(f"x and y must share the examples axis, got {x.shape} and {y.shape}")
    n = y.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    xb = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
        (steps, batch_size) + x.shape[1:]
    )
    yb = np.concatenate([y, np.zeros((pad,), y.dtype)]).reshape(steps, batch_size)

    @jax.jit
    def stats(params, xb, yb):
        def one(p):
            def batch(xy):
                logits = apply_fn(p, xy[0])
                return logit_confidence(logits, xy[1]), loss_fn(logits, xy[1])

            return jax.lax.map(batch, (xb, yb))

        return jax.vmap(one)(params)

    phi, loss = stats(params, xb, yb)
    num_models = jax.tree.leaves(params)[0].shape[0]
    return (
        np.asarray(phi).reshape(num_models, -1)[:, :n],
        np.asarray(loss).reshape(num_models, -1)[:, :n],
    )
