"""Evaluating a global model: on a central test set and on clients' own data.

``evaluate`` runs the model over a central data set in fixed-size batches
(one compiled shape). ``federated_evaluate`` runs it on every client's own
held-out data, vmapped over clients, and reports the distribution across
clients (mean, percentiles) as well as each client's value: a global model can
be good on average and poor for a minority of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fljax import losses
from fljax.base import ApplyFn, Params
from fljax.client import as_apply
from fljax.data.federated import FederatedData


def _batch_sums(apply_fn: ApplyFn, loss_fn: losses.LossFn):
    def sums(params, x, y, mask):
        out = apply_fn(params, x)
        m = mask.astype(jnp.float32)
        return (
            jnp.sum(loss_fn(out, y) * m),
            jnp.sum(losses.accuracy(out, y) * m),
            jnp.sum(m),
        )

    return sums


def evaluate(
    model,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1024,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
) -> dict[str, float]:
    """Loss and accuracy of ``params`` on a central data set.

    Returns:
      ``{"loss": ..., "accuracy": ..., "num_examples": ...}``.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    n = len(y)
    steps = -(-n // batch_size)
    bs = min(batch_size, n)
    pad = steps * bs - n
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((steps, bs) + x.shape[1:])
    yp = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)]).reshape((steps, bs) + y.shape[1:])
    mask = (np.arange(steps * bs) < n).reshape(steps, bs)
    fn = _compiled_eval(as_apply(model), loss_fn)
    loss, correct, count = fn(params, xp, yp, mask)
    count = float(count)
    return {"loss": float(loss) / count, "accuracy": float(correct) / count, "num_examples": count}


_CACHE: dict = {}


def _compiled_eval(apply_fn, loss_fn):
    key = (apply_fn, loss_fn)
    if key not in _CACHE:
        sums = _batch_sums(apply_fn, loss_fn)

        @jax.jit
        def run(params, xs, ys, masks):
            def body(acc, batch):
                s = sums(params, *batch)
                return tuple(a + b for a, b in zip(acc, s, strict=True)), None

            zero = jnp.zeros((), jnp.float32)
            acc, _ = jax.lax.scan(body, (zero, zero, zero), (xs, ys, masks))
            return acc

        _CACHE[key] = run
    return _CACHE[key]


def federated_evaluate(
    model,
    params: Params,
    data: FederatedData,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    percentiles: Sequence[float] = (10, 50, 90),
) -> dict:
    """Evaluate ``params`` on every client's own data.

    Returns:
      dict with ``per_client_accuracy`` and ``per_client_loss`` (lists, in
      client order, ``nan`` for clients without data), ``mean_accuracy``
      (unweighted over clients with data), ``weighted_accuracy`` (by examples),
      and ``accuracy_p{q}`` for each percentile ``q`` across clients.
    """
    cohort = data.cohort(np.arange(data.num_clients))
    sums = _batch_sums(as_apply(model), loss_fn)
    loss, correct, count = jax.jit(jax.vmap(sums, in_axes=(None, 0, 0, 0)))(
        params, cohort.data.x, cohort.data.y, cohort.data.mask
    )
    loss, correct, count = (np.asarray(a, np.float64) for a in (loss, correct, count))
    has = count > 0
    acc = np.where(has, correct / np.maximum(count, 1), np.nan)
    per_loss = np.where(has, loss / np.maximum(count, 1), np.nan)
    out = {
        "per_client_accuracy": acc.tolist(),
        "per_client_loss": per_loss.tolist(),
        "mean_accuracy": float(np.nanmean(acc)),
        "weighted_accuracy": float(correct.sum() / max(count.sum(), 1)),
    }
    for q in percentiles:
        out[f"accuracy_p{q:g}"] = float(np.nanpercentile(acc, q))
    return out
