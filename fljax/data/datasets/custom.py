"""Populations from the user's own data: arrays or a pandas frame plus a client-id column.

Bad data fails early with a message that names the problem: mismatched
lengths, NaN or inf features, labels outside ``[0, num_classes)``, clients
without examples, unknown columns.

Examples:
  >>> import numpy as np, pandas as pd
  >>> from fljax.data.datasets import custom
  >>> df = pd.DataFrame({
  ...     "hospital": ["a", "b", "a", "c", "b"],
  ...     "age": [61, 45, 70, 38, 52],
  ...     "sex": ["f", "m", "m", "f", "f"],
  ...     "outcome": [1, 0, 1, 0, 0],
  ... })
  >>> data = custom.from_dataframe(df, client_column="hospital", label_column="outcome", one_hot=True)
  >>> data.client_names, data.sizes.tolist(), data.x.shape  # age, sex=f, sex=m
  (('a', 'b', 'c'), [2, 2, 1], (5, 3))
  >>> x = np.arange(12, dtype=np.float32).reshape(6, 2)
  >>> y = np.array([0, 1, 1, 0, 1, 0])
  >>> site = np.array([2, 2, 5, 5, 5, 9])
  >>> data = custom.from_arrays(x, y, client_ids=site, num_classes=2)
  >>> data.client_names, data.sizes.tolist(), data.y.dtype
  (('2', '5', '9'), [2, 3, 1], dtype('int32'))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fljax.data import partition
from fljax.data.federated import FederatedData


def _check_features(x: np.ndarray, what: str = "x") -> None:
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
        bad = ~np.isfinite(x.reshape(len(x), -1))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{what} holds {int(bad.sum())} NaN/inf values (first at row {row}, feature {col})"
            )
    elif not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")


def _check_labels(y: np.ndarray, num_classes: int | None) -> np.ndarray:
    if y.ndim < 1:
        raise ValueError("y must have a leading examples axis")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError("y holds NaN/inf labels")
    if num_classes is not None:
        if not np.all(y == np.round(y)):
            raise ValueError("class labels must be integers")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), found range [{y.min()}, {y.max()}]")
        return y.astype(np.int32)
    return y


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    client_ids: np.ndarray,
    *,
    num_classes: int | None = None,
    clients: Sequence | None = None,
    allow_empty: bool = False,
) -> FederatedData:
    """A population with one client per distinct ``client_ids`` value.

    Args:
      x: ``[N, ...]`` numeric features.
      y: ``[N, ...]`` labels (class ids when ``num_classes`` is given).
      client_ids: ``[N]`` client of each example (strings or integers).
      num_classes: checks labels lie in ``[0, num_classes)`` and makes them int32.
      clients: the expected clients, in this order (default: sorted distinct
        ids). A listed client without examples raises unless ``allow_empty``;
        an example whose id is not listed raises.
      allow_empty: keep listed clients that have no examples.

    Returns:
      :class:`FederatedData` with the ids (as strings) as ``client_names``.
    """
    x, y, ids = np.asarray(x), np.asarray(y), np.asarray(client_ids)
    if not len(x) == len(y) == len(ids):
        raise ValueError(f"x, y and client_ids differ in length: {len(x)}, {len(y)}, {len(ids)}")
    if len(x) == 0:
        raise ValueError("no examples")
    _check_features(x)
    y = _check_labels(y, num_classes)
    p = partition.natural(ids)
    indices, names = list(p.indices), list(p.client_names)
    if clients is not None:
        wanted = [str(c) for c in clients]
        unknown = sorted(set(names) - set(wanted))
        if unknown:
            raise ValueError(f"examples belong to clients not in `clients`: {unknown[:10]}")
        where = dict(zip(names, indices, strict=True))
        indices = [where.get(c, np.zeros(0, np.int64)) for c in wanted]
        names = wanted
        empty = [c for c, i in zip(names, indices, strict=True) if len(i) == 0]
        if empty and not allow_empty:
            raise ValueError(f"clients without examples: {empty[:10]} (pass allow_empty=True to keep them)")
    return FederatedData.from_partition(
        x, y, indices, client_names=names, num_classes=num_classes, allow_empty=allow_empty
    )


def from_dataframe(
    frame,
    *,
    client_column: str,
    label_column: str,
    feature_columns: Sequence[str] | None = None,
    num_classes: int | None = None,
    one_hot: bool = False,
    clients: Sequence | None = None,
    allow_empty: bool = False,
) -> FederatedData:
    """A population from a pandas DataFrame with a client-id column.

    Args:
      frame: ``pandas.DataFrame``.
      client_column: column naming each row's client (e.g. ``"hospital"``).
      label_column: label column. Non-numeric labels become the index of their
        value in the sorted distinct values (``num_classes`` then defaults to
        their count).
      feature_columns: feature columns (default: every other column).
      num_classes: see :func:`from_arrays`.
      one_hot: one-hot encode non-numeric feature columns (otherwise they raise).
      clients: see :func:`from_arrays`.
      allow_empty: see :func:`from_arrays`.

    Returns:
      :class:`FederatedData` with ``x`` float32 ``[N, features]`` in
      ``feature_columns`` order (one-hot columns expanded in place).
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    columns = list(frame.columns)
    for name, col in (("client_column", client_column), ("label_column", label_column)):
        if col not in frame.columns:
            raise ValueError(f"{name} {col!r} is not a column; columns are {columns}")
    if feature_columns is None:
        feature_columns = [c for c in columns if c not in (client_column, label_column)]
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"unknown feature columns {missing}; columns are {columns}")
    if not feature_columns:
        raise ValueError("no feature columns")
    if frame[client_column].isna().any():
        raise ValueError(f"client column {client_column!r} has missing values")
    parts = []
    for c in feature_columns:
        col = frame[c]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            if col.isna().any():
                raise ValueError(f"feature column {c!r} has {int(col.isna().sum())} missing (NaN) values")
            parts.append(col.to_numpy(np.float32)[:, None])
        elif one_hot:
            values = sorted(col.dropna().astype(str).unique())
            parts.append((col.astype(str).to_numpy()[:, None] == np.array(values)[None]).astype(np.float32))
        else:
            raise ValueError(
                f"feature column {c!r} is not numeric ({col.dtype}); encode it or pass one_hot=True"
            )
    x = np.concatenate(parts, axis=1)
    label = frame[label_column]
    if label.isna().any():
        raise ValueError(f"label column {label_column!r} has missing values")
    if pd.api.types.is_numeric_dtype(label) or pd.api.types.is_bool_dtype(label):
        y = label.to_numpy()
    else:
        values = sorted(label.astype(str).unique())
        y = np.searchsorted(np.array(values), label.astype(str).to_numpy()).astype(np.int32)
        num_classes = len(values) if num_classes is None else num_classes
    return from_arrays(
        x,
        y,
        frame[client_column].astype(str).to_numpy(),
        num_classes=num_classes,
        clients=clients,
        allow_empty=allow_empty,
    )
