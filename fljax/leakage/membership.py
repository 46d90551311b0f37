"""Membership inference: the loss-threshold attack, LiRA, and how to score an attack.

Two attacks on a trained model, each giving one score per candidate example
(higher means "more likely a member"):

* loss threshold (Yeom et al. 2018): ``score = -loss``; members of an overfit
  model have smaller losses. Needs no shadow models.
* LiRA (Carlini et al. 2022): the statistic is the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))`` of the true label
  (:func:`fljax.leakage.shadows.logit_confidence`), which is close to Gaussian
  across retrainings. For each example, shadow models that were trained WITH it
  (IN) and WITHOUT it (OUT) give two samples of ``phi``; Gaussian fits
  ``N(mu_in, s_in^2)`` and ``N(mu_out, s_out^2)`` turn the target's ``phi`` into

  - online: the log likelihood ratio ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``;
  - offline (OUT shadows only, one-sided): ``(phi - mu_out) / s_out``, a
    monotone transform of the one-sided p-value ``1 - Phi((phi - mu_out) / s_out)``
    that Carlini et al. threshold, so it ranks examples identically.

  With few shadows the per-example variances are noisy; ``global_variance=True``
  replaces them by one variance pooled over all examples (per IN and OUT),
  the variant Carlini et al. recommend below ~64 shadows.

Granularity. Federated learning admits CLIENTS, so an example is a member
exactly when its client is. Example level asks about one example; client level
asks whether a client took part, scoring it with the MEAN of its examples'
scores: for LiRA that is the log likelihood ratio of the client's examples
taken as independent, divided by their number (so clients of different sizes
are on one scale); for the loss attack the client's mean loss, negated.

Metrics (:func:`attack_metrics`): the AUC (:func:`fljax.evaluation.roc_auc`),
the TPR at a low FPR read from the ROC curve (:func:`tpr_at_fpr`: linear
interpolation between the curve's vertices, i.e. the TPR of the randomised
threshold that attains that FPR exactly), and the balanced accuracy at the best
threshold (:func:`best_balanced_accuracy`). A low-FPR TPR estimated from ``n``
non-members is only resolved down to ``1/n``: read TPR at 0.1% FPR only with
several thousand non-members.

:func:`leave_one_out` evaluates a set of models trained by
:func:`fljax.leakage.shadows.train_models`: each model is the target in turn,
the others its shadows, and the scores are pooled (Carlini et al. 2022, Sec. V).

References:
  Yeom, Giacomelli, Fredrikson, Jha. "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting". IEEE CSF 2018.
  Carlini, Chien, Nasr, Song, Terzis, Tramèr. "Membership Inference Attacks
  From First Principles". IEEE S&P 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fljax import evaluation

DEFAULT_FPRS = (0.001, 0.01)
MIN_STD = 1e-3
"""Floor on a fitted standard deviation (of ``phi``), so a constant shadow sample cannot give inf."""


def _labels(labels, n: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"membership labels must be 1-D, got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} membership labels for {n} scores")
    if y.dtype != bool:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError(f"membership labels must be binary (0/1 or bool), found {np.unique(y)[:5]}")
        y = y.astype(bool)
    return y


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's vertices, from (0, 0) to (1, 1), one per distinct score.

    Args:
      scores: ``[n]`` attack scores (higher: more likely a member).
      labels: ``[n]`` true membership (bool or 0/1).

    Returns:
      ``(fpr, tpr)``, non-decreasing, of the thresholds "score >= t" for every
      distinct ``t`` (ties move both rates at once: a diagonal segment).

    Examples:
      >>> fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
      >>> fpr.tolist(), tpr.tolist()
      ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s = _scores(scores)
    y = _labels(labels, s.shape[0])
    num_pos, num_neg = int(y.sum()), int((~y).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"the ROC curve needs members and non-members, got {num_pos} and {num_neg}")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]]))  # end of each tie group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    fpr = np.concatenate([[0.0], fp / num_neg])
    tpr = np.concatenate([[0.0], tp / num_pos])
    return fpr, tpr


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """True-positive rate at false-positive rate ``fpr``, interpolated on the ROC curve.

    The highest TPR among the curve's vertices with FPR <= ``fpr``, joined
    linearly to the next vertex: the TPR of the randomised threshold (a mix of
    two neighbouring thresholds) whose FPR is exactly ``fpr``.

    Examples:
      Perfectly separated scores reach TPR 1 at any FPR; reversed ones 0 until FPR 1:

      >>> y = np.array([1, 1, 0, 0])
      >>> tpr_at_fpr(np.array([4.0, 3.0, 2.0, 1.0]), y, 0.001)
      1.0
      >>> tpr_at_fpr(np.array([1.0, 2.0, 3.0, 4.0]), y, 0.5)
      0.0
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    xs, ys = roc_curve(scores, labels)
    i = int(np.searchsorted(xs, fpr, side="right")) - 1  # last vertex with FPR <= fpr
    if xs[i] == fpr or i == xs.shape[0] - 1:
        return float(ys[i])
    t = (fpr - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + t * (ys[i + 1] - ys[i]))


def best_balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """``max_t (TPR(t) + 1 - FPR(t)) / 2`` over the thresholds (0.5 for a useless attack).

    Examples:
      >>> best_balanced_accuracy(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
      0.75
    """
    fpr, tpr = roc_curve(scores, labels)
    return float(np.max(tpr + 1.0 - fpr) / 2.0)


def attack_metrics(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """AUC, TPR at each FPR in ``fprs`` and the best balanced accuracy of one attack.

    Returns:
      ``{"auc", "tpr_at_fpr_<f>" for f in fprs, "balanced_accuracy", "num_members",
      "num_nonmembers"}``; keys like ``tpr_at_fpr_0.001``.

    Examples:
      >>> m = attack_metrics(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
      >>> m["auc"], m["balanced_accuracy"], m["num_members"]
      (0.75, 0.75, 2)
    """
    s = _scores(scores)
    y = _labels(labels, s.shape[0])
    out = {"auc": evaluation.roc_auc(s, y.astype(np.int64))}
    for f in fprs:
        out[f"tpr_at_fpr_{f:g}"] = tpr_at_fpr(s, y, f)
    out["balanced_accuracy"] = best_balanced_accuracy(s, y)
    out["num_members"] = int(y.sum())
    out["num_nonmembers"] = int((~y).sum())
    return out


def auc_null_standard_error(num_members: int, num_nonmembers: int) -> float:
    """Standard error of the AUC of a useless attack (continuous scores), ``sqrt((m + n + 1) / (12 m n))``.

    Under the null (scores of members and non-members from one distribution),
    ``AUC = U / (m n)`` with ``U`` the Mann-Whitney statistic, whose variance is
    ``m n (m + n + 1) / 12``. An AUC within 3 of these of 0.5 is consistent
    with no leakage (for independent scores; pooled leave-one-out scores are
    correlated, so read it as a lower bound on the noise).

    Examples:
      >>> round(auc_null_standard_error(500, 500), 4)
      0.0183
    """
    if num_members < 1 or num_nonmembers < 1:
        raise ValueError(f"need members and non-members, got {num_members} and {num_nonmembers}")
    m, n = num_members, num_nonmembers
    return float(np.sqrt((m + n + 1) / (12.0 * m * n)))


def loss_scores(loss: np.ndarray) -> np.ndarray:
    """The loss-threshold attack (Yeom et al. 2018): ``score = -loss``."""
    loss = np.asarray(loss, np.float64)
    if np.isnan(loss).any():
        raise ValueError("losses contain NaN")
    return -loss


def _fit(
    phi: np.ndarray, mask: np.ndarray, global_variance: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example mean and std of ``phi[S, n]`` over the shadows where ``mask`` holds."""
    count = mask.sum(axis=0)
    total = np.where(mask, phi, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(phi.shape[1], np.nan), where=count > 0)
    resid = np.where(mask, phi - np.where(count > 0, mean, 0.0), 0.0)
    pooled = np.sqrt(np.sum(resid**2) / max(int(count.sum()) - int((count > 0).sum()), 1))
    if global_variance:
        std = np.full(phi.shape[1], pooled)
    else:
        var = np.divide((resid**2).sum(axis=0), count, out=np.zeros(phi.shape[1]), where=count > 0)
        std = np.where(count >= 2, np.sqrt(var), pooled)  # too few samples: the pooled std
    return mean, np.maximum(std, MIN_STD), count


def _log_normal(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std)


def lira_scores(
    target_phi: np.ndarray,
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool = True,
    global_variance: bool = False,
) -> np.ndarray:
    """LiRA scores of the target model's examples (Carlini et al. 2022, Algorithm 1).

    Args:
      target_phi: ``[n]`` the target's :func:`~fljax.leakage.shadows.logit_confidence` per example.
      shadow_phi: ``[num_shadows, n]`` the same statistic under each shadow model.
      shadow_in: ``[num_shadows, n]`` bool, whether each shadow trained on each example.
      online: use IN and OUT fits (log likelihood ratio); ``False``: the
        offline, one-sided test against the OUT fit only.
      global_variance: one variance per IN/OUT pooled over all examples.

    Returns:
      ``[n]`` scores, higher for likelier members. An example without any OUT
      shadow (or, online, any IN shadow) gets that mean from the others: the
      mean of ``phi`` over the shadows plus the average IN-OUT offset of the
      examples that have both (offline: the average OUT mean offset from the
      overall mean). Per-example stds need 2 samples; with fewer the pooled std is used.

    Examples:
      A target ``phi`` at the IN mean scores higher than one at the OUT mean:

      >>> shadow_phi = np.array([[3.0, 3.0], [3.2, 3.2], [0.0, 0.0], [0.2, 0.2]])
      >>> shadow_in = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], bool)
      >>> s = lira_scores(np.array([3.1, 0.1]), shadow_phi, shadow_in)
      >>> bool(s[0] > 0 > s[1])
      True
    """
    t = np.asarray(target_phi, np.float64)
    phi = np.asarray(shadow_phi, np.float64)
    ins = np.asarray(shadow_in)
    if t.ndim != 1:
        raise ValueError(f"target_phi must be [examples], got shape {t.shape}")
    if phi.ndim != 2 or phi.shape[1:] != t.shape:
        raise ValueError(f"shadow_phi must be [num_shadows, {t.shape[0]}], got {phi.shape}")
    if ins.shape != phi.shape:
        raise ValueError(f"shadow_in must have shadow_phi's shape {phi.shape}, got {ins.shape}")
    if ins.dtype != bool:
        if ins.size and not np.isin(ins, (0, 1)).all():
            raise ValueError("shadow_in must be binary (0/1 or bool)")
        ins = ins.astype(bool)
    if np.isnan(phi).any() or np.isnan(t).any():
        raise ValueError("phi contains NaN")
    if not (~ins).any(axis=0).any():
        raise ValueError("no example has an OUT shadow: LiRA needs models trained without the examples")
    mu_out, s_out, n_out = _fit(phi, ~ins, global_variance)
    overall = phi.mean(axis=0)
    if (n_out == 0).any():
        mu_out = np.where(n_out > 0, mu_out, overall + np.mean((mu_out - overall)[n_out > 0]))
    if not online:
        return (t - mu_out) / s_out
    if not ins.any():
        raise ValueError("online LiRA needs IN shadows; use online=False")
    mu_in, s_in, n_in = _fit(phi, ins, global_variance)
    if (n_in == 0).any():
        both = (n_in > 0) & (n_out > 0)
        offset = np.mean((mu_in - mu_out)[both]) if both.any() else 0.0
        mu_in = np.where(n_in > 0, mu_in, mu_out + offset)
    return _log_normal(t, mu_in, s_in) - _log_normal(t, mu_out, s_out)


def client_scores(scores: np.ndarray, example_client: np.ndarray, num_clients: int) -> np.ndarray:
    """Client-level scores: the mean of each client's example scores.

    Args:
      scores: ``[n]`` example scores.
      example_client: ``[n]`` the client of each example (``0 .. num_clients-1``).
      num_clients: number of clients.

    Returns:
      ``[num_clients]``; ``nan`` for a client without examples.

    Examples:
      >>> client_scores(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 1]), 2).tolist()
      [2.0, 5.0]
    """
    s = _scores(scores)
    c = np.asarray(example_client)
    if c.shape != s.shape:
        raise ValueError(f"example_client must be [{s.shape[0]}], got shape {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= num_clients):
        raise ValueError(f"client indices must lie in [0, {num_clients}), got [{c.min()}, {c.max()}]")
    total = np.bincount(c, weights=s, minlength=num_clients)
    count = np.bincount(c, minlength=num_clients)
    return np.divide(total, count, out=np.full(num_clients, np.nan), where=count > 0)


def example_clients(offsets: np.ndarray) -> np.ndarray:
    """``[N]`` client index of every example from ``FederatedData.offsets``."""
    offsets = np.asarray(offsets)
    return np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))


ATTACKS = ("loss", "lira_online", "lira_offline")


def leave_one_out(
    phi: np.ndarray,
    loss: np.ndarray,
    in_mask: np.ndarray,
    offsets: np.ndarray,
    *,
    global_variance: bool = False,
    targets: Sequence[int] | None = None,
) -> dict:
    """Pooled attack scores with each model as the target and the others as its shadows.

    Args:
      phi: ``[num_models, N]`` per-example :func:`~fljax.leakage.shadows.logit_confidence`
        (:func:`fljax.leakage.shadows.model_statistics`).
      loss: ``[num_models, N]`` per-example losses.
      in_mask: ``[num_models, num_clients]`` bool, which clients each model admitted.
      offsets: ``FederatedData.offsets`` (``[num_clients + 1]``), grouping examples by client.
      global_variance: LiRA with one pooled variance (few shadows).
      targets: models to attack (default: all).

    Returns:
      ``{"example": {attack: (scores, labels)}, "client": {attack: (scores, labels)}}``
      for attacks ``loss``, ``lira_online`` and ``lira_offline``, each pooled
      over the targets (feed them to :func:`attack_metrics`).
    """
    phi, loss, in_mask = np.asarray(phi), np.asarray(loss), np.asarray(in_mask, bool)
    num_models, num_clients = in_mask.shape
    owner = example_clients(offsets)
    if phi.shape != (num_models, owner.shape[0]) or loss.shape != phi.shape:
        raise ValueError(
            f"phi and loss must be [num_models={num_models}, examples={owner.shape[0]}], "
            f"got {phi.shape} and {loss.shape}"
        )
    if num_models < 2:
        raise ValueError("leave_one_out needs at least 2 models (a target and a shadow)")
    example_in = in_mask[:, owner]
    pooled: dict = {level: {a: ([], []) for a in ATTACKS} for level in ("example", "client")}
    for t in range(num_models) if targets is None else targets:
        others = np.arange(num_models) != t
        scores = {
            "loss": loss_scores(loss[t]),
            "lira_online": lira_scores(
                phi[t], phi[others], example_in[others], global_variance=global_variance
            ),
            "lira_offline": lira_scores(
                phi[t], phi[others], example_in[others], online=False, global_variance=global_variance
            ),
        }
        for a, s in scores.items():
            pooled["example"][a][0].append(s)
            pooled["example"][a][1].append(example_in[t])
            pooled["client"][a][0].append(client_scores(s, owner, num_clients))
            pooled["client"][a][1].append(in_mask[t])
    return {
        level: {a: (np.concatenate(s), np.concatenate(y)) for a, (s, y) in attacks.items()}
        for level, attacks in pooled.items()
    }
