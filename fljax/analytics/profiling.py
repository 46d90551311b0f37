"""Federated data profiling for cross-silo work, and private standardisation.

Sites (hospitals, banks) hold tables with, supposedly, the same columns. Before
training on them together one checks, without pooling the records:

* :func:`schema`: the same columns, dtypes and categorical levels at every site
  (metadata each site shares; categorical levels are themselves data, so a rare
  level can identify records: share them only where that is acceptable);
* :func:`profile`: per site and feature, a private histogram over public bins
  (with below-range, above-range and missing cells, hence private missing-value
  and out-of-range rates) and private mean and standard deviation
  (:func:`fljax.analytics.queries.variance`), the global figures (sums of the
  sites' released figures, post-processing) and the features of a site that
  sit on another scale (rule below); :func:`plot` draws them, sites overlaid;
* :func:`private_scaler`: a :class:`fljax.data.standardize.Scaler` from noised
  sums; without noise it IS :func:`fljax.data.standardize.fit` (same code).

Unit of privacy: ONE RECORD (a patient) of a site, the usual unit across silos:
each record is a "client" of :func:`fljax.analytics.release.release` (the site
adds its records' bounded contributions locally, the sites' sums are added, noise
once), so the neighbouring relation is add/remove one record and the
sensitivities are the per-record bounds of :mod:`fljax.analytics.queries` with
``max_contributions = 1``. Sites hold disjoint records, so a feature's releases at
different sites compose in parallel; :attr:`Profile.dp_event` composes two
releases (histogram and moments) per feature.

Scale rule (:func:`profile`): site ``s`` is flagged for feature ``f`` when

1. more than ``max_out_of_range`` (default 0.5) of its released observed values
   lie outside the public range ``[lo, hi]`` (values multiplied by 100, or
   recorded in another unit, fall outside it; their clipped moments cannot show
   it), or
2. its released root mean square ``sqrt(mean^2 + std^2)`` (a scale that needs no
   sign convention) differs from the median of the other sites' by more than a
   factor ``scale_factor`` (default 10), either way.

Examples:
  >>> import numpy as np, pandas as pd, jax
  >>> from fljax.analytics import profiling
  >>> rng = np.random.default_rng(0)
  >>> sites = {f"s{i}": pd.DataFrame({"x": rng.normal(5, 1, 200)}) for i in range(3)}
  >>> sites["s2"]["x"] *= 100  # a site in other units
  >>> prof = profiling.profile(sites, {"x": (0.0, 20.0)}, jax.random.key(0), noise_multiplier=1.0)
  >>> prof.flags
  {'x': ['s2']}
  >>> profiling.schema(sites).ok
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fljax.analytics import budget, queries
from fljax.analytics import release as release_lib
from fljax.data import standardize
from fljax.data.federated import FederatedData


# --- schema ------------------------------------------------------------------------
class SchemaReport(NamedTuple):
    """Per-site and global schema.

    Attributes:
      columns: the union of the columns, in first-seen order.
      dtypes: ``{site: {column: dtype name}}``.
      levels: ``{site: {column: sorted levels}}`` of categorical (object, category,
        bool) columns.
      issues: human-readable problems (missing columns, dtype kinds that differ,
        levels a site has that some other site lacks).
      ok: no issue.
    """

    columns: list[str]
    dtypes: dict[str, dict[str, str]]
    levels: dict[str, dict[str, list]]
    issues: list[str]
    ok: bool


def _is_categorical(series) -> bool:
    kind = series.dtype.kind
    return kind in "ObU" or str(series.dtype) == "category"


def schema(sites: Mapping) -> SchemaReport:
    """Check that every site has the same columns, dtype kinds and categorical levels.

    Args:
      sites: ``{site name: pandas.DataFrame}``.

    Returns:
      :class:`SchemaReport`.
    """
    if not sites:
        raise ValueError("no sites given")
    columns: list[str] = []
    dtypes, levels = {}, {}
    for name, frame in sites.items():
        for c in frame.columns:
            if c not in columns:
                columns.append(c)
        dtypes[name] = {c: str(frame[c].dtype) for c in frame.columns}
        levels[name] = {
            c: sorted(map(str, frame[c].dropna().unique()))
            for c in frame.columns
            if _is_categorical(frame[c])
        }
    issues = []
    for name, frame in sites.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            issues.append(f"site {name!r} lacks column(s) {missing}")
    for c in columns:
        kinds = {
            name: ("categorical" if _is_categorical(f[c]) else "numeric")
            for name, f in sites.items()
            if c in f
        }
        if len(set(kinds.values())) > 1:
            issues.append(f"column {c!r} is categorical at some sites and numeric at others: {kinds}")
        site_levels = {name: set(lv[c]) for name, lv in levels.items() if c in lv}
        if len(site_levels) > 1:
            union = set().union(*site_levels.values())
            for name, lv in site_levels.items():
                extra = sorted(union - lv)
                if extra:
                    issues.append(f"column {c!r}: site {name!r} lacks level(s) {extra} seen at other sites")
    return SchemaReport(columns, dtypes, levels, issues, not issues)


# --- private profile -----------------------------------------------------------------
class FeatureProfile(NamedTuple):
    """One feature at one site (released values).

    Attributes:
      histogram: :class:`~fljax.analytics.queries.HistogramResult`.
      mean: released mean (values clipped to the range).
      std: released standard deviation (``ddof=0``).
      count: released number of observed values.
      missing_rate: released missing / released total (sums of the raw released cells,
        the ratio clamped to ``[0, 1]``).
      out_of_range_rate: released (below + above) / released observed (likewise).
    """

    histogram: queries.HistogramResult
    mean: float
    std: float
    count: float
    missing_rate: float
    out_of_range_rate: float


class Profile(NamedTuple):
    """A private federated profile.

    Attributes:
      sites: ``{site: {feature: FeatureProfile}}``.
      overall: ``{feature: FeatureProfile}``: the sites' releases combined (post-processing).
      flags: ``{feature: [flagged sites]}`` (features without a flagged site omitted).
      reasons: ``{(feature, site): why}``.
      bounds: ``{feature: (lo, hi)}``.
      dp_event: the ``DpEvent`` of the whole profile (unit: one record).
      noise_multiplier: of every release.
    """

    sites: dict[str, dict[str, FeatureProfile]]
    overall: dict[str, FeatureProfile]
    flags: dict[str, list[str]]
    reasons: dict[tuple[str, str], str]
    bounds: dict[str, tuple[float, float]]
    dp_event: dp_accounting.DpEvent
    noise_multiplier: float


def _records(values: np.ndarray, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Records as clients, padded to ``capacity`` (one shape, one compilation, for every site):
    ``values [n]`` -> ``([capacity, 1], mask [capacity, 1], client_mask [capacity])``."""
    v = np.zeros((capacity, 1), np.float32)
    n = len(values)
    v[:n, 0] = values
    client_mask = np.arange(capacity) < n
    return jnp.asarray(v), jnp.ones((capacity, 1), jnp.bool_), jnp.asarray(client_mask)


@functools.lru_cache(maxsize=64)
def _profile_queries(lo: float, hi: float, num_bins: int) -> tuple[queries.Query, queries.Query]:
    """The histogram and moment queries of one feature (cached: the same queries reuse their compilations)."""
    return queries.histogram(np.linspace(lo, hi, num_bins + 1)), queries.variance(lo, hi)


def _feature_profile(hist: queries.HistogramResult, mean: float, std: float, count: float) -> FeatureProfile:
    # sums of the raw released cells (unbiased; clamping each cell first would bias them up)
    outside = max(hist.below + hist.above, 0.0)
    observed = max(float(np.sum(hist.counts)) + hist.below + hist.above, 0.0)
    missing = max(hist.missing, 0.0)
    total = observed + missing
    return FeatureProfile(
        histogram=hist,
        mean=mean,
        std=std,
        count=count,
        missing_rate=float(min(missing / total, 1.0)) if total > 0 else 0.0,
        out_of_range_rate=float(min(outside / observed, 1.0)) if observed > 0 else 0.0,
    )


def _combine(parts: list[FeatureProfile], edges: np.ndarray) -> FeatureProfile:
    hist = queries.HistogramResult(
        counts=np.sum([p.histogram.counts for p in parts], axis=0),
        below=sum(p.histogram.below for p in parts),
        above=sum(p.histogram.above for p in parts),
        missing=sum(p.histogram.missing for p in parts),
        edges=edges,
    )
    n = np.array([max(p.count, 0.0) for p in parts])
    means = np.array([p.mean for p in parts])
    var = np.array([p.std**2 for p in parts])
    total = max(float(n.sum()), 1.0)
    mean = float(np.sum(n * means) / total)
    variance = float(np.sum(n * (var + (means - mean) ** 2)) / total)
    return _feature_profile(hist, mean, math.sqrt(max(variance, 0.0)), float(n.sum()))


def profile(
    sites: Mapping,
    bounds: Mapping[str, tuple[float, float]],
    key: jax.Array,
    *,
    noise_multiplier: float,
    num_bins: int = 20,
    max_out_of_range: float = 0.5,
    scale_factor: float = 10.0,
    sum=None,  # noqa: A002
) -> Profile:
    """Private per-site profile of the numeric features named in ``bounds``.

    For every feature ``f`` and site ``s``: a histogram over ``num_bins`` equal
    bins of ``bounds[f]`` (:func:`fljax.analytics.queries.histogram`, one record
    per "client", L2 bound 1) and the moments
    (:func:`fljax.analytics.queries.variance`), both with noise multiplier
    ``noise_multiplier``; key ``fold_in(fold_in(key, feature index), site index)``
    then ``fold_in(., 0 or 1)``. Flags follow the module's scale rule.

    Args:
      sites: ``{site: pandas.DataFrame}``.
      bounds: ``{feature: (lo, hi)}``, public ranges.
      key: typed PRNG key.
      noise_multiplier: ``z`` of every release (0: exact, not private).
      num_bins: bins per histogram.
      max_out_of_range: rule 1's threshold.
      scale_factor: rule 2's factor (> 1).
      sum: the sum aggregator of the releases (default plain).

    Returns:
      :class:`Profile`.
    """
    if not sites:
        raise ValueError("no sites given")
    if not scale_factor > 1:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
    if not 0 < max_out_of_range < 1:
        raise ValueError(f"max_out_of_range must be in (0, 1), got {max_out_of_range}")
    names = list(sites)
    per_site: dict[str, dict[str, FeatureProfile]] = {s: {} for s in names}
    overall, flags, reasons = {}, {}, {}
    events = []
    sizes = [len(sites[s]) for s in names]
    capacity = 1 << max(max(sizes) - 1, 1).bit_length()  # a power of two: few distinct shapes
    n = max(int(np.sum(sizes)), 1)  # population size (sets only the default delta)
    for fi, (feature, (lo, hi)) in enumerate(bounds.items()):
        hist_q, var_q = _profile_queries(float(lo), float(hi), int(num_bins))
        edges = np.linspace(float(lo), float(hi), num_bins + 1)
        for si, s in enumerate(names):
            frame = sites[s]
            if feature not in frame.columns:
                raise ValueError(f"site {s!r} has no column {feature!r}")
            values, mask, clients = _records(frame[feature].to_numpy(np.float64), capacity)
            k = jax.random.fold_in(jax.random.fold_in(key, fi), si)
            hist, _ = queries.run(
                hist_q, hist_q.config(noise_multiplier=noise_multiplier, population_size=n),
                values, mask, clients, jax.random.fold_in(k, 0), sum=sum,
            )  # fmt: skip
            mom, _ = queries.run(
                var_q, var_q.config(noise_multiplier=noise_multiplier, population_size=n),
                values, mask, clients, jax.random.fold_in(k, 1), sum=sum,
            )  # fmt: skip
            per_site[s][feature] = _feature_profile(hist, mom.mean, mom.std, mom.count)
        overall[feature] = _combine([per_site[s][feature] for s in names], edges)
        rms = {s: math.hypot(per_site[s][feature].mean, per_site[s][feature].std) for s in names}
        for s in names:
            fp = per_site[s][feature]
            why = None
            if fp.out_of_range_rate > max_out_of_range:
                why = f"{fp.out_of_range_rate:.0%} of values outside [{lo:g}, {hi:g}]"
            elif len(names) > 1:
                ref = float(np.median([rms[t] for t in names if t != s]))
                ratio = (rms[s] + 1e-12) / (ref + 1e-12)
                if abs(math.log(ratio)) > math.log(scale_factor):
                    why = f"root mean square {rms[s]:.3g} is {ratio:.3g} x the other sites' median {ref:.3g}"
            if why is not None:
                flags.setdefault(feature, []).append(s)
                reasons[(feature, s)] = why
        if noise_multiplier > 0:
            events += [dp_accounting.GaussianDpEvent(noise_multiplier)] * 2
    event = dp_accounting.ComposedDpEvent(events) if events else dp_accounting.NonPrivateDpEvent()
    return Profile(per_site, overall, flags, reasons, {f: (float(a), float(b)) for f, (a, b) in bounds.items()},
                   event, noise_multiplier)  # fmt: skip


def plot(
    prof: Profile,
    path=None,
    *,
    columns: int = 3,
    axes=None,
    features: Sequence[str] | None = None,
    min_count: float = 20.0,
):
    """One panel per feature: the sites' released histograms (normalised) overlaid.

    Flagged sites are dashed and marked "(flagged)" in the legend. Post-processing of the
    released histograms: no privacy cost.

    Args:
      prof: a :class:`Profile`.
      path: save the figure there if given.
      columns: panels per row of a new figure.
      axes: draw into these matplotlib axes (one per feature) instead of a new figure.
      features: the features to draw (default: all, in order).
      min_count: a site whose released in-range count is below this is listed, not drawn
        (its normalised histogram would be mostly noise).

    Returns:
      The matplotlib figure.
    """
    import matplotlib

    if axes is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = list(prof.bounds) if features is None else list(features)
    if axes is None:
        rows = math.ceil(len(features) / columns)
        fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
        axes = list(grid.flat)
        for ax in axes[len(features) :]:
            ax.axis("off")
        fig.suptitle(
            f"private per-site histograms (noise multiplier {prof.noise_multiplier:g}, unit: one record)"
        )
    else:
        axes = list(axes)
        fig = axes[0].figure
    for ax, feature in zip(axes, features, strict=False):
        for s, feats in prof.sites.items():
            h = feats[feature].histogram
            counts = np.maximum(h.counts, 0.0)
            flagged = s in prof.flags.get(feature, [])
            label = f"{s} (flagged)" if flagged else s
            if float(np.sum(h.counts)) < min_count:  # normalised noise would look like data
                ax.plot(
                    [], [], linestyle="--" if flagged else "-", label=f"{label}: < {min_count:g} in range"
                )
                continue
            dens = counts / max(float(counts.sum()), 1.0)
            ax.stairs(dens, h.edges, label=label, linestyle="--" if flagged else "-", linewidth=1.5)
        flagged = prof.flags.get(feature)
        ax.set_title(feature + (f"  [flagged: {', '.join(flagged)}]" if flagged else ""), fontsize=9)
        ax.set_ylabel("fraction in range")
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# --- private standardisation ---------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivateStandardize:
    """Options of a data loader's private standardisation (:func:`private_scaler`).

    Attributes:
      noise_multiplier: ``z`` of each of the (two) releases; 0: the exact
        federated statistics (equal to :func:`fljax.data.standardize.fit`).
      bounds: ``((feature, lo, hi), ...)`` public ranges of the features; every
        feature needs one when ``noise_multiplier > 0``.
      seed: seed of the noise key (a reproducible simulation; real deployments
        draw the noise from a secret key).
      two_pass: as :func:`fljax.data.standardize.fit`.
    """

    noise_multiplier: float = 0.0
    bounds: tuple[tuple[str, float, float], ...] = ()
    seed: int = 0
    two_pass: bool = True

    def bounds_for(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(lo [F], hi [F])`` for the features ``names`` (``None`` if no bound is given)."""
        table = {n: (float(lo), float(hi)) for n, lo, hi in self.bounds}
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(f"bounds name unknown feature(s) {unknown}; features: {list(names)}")
        if not table:
            return None
        lo = np.array([table.get(n, (-np.inf, np.inf))[0] for n in names])
        hi = np.array([table.get(n, (-np.inf, np.inf))[1] for n in names])
        return lo, hi

    def dp_event(self) -> dp_accounting.DpEvent:
        """The ``DpEvent`` of :meth:`scaler` (unit: one record): two Gaussian releases of multiplier
        ``noise_multiplier`` (:func:`private_scaler`'s rounds; their sensitivity is built into it)."""
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(self.noise_multiplier)] * 2)

    def epsilon(self, delta: float, *, accountant: str = "rdp") -> float:
        """Epsilon of :meth:`scaler` at ``delta`` (unit: one record; ``inf`` without noise).

        Examples:
          >>> 0.9 < PrivateStandardize(noise_multiplier=6.0).epsilon(1e-5) < 1.0
          True
        """
        if self.noise_multiplier == 0:
            return math.inf
        ledger = budget.BudgetLedger(budget_epsilon=None, delta=delta, accountant=accountant)
        return ledger.spend(self.dp_event(), label="standardisation")

    def scaler(self, clients: Sequence[np.ndarray], names: Sequence[str]) -> standardize.Scaler:
        """:func:`private_scaler` of ``clients`` (``[examples, F]`` arrays, columns ``names``)."""
        return private_scaler(
            clients,
            bounds=self.bounds_for(names),
            noise_multiplier=self.noise_multiplier,
            key=jax.random.key(self.seed),
            two_pass=self.two_pass,
        ).scaler


class PrivateScale(NamedTuple):
    """A privately fitted scaler and what it spent.

    Attributes:
      scaler: :class:`fljax.data.standardize.Scaler`.
      configs: the :class:`~fljax.analytics.release.ReleaseConfig` of each round
        (unit: one record); account them with :meth:`ReleaseConfig.dp_event`.
    """

    scaler: standardize.Scaler
    configs: tuple[release_lib.ReleaseConfig, ...]


def private_scaler(
    clients: Sequence[np.ndarray] | FederatedData,
    *,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    noise_multiplier: float = 0.0,
    key: jax.Array | None = None,
    two_pass: bool = True,
) -> PrivateScale:
    """Feature means and standard deviations from noised sums (a private :func:`standardize.fit`).

    The sums are :func:`fljax.data.standardize.fit`'s own (same code, float64 on
    the host): round 1 the count and sum of each feature, round 2 (``two_pass``)
    the sums about the round-1 mean. Each value is first clipped to its public
    ``[lo, hi]`` (NaN stays missing), which bounds one record's contribution.
    Unit of privacy: one record; neighbouring relation: add/remove one record.
    Every feature is put on a unit scale, so that each gets the same relative
    precision whatever its units: per round, one record contributes per observed
    feature ``f`` two numbers in ``[-1, 1]`` (round 1: its count 1 and
    ``(x - c_f) / R_f``, with ``c_f``, ``R_f`` the centre and half-width of
    ``[lo_f, hi_f]``; round 2: ``(x - mu_f) / D_f`` and ``((x - mu_f) / D_f)^2``
    with ``D_f = max(hi_f - mu_f, mu_f - lo_f)``), so its L2 bound is
    ``sqrt(2 F)`` for ``F`` features: each round is one
    :class:`~fljax.analytics.release.ReleaseConfig` with that ``l2_bound`` and
    noise multiplier ``z`` (noise from :func:`fljax.analytics.release.host_noise`,
    keys ``fold_in(key, round)``; std ``sigma = z sqrt(2 F)`` on each scaled sum,
    hence ``sigma`` on a count, ``sigma R_f`` on a sum, ``sigma D_f^2`` on a sum of
    squares). Round 2 reuses round 1's released count. Without noise and with bounds that
    hold the data (or ``bounds=None``) the result equals
    :func:`fljax.data.standardize.fit` exactly.

    Args:
      clients: one ``[examples, F]`` array per client (site), or a :class:`FederatedData`.
      bounds: ``(lo [F], hi [F])``; required with noise (infinite entries only without).
      noise_multiplier: ``z`` (0: exact, not private).
      key: typed PRNG key, required with noise.
      two_pass: as :func:`fljax.data.standardize.fit`.

    Returns:
      :class:`PrivateScale`.

    Examples:
      >>> import numpy as np, jax
      >>> from fljax.data import standardize
      >>> clients = [np.array([[1.0, 10.0], [3.0, 10.0]]), np.array([[5.0, 40.0]])]
      >>> exact = private_scaler(clients).scaler
      >>> bool(np.array_equal(exact.std, standardize.fit(clients).std))
      True
      >>> noisy = private_scaler(clients, bounds=(np.array([0.0, 0.0]), np.array([8.0, 64.0])),
      ...                        noise_multiplier=1.0, key=jax.random.key(0)).scaler
      >>> noisy.mean.shape
      (2,)
    """
    if isinstance(clients, FederatedData):
        xs = [np.asarray(clients.client(c)[0], np.float64) for c in range(clients.num_clients)]
    else:
        xs = [np.asarray(x, np.float64) for x in clients]
    if not xs:
        raise ValueError("no clients given")
    if noise_multiplier > 0:
        if key is None:
            raise ValueError("a noised scaler needs a key")
        if bounds is None or not (np.all(np.isfinite(bounds[0])) and np.all(np.isfinite(bounds[1]))):
            raise ValueError("a noised scaler needs finite bounds (lo, hi) for every feature")
    if bounds is not None:
        lo, hi = (np.asarray(b, np.float64) for b in bounds)
        if np.any(~(lo < hi)):
            raise ValueError(f"every bound needs lo < hi, got lo={lo}, hi={hi}")
        xs = [np.clip(x, lo, hi) for x in xs]
    population = max(sum(len(x) for x in xs), 1)
    if noise_multiplier == 0:
        scaler = standardize.fit(xs, two_pass=two_pass)  # the same computation, exactly
        configs = (
            release_lib.ReleaseConfig(l2_bound=math.inf, noise_multiplier=0.0, population_size=population),
        )
        return PrivateScale(scaler, configs * (2 if two_pass else 1))
    if not two_pass:
        raise ValueError("a noised scaler needs two_pass=True (the variance comes from the second round)")

    # every record adds, per feature, two numbers in [-1, 1]: L2 bound sqrt(2 F) in both rounds
    l2 = math.sqrt(2.0 * lo.size)
    centre, half = (hi + lo) / 2.0, (hi - lo) / 2.0
    # round 1: count and sum of (x - centre) / half of each feature
    cfg1 = release_lib.ReleaseConfig(
        l2_bound=l2, noise_multiplier=noise_multiplier, population_size=population
    )
    total1 = standardize.combine(standardize.client_statistics(xs, shift=centre))
    noise1 = release_lib.host_noise((2,) + lo.shape, cfg1, jax.random.fold_in(key, 1))
    count = np.maximum(total1.count + noise1[0], 1.0)
    mean = np.clip(centre + (total1.sum + noise1[1] * half) / count, lo, hi)

    # round 2: sums of (x - mean) / D and ((x - mean) / D)^2
    d = np.maximum(hi - mean, mean - lo)
    cfg2 = release_lib.ReleaseConfig(
        l2_bound=l2, noise_multiplier=noise_multiplier, population_size=population
    )
    total2 = standardize.combine(standardize.client_statistics(xs, shift=mean))
    noise2 = release_lib.host_noise((2,) + d.shape, cfg2, jax.random.fold_in(key, 2))
    released = standardize.Statistics(count, total2.sum + noise2[0] * d, total2.sum_sq + noise2[1] * d**2)
    variance = standardize.moments(released, shift=mean)[1]
    return PrivateScale(standardize.Scaler(mean=mean, std=np.sqrt(variance)), (cfg1, cfg2))
