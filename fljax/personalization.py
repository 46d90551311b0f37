"""Personalization after federation: fine-tune the global model on each client, evaluate it there.

A federated model is one model for every client; a client whose data differ from the others'
(another label balance, other measurements) can do better with a model of its own. The
simplest personalization keeps federation as it is and adds one local step at the end: each
client starts from the global model and trains for a few epochs on its own training data
(:func:`fine_tune`, every client at once, vmapped, jittable). :func:`personalized_evaluate`
then scores each client's OWN model on that client's held-out data, with the keys and
summaries of :func:`fljax.evaluation.federated_evaluate` (which scores ONE model on every
client).

Fine-tuning from the federated model is the baseline that personalization methods are measured
against (Wang et al. 2019; Yu, Bagdasaryan and Shmatikov 2020). Methods that personalise during
training keep the personal part as client state: Ditto's personal models
(:mod:`fljax.algorithms.ditto`), FedPer/FedRep's personal heads (:mod:`fljax.algorithms.fedrep`).
Both kinds end with one model per client, ``[clients, ...]`` leaves, that
:func:`personalized_evaluate` takes.

References:
  Wang, Mathews, Kiddon, Eichner, Beaufays, Ramage. "Federated Evaluation of On-device
  Personalization". arXiv:1910.10252, 2019.

  Yu, Bagdasaryan, Shmatikov. "Salvaging Federated Learning by Local Adaptation".
  arXiv:2002.04758, 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import client, evaluation, losses, simulation
from fljax import random as fl_random
from fljax.base import ClientData, Cohort, Params
from fljax.data.federated import FederatedData


def fine_tune(
    model,
    optimizer: optax.GradientTransformation,
    params: Params,
    cohort: Cohort,
    key: jax.Array,
    *,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    max_steps: int | None = None,
    chunk_size: int | None = None,
) -> Params:
    """Every cohort client fine-tunes ``params`` on its own data; one model per client.

    Client ``i`` runs :func:`fljax.client.train_locally` from ``params`` for ``num_epochs``
    epochs of minibatch optimisation with a fresh ``optimizer`` state, with the key
    ``fold_in(stream(key, "clients"), client_ids[i])`` (a client's randomness follows its id,
    as in a round). Padding slots (``client_mask`` False) and clients without data keep
    ``params``. ``num_epochs=0`` returns ``params`` for every client. Pure and jittable: close
    over the model, optimizer and options, e.g. ``jax.jit(lambda p, c, k: fine_tune(model,
    opt, p, c, k, batch_size=16, num_epochs=5))``, and compile once for every call.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      optimizer: the local optimizer (any optax optimizer).
      params: the global model (no client axis).
      cohort: the clients' training data, ``[clients, num_examples, ...]``.
      key: the fine-tuning key.
      batch_size: minibatch size.
      num_epochs: local epochs (``>= 0``).
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      max_steps: optional cap on minibatches per epoch.
      chunk_size: clients per vmapped chunk (:func:`fljax.simulation.map_clients`); ``None``
        vmaps the whole cohort. A performance setting only.

    Returns:
      The personal models: ``params``'s pytree with a leading ``[clients]`` axis on every leaf.

    Raises:
      ValueError: ``batch_size < 1``, ``num_epochs < 0`` or ``max_steps < 1``.

    Examples:
      Three clients fine-tune a small MLP for two epochs; zero epochs change nothing:

      >>> import jax, numpy as np, optax
      >>> from fljax import models, personalization
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9, 4)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> cohort = data.cohort([0, 1, 2])
      >>> personal = personalization.fine_tune(
      ...     model, optax.sgd(0.1), params, cohort, jax.random.key(1), batch_size=3, num_epochs=2
      ... )
      >>> [leaf.shape[0] for leaf in jax.tree.leaves(personal)]
      [3, 3, 3, 3]
      >>> same = personalization.fine_tune(
      ...     model, optax.sgd(0.1), params, cohort, jax.random.key(1), batch_size=3, num_epochs=0
      ... )
      >>> all(bool(np.all(np.asarray(s) == np.asarray(p))) for s, p in zip(jax.tree.leaves(same), jax.tree.leaves(params)))
      True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 0:
        raise ValueError(f"num_epochs must be an integer >= 0, got {num_epochs!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be positive or None, got {max_steps!r}")
    simulation.check_cohort(cohort)
    grad_fn = client.masked_mean_gradient(client.as_apply(model), loss_fn)
    keys = fl_random.client_keys(fl_random.stream(key, "clients"), cohort.client_ids)

    def one_client(data: ClientData, client_key: jax.Array, present: jax.Array) -> Params:
        if num_epochs == 0:
            return params
        local, _, _ = client.train_locally(
            grad_fn,
            optimizer,
            params,
            data._replace(mask=data.mask & present),
            client_key,
            batch_size=batch_size,
            num_epochs=num_epochs,
            max_steps=max_steps,
        )
        return local

    return simulation.map_clients(one_client, cohort.data, keys, cohort.client_mask, chunk_size=chunk_size)


_CACHE: dict = {}


def _compiled(apply_fn, loss_fn, with_outputs: bool):
    key = (apply_fn, loss_fn, with_outputs)
    if key not in _CACHE:
        sums = evaluation._batch_sums(apply_fn, loss_fn)

        def one_client(params, x, y, mask):
            s, out = sums(params, x, y, mask)
            return s, (out if with_outputs else None)

        _CACHE[key] = jax.jit(jax.vmap(one_client))
    return _CACHE[key]


def personalized_evaluate(
    model,
    personal_params: Params,
    data: FederatedData,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    percentiles: Sequence[float] = (10, 50, 90),
    metrics: Sequence[str] = (),
    num_calibration_bins: int = evaluation.DEFAULT_NUM_CALIBRATION_BINS,
) -> dict:
    """Evaluate each client's own model on that client's own data.

    The counterpart of :func:`fljax.evaluation.federated_evaluate` for personal models: the
    same keys (``per_client_accuracy``, ``mean_accuracy``, ``weighted_accuracy``,
    ``accuracy_p{q}``, and with ``metrics`` the classification metrics per client and pooled),
    but client ``c`` is scored with ``personal_params[c]``. Feed it the result to
    :func:`fljax.evaluation.per_client_table` for rows. Given ``params`` broadcast to every
    client it returns what ``federated_evaluate(model, params, data)`` returns.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      personal_params: one model per client, leaves ``[data.num_clients, ...]`` in client order
        (:func:`fine_tune` over all clients, or e.g. Ditto's ``ClientStates.tree``).
      data: the clients' held-out data.
      loss_fn: per-example loss of the outputs.
      percentiles: percentiles across clients to report.
      metrics: names from :data:`fljax.evaluation.CLASSIFICATION_METRICS`.
      num_calibration_bins: bins of the ECE.

    Returns:
      dict with the keys of :func:`fljax.evaluation.federated_evaluate`.

    Raises:
      ValueError: ``personal_params`` does not hold one model per client.

    Examples:
      >>> res = personalized_evaluate(model, personal, test_data, metrics=("auc",))  # doctest: +SKIP
      >>> res["per_client_accuracy"], res["auc_pooled"]  # doctest: +SKIP
    """
    metrics = evaluation._check_metric_names(metrics)
    n = data.num_clients
    for leaf in jax.tree.leaves(personal_params):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(
                f"personal_params must hold one model per client: leaves [{n}, ...], got shape {np.shape(leaf)}"
            )
    cohort = data.cohort(np.arange(n))
    fn = _compiled(client.as_apply(model), loss_fn, bool(metrics))
    (loss, correct, count), outputs = fn(personal_params, cohort.data.x, cohort.data.y, cohort.data.mask)
    loss, correct, count = (np.asarray(a, np.float64) for a in (loss, correct, count))
    has = count > 0
    acc = np.where(has, correct / np.maximum(count, 1), np.nan)
    out = {
        "per_client_accuracy": acc.tolist(),
        "per_client_loss": np.where(has, loss / np.maximum(count, 1), np.nan).tolist(),
        "mean_accuracy": float(np.nanmean(acc)),
        "weighted_accuracy": float(correct.sum() / max(count.sum(), 1)),
    }
    for q in percentiles:
        out[f"accuracy_p{q:g}"] = float(np.nanpercentile(acc, q))
    if metrics:
        out.update(
            evaluation._federated_metrics(
                np.asarray(outputs), cohort.data, metrics, percentiles, num_calibration_bins
            )
        )
    return out


def broadcast(params: Params, num_clients: int) -> Params:
    """``params`` repeated along a new leading ``[num_clients]`` axis (one copy per client).

    Examples:
      >>> import jax.numpy as jnp
      >>> broadcast({"w": jnp.ones(3)}, 2)["w"].shape
      (2, 3)
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + jnp.shape(a)), params)
