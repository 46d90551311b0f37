"""Privacy configurations: one frozen object builds both the mechanism and its accounting.

No JAX here: the accounting side (:mod:`fljax.privacy.accounting`) runs on the
host from the same objects that the jitted mechanisms
(:mod:`fljax.privacy.aggregation`, :mod:`fljax.privacy.dp_sgd`) read, so noise
and epsilon cannot drift apart.

Two configurations:

* :class:`DPConfig`: client-level DP (DP-FedAvg, McMahan et al. 2018), with
  optional adaptive clipping (Andrew et al. 2021) and an optional simulated
  production noise cohort.
* :class:`DPSGDConfig`: example-level DP inside one client (DP-SGD, Abadi et al.
  2016), for the cross-silo case where the unit of privacy is a record.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models". ICLR 2018.
  Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with
  Adaptive Clipping". NeurIPS 2021.
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Sampling = Literal["poisson", "fixed"]


def default_delta(n: int) -> float:
    """The delta used when none is given, for ``n`` units of privacy: ``min(1e-5, n ** -1.1)``.

    Delta must be well below ``1 / n``: a mechanism that publishes one unit's data in full with
    probability ``1 / n`` satisfies (0, 1/n)-DP. ``n ** -1.1`` is below ``1 / n`` for every
    ``n > 1``, and the cap 1e-5 keeps delta small for small populations (4 hospitals: 1e-5,
    not 0.25).

    Examples:
      >>> default_delta(4), default_delta(10**6) < 1e-6
      (1e-05, True)
    """
    return min(1e-5, float(n) ** -1.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Client-level differential privacy for one federated training run.

    Unit of privacy: one client (all of its examples). Neighbouring relation:
    with ``sampling="poisson"`` (each client joins each round independently with
    probability ``cohort_size / population_size``), add/remove one client; with
    ``sampling="fixed"`` (``cohort_size`` clients drawn uniformly without
    replacement), replace one client by another (the population size is public).

    Mechanism per round: each participating client's delta is clipped to L2 norm
    ``clip_norm`` (``clip_scheme="flat"``: the whole update; ``"per_layer"``: each
    of the ``L`` leaves to ``clip_norm / sqrt(L)``, an equal split of the budget,
    so the whole update still has norm at most ``clip_norm``), multiplied by a
    bounded weight in ``[0, 1]``, summed, then Gaussian noise of std
    ``noise_multiplier * clip_norm`` is added ONCE to the sum, which is divided by
    the fixed ``expected_cohort_weight`` (never the observed weight).

    Sensitivity of the sum: ``clip_norm`` under add/remove, ``2 * clip_norm``
    under replace-one (see :attr:`sensitivity`). The accounted noise multiplier
    is ``noise std / sensitivity`` (:attr:`accounting_noise_multiplier`).

    Attributes:
      clip_norm: L2 clip norm ``C`` of one client's update (the initial clip norm
        with adaptive clipping). ``inf`` disables clipping (only sensible with
        ``noise_multiplier=0``, which is then not private).
      noise_multiplier: ``z``: the noise on the sum has std ``z * C``. With
        adaptive clipping, ``z`` is the effective multiplier that the accounting
        uses for the pair of queries (update sum and clipped count); the update
        sum then gets the larger ``z_delta`` (:attr:`update_noise_multiplier`).
      population_size: number of clients in the population (``N``).
      cohort_size: expected cohort size (Poisson: ``q * N``) or exact size (fixed).
      sampling: ``"poisson"`` or ``"fixed"``; must be what the runner does (use
        :func:`fljax.privacy.aggregation.sample_cohort`).
      delta: target delta; default :func:`default_delta` of ``population_size``
        (``min(1e-5, N ** -1.1)``, always below ``1 / N``).
      weighting: ``"uniform"``: every participating client has weight 1 (its
        example count is ignored). ``"capped"``: weight
        ``min(num_examples, max_weight) / max_weight`` in ``[0, 1]``.
      max_weight: cap for ``weighting="capped"``.
      expected_cohort_weight: the fixed denominator. Default ``cohort_size``,
        correct for uniform weighting; REQUIRED for capped weighting (e.g.
        :func:`expected_capped_weight`).
      clip_scheme: ``"flat"`` or ``"per_layer"``.
      target_quantile: ``None`` (fixed clip norm) or the quantile ``gamma`` of
        update norms that adaptive clipping tracks (e.g. 0.5).
      clip_learning_rate: ``eta_C`` of the geometric update
        ``C <- C * exp(-eta_C * (b - gamma))``.
      clipped_count_stddev: ``sigma_b``, std of the noise on the (centred)
        clipped count; default ``cohort_size / 20`` as in Andrew et al.; must
        satisfy ``2 * sigma_b > noise_multiplier``.
      noise_cohort_size: ``None``, or the PRODUCTION cohort size whose noise is
        simulated: the noise on the sum is scaled by ``cohort_size /
        noise_cohort_size`` so that the mean's noise is the production mean's,
        and the accounting uses ``noise_cohort_size / population_size``
        (``population_size`` is then the production population). Outputs are
        labelled "simulated noise cohort": the simulated run itself is NOT
        private at the reported epsilon.
    """

    clip_norm: float
    noise_multiplier: float
    population_size: int
    cohort_size: int
    sampling: Sampling = "poisson"
    delta: float | None = None
    weighting: Literal["uniform", "capped"] = "uniform"
    max_weight: float | None = None
    expected_cohort_weight: float | None = None
    clip_scheme: Literal["flat", "per_layer"] = "flat"
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    noise_cohort_size: int | None = None

    def __post_init__(self):
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if math.isinf(self.clip_norm) and self.noise_multiplier > 0:
            raise ValueError("an infinite clip_norm needs noise_multiplier=0 (the noise would be infinite)")
        if self.sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling must be 'poisson' or 'fixed', got {self.sampling!r}")
        if not 0 < self.cohort_size <= self.population_size:
            raise ValueError(
                f"cohort_size must be in [1, population_size={self.population_size}], got {self.cohort_size}"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.weighting not in ("uniform", "capped"):
            raise ValueError(f"weighting must be 'uniform' or 'capped', got {self.weighting!r}")
        if self.weighting == "capped":
            if self.max_weight is None or not self.max_weight > 0:
                raise ValueError("weighting='capped' needs a positive max_weight")
            if self.expected_cohort_weight is None:
                raise ValueError(
                    "weighting='capped' needs expected_cohort_weight (see expected_capped_weight); "
                    "the observed weight must never be the denominator"
                )
        if self.expected_cohort_weight is not None and not self.expected_cohort_weight > 0:
            raise ValueError(f"expected_cohort_weight must be positive, got {self.expected_cohort_weight}")
        if self.clip_scheme not in ("flat", "per_layer"):
            raise ValueError(f"clip_scheme must be 'flat' or 'per_layer', got {self.clip_scheme!r}")
        if self.target_quantile is not None:
            if not 0 < self.target_quantile < 1:
                raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
            if math.isinf(self.clip_norm):
                raise ValueError("adaptive clipping needs a finite initial clip_norm")
            if self.clip_scheme != "flat":
                raise ValueError("adaptive clipping is implemented for clip_scheme='flat' only")
            if self.noise_multiplier > 0 and not 2 * self.count_stddev > self.noise_multiplier:
                raise ValueError(
                    f"adaptive clipping needs 2 * clipped_count_stddev ({2 * self.count_stddev:g}) > "
                    f"noise_multiplier ({self.noise_multiplier:g}); raise clipped_count_stddev"
                )
        if self.noise_cohort_size is not None and not 0 < self.noise_cohort_size <= self.population_size:
            raise ValueError(
                f"noise_cohort_size must be in [1, population_size={self.population_size}], "
                f"got {self.noise_cohort_size}"
            )

    # --- what the mechanism uses -------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the clip norm adapts to a target quantile (Andrew et al. 2021)."""
        return self.target_quantile is not None

    @property
    def denominator(self) -> float:
        """The fixed divisor of the noised sum (expected cohort weight)."""
        return float(
            self.expected_cohort_weight if self.expected_cohort_weight is not None else self.cohort_size
        )

    @property
    def noise_cohort_scale(self) -> float:
        """``cohort_size / noise_cohort_size`` (1 when no production cohort is simulated)."""
        return 1.0 if self.noise_cohort_size is None else self.cohort_size / self.noise_cohort_size

    @property
    def count_stddev(self) -> float:
        """``sigma_b``: std of the noise on the centred clipped count (production scale)."""
        if self.clipped_count_stddev is not None:
            return float(self.clipped_count_stddev)
        return self.accounting_cohort_size / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """``z_delta``: noise std on the update sum is ``z_delta * C`` (before cohort scaling).

        Equal to ``noise_multiplier`` with a fixed clip norm; with adaptive
        clipping ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021,
        Theorem 1), so that the update sum and the clipped count together
        compose to one Gaussian mechanism of multiplier ``z``.
        """
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        return (z**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5

    @property
    def relative_noise_std(self) -> float:
        """Noise std on the sum per unit of clip norm: ``z_delta * noise_cohort_scale``."""
        return self.update_noise_multiplier * self.noise_cohort_scale

    @property
    def noise_std(self) -> float:
        """Noise std on the update sum for the initial clip norm (``z_delta * C * scale``)."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.relative_noise_std * self.clip_norm

    # --- what the accounting uses ------------------------------------------------
    @property
    def unit_of_privacy(self) -> str:
        return "client"

    @property
    def neighboring_relation(self) -> str:
        """``"add_or_remove_one"`` (Poisson) or ``"replace_one"`` (fixed-size sampling)."""
        return "add_or_remove_one" if self.sampling == "poisson" else "replace_one"

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped, weighted sum for the initial clip norm.

        ``C`` under add/remove (one client's contribution has norm <= C because its
        weight is <= 1), ``2C`` under replace-one (one contribution swapped for another).
        """
        return self.clip_norm * (1.0 if self.sampling == "poisson" else 2.0)

    @property
    def accounting_noise_multiplier(self) -> float:
        """Noise std / sensitivity, as accounted (``z``, or ``z / 2`` under replace-one)."""
        return self.noise_multiplier * (1.0 if self.sampling == "poisson" else 0.5)

    @property
    def accounting_cohort_size(self) -> int:
        """The cohort size the accounting assumes (the production one when simulated)."""
        return self.noise_cohort_size if self.noise_cohort_size is not None else self.cohort_size

    @property
    def sampling_probability(self) -> float:
        """``accounting_cohort_size / population_size``."""
        return self.accounting_cohort_size / self.population_size

    @property
    def target_delta(self) -> float:
        return float(self.delta) if self.delta is not None else default_delta(self.population_size)

    def replace(self, **changes) -> DPConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """Example-level DP-SGD inside one client (cross-silo).

    Unit of privacy: one record (example) of one silo. Neighbouring relation:
    add/remove one record. Mechanism per minibatch: every real example's
    gradient is clipped to L2 norm ``l2_norm_clip``, padding examples contribute
    exactly zero, the clipped gradients are summed, Gaussian noise of std
    ``noise_multiplier * l2_norm_clip`` is added once to the sum, which is
    divided by the fixed ``batch_size``. Sensitivity of the sum: ``l2_norm_clip``.

    ``num_examples`` describes ONE silo: the epsilon of this config is that of a silo with
    ``num_examples`` records. Silos of different sizes spend different budgets (a smaller silo
    runs fewer steps at a higher sampling rate and spends more): account them with
    :func:`fljax.privacy.silo_accounting.silo_epsilons` and report the maximum.

    Accounting: each minibatch step is a Poisson-subsampled Gaussian with
    ``q = batch_size / num_examples``, composed over ``steps_per_round * rounds``
    steps. NOTE: :func:`fljax.client.local_sgd` draws shuffled fixed-size
    minibatches (a permutation per epoch), not Poisson samples; accounting them
    as Poisson is what most libraries (TF Privacy, Opacus, jax-privacy by
    default) do, and is an approximation, not a proof, for shuffling.

    Attributes:
      l2_norm_clip: per-example clip norm ``C_ex``.
      noise_multiplier: ``z``: noise std on the minibatch sum is ``z * C_ex``.
      batch_size: the fixed minibatch size (the denominator).
      num_examples: the silo's number of records ``n`` (public).
      num_epochs: local epochs per round.
      delta: target delta; default :func:`default_delta` of ``num_examples``
        (``min(1e-5, n ** -1.1)``, always below ``1 / n``).
    """

    l2_norm_clip: float
    noise_multiplier: float
    batch_size: int
    num_examples: int
    num_epochs: int = 1
    delta: float | None = None

    def __post_init__(self):
        if not (self.l2_norm_clip > 0 and math.isfinite(self.l2_norm_clip)):
            raise ValueError(f"l2_norm_clip must be positive and finite, got {self.l2_norm_clip}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 < self.batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size must be in [1, num_examples={self.num_examples}], got {self.batch_size}"
            )
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def unit_of_privacy(self) -> str:
        return "example"

    @property
    def neighboring_relation(self) -> str:
        return "add_or_remove_one"

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one minibatch's clipped gradient sum: ``l2_norm_clip``."""
        return float(self.l2_norm_clip)

    @property
    def noise_std(self) -> float:
        return float(self.noise_multiplier * self.l2_norm_clip)

    @property
    def accounting_noise_multiplier(self) -> float:
        return float(self.noise_multiplier)

    @property
    def sampling_probability(self) -> float:
        return self.batch_size / self.num_examples

    @property
    def steps_per_round(self) -> int:
        """Minibatch steps one round runs: ``num_epochs * ceil(num_examples / batch_size)``."""
        return self.num_epochs * -(-self.num_examples // self.batch_size)

    @property
    def target_delta(self) -> float:
        return float(self.delta) if self.delta is not None else default_delta(self.num_examples)

    def replace(self, **changes) -> DPSGDConfig:
        return dataclasses.replace(self, **changes)


def expected_capped_weight(sizes, cohort_size: int, max_weight: float) -> float:
    """Expected cohort weight under ``weighting="capped"``: ``cohort_size * mean(min(n, cap) / cap)``.

    Computed from the population's client sizes (treated as public). Pass the
    result as ``DPConfig.expected_cohort_weight``.
    """
    total, count = 0.0, 0
    for n in sizes:
        total += min(float(n), max_weight) / max_weight
        count += 1
    if count == 0:
        raise ValueError("sizes is empty")
    return cohort_size * total / count
