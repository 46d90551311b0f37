"""Federated feature standardisation from sums of per-client sufficient statistics.

Each client sends, for every feature, three numbers: the count of observed
values, their sum and their sum of squares. The server adds them up and never
sees an individual client's data::

    n = sum_c n_c,    S = sum_c sum_i x_ci,    Q = sum_c sum_i x_ci^2
    mean = S / n,     variance = Q / n - mean^2          (population variance, ddof=0)

Because the statistics are SUMS, they can go through a secure sum (any
:mod:`fljax.secagg` sum, which adds pytrees of client vectors) unchanged, and
the result does not depend on how the examples are split among clients: it
equals the pooled ``np.mean(x, 0)`` and ``np.std(x, 0)``.

``Q / n - mean^2`` cancels catastrophically when ``|mean| >> std``. Both
quantities are therefore accumulated about a ``shift`` ``c`` (sums of ``x - c``
and ``(x - c)^2``; the variance about the mean is ``Q_c / n - (S_c / n)^2``), and
:func:`fit` runs the textbook two-pass algorithm as two rounds of sums: round 1
gives the mean, round 2 the sum of squared deviations from that mean. All host
arithmetic is float64. A ``NaN`` marks a missing value: it is skipped (counts
are per feature) and stays ``NaN`` after :func:`apply`.

Examples:
  >>> import numpy as np
  >>> from fljax.data import standardize
  >>> clients = [np.array([[1.0, 10.0], [3.0, 10.0]]), np.array([[5.0, 40.0]])]
  >>> scaler = standardize.fit(clients)
  >>> scaler.mean.tolist(), scaler.std.tolist()
  ([3.0, 20.0], [1.632993161855452, 14.142135623730951])
  >>> pooled = np.concatenate(clients)
  >>> bool(np.allclose(scaler.std, pooled.std(axis=0)))
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fljax.data.federated import FederatedData


class Statistics(NamedTuple):
    """Additive sufficient statistics of features (float64 numpy).

    Shapes are ``[..., *feature_shape]``: one client's statistics have the
    feature shape; :func:`client_statistics` adds a leading ``[clients]`` axis.

    Attributes:
      count: number of observed (non-NaN) values per feature.
      sum: sum of ``x - shift`` over observed values.
      sum_sq: sum of ``(x - shift) ** 2`` over observed values.
    """

    count: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray


class Scaler(NamedTuple):
    """Feature means and population standard deviations (float64, ``[*feature_shape]``)."""

    mean: np.ndarray
    std: np.ndarray


def statistics(x: np.ndarray, *, shift: np.ndarray | float | None = None) -> Statistics:
    """One client's statistics of ``x[examples, *features]``, about ``shift``.

    Args:
      x: the client's examples; ``NaN`` marks a missing value (skipped).
      shift: optional value (scalar or ``[*features]``) subtracted before
        summing; ``None`` sums raw values. Every client must use the same shift.

    Returns:
      :class:`Statistics` with the feature shape ``x.shape[1:]``.

    Examples:
      >>> import numpy as np
      >>> s = statistics(np.array([[1.0, np.nan], [3.0, 4.0]]))
      >>> s.count.tolist(), s.sum.tolist(), s.sum_sq.tolist()
      ([2.0, 1.0], [4.0, 4.0], [10.0, 16.0])
    """
    d = np.asarray(x, np.float64)
    if d.ndim < 1:
        raise ValueError(f"x must be [examples, *features], got a scalar of shape {d.shape}")
    if shift is not None:
        d = d - np.asarray(shift, np.float64)
    return Statistics(
        count=np.sum(~np.isnan(d), axis=0).astype(np.float64),
        sum=np.nansum(d, axis=0),
        sum_sq=np.nansum(d**2, axis=0),
    )


def client_statistics(
    data: FederatedData | Sequence[np.ndarray], *, shift: np.ndarray | float | None = None
) -> Statistics:
    """Every client's :func:`statistics`, stacked on a leading ``[clients]`` axis.

    This is what each client would compute locally and send (possibly through
    a secure sum). A client without examples contributes zeros.

    Args:
      data: a :class:`FederatedData` population (its ``x``) or one array
        ``[examples, *features]`` per client.
      shift: passed to :func:`statistics`, the same for every client.

    Returns:
      :class:`Statistics` of shape ``[clients, *feature_shape]``.

    Examples:
      >>> import numpy as np
      >>> s = client_statistics([np.ones((2, 3)), np.zeros((0, 3))])
      >>> s.count.tolist()
      [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    """
    if isinstance(data, FederatedData):
        xs = [data.client(c)[0] for c in range(data.num_clients)]
    else:
        xs = list(data)
    if not xs:
        raise ValueError("no clients given")
    shapes = {np.shape(x)[1:] for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"clients have different feature shapes: {sorted(shapes)}")
    per = [statistics(x, shift=shift) for x in xs]
    return Statistics(*(np.stack(field) for field in zip(*per, strict=True)))


def combine(stats: Statistics | Sequence[Statistics]) -> Statistics:
    """Add statistics over clients (the server's only step; a plain or secure sum).

    Args:
      stats: :class:`Statistics` with a leading ``[clients]`` axis, or a sequence
        of per-client :class:`Statistics`.

    Returns:
      The totals, of the feature shape. Clients are added in order, so the
      result is bit-for-bit that of ``s_0 + s_1 + ...``.

    Examples:
      >>> import numpy as np
      >>> total = combine(client_statistics([np.ones((2, 1)), 3 * np.ones((1, 1))]))
      >>> total.count.tolist(), total.sum.tolist(), total.sum_sq.tolist()
      ([3.0], [5.0], [11.0])
    """
    if isinstance(stats, Statistics):
        stats = [Statistics(*(f[c] for f in stats)) for c in range(np.shape(stats.count)[0])]
    if not stats:
        raise ValueError("no statistics to combine")
    total = stats[0]
    for s in stats[1:]:
        total = Statistics(*(a + b for a, b in zip(total, s, strict=True)))
    return Statistics(*(np.asarray(f, np.float64) for f in total))


def moments(total: Statistics, *, shift: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population variance (``ddof=0``) from combined statistics.

    Args:
      total: :func:`combine`'d statistics, accumulated about ``shift``.
      shift: the shift the statistics were computed about (``None``: raw sums).

    Returns:
      ``(mean, variance)``, float64 arrays of the feature shape; the variance
      is ``sum_sq / n - (sum / n) ** 2`` clipped at 0 (rounding can make it
      slightly negative for a constant feature).

    Raises:
      ValueError: if some feature has no observed value (its mean is undefined).

    Examples:
      >>> import numpy as np
      >>> mean, var = moments(statistics(np.array([[1.0], [2.0], [3.0], [6.0]])))
      >>> mean.tolist(), var.tolist()
      ([3.0], [3.5])
    """
    count = np.asarray(total.count, np.float64)
    if np.any(count <= 0):
        bad = np.argwhere(np.reshape(count, -1) <= 0)[:, 0].tolist()
        raise ValueError(f"feature(s) {bad} (flattened index) have no observed values")
    centred_mean = total.sum / count
    variance = np.maximum(total.sum_sq / count - centred_mean**2, 0.0)
    mean = centred_mean if shift is None else np.asarray(shift, np.float64) + centred_mean
    return mean, variance


def fit(data: FederatedData | Sequence[np.ndarray], *, two_pass: bool = True) -> Scaler:
    """Federated mean and standard deviation of the features of all clients.

    Equal to ``np.nanmean(pooled, 0)`` and ``np.nanstd(pooled, 0)`` (``ddof=0``)
    up to float64 rounding, whatever the split of examples among clients.

    Args:
      data: a :class:`FederatedData` population or one array per client
        (``NaN`` = missing).
      two_pass: ``True`` (default) runs two rounds of sums: raw sums for the
        mean, then sums of squared deviations from that mean (no cancellation).
        ``False`` runs one round (count, sum, sum of squares) and is exact
        enough when ``|mean|`` is not much larger than the standard deviation.

    Returns:
      :class:`Scaler` ``(mean, std)`` of the feature shape, float64.

    Examples:
      >>> import numpy as np
      >>> x = np.array([[1e8 + 1.0], [1e8 + 2.0], [1e8 + 3.0]])
      >>> fit([x[:1], x[1:]]).std.tolist()
      [0.816496580927726]
    """
    mean, variance = moments(combine(client_statistics(data)))
    if two_pass:  # round 2: squared deviations from the round-1 mean
        variance = moments(combine(client_statistics(data, shift=mean)), shift=mean)[1]
    return Scaler(mean=mean, std=np.sqrt(variance))


def apply(data, scaler: Scaler):
    """Standardise ``(x - mean) / std`` (``std == 0``: divided by 1 instead).

    Each client can apply this to its own data once it receives the scaler.

    Args:
      data: an array ``[examples, *features]`` or a :class:`FederatedData`
        (every client standardised with the same ``scaler``).
      scaler: from :func:`fit` (or :func:`moments`).

    Returns:
      Same type as ``data``; a floating array keeps its dtype (computed in
      float64 first), an integer one becomes float32. ``NaN`` stays ``NaN``.

    Examples:
      >>> import numpy as np
      >>> apply(np.array([[1.0, 5.0], [3.0, 5.0]]), Scaler(np.array([2.0, 5.0]), np.array([1.0, 0.0])))
      array([[-1.,  0.],
             [ 1.,  0.]])
    """
    if isinstance(data, FederatedData):
        return FederatedData(
            x=apply(data.x, scaler),
            y=data.y,
            offsets=data.offsets,
            client_names=data.client_names,
            num_classes=data.num_classes,
        )
    x = np.asarray(data)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    std = np.asarray(scaler.std, np.float64)
    out = (x.astype(np.float64, copy=False) - scaler.mean) / np.where(std > 0, std, 1.0)
    return out.astype(dtype, copy=False)
