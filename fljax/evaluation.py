"""Evaluating a global model: on a central test set and on clients' own data.

``evaluate`` runs the model over a central data set in fixed-size batches
(one compiled shape). ``federated_evaluate`` runs it on every client's own
held-out data, vmapped over clients, and reports the distribution across
clients (mean, percentiles) as well as each client's value: a global model can
be good on average and poor for a minority of clients.

Accuracy alone misleads on imbalanced tasks: with 5% positives, always
predicting the majority class scores 0.95 accuracy but 0.5 balanced accuracy
and 0.5 AUC. Pass ``metrics=CLASSIFICATION_METRICS`` (or a subset) to either
function to add, from the model's outputs gathered on the host (exact numpy,
not jitted):

* ``auc``: area under the ROC curve, rank-based (Mann-Whitney) with midranks
  for ties, i.e. the fraction of (positive, negative) pairs ranked correctly,
  ties counting 1/2. Binary tasks (one logit, or two classes): class 1 is
  positive. More classes: the macro average of one-vs-rest AUCs over classes
  with both positives and negatives.
* ``average_precision``: area under the precision-recall curve as the step sum
  ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds (scikit-learn's
  definition; no interpolation). Multi-class: macro over classes present.
* ``balanced_accuracy``: mean over classes present of each class's recall.
* ``per_class_recall``: ``[num_classes]`` recall (``nan`` for absent classes).
* ``ece``: expected calibration error of the top-label confidence over
  ``num_calibration_bins`` (default 15) equal-width bins of ``[0, 1]``.

Undefined values are ``nan``, never an exception: AUC needs both classes
(a client whose held-out data are all negatives has no AUC), average precision
needs a positive. Summaries skip them and ``<metric>_num_clients`` says how
many clients had a value.

Key names from ``federated_evaluate`` say what they average. For each new
scalar metric ``m``:

* ``per_client_m``: one value per client, in client order;
* ``m_mean_over_clients``: unweighted mean over clients with a value;
* ``m_p{q}_over_clients``: the ``q``-th percentile across those clients;
* ``m_pooled``: ``m`` on all clients' examples pooled (example-weighted);
* ``m_num_clients``: how many clients had a value.

The older accuracy keys (``mean_accuracy``, ``weighted_accuracy``,
``accuracy_p{q}``, ``per_client_accuracy``, ``per_client_loss``) keep their
names for existing callers. :func:`per_client_table` turns the per-client
lists into rows.
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

CLASSIFICATION_METRICS = ("auc", "average_precision", "balanced_accuracy", "per_class_recall", "ece")
DEFAULT_NUM_CALIBRATION_BINS = 15


# --- host metrics (numpy, exact) --------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    n = x.shape[0]
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [n]])
    ranks = np.empty(n, np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new) - 1]
    return ranks


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be [examples], got shape {y.shape}")
    if s.shape[:1] != y.shape or s.ndim not in (1, 2):
        raise ValueError(
            f"scores must be [examples] or [examples, classes], got {s.shape} for {y.shape[0]} labels"
        )
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.size and not np.all(y == np.round(y)):
        raise ValueError("labels must be integers")
    y = y.astype(np.int64)
    limit = 2 if s.ndim == 1 else s.shape[1]
    if y.size and (y.min() < 0 or y.max() >= limit):
        raise ValueError(f"labels must lie in [0, {limit}), found [{y.min()}, {y.max()}]")
    return s, y


def _binary_auc(s: np.ndarray, positive: np.ndarray) -> float:
    num_pos = int(positive.sum())
    num_neg = positive.shape[0] - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    u = _midranks(s)[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def _binary_average_precision(s: np.ndarray, positive: np.ndarray) -> float:
    num_pos = int(positive.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, hits = s[order], positive[order]
    last = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]]))  # end of each tie group
    true_pos = np.cumsum(hits)[last]
    precision = true_pos / (last + 1.0)
    recall_gain = np.diff(np.concatenate([[0], true_pos])) / num_pos
    return float(np.sum(recall_gain * precision))


def _one_vs_rest(binary, s: np.ndarray, y: np.ndarray) -> float:
    if s.ndim == 1:
        return binary(s, y == 1)
    values = [binary(s[:, k], y == k) for k in range(s.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exact, with ties counting 1/2.

    Equal to the fraction of (positive, negative) pairs whose positive has the
    higher score, computed from midranks in ``O(n log n)``.

    Args:
      scores: ``[examples]`` for a binary task (any score increasing with the
        belief in class 1: a logit, a probability), or ``[examples, classes]``
        of probabilities or log-probabilities (not raw logits: one-vs-rest
        compares one class's score ACROSS examples) for the macro one-vs-rest
        AUC over classes that have both positives and negatives.
      labels: ``[examples]`` integer labels (0/1 when binary).

    Returns:
      The AUC in ``[0, 1]``, or ``nan`` when it is undefined: only one class
      present (no pair to rank).

    Examples:
      >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
      0.75
      >>> roc_auc(np.array([0.5, 0.5]), np.array([0, 1]))  # a tie counts 1/2
      0.5
      >>> roc_auc(np.array([0.2, 0.7]), np.array([1, 1]))  # one class only
      nan
    """
    s, y = _check_scores(scores, labels)
    return _one_vs_rest(_binary_auc, s, y)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: the area under the precision-recall curve (step sum).

    ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds in decreasing
    order, all examples tied at a threshold entering together; equivalently the
    mean, over positives, of the precision among examples scoring at least as
    high. A constant score gives the positive rate; a perfect ranking gives 1.

    Args:
      scores: as for :func:`roc_auc` (``[examples]`` binary, or
        ``[examples, classes]`` for the macro one-vs-rest average over classes
        present).
      labels: ``[examples]`` integer labels.

    Returns:
      The average precision in ``[0, 1]``, or ``nan`` without any positive.

    Examples:
      >>> average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))  # (1 + 2/3) / 2
      0.8333333333333333
    """
    s, y = _check_scores(scores, labels)
    return _one_vs_rest(_binary_average_precision, s, y)


def _check_predictions(predictions, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions).astype(np.int64)
    y = np.asarray(labels).astype(np.int64)
    if p.shape != y.shape or y.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must both be [examples]")
    for name, a in (("predictions", p), ("labels", y)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), found [{a.min()}, {a.max()}]")
    return p, y


def per_class_recall(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class: the fraction of its examples predicted as it.

    Args:
      predictions: ``[examples]`` predicted classes.
      labels: ``[examples]`` true classes.
      num_classes: number of classes.

    Returns:
      ``[num_classes]`` float64, ``nan`` for a class with no example.

    Examples:
      >>> per_class_recall(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 3).tolist()
      [1.0, 0.5, nan]
    """
    p, y = _check_predictions(predictions, labels, num_classes)
    support = np.bincount(y, minlength=num_classes)
    hits = np.bincount(y[p == y], minlength=num_classes)
    return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean of :func:`per_class_recall` over the classes present in ``labels``.

    A constant predictor scores ``1 / (number of classes present)`` whatever
    the class balance.

    Args:
      predictions: ``[examples]`` predicted classes.
      labels: ``[examples]`` true classes.
      num_classes: number of classes.

    Returns:
      Balanced accuracy in ``[0, 1]`` (``nan`` without examples).

    Examples:
      >>> labels = np.array([0] * 19 + [1])  # 5% positives
      >>> balanced_accuracy(np.zeros(20), labels, 2)  # accuracy would be 0.95
      0.5
    """
    recall = per_class_recall(predictions, labels, num_classes)
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else float("nan")


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, *, num_bins: int = DEFAULT_NUM_CALIBRATION_BINS
) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins.

    ``ECE = sum_b (n_b / n) |accuracy_b - confidence_b|`` where bin ``b`` holds
    the examples whose confidence (largest class probability) lies in
    ``[b / num_bins, (b + 1) / num_bins)`` (the last bin includes 1), and
    ``accuracy_b`` is the fraction of them whose most probable class is right.

    Args:
      probabilities: ``[examples, classes]`` (rows summing to 1) or
        ``[examples]`` probabilities of class 1 for a binary task.
      labels: ``[examples]`` integer labels.
      num_bins: number of equal-width confidence bins (Guo et al., 2017 use 15).

    Returns:
      ECE in ``[0, 1]`` (0 for a calibrated predictor, in the limit of many
      examples); ``nan`` without examples.

    Examples:
      >>> round(expected_calibration_error(np.full(4, 0.9), np.array([1, 1, 1, 0])), 12)  # |0.75 - 0.9|
      0.15

    References:
      Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    p, y = _check_scores(probabilities, labels)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    if y.shape[0] == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    gap = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
    return float(np.abs(gap).sum() / y.shape[0])


def classification_metrics(
    outputs: np.ndarray,
    labels: np.ndarray,
    *,
    metrics: Sequence[str] = CLASSIFICATION_METRICS,
    num_calibration_bins: int = DEFAULT_NUM_CALIBRATION_BINS,
) -> dict:
    """The ``metrics`` of a classifier's outputs (host numpy, float64).

    Args:
      outputs: logits, ``[examples, classes]`` for a softmax model, or
        ``[examples]`` / ``[examples, 1]`` for one sigmoid logit (the same rule
        as :func:`fljax.losses.accuracy`, whose predictions are used).
      labels: ``[examples]`` integer labels.
      metrics: names from :data:`CLASSIFICATION_METRICS`.
      num_calibration_bins: bins of the ECE.

    Returns:
      ``{name: value}``; ``per_class_recall`` is a list.

    Examples:
      >>> logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
      >>> m = classification_metrics(logits, np.array([0, 1, 1, 1]), metrics=("auc", "balanced_accuracy"))
      >>> m["auc"], m["balanced_accuracy"]
      (1.0, 0.8333333333333333)
    """
    metrics = _check_metric_names(metrics)
    out = np.asarray(outputs, np.float64)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"classification metrics need one label per example, got labels of shape {y.shape}")
    if out.ndim == y.ndim or (out.ndim == 2 and out.shape[-1] == 1):
        logit = out.reshape(y.shape)
        score = logit
        log_probs = np.stack([-np.logaddexp(0.0, logit), -np.logaddexp(0.0, -logit)], axis=1)
        predictions = (logit > 0).astype(np.int64)
    elif out.ndim == 2:
        log_probs = out - np.logaddexp.reduce(out, axis=1, keepdims=True)
        score = out[:, 1] - out[:, 0] if out.shape[1] == 2 else log_probs
        predictions = np.argmax(out, axis=1)
    else:
        raise ValueError(f"outputs must be [examples] or [examples, classes], got {out.shape}")
    num_classes = log_probs.shape[1]
    result: dict = {}
    if "auc" in metrics:
        result["auc"] = roc_auc(score, y)
    if "average_precision" in metrics:
        result["average_precision"] = average_precision(score, y)
    if "balanced_accuracy" in metrics:
        result["balanced_accuracy"] = balanced_accuracy(predictions, y, num_classes)
    if "per_class_recall" in metrics:
        result["per_class_recall"] = per_class_recall(predictions, y, num_classes).tolist()
    if "ece" in metrics:
        result["ece"] = expected_calibration_error(np.exp(log_probs), y, num_bins=num_calibration_bins)
    return result


# --- running the model --------------------------------------------------------------------------------


def _batch_sums(apply_fn: ApplyFn, loss_fn: losses.LossFn):
    def sums(params, x, y, mask):
        out = apply_fn(params, x)
        m = mask.astype(jnp.float32)
        return (
            jnp.sum(loss_fn(out, y) * m),
            jnp.sum(losses.accuracy(out, y) * m),
            jnp.sum(m),
        ), out

    return sums


def _check_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names, got the string {metrics!r}")
    unknown = sorted(set(metrics) - set(CLASSIFICATION_METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected names from {CLASSIFICATION_METRICS}")
    return tuple(metrics)


def evaluate(
    model,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1024,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    metrics: Sequence[str] = (),
    num_calibration_bins: int = DEFAULT_NUM_CALIBRATION_BINS,
) -> dict:
    """Loss and accuracy (and optional classification metrics) of ``params`` on a central data set.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      params: model parameters.
      x: ``[examples, ...]`` inputs.
      y: ``[examples]`` labels.
      batch_size: examples per compiled batch (the last one is padded).
      loss_fn: per-example loss of the outputs.
      metrics: names from :data:`CLASSIFICATION_METRICS` to add, computed by
        :func:`classification_metrics` from the gathered outputs.
      num_calibration_bins: bins of the ECE.

    Returns:
      ``{"loss": ..., "accuracy": ..., "num_examples": ...}`` plus one entry per
      requested metric (``nan`` where undefined, e.g. AUC with one class).

    Examples:
      >>> res = evaluate(model, params, x_test, y_test, metrics=CLASSIFICATION_METRICS)  # doctest: +SKIP
      >>> res["accuracy"], res["balanced_accuracy"], res["auc"]  # doctest: +SKIP
    """
    metrics = _check_metric_names(metrics)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    if metrics and np.ndim(y) != 1:
        raise ValueError(f"classification metrics need one label per example, got y of shape {np.shape(y)}")
    n = len(y)
    steps = -(-n // batch_size)
    bs = min(batch_size, n)
    pad = steps * bs - n
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((steps, bs) + x.shape[1:])
    yp = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)]).reshape((steps, bs) + y.shape[1:])
    mask = (np.arange(steps * bs) < n).reshape(steps, bs)
    fn = _compiled_eval(as_apply(model), loss_fn, bool(metrics))
    (loss, correct, count), outputs = fn(params, xp, yp, mask)
    count = float(count)
    res = {"loss": float(loss) / count, "accuracy": float(correct) / count, "num_examples": count}
    if metrics:
        outputs = np.asarray(outputs).reshape((steps * bs,) + outputs.shape[2:])[:n]
        res.update(
            classification_metrics(outputs, y, metrics=metrics, num_calibration_bins=num_calibration_bins)
        )
    return res


_CACHE: dict = {}


def _compiled_eval(apply_fn, loss_fn, with_outputs: bool):
    key = (apply_fn, loss_fn, with_outputs)
    if key not in _CACHE:
        sums = _batch_sums(apply_fn, loss_fn)

        @jax.jit
        def run(params, xs, ys, masks):
            def body(acc, batch):
                s, out = sums(params, *batch)
                return tuple(a + b for a, b in zip(acc, s, strict=True)), (out if with_outputs else None)

            zero = jnp.zeros((), jnp.float32)
            return jax.lax.scan(body, (zero, zero, zero), (xs, ys, masks))

        _CACHE[key] = run
    return _CACHE[key]


def _compiled_federated(apply_fn, loss_fn, with_outputs: bool):
    key = ("federated", apply_fn, loss_fn, with_outputs)
    if key not in _CACHE:
        sums = _batch_sums(apply_fn, loss_fn)

        def one_client(params, x, y, mask):
            s, out = sums(params, x, y, mask)
            return s, (out if with_outputs else None)

        _CACHE[key] = jax.jit(jax.vmap(one_client, in_axes=(None, 0, 0, 0)))
    return _CACHE[key]


def _summarise(name: str, values: np.ndarray, percentiles: Sequence[float]) -> dict:
    defined = values[~np.isnan(values)]
    out = {f"per_client_{name}": values.tolist(), f"{name}_num_clients": int(defined.size)}
    out[f"{name}_mean_over_clients"] = float(defined.mean()) if defined.size else float("nan")
    for q in percentiles:
        out[f"{name}_p{q:g}_over_clients"] = (
            float(np.percentile(defined, q)) if defined.size else float("nan")
        )
    return out


def federated_evaluate(
    model,
    params: Params,
    data: FederatedData,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    percentiles: Sequence[float] = (10, 50, 90),
    metrics: Sequence[str] = (),
    num_calibration_bins: int = DEFAULT_NUM_CALIBRATION_BINS,
) -> dict:
    """Evaluate ``params`` on every client's own data.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      params: model parameters.
      data: the clients' held-out data (all clients are evaluated at once).
      loss_fn: per-example loss of the outputs.
      percentiles: percentiles across clients to report.
      metrics: names from :data:`CLASSIFICATION_METRICS` to add, per client
        and pooled (see the module docstring for the key names).
      num_calibration_bins: bins of the ECE.

    Returns:
      dict with ``per_client_accuracy`` and ``per_client_loss`` (lists, in
      client order, ``nan`` for clients without data), ``mean_accuracy``
      (unweighted over clients with data), ``weighted_accuracy`` (by examples),
      and ``accuracy_p{q}`` for each percentile ``q`` across clients. With
      ``metrics``, also ``per_client_num_examples`` and, for each scalar metric
      ``m``: ``per_client_m``, ``m_mean_over_clients``, ``m_p{q}_over_clients``,
      ``m_num_clients`` and ``m_pooled``; for ``per_class_recall``:
      ``per_client_per_class_recall`` (``[clients][classes]``),
      ``per_class_recall_mean_over_clients`` and ``per_class_recall_pooled``.

    Examples:
      >>> res = federated_evaluate(model, params, test_data, metrics=("auc",))  # doctest: +SKIP
      >>> res["auc_p10_over_clients"], res["per_client_auc"]  # doctest: +SKIP
    """
    parts = client_parts(
        model, params, data, loss_fn=loss_fn, metrics=metrics, num_calibration_bins=num_calibration_bins
    )
    out = combine_client_parts(parts, percentiles=percentiles, metrics=metrics)
    if metrics:
        mask, labels = np.asarray(parts["mask"]), np.asarray(parts["labels"])
        pooled = classification_metrics(
            parts["outputs"][mask], labels[mask], metrics=metrics, num_calibration_bins=num_calibration_bins
        )
        out.update({f"{name}_pooled": pooled[name] for name in _check_metric_names(metrics)})
    return out


def client_parts(
    model,
    params: Params,
    data: FederatedData,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    metrics: Sequence[str] = (),
    num_calibration_bins: int = DEFAULT_NUM_CALIBRATION_BINS,
) -> dict:
    """What :func:`federated_evaluate` computes for each client on its own data.

    Each client's part needs only that client's data, so a deployment computes it where the
    data is (:mod:`fljax.deploy`) and the server combines the parts with
    :func:`combine_client_parts` into the same result, the pooled metrics excepted.

    Returns:
      ``loss_sum``, ``correct`` and ``count`` (float64 ``[clients]``), and with ``metrics``
      ``per_client_<m>`` for each (``[clients]``, or ``[clients][classes]`` for
      ``per_class_recall``; ``nan`` for a client without data), plus the model's ``outputs``,
      the ``mask`` and the ``labels`` of the padded cohort (for pooled metrics).
    """
    metrics = _check_metric_names(metrics)
    if int(np.sum(data.sizes)) == 0:  # no data at all (e.g. one client without held-out rows)
        n = data.num_clients
        parts = {k: np.zeros((n,), np.float64) for k in ("loss_sum", "correct", "count")}
        for name in metrics:
            shape = (n, data.num_classes) if name == "per_class_recall" else (n,)
            parts[f"per_client_{name}"] = np.full(shape, np.nan)
        return parts
    cohort = data.cohort(np.arange(data.num_clients))
    fn = _compiled_federated(as_apply(model), loss_fn, bool(metrics))
    (loss, correct, count), outputs = fn(params, cohort.data.x, cohort.data.y, cohort.data.mask)
    parts = {
        k: np.asarray(a, np.float64)
        for k, a in zip(("loss_sum", "correct", "count"), (loss, correct, count), strict=True)
    }
    if metrics:
        outputs, mask, labels = np.asarray(outputs), np.asarray(cohort.data.mask), np.asarray(cohort.data.y)
        parts.update(
            _per_client_metrics(outputs, mask, labels, metrics, num_calibration_bins, data.num_classes)
        )
        parts.update(outputs=outputs, mask=mask, labels=labels)
    return parts


def combine_client_parts(
    parts: dict, *, percentiles: Sequence[float] = (10, 50, 90), metrics: Sequence[str] = ()
) -> dict:
    """:func:`federated_evaluate`'s result, without pooled metrics, from the clients' parts.

    Args:
      parts: :func:`client_parts` of all clients (arrays in client order, e.g. concatenated
        from several calls, one per client).
      percentiles: percentiles across clients to report.
      metrics: the metric names the parts were computed with.
    """
    loss, correct, count = (np.asarray(parts[k], np.float64) for k in ("loss_sum", "correct", "count"))
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
    metrics = _check_metric_names(metrics)
    if metrics:
        out["per_client_num_examples"] = count.astype(np.int64).tolist()
    for name in metrics:
        values = np.asarray(parts[f"per_client_{name}"], np.float64)
        if name == "per_class_recall":
            num_defined = np.sum(~np.isnan(values), axis=0)
            mean = np.where(num_defined > 0, np.nansum(values, axis=0) / np.maximum(num_defined, 1), np.nan)
            out["per_client_per_class_recall"] = values.tolist()
            out["per_class_recall_mean_over_clients"] = mean.tolist()
        else:
            out.update(_summarise(name, values, percentiles))
    return out


def _per_client_metrics(outputs, mask, labels, metrics, num_bins, num_classes) -> dict:
    """``per_client_<m>`` arrays of the clients' metrics (``nan`` for a client without data)."""
    kw = dict(metrics=metrics, num_calibration_bins=num_bins)
    per_client = [
        classification_metrics(outputs[c][mask[c]], labels[c][mask[c]], **kw) if mask[c].any() else None
        for c in range(mask.shape[0])
    ]
    widths = [len(r["per_class_recall"]) for r in per_client if r is not None and "per_class_recall" in r]
    width = widths[0] if widths else num_classes
    parts = {}
    for name in metrics:
        undefined = [np.nan] * width if name == "per_class_recall" else np.nan
        parts[f"per_client_{name}"] = np.array(
            [undefined if r is None else r[name] for r in per_client], np.float64
        )
    return parts


def _federated_metrics(outputs, client_data, metrics, percentiles, num_bins) -> dict:
    """The ``metrics`` part of :func:`federated_evaluate` from the cohort's outputs."""
    mask, labels = np.asarray(client_data.mask), np.asarray(client_data.y)
    parts = _per_client_metrics(outputs, mask, labels, metrics, num_bins, None)
    parts |= {
        "loss_sum": np.zeros(mask.shape[0]),
        "correct": np.zeros(mask.shape[0]),
        "count": mask.sum(axis=1),
    }
    combined = combine_client_parts(parts, percentiles=percentiles, metrics=metrics)
    res = {
        k: v for k, v in combined.items() if k == "per_client_num_examples" or any(m in k for m in metrics)
    }
    pooled = classification_metrics(
        outputs[mask], labels[mask], metrics=metrics, num_calibration_bins=num_bins
    )
    return res | {f"{name}_pooled": pooled[name] for name in metrics}


def per_client_table(result: dict, client_names: Sequence[str] | None = None) -> list[dict]:
    """Rows ``{"client": ..., <metric>: ...}`` from the ``per_client_*`` lists of :func:`federated_evaluate`.

    Args:
      result: the dict :func:`federated_evaluate` returned.
      client_names: optional names (default: the client index).

    Returns:
      One dict per client (e.g. for ``pandas.DataFrame(rows)``), with every
      ``per_client_<name>`` entry under ``<name>``.

    Examples:
      >>> per_client_table({"per_client_accuracy": [0.5, 1.0], "per_client_auc": [0.6, float("nan")]}, ["A", "B"])
      [{'client': 'A', 'accuracy': 0.5, 'auc': 0.6}, {'client': 'B', 'accuracy': 1.0, 'auc': nan}]
    """
    columns = {k.removeprefix("per_client_"): v for k, v in result.items() if k.startswith("per_client_")}
    if not columns:
        raise ValueError("no per_client_* entries in result")
    num_clients = len(next(iter(columns.values())))
    names = list(range(num_clients)) if client_names is None else list(client_names)
    if len(names) != num_clients:
        raise ValueError(f"{len(names)} client names for {num_clients} clients")
    return [{"client": names[c]} | {k: v[c] for k, v in columns.items()} for c in range(num_clients)]
