"""UCI tabular data sets split by a natural column: Adult and credit default.

Numeric encoding (the same for every client and split, so models are
comparable): numeric columns are standardised to zero mean and unit variance
with statistics from the training data (Adult: ``adult.data``; credit: all
rows); categorical columns are one-hot over their sorted values in the
training data, a missing value (``?``) or an unseen value is the all-zero
vector. The split column stays among the features. Standardising with
central statistics is a preprocessing convenience, not a private step.

References:
  Becker, Kohavi. "Adult". UCI Machine Learning Repository, 1996.
  Yeh, Lien. "The comparisons of data mining techniques for the predictive
  accuracy of probability of default of credit card clients". 2009.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fljax.data import standardize
from fljax.data.datasets import custom, paths
from fljax.data.federated import FederatedData

ADULT_COLUMNS = (
    "age workclass fnlwgt education education_num marital_status occupation relationship race sex "
    "capital_gain capital_loss hours_per_week native_country ltgt50k"
).split()
ADULT_NUMERIC = ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week")
ADULT_CATEGORICAL = (
    "workclass",
    "education",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "native_country",
)

# UCI's X1..X23 header and the common named header.
CREDIT_NAMES = {
    "X1": "LIMIT_BAL", "X2": "SEX", "X3": "EDUCATION", "X4": "MARRIAGE", "X5": "AGE",
    **{f"X{6 + i}": f"PAY_{0 if i == 0 else i + 1}" for i in range(6)},
    **{f"X{12 + i}": f"BILL_AMT{i + 1}" for i in range(6)},
    **{f"X{18 + i}": f"PAY_AMT{i + 1}" for i in range(6)},
    "Y": "default", "default.payment.next.month": "default", "default payment next month": "default",
}  # fmt: skip
CREDIT_CATEGORICAL = ("SEX", "EDUCATION", "MARRIAGE")
EDUCATION_NAMES = {1: "graduate_school", 2: "university", 3: "high_school"}  # 0, 4, 5, 6: "other"
MARRIAGE_NAMES = {1: "married", 2: "single"}  # 0, 3: "other"
# Public ranges of credit default's numeric columns for private standardisation
# (fljax.analytics.profiling.PrivateStandardize), fixed from the data set's documentation rather
# than its values: amounts in NT dollars, credit limits up to 1,000,000; monthly bills from
# -100,000 (overpaid) to 600,000 and payments up to 100,000 (larger ones, under 1% of rows,
# count as the bound in the statistics only); age in years; repayment status from -2 (no
# consumption) to 9 (nine months or more late).
CREDIT_PUBLIC_BOUNDS = (
    ("LIMIT_BAL", 0.0, 1_000_000.0),
    ("AGE", 20.0, 80.0),
    *((f"PAY_{i}", -2.0, 9.0) for i in (0, 2, 3, 4, 5, 6)),
    *((f"BILL_AMT{i}", -100_000.0, 600_000.0) for i in range(1, 7)),
    *((f"PAY_AMT{i}", 0.0, 100_000.0) for i in range(1, 7)),
)


def encode(
    frame, numeric: Sequence[str], categorical: Sequence[str], reference=None
) -> tuple[np.ndarray, list[str]]:
    """Standardise ``numeric`` and one-hot ``categorical`` columns.

    Args:
      frame: ``pandas.DataFrame`` to encode.
      numeric: numeric column names.
      categorical: categorical column names.
      reference: frame whose means, standard deviations and category values
        are used (default: ``frame`` itself).

    Returns:
      ``(features float32 [rows, dims], feature names)``.
    """
    ref = frame if reference is None else reference
    parts, names = [], []
    for c in numeric:
        v = frame[c].astype(np.float64).to_numpy()
        r = ref[c].astype(np.float64).to_numpy()
        mean, std = np.nanmean(r), np.nanstd(r)
        z = (v - mean) / (std if std > 0 else 1.0)
        parts.append(np.nan_to_num(z, nan=0.0)[:, None])
        names.append(c)
    for c in categorical:
        values = sorted(ref[c].dropna().astype(str).unique())
        col = frame[c].astype(str).where(frame[c].notna(), None).to_numpy()
        parts.append((col[:, None] == np.array(values, object)[None]).astype(np.float32))
        names.extend(f"{c}={v}" for v in values)
    return np.concatenate(parts, axis=1).astype(np.float32), names


def _read_adult(path):
    import pandas as pd

    frame = pd.read_csv(
        path, skipinitialspace=True, na_values="?", header=0, names=ADULT_COLUMNS, comment="|"
    )
    frame = frame.dropna(how="all")
    frame["ltgt50k"] = frame["ltgt50k"].astype(str).str.rstrip(".")
    return frame


def adult(
    split: str = "train",
    *,
    client_column: str = "race",
    data_dir: str | os.PathLike | None = None,
) -> FederatedData:
    """UCI Adult (income > 50K), one client per value of ``client_column``.

    Files in folder ``adult_uci``: ``adult.data`` and ``adult.test`` (a header
    line first; ``?`` marks missing values; test labels end in ``.``).
    Features: the 6 numeric columns standardised and the 8 categorical ones
    one-hot (see the module docstring), 14 columns in all; label 1 for
    ``>50K``. Rows whose ``client_column`` is missing form the client
    ``"missing"``.

    Args:
      split: ``"train"`` (32,561 rows) or ``"test"`` (16,281 rows).
      client_column: a categorical column, e.g. ``"race"`` (5 clients),
        ``"sex"``, ``"workclass"``, ``"education"``, ``"native_country"``.
      data_dir: folder holding the files.

    Returns:
      :class:`FederatedData` with ``x`` float32 ``[N, features]``, ``num_classes = 2``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if client_column not in ADULT_CATEGORICAL:
        raise ValueError(f"client_column must be one of {ADULT_CATEGORICAL}, got {client_column!r}")
    folder = paths.find("adult_uci", ["adult.data", "adult.test"], data_dir)
    train = _read_adult(folder / "adult.data")
    frame = train if split == "train" else _read_adult(folder / "adult.test")
    x, _ = encode(frame, ADULT_NUMERIC, ADULT_CATEGORICAL, reference=train)
    labels = frame["ltgt50k"].to_numpy()
    unknown = set(labels) - {"<=50K", ">50K"}
    if unknown:
        raise ValueError(f"unexpected Adult labels {sorted(unknown)}")
    y = (labels == ">50K").astype(np.int32)
    ids = frame[client_column].fillna("missing").astype(str).to_numpy()
    return custom.from_arrays(x, y, ids, num_classes=2)


def _read_credit(path):
    import pandas as pd

    frame = pd.read_csv(path)
    if "X1" not in frame.columns and "LIMIT_BAL" not in frame.columns:
        # the .xls layout with a first row of X-names above the real header
        frame = pd.read_csv(path, skiprows=1)
    return frame.rename(columns=CREDIT_NAMES)


def credit_default(
    *,
    client_column: str = "EDUCATION",
    data_dir: str | os.PathLike | None = None,
    private_standardize=None,
) -> FederatedData:
    """UCI default of credit card clients (Taiwan, 2005), one client per group.

    File in folder ``credit_default_uci``: ``UCI_Credit_Card.csv`` (30,000 rows,
    header ``ID, X1..X23, Y`` or the named header ``LIMIT_BAL, SEX, ...``).
    Features: 20 numeric columns (limit, age, repayment status, bill and
    payment amounts) standardised, ``SEX``, ``EDUCATION``, ``MARRIAGE`` one-hot;
    label 1 = default next month. All rows are returned (there is no official
    test split; hold out clients or rows with :mod:`fljax.data.partition`).

    Args:
      client_column: ``"EDUCATION"`` (4 clients: graduate_school, university,
        high_school, other = codes 0/4/5/6), ``"MARRIAGE"`` (3 clients:
        married, single, other = codes 0/3) or ``"SEX"`` (male, female).
      data_dir: folder holding the file.
      private_standardize: ``None`` (default: central statistics over all rows), or a
        :class:`fljax.analytics.profiling.PrivateStandardize`: the numeric columns'
        mean and variance come from noised federated sums over the clients (unit:
        one row); without noise they equal the central ones up to float64 rounding.

    Returns:
      :class:`FederatedData` with ``x`` float32 ``[30000, features]``, ``num_classes = 2``.
    """
    names = {"EDUCATION": EDUCATION_NAMES, "MARRIAGE": MARRIAGE_NAMES, "SEX": {1: "male", 2: "female"}}
    if client_column not in names:
        raise ValueError(f"client_column must be one of {sorted(names)}, got {client_column!r}")
    folder = paths.find("credit_default_uci", ["UCI_Credit_Card.csv"], data_dir)
    frame = _read_credit(folder / "UCI_Credit_Card.csv")
    missing = [c for c in (*CREDIT_CATEGORICAL, "default") if c not in frame.columns]
    if missing:
        raise ValueError(f"UCI_Credit_Card.csv lacks columns {missing}; found {list(frame.columns)}")
    numeric = [c for c in frame.columns if c not in (*CREDIT_CATEGORICAL, "default", "ID")]
    x, _ = encode(frame, numeric, CREDIT_CATEGORICAL)
    y = frame["default"].to_numpy()
    ids = frame[client_column].map(lambda v: names[client_column].get(int(v), "other")).to_numpy()
    if private_standardize is not None:
        raw = frame[numeric].to_numpy(np.float64)
        scaler = private_standardize.scaler([raw[ids == c] for c in sorted(set(ids))], numeric)
        x[:, : len(numeric)] = np.nan_to_num(standardize.apply(raw, scaler), nan=0.0).astype(np.float32)
    return custom.from_arrays(x, y, ids, num_classes=2)
