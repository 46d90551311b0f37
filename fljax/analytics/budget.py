"""One privacy budget shared by analytics and training on the same population.

:class:`BudgetLedger` composes heterogeneous ``dp_accounting`` events with one RDP or
PLD accountant: a training run's :func:`fljax.privacy.accounting.dp_event` (its
rounds, its sampling), each release's event
(:meth:`fljax.analytics.release.ReleaseConfig.dp_event`, a Gaussian), or any other
``DpEvent``. The unit of privacy is one client of the population everywhere, and
all events must share one neighbouring relation (the ledger's): add/remove one
client by default, which is what releases and Poisson-sampled training use. A
training config with fixed-size sampling (replace one client) needs a ledger with
``neighboring_relation="replace_one"``, under which a release's sensitivity
doubles (its event becomes a Gaussian of multiplier ``z / 2``).

Before anything runs, :meth:`BudgetLedger.check` (and :meth:`~BudgetLedger.spend`,
which checks first) computes the epsilon that the events so far plus the new
one would reach, and raises :class:`BudgetExceededError` (a
:class:`fljax.privacy.accounting.PrivacyBudgetExceededError`) when it exceeds
the budget: the query is refused, never run and then regretted.

Examples:
  Train 20 rounds, then release queries until the budget refuses one:

  >>> from fljax import privacy
  >>> from fljax.analytics import budget, release
  >>> train = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=1000, cohort_size=50)
  >>> ledger = budget.BudgetLedger(budget_epsilon=3.0, delta=1e-5)
  >>> eps = ledger.spend_training(train, rounds=20)
  >>> query = release.ReleaseConfig(l2_bound=1.0, noise_multiplier=5.0, population_size=1000)
  >>> spent = []
  >>> while ledger.can_spend(query.dp_event()):
  ...     spent.append(ledger.spend_release(query, label="count"))
  >>> len(spent) > 0 and spent[-1] <= 3.0 < ledger.epsilon_with(query.dp_event())
  True
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import pld, rdp

from fljax.analytics.release import ReleaseConfig
from fljax.privacy import accounting
from fljax.privacy.config import DPConfig

_RELATIONS = {
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class BudgetExceededError(accounting.PrivacyBudgetExceededError):
    """Raised BEFORE an event (a query or training rounds) that would exceed the shared budget."""


class BudgetLedger:
    """A shared privacy budget: heterogeneous events composed by one accountant, checked before each.

    Args:
      budget_epsilon: the most epsilon (at ``delta``) all events together may spend;
        ``None``: no limit (the ledger only records).
      delta: the target delta of the budget.
      accountant: ``"rdp"`` (every event kind) or ``"pld"`` (no sampling without
        replacement: ``dp_accounting``'s PLD accountant lacks it).
      neighboring_relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.

    Attributes:
      entries: ``(label, event, epsilon after it)`` for every event spent, in order.
    """

    def __init__(
        self,
        *,
        budget_epsilon: float | None,
        delta: float,
        accountant: accounting.AccountantKind = "rdp",
        neighboring_relation: str = "add_or_remove_one",
    ):
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be positive or None, got {budget_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ("rdp", "pld"):
            raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
        if neighboring_relation not in _RELATIONS:
            raise ValueError(
                f"neighboring_relation must be one of {sorted(_RELATIONS)}, got {neighboring_relation!r}"
            )
        self.budget_epsilon = budget_epsilon
        self.delta = float(delta)
        self.accountant = accountant
        self.neighboring_relation = neighboring_relation
        self.entries: list[tuple[str, dp_accounting.DpEvent, float]] = []

    # --- events ---------------------------------------------------------------
    def release_event(self, config: ReleaseConfig) -> dp_accounting.DpEvent:
        """A release's event under this ledger's relation (``z / 2`` under replace-one: sensitivity doubles)."""
        if self.neighboring_relation == "add_or_remove_one":
            return config.dp_event()
        return dp_accounting.GaussianDpEvent(config.noise_multiplier / 2.0)

    def training_event(self, config: DPConfig, rounds: int) -> dp_accounting.DpEvent:
        """A training run's event (:func:`fljax.privacy.accounting.dp_event`); its relation must be the ledger's."""
        if config.neighboring_relation != self.neighboring_relation:
            raise ValueError(
                f"the training config's neighbouring relation ({config.neighboring_relation}, sampling="
                f"{config.sampling!r}) differs from the ledger's ({self.neighboring_relation})"
            )
        return accounting.dp_event(config, rounds)

    # --- accounting -------------------------------------------------------------
    def _accountant(self) -> dp_accounting.PrivacyAccountant:
        relation = _RELATIONS[self.neighboring_relation]
        if self.accountant == "rdp":
            return rdp.RdpAccountant(neighboring_relation=relation)
        return pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=accounting.PLD_DISCRETIZATION
        )

    def _epsilon(self, events: list[dp_accounting.DpEvent]) -> float:
        if not events:
            return 0.0
        acc = self._accountant()
        composed = dp_accounting.ComposedDpEvent(events)
        if not acc.supports(composed):
            raise ValueError(
                f"the {self.accountant} accountant does not support one of the events: {composed}"
            )
        acc.compose(composed)
        return float(acc.get_epsilon(self.delta))

    def epsilon(self) -> float:
        """Epsilon (at :attr:`delta`) of every event spent so far."""
        return self._epsilon([e for _, e, _ in self.entries])

    def epsilon_with(self, event: dp_accounting.DpEvent) -> float:
        """Epsilon if ``event`` were spent now (nothing is recorded)."""
        return self._epsilon([e for _, e, _ in self.entries] + [event])

    def can_spend(self, event: dp_accounting.DpEvent) -> bool:
        """Whether ``event`` fits in the remaining budget."""
        return self.budget_epsilon is None or self.epsilon_with(event) <= self.budget_epsilon

    def check(self, event: dp_accounting.DpEvent, label: str = "event") -> None:
        """Raise :class:`BudgetExceededError` if ``event`` would exceed the budget."""
        if self.budget_epsilon is None:
            return
        after = self.epsilon_with(event)
        if not after <= self.budget_epsilon:
            raise BudgetExceededError(
                f"privacy budget exhausted: {len(self.entries)} event(s) spent epsilon={self.epsilon():.4g} "
                f"(delta={self.delta:.3g}, unit: client, {self.neighboring_relation}); {label!r} would reach "
                f"epsilon={after:.4g} > budget {self.budget_epsilon:.4g}; refused before running"
            )

    def spend(self, event: dp_accounting.DpEvent, label: str = "event") -> float:
        """Check, then record ``event``; returns epsilon spent so far."""
        self.check(event, label)
        eps = self.epsilon_with(event)
        self.entries.append((label, event, eps))
        return eps

    def spend_release(self, config: ReleaseConfig, label: str = "release") -> float:
        """Check and record one release (:func:`fljax.analytics.release.release` with ``config``)."""
        if config.noise_multiplier == 0:
            raise ValueError(
                f"{label!r} has no noise (noise_multiplier=0): it is not private and cannot be spent"
            )
        return self.spend(self.release_event(config), label)

    def spend_training(self, config: DPConfig, rounds: int, label: str = "training") -> float:
        """Check and record ``rounds`` rounds of DP training under ``config``."""
        if config.noise_multiplier == 0:
            raise ValueError("training without noise is not private and cannot be spent")
        return self.spend(self.training_event(config, rounds), label)

    def remaining(self) -> float:
        """Budget left in epsilon (``inf`` without a budget); epsilon does not add, so this is indicative."""
        return math.inf if self.budget_epsilon is None else self.budget_epsilon - self.epsilon()

    def summary(self) -> dict:
        """A JSON-ready record of the ledger."""
        return {
            "unit_of_privacy": "client",
            "neighboring_relation": self.neighboring_relation,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "epsilon": self.epsilon(),
            "entries": [{"label": label, "epsilon_after": eps} for label, _, eps in self.entries],
        }
