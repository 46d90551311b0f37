"""Privacy accounting with ``dp_accounting`` (host side; no JAX in this module).

Builds the ``DpEvent`` of what actually ran from the same config object that
built the mechanism (:class:`~fljax.privacy.config.DPConfig` or
:class:`~fljax.privacy.config.DPSGDConfig`), computes epsilon at the config's
delta with an RDP or PLD accountant, calibrates noise multipliers to a target
epsilon, and enforces a budget with :class:`PrivacyLedger`.

Events:

* client-level DP with Poisson sampling:
  ``SelfComposed(PoissonSampled(q, Gaussian(z)), rounds)``, add/remove one client;
* client-level DP with fixed-size sampling:
  ``SelfComposed(SampledWithoutReplacement(N, m, Gaussian(z / 2)), rounds)``,
  replace one client (the sum's sensitivity is ``2C``); RDP only, since
  ``dp_accounting``'s PLD accountant does not support sampling without replacement;
* adaptive clipping: the update sum (multiplier ``z_delta``) and the noised
  clipped count (multiplier ``2 sigma_b``) compose exactly to one Gaussian of
  multiplier ``z`` (Andrew et al. 2021, Theorem 1), which is what is accounted;
* DP-SGD: ``SelfComposed(PoissonSampled(batch / n, Gaussian(z)), steps)``.

Examples:
  >>> from fljax import privacy
  >>> config = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=1000, cohort_size=10)
  >>> ledger = privacy.PrivacyLedger(config, budget_epsilon=1.0)
  >>> history = []
  >>> for r in range(3):
  ...     ledger.check(1)            # raises PrivacyBudgetExceededError before overspending
  ...     # state, metrics = step(state, cohort, key)
  ...     history.append(ledger.step(1))  # epsilon spent so far, logged per round
  >>> history == sorted(history) and 0 < history[-1] <= 1.0
  True
  >>> ledger.check(ledger.max_rounds() - ledger.rounds + 1)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  fljax.privacy.accounting.PrivacyBudgetExceededError: privacy budget exhausted: 3 rounds spent ...
"""

from __future__ import annotations

import math
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

from fljax.privacy.config import DPConfig, DPSGDConfig

AccountantKind = Literal["rdp", "pld"]
PrivacyConfig = DPConfig | DPSGDConfig

PLD_DISCRETIZATION = 1e-3
"""PLD value discretisation interval. dp_accounting's default is 1e-4; 1e-3 is about ten
times faster and, since the PLD accountant rounds pessimistically, still an upper bound
(epsilon differs by ~1e-6 relative on the workloads in tests/privacy)."""

_RELATIONS = {
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class PrivacyBudgetExceededError(RuntimeError):
    """Raised BEFORE a step that would spend more than the privacy budget."""


def neighboring_relation(config: PrivacyConfig) -> dp_accounting.NeighboringRelation:
    """The ``dp_accounting`` neighbouring relation matching the config's sampling."""
    return _RELATIONS[config.neighboring_relation]


def _steps(config: PrivacyConfig, rounds: int) -> int:
    return rounds if isinstance(config, DPConfig) else rounds * config.steps_per_round


def step_event(config: PrivacyConfig) -> dp_accounting.DpEvent:
    """The event of ONE round (client DP) or ONE minibatch step (DP-SGD)."""
    gaussian = dp_accounting.GaussianDpEvent(config.accounting_noise_multiplier)
    if isinstance(config, DPSGDConfig) or config.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(config.sampling_probability, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=config.population_size,
        sample_size=config.accounting_cohort_size,
        event=gaussian,
    )


def dp_event(config: PrivacyConfig, rounds: int) -> dp_accounting.DpEvent:
    """The event of ``rounds`` rounds of training under ``config``.

    For a :class:`DPSGDConfig` a round is ``config.steps_per_round`` minibatch
    steps of one silo (the silo takes part in every round).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(step_event(config), _steps(config, rounds))


def make_accountant(config: PrivacyConfig, kind: AccountantKind = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh RDP or PLD accountant with the config's neighbouring relation."""
    relation = neighboring_relation(config)
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if kind == "pld":
        if isinstance(config, DPConfig) and config.sampling == "fixed":
            raise ValueError(
                "dp_accounting's PLD accountant does not support fixed-size sampling without "
                "replacement; use accountant='rdp' or sampling='poisson'"
            )
        return pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION
        )
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {kind!r}")


def epsilon(config: PrivacyConfig, rounds: int, *, accountant: AccountantKind = "rdp") -> float:
    """Epsilon at ``config.target_delta`` after ``rounds`` rounds (``inf`` without noise)."""
    if rounds == 0:
        return 0.0
    if config.noise_multiplier == 0:
        return math.inf
    acc = make_accountant(config, accountant)
    acc.compose(dp_event(config, rounds))
    return float(acc.get_epsilon(config.target_delta))


def calibrate_noise_multiplier(
    config: PrivacyConfig,
    *,
    target_epsilon: float,
    rounds: int,
    accountant: AccountantKind = "rdp",
    tol: float = 1e-4,
) -> float:
    """The smallest ``noise_multiplier`` whose epsilon after ``rounds`` is at most ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` on the events
    :func:`dp_event` builds, with every other field of ``config`` (sampling,
    cohort, delta, adaptive clipping) as given; the result's epsilon is within
    a small fraction of the target (the tests check 1%). Apply it with
    ``config.replace(noise_multiplier=z)``.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if rounds <= 0:
        raise ValueError(f"rounds must be positive, got {rounds}")

    def make_event(z: float) -> dp_accounting.DpEvent:
        return dp_event(_with_noise(config, z), rounds)

    def calibrate(kind: AccountantKind, bracket) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(config, kind),
                make_event,
                target_epsilon,
                config.target_delta,
                bracket_interval=bracket,
                tol=tol,
            )
        )

    z_rdp = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if accountant == "rdp":
        return z_rdp
    # PLD is tighter than RDP (smaller z) and its discretisation explodes for tiny
    # multipliers, so search just below the RDP answer rather than from ~0.
    return calibrate("pld", dp_accounting.LowerEndpointAndGuess(0.5 * z_rdp, z_rdp))


def _with_noise(config: PrivacyConfig, z: float) -> PrivacyConfig:
    if isinstance(config, DPConfig) and config.adaptive:
        # keep the config valid while the search explores small multipliers
        return config.replace(noise_multiplier=z, clipped_count_stddev=max(config.count_stddev, z))
    return config.replace(noise_multiplier=z)


def summary(config: PrivacyConfig, rounds: int, *, accountant: AccountantKind = "rdp") -> dict:
    """A JSON-ready description of the guarantee after ``rounds`` rounds."""
    eps = epsilon(config, rounds, accountant=accountant)
    out: dict = {
        "unit_of_privacy": config.unit_of_privacy,
        "neighboring_relation": config.neighboring_relation,
        "epsilon": eps,
        "delta": config.target_delta,
        "accountant": accountant,
        "noise_multiplier": config.noise_multiplier,
        "accounting_noise_multiplier": config.accounting_noise_multiplier,
        "sensitivity": config.sensitivity,
        "rounds": rounds,
    }
    if isinstance(config, DPConfig):
        out.update(
            sampling=config.sampling,
            sampling_probability=config.sampling_probability,
            population_size=config.population_size,
            cohort_size=config.cohort_size,
            clip_norm=config.clip_norm,
            clip_scheme=config.clip_scheme,
            weighting=config.weighting,
            denominator=config.denominator,
            adaptive_clipping=config.adaptive,
        )
        if config.adaptive:
            out.update(
                target_quantile=config.target_quantile,
                clipped_count_stddev=config.count_stddev,
                update_noise_multiplier=config.update_noise_multiplier,
            )
        if config.noise_cohort_size is not None:
            out.update(
                simulated_noise_cohort=True,
                noise_cohort_size=config.noise_cohort_size,
                note=(
                    f"simulated noise cohort: noise calibrated for a production cohort of "
                    f"{config.noise_cohort_size} clients while {config.cohort_size} were simulated; "
                    "epsilon is the production run's, the simulation itself is not private at it"
                ),
            )
    else:
        out.update(
            sampling="poisson (shuffled minibatches accounted as Poisson)",
            sampling_probability=config.sampling_probability,
            batch_size=config.batch_size,
            num_examples=config.num_examples,
            steps=_steps(config, rounds),
            l2_norm_clip=config.l2_norm_clip,
        )
    return out


class PrivacyLedger:
    """Host-side record of the privacy spent by a run, with an optional budget.

    The runner calls :meth:`check` (or :meth:`can_run`) before each round and
    :meth:`step` after it; :meth:`step` returns epsilon so far. A run whose next
    round would exceed ``budget_epsilon`` is stopped by
    :class:`PrivacyBudgetExceededError` BEFORE the round runs.

    Args:
      config: the same :class:`DPConfig`/:class:`DPSGDConfig` that built the mechanism.
      budget_epsilon: ``None`` (no budget) or the largest epsilon (at
        ``config.target_delta``) the run may spend.
      accountant: ``"rdp"`` or ``"pld"``.
      rounds: rounds already run (e.g. when resuming from a checkpoint).

    Attributes:
      rounds: rounds recorded so far.
      history: epsilon after each recorded round.
    """

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        budget_epsilon: float | None = None,
        accountant: AccountantKind = "rdp",
        rounds: int = 0,
    ):
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be positive, got {budget_epsilon}")
        make_accountant(config, accountant)  # validate the combination early
        self.config = config
        self.budget_epsilon = budget_epsilon
        self.accountant = accountant
        self.rounds = int(rounds)
        self.history: list[float] = []
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon after ``rounds`` rounds (default: the rounds recorded so far)."""
        r = self.rounds if rounds is None else int(rounds)
        if r not in self._cache:
            self._cache[r] = epsilon(self.config, r, accountant=self.accountant)
        return self._cache[r]

    def can_run(self, rounds: int = 1) -> bool:
        """Whether ``rounds`` more rounds stay within the budget."""
        return self.budget_epsilon is None or self.epsilon(self.rounds + rounds) <= self.budget_epsilon

    def check(self, rounds: int = 1) -> None:
        """Raise :class:`PrivacyBudgetExceededError` if ``rounds`` more rounds would exceed the budget."""
        if not self.can_run(rounds):
            after = self.epsilon(self.rounds + rounds)
            raise PrivacyBudgetExceededError(
                f"privacy budget exhausted: {self.rounds} rounds spent epsilon={self.epsilon():.4g} "
                f"(delta={self.config.target_delta:.3g}, unit: {self.config.unit_of_privacy}); "
                f"{rounds} more would reach epsilon={after:.4g} > budget {self.budget_epsilon:.4g}"
            )

    def step(self, rounds: int = 1) -> float:
        """Record ``rounds`` rounds (after checking the budget); returns epsilon so far."""
        self.check(rounds)
        self.rounds += rounds
        eps = self.epsilon()
        self.history.append(eps)
        return eps

    def max_rounds(self, limit: int = 1_000_000) -> int:
        """The most rounds (in total) the budget allows, up to ``limit`` (``limit`` without a budget)."""
        if self.budget_epsilon is None or self.config.noise_multiplier == 0:
            return limit if self.budget_epsilon is None else 0
        if self.epsilon(1) > self.budget_epsilon:
            return 0
        lo, hi = 1, 2
        while hi < limit and self.epsilon(hi) <= self.budget_epsilon:
            lo, hi = hi, min(2 * hi, limit)
        if self.epsilon(hi) <= self.budget_epsilon:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(mid) <= self.budget_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def summary(self) -> dict:
        """:func:`summary` for the rounds recorded so far, plus the budget."""
        out = summary(self.config, self.rounds, accountant=self.accountant)
        out["budget_epsilon"] = self.budget_epsilon
        return out


class MechanismLedger(PrivacyLedger):
    """A :class:`PrivacyLedger` for a mechanism with its own accounting: the same budget checks
    (``can_run``, ``check``, ``step``, ``max_rounds``) over ``epsilon_fn(config, rounds)``, and
    ``summary_fn(config, rounds)`` for :meth:`summary`. Used for distributed DP and DP-FTRL.

    Examples:
      >>> ledger = MechanismLedger("toy", lambda cfg, r: 0.5 * r, lambda cfg, r: {"rounds": r}, budget_epsilon=2.0)
      >>> ledger.step(3), ledger.can_run(2)
      (1.5, False)
    """

    def __init__(
        self, config, epsilon_fn, summary_fn, *, budget_epsilon: float | None = None, rounds: int = 0
    ):
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be positive, got {budget_epsilon}")
        self.config = config
        self.budget_epsilon = budget_epsilon
        self.accountant = "mechanism"
        self.rounds = int(rounds)
        self.history: list[float] = []
        self._cache: dict[int, float] = {}
        self._epsilon_fn, self._summary_fn = epsilon_fn, summary_fn

    def epsilon(self, rounds: int | None = None) -> float:
        r = self.rounds if rounds is None else int(rounds)
        if r not in self._cache:
            self._cache[r] = float(self._epsilon_fn(self.config, r))
        return self._cache[r]

    def summary(self) -> dict:
        return self._summary_fn(self.config, self.rounds) | {"budget_epsilon": self.budget_epsilon}
