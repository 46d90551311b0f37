"""UCI Heart Disease across four hospitals, shipped inside fljax (CC BY 4.0).

The data set is naturally federated: Cleveland (303 patients), Hungary (294),
Switzerland (123) and VA Long Beach (200). The default task is binary: disease
present (``num > 0``). ``target="severity"`` predicts the original 5-level ``num``
(0 no disease, 1-4 increasing severity), whose class counts differ sharply by
site (:data:`SEVERITY_COUNTS`): Switzerland has 8 patients without disease out of
123, and Hungary's file codes ``num`` as 0 or 1 only (its 106 diseased patients
are all labelled 1, whatever their severity), so its label 1 means "disease"
where the other sites' means "severity 1".
Attribution: ``fljax/data/resources/HEART_DISEASE_ATTRIBUTION.md``.

Features (all float32, 29 columns), encoded with fixed rules so that no
statistic crosses hospitals except the federated mean and variance used for
standardisation (computable by one secure-sum round; equal to pooled statistics):

* numeric, standardised: age, trestbps, chol (0 is "unknown" and treated as
  missing), thalach, oldpeak, ca; a missing numeric value is imputed with the
  mean (0 after standardisation) and flagged by a ``*_missing`` column;
* binary: sex, fbs (with fbs_missing), exang;
* one-hot: cp (1-4), restecg (0-2), slope (1-3, all-zero if missing), thal
  (3, 6, 7, all-zero if missing).
"""

from __future__ import annotations

import dataclasses
import importlib.resources

import numpy as np
import pandas as pd

from fljax.data import standardize
from fljax.data.federated import FederatedData

SITES = ("cleveland", "hungarian", "switzerland", "va")
SITE_NAMES = {
    "cleveland": "Cleveland",
    "hungarian": "Hungary",
    "switzerland": "Switzerland",
    "va": "VA Long Beach",
}
TARGETS = ("disease", "severity")
NUM_SEVERITY_LEVELS = 5
# Patients per severity level 0-4 at each site in the shipped file (UCI ``processed.*.data``).
SEVERITY_COUNTS = {
    "cleveland": (164, 55, 36, 35, 13),
    "hungarian": (188, 106, 0, 0, 0),
    "switzerland": (8, 48, 32, 30, 5),
    "va": (51, 56, 41, 42, 10),
}
_NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak", "ca")
_ONE_HOT = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2), "slope": (1, 2, 3), "thal": (3, 6, 7)}
# Public ranges of the numeric columns for private standardisation
# (fljax.analytics.profiling.PrivateStandardize): clinical ranges fixed without looking at the
# data: adult patients' age in years, resting systolic blood pressure (mmHg), serum cholesterol
# (mg/dl; a value above 400 counts as 400 in the statistics only), maximum heart rate reached
# (bpm, at most 220), ST depression (mm) and the number of major vessels coloured by
# fluoroscopy (0 to 3).
PUBLIC_BOUNDS = (
    ("age", 20.0, 90.0),
    ("trestbps", 80.0, 220.0),
    ("chol", 100.0, 400.0),
    ("thalach", 60.0, 220.0),
    ("oldpeak", -3.0, 7.0),
    ("ca", 0.0, 3.0),
)


@dataclasses.dataclass(frozen=True)
class HeartDisease:
    """Train and held-out populations, one client per hospital (same client order).

    Attributes:
      train: :class:`FederatedData` of each hospital's training patients.
      test: :class:`FederatedData` of each hospital's held-out patients.
      feature_names: names of the 29 feature columns.
    """

    train: FederatedData
    test: FederatedData
    feature_names: tuple[str, ...]


def read_csv(path=None) -> pd.DataFrame:
    """The raw table (920 rows, ``site`` first, ``target`` last); default: the shipped copy."""
    if path is None:
        ref = importlib.resources.files("fljax.data") / "resources" / "heart_disease_4sites.csv"
        with importlib.resources.as_file(ref) as p:
            return pd.read_csv(p, na_values=["?", ""])
    return pd.read_csv(path, na_values=["?", ""])


def _encode(frame: pd.DataFrame) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Raw encoding (numeric columns not yet standardised) and numeric-column mask."""
    frame = frame.copy()
    frame.loc[frame["chol"] == 0, "chol"] = np.nan
    cols, names, numeric = [], [], []
    for c in _NUMERIC:
        v = frame[c].to_numpy(np.float64)
        cols.append(v)
        names.append(c)
        numeric.append(True)
        cols.append(np.isnan(v).astype(np.float64))
        names.append(f"{c}_missing")
        numeric.append(False)
    for c in ("sex", "exang", "fbs"):
        v = frame[c].to_numpy(np.float64)
        cols.append(np.nan_to_num(v, nan=0.0))
        names.append(c)
        numeric.append(False)
    cols.append(frame["fbs"].isna().to_numpy(np.float64))
    names.append("fbs_missing")
    numeric.append(False)
    for c, levels in _ONE_HOT.items():
        v = frame[c].to_numpy(np.float64)
        for lv in levels:
            cols.append((v == lv).astype(np.float64))
            names.append(f"{c}={lv:g}")
            numeric.append(False)
    return np.stack(cols, axis=1), names, np.asarray(numeric)


def load(
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    path=None,
    private_standardize=None,
    target: str = "disease",
) -> HeartDisease:
    """Load the four hospitals as a federated train/held-out split.

    Each hospital's patients are split at random (stratified by label, from
    ``seed``) into train and held-out parts. Numeric features are standardised
    with the mean and variance over all hospitals' TRAINING patients, computed as
    a sum of per-hospital sums (what one federated aggregation would give).

    Args:
      test_fraction: fraction of each hospital's patients held out.
      seed: split seed.
      path: optional CSV with the same columns (default: the copy inside fljax).
      private_standardize: ``None`` (default: the exact federated statistics), or a
        :class:`fljax.analytics.profiling.PrivateStandardize`: the mean and variance
        come from its noised sums (unit: one training patient; bounds named by the
        numeric columns ``age``, ``trestbps``, ``chol``, ``thalach``, ``oldpeak``,
        ``ca``). Without noise it gives exactly the default's numbers.
      target: ``"disease"`` (default): 2 classes, 0 healthy and 1 disease (``num > 0``);
        ``"severity"``: the 5 levels of ``num`` (0 healthy, 1-4 severity; Hungary's
        file has 0 and 1 only, see the module docstring), split stratified by level.

    Returns:
      :class:`HeartDisease` with 2 classes, or 5 with ``target="severity"``.

    Examples:
      >>> d = load(target="severity")
      >>> d.train.num_classes, int(d.train.sizes.sum() + d.test.sizes.sum())
      (5, 920)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    frame = read_csv(path)
    unknown = sorted(set(frame["site"]) - set(SITES))
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; expected {SITES}")
    x_all, names, numeric = _encode(frame)
    num = frame["target"].to_numpy()
    if target == "severity":
        bad = sorted(set(num[~np.isin(num, np.arange(NUM_SEVERITY_LEVELS))].tolist()))
        if bad:
            raise ValueError(f"target='severity' needs num in 0-4; the file has {bad}")
        y_all, num_classes = num.astype(np.int32), NUM_SEVERITY_LEVELS
    else:
        y_all, num_classes = (num > 0).astype(np.int32), 2
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for site in SITES:
        idx = np.flatnonzero(frame["site"].to_numpy() == site)
        tr, te = [], []
        for label in range(num_classes):
            lab = rng.permutation(idx[y_all[idx] == label])
            k = int(round(test_fraction * len(lab)))
            te.append(lab[:k])
            tr.append(lab[k:])
        train_idx.append(np.sort(np.concatenate(tr)))
        test_idx.append(np.sort(np.concatenate(te)))
    # Federated standardisation: sums of per-hospital sums over training rows (NaN = missing).
    parts = [x_all[i][:, numeric] for i in train_idx]
    if private_standardize is None:
        scaler = standardize.fit(parts)
    else:
        scaler = private_standardize.scaler(parts, [n for n, num in zip(names, numeric, strict=True) if num])
    x = x_all.copy()
    x[:, numeric] = np.nan_to_num(standardize.apply(x_all[:, numeric], scaler), nan=0.0)
    x = x.astype(np.float32)
    client_names = tuple(SITE_NAMES[s] for s in SITES)
    train = FederatedData.from_partition(
        x, y_all, train_idx, client_names=client_names, num_classes=num_classes
    )
    test = FederatedData.from_partition(
        x, y_all, test_idx, client_names=client_names, num_classes=num_classes
    )
    return HeartDisease(train=train, test=test, feature_names=tuple(names))
