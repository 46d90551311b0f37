"""Per-silo accounting of example-level DP-SGD (cross-silo), with ``dp_accounting``.

No JAX here (host side, like :mod:`fljax.privacy.accounting`, whose helpers it
calls with each silo's own values).

Unit of privacy: one record of one silo. Each silo protects its own records, so
each silo has its own epsilon, and the run's guarantee is the largest of them.
:func:`fljax.privacy.accounting.epsilon` on a :class:`DPSGDConfig` is the
epsilon of ONE silo of ``config.num_examples`` records that took part in every
round: used for silos of other sizes it under-reports the smaller ones (a
1,000-record silo spends more than a 5,000-record one at the same noise).

What a silo with ``n_i`` records runs (:func:`fljax.client.train_locally`, via
:func:`fljax.privacy.dp_sgd_client`): each epoch shuffles its real records
(padding sorted after them) and cuts them into minibatches of ``B =
config.batch_size``; minibatches made only of padding change nothing. So per
round it takes part in, it runs::

    steps_i = num_epochs * min(ceil(n_i / B), max_steps)      (max_steps = inf by default)

real steps, each over a fixed-size slice of a permutation (the last one
partial), with the noise calibrated to the fixed ``B``.

Accounting models (``sampling=``):

* ``"poisson"`` (default; the convention of :func:`fljax.privacy.accounting.dp_event`
  and of TF Privacy and Opacus): ``SelfComposed(PoissonSampled(B / n_i,
  Gaussian(z)), steps_i * rounds_i)``, add/remove one record. Shuffled
  fixed-size batches are NOT Poisson samples: this is an approximation, not a
  proof (Chua et al. 2024 show shuffling can be less private than it).
* ``"shuffle"``: ``SelfComposed(Gaussian(z), num_epochs * rounds_i)``, an upper
  bound that holds for what actually runs, without any amplification: within an
  epoch a record lands in exactly one minibatch, whose clipped sum has
  sensitivity ``C_ex``, so for every permutation the epoch is one Gaussian
  mechanism of multiplier ``z`` (the other steps are adaptive but do not see
  the record), and mixing over permutations does not increase the divergence.
  The neighbouring relation is zero-out (one record replaced by a padding
  record, which contributes exactly zero), as in Kairouz et al. 2021. It does
  not depend on ``n_i``.

Rounds: a silo is charged only for the rounds it took part in (its selection
must not depend on its records); no amplification by silo sampling is claimed.
Delta: ``config.delta`` for every silo when set, else the config's own default
applied to each silo's ``n_i`` (``DPSGDConfig.target_delta`` of a silo of
``n_i`` records); the summary's ``delta`` is the largest, so every silo is
``(max_epsilon, delta)``-DP.

Examples:
  >>> from fljax import privacy
  >>> cfg = privacy.DPSGDConfig(
  ...     l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=32, num_examples=5000, delta=1e-5
  ... )
  >>> round(privacy.epsilon(cfg, 10), 2)  # a 5,000-record silo only
  1.65
  >>> out = privacy.silo_epsilons(cfg, [5000, 1000], rounds=10)
  >>> [round(e, 2) for e in out["per_silo_epsilon"]], round(out["max_epsilon"], 2)
  ([1.65, 4.19], 4.19)
  >>> out["per_silo_steps"]  # 10 rounds of ceil(n / 32) steps
  [1570, 320]

References:
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
  Kairouz, McMahan, Song, Thakkar, Thakurta, Xu. "Practical and Private (Deep)
  Learning without Sampling or Shuffling". ICML 2021.
  Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha, Zhang. "How Private are DP-SGD
  Implementations?". ICML 2024.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import dp_accounting
import numpy as np

from fljax.privacy import accounting
from fljax.privacy.config import DPSGDConfig

SiloSampling = Literal["poisson", "shuffle"]


class SiloSizeWarning(UserWarning):
    """A single ``num_examples`` would under-report the epsilon of smaller silos."""


def silo_steps(
    config: DPSGDConfig, num_examples: int, rounds: int = 1, *, max_steps: int | None = None
) -> int:
    """Real DP-SGD steps a silo of ``num_examples`` records runs in ``rounds`` rounds.

    ``rounds * config.num_epochs * min(ceil(num_examples / batch_size),
    max_steps)``: the count :func:`fljax.client.train_locally` returns (its
    ``max_steps`` is the one given to :func:`fljax.client.local_sgd`; ``None``
    for :func:`fljax.privacy.dp_sgd_client`).
    """
    if num_examples < 0 or rounds < 0:
        raise ValueError(f"num_examples and rounds must be >= 0, got {num_examples}, {rounds}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive or None, got {max_steps}")
    per_epoch = -(-int(num_examples) // config.batch_size)
    if max_steps is not None:
        per_epoch = min(per_epoch, max_steps)
    return int(rounds) * config.num_epochs * per_epoch


def silo_config(config: DPSGDConfig, num_examples: int) -> DPSGDConfig:
    """``config`` for one silo of ``num_examples`` records (``delta``, if set, is kept)."""
    if 0 < num_examples < config.batch_size:
        raise ValueError(
            f"a silo of {num_examples} records is smaller than batch_size={config.batch_size}: its "
            "sampling probability would exceed 1; lower batch_size or leave the silo out"
        )
    return config.replace(num_examples=int(num_examples))


def silo_event(
    config: DPSGDConfig,
    num_examples: int,
    rounds: int,
    *,
    sampling: SiloSampling = "poisson",
    max_steps: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one silo of ``num_examples`` records over the ``rounds`` it took part in."""
    if sampling not in ("poisson", "shuffle"):
        raise ValueError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")
    steps = silo_steps(config, num_examples, rounds, max_steps=max_steps)
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    cfg = silo_config(config, num_examples)
    if sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(accounting.step_event(cfg), steps)
    gaussian = dp_accounting.GaussianDpEvent(cfg.accounting_noise_multiplier)
    return dp_accounting.SelfComposedDpEvent(gaussian, rounds * cfg.num_epochs)


def silo_epsilon(
    config: DPSGDConfig,
    num_examples: int,
    rounds: int,
    *,
    accountant: accounting.AccountantKind = "rdp",
    sampling: SiloSampling = "poisson",
    max_steps: int | None = None,
) -> float:
    """Epsilon of one silo of ``num_examples`` records after ``rounds`` rounds (0 if it ran nothing)."""
    event = silo_event(config, num_examples, rounds, sampling=sampling, max_steps=max_steps)
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return 0.0
    if config.noise_multiplier == 0:
        return math.inf
    cfg = silo_config(config, num_examples)
    acc = accounting.make_accountant(cfg, accountant)
    acc.compose(event)
    return float(acc.get_epsilon(cfg.target_delta))


def _delta(config: DPSGDConfig, num_examples: int) -> float:
    """The delta a silo is accounted at: its :func:`silo_config`'s ``target_delta`` (0 if empty)."""
    return silo_config(config, num_examples).target_delta if num_examples else 0.0


def _summary(
    config: DPSGDConfig,
    sizes: list[int],
    rounds: list[int],
    epsilons: list[float],
    *,
    accountant: str,
    sampling: str,
    max_steps: int | None,
) -> dict:
    worst = max(range(len(sizes)), key=lambda i: epsilons[i]) if sizes else None
    relation = "add_or_remove_one" if sampling == "poisson" else "zero_out_one"
    model = (
        "poisson (shuffled minibatches accounted as Poisson; an approximation)"
        if sampling == "poisson"
        else "shuffle (one Gaussian per epoch, no amplification; an upper bound)"
    )
    return {
        "unit_of_privacy": "example (per silo)",
        "neighboring_relation": relation,
        "per_silo_epsilon": epsilons,
        "max_epsilon": epsilons[worst] if worst is not None else 0.0,
        "max_epsilon_silo": worst,
        "delta": max((_delta(config, n) for n in sizes), default=0.0),
        "per_silo_delta": [_delta(config, n) for n in sizes],
        "accountant": accountant,
        "sampling": model,
        "silo_sizes": sizes,
        "per_silo_rounds": rounds,
        "per_silo_steps": [
            silo_steps(config, n, r, max_steps=max_steps) for n, r in zip(sizes, rounds, strict=True)
        ],
        "per_silo_sampling_probability": [min(1.0, config.batch_size / n) if n else 0.0 for n in sizes],
        "noise_multiplier": config.noise_multiplier,
        "l2_norm_clip": config.l2_norm_clip,
        "batch_size": config.batch_size,
        "num_epochs": config.num_epochs,
        "max_steps": max_steps,
    }


def _sizes(silo_sizes: Sequence[int]) -> list[int]:
    sizes = [int(n) for n in np.asarray(silo_sizes).reshape(-1)]
    if any(n < 0 for n in sizes):
        raise ValueError(f"silo sizes must be >= 0, got {sizes}")
    return sizes


def _participation(rounds: int, participation, num_silos: int) -> list[int]:
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if participation is None:
        return [int(rounds)] * num_silos
    p = np.asarray(participation)
    if p.ndim == 2:  # [rounds, silos] participation mask
        if p.shape != (rounds, num_silos):
            raise ValueError(
                f"a participation mask must be [rounds={rounds}, silos={num_silos}], got {p.shape}"
            )
        counts = [int(c) for c in p.astype(bool).sum(axis=0)]
    elif p.shape == (num_silos,):
        counts = [int(c) for c in p]
    else:
        raise ValueError(
            f"participation must be [silos={num_silos}] counts or a [rounds, silos] mask, got {p.shape}"
        )
    if any(not 0 <= c <= rounds for c in counts):
        raise ValueError(f"per-silo rounds must be in [0, rounds={rounds}], got {counts}")
    return counts


def silo_epsilons(
    config: DPSGDConfig,
    silo_sizes: Sequence[int],
    rounds: int,
    *,
    participation=None,
    accountant: accounting.AccountantKind = "rdp",
    sampling: SiloSampling = "poisson",
    max_steps: int | None = None,
) -> dict:
    """Each silo's epsilon, from its own size, steps and rounds, and the largest.

    ``config.num_examples`` is ignored: silo ``i`` is accounted with ``n_i =
    silo_sizes[i]`` (see the module docstring for the steps and the event).

    Args:
      config: the :class:`DPSGDConfig` that built the DP-SGD client.
      silo_sizes: every silo's number of real records ``n_i`` (public).
      rounds: rounds of training.
      participation: ``None`` (every silo took part in every round), per-silo
        counts of rounds taken part in ``[silos]``, or a participation mask
        ``[rounds, silos]``.
      accountant: ``"rdp"`` or ``"pld"``.
      sampling: ``"poisson"`` (approximation, the default) or ``"shuffle"``
        (upper bound without amplification).
      max_steps: the ``max_steps`` of :func:`fljax.client.local_sgd` if one was set,
        or ``ceil(N / batch_size)`` when cohorts are padded to ``N`` records
        (:meth:`fljax.data.FederatedData.cohort` with ``num_examples=N`` draws a
        random ``N``-subset of a larger silo each round; without it the count
        for such a silo is too high, which over-reports).

    Returns:
      A JSON-ready dict: ``per_silo_epsilon``, ``max_epsilon``,
      ``max_epsilon_silo``, ``delta`` (the largest per-silo delta),
      ``per_silo_delta``, ``accountant``, ``sampling``, ``per_silo_steps``,
      ``per_silo_rounds``, ``per_silo_sampling_probability`` and the mechanism's
      parameters. Epsilon is the same for silos of equal size and rounds.
    """
    sizes = _sizes(silo_sizes)
    counts = _participation(rounds, participation, len(sizes))
    cache: dict[tuple[int, int], float] = {}
    epsilons = []
    for n, r in zip(sizes, counts, strict=True):
        if (n, r) not in cache:
            cache[n, r] = silo_epsilon(
                config, n, r, accountant=accountant, sampling=sampling, max_steps=max_steps
            )
        epsilons.append(cache[n, r])
    return _summary(
        config, sizes, counts, epsilons, accountant=accountant, sampling=sampling, max_steps=max_steps
    )


def check_silo_sizes(config: DPSGDConfig, silo_sizes: Sequence[int]) -> None:
    """Refuse silos DP-SGD cannot account, and warn when ``config.num_examples`` under-reports.

    Raises ``ValueError`` if a non-empty silo has fewer than ``batch_size``
    records. Warns (:class:`SiloSizeWarning`) if ``config.num_examples`` exceeds
    the smallest non-empty silo: ``accounting.epsilon(config, rounds)`` is then
    the epsilon of a silo of ``config.num_examples`` records only, below what the
    smaller silos spend; report :func:`silo_epsilons` (or use :class:`SiloLedger`).
    """
    sizes = [n for n in _sizes(silo_sizes) if n > 0]
    for n in sizes:
        silo_config(config, n)
    if sizes and config.num_examples > min(sizes):
        warnings.warn(
            f"DPSGDConfig.num_examples={config.num_examples} but the smallest silo has {min(sizes)} "
            f"records: accounting.epsilon(config, rounds) is the epsilon of a "
            f"{config.num_examples}-record silo only and under-reports smaller silos; report "
            "privacy.silo_epsilons(config, silo_sizes, rounds) or use privacy.SiloLedger",
            SiloSizeWarning,
            stacklevel=3,
        )


class SiloLedger:
    """Host-side per-silo record of the example-level privacy spent, with an optional budget.

    Like :class:`~fljax.privacy.accounting.PrivacyLedger`, for DP-SGD across
    silos of different sizes: before each round the runner calls
    :meth:`check` with the round's participants, after it :meth:`step`, which
    returns the largest epsilon so far. A round that would take ANY silo past
    ``budget_epsilon`` is refused (:class:`PrivacyBudgetExceededError`) before it runs.

    Args:
      config: the :class:`DPSGDConfig` that built the DP-SGD client.
      silo_sizes: every silo's number of real records.
      budget_epsilon: ``None`` or the largest epsilon any silo may spend.
      accountant: ``"rdp"`` or ``"pld"``.
      sampling: ``"poisson"`` or ``"shuffle"`` (see the module docstring).
      max_steps: the ``max_steps`` of :func:`fljax.client.local_sgd` if one was set.
      rounds: per-silo rounds already taken part in (resuming), default zeros.

    Attributes:
      rounds: per-silo rounds taken part in so far.
      history: the largest epsilon after each recorded round.

    Examples:
      >>> from fljax import privacy
      >>> cfg = privacy.DPSGDConfig(
      ...     l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=32, num_examples=1000, delta=1e-5
      ... )
      >>> ledger = privacy.SiloLedger(cfg, [5000, 1000], budget_epsilon=3.0)
      >>> for r in range(3):
      ...     ledger.check([0, 1])     # the round's silo ids (a boolean mask works too)
      ...     _ = ledger.step([0, 1])
      >>> ledger.rounds, [round(e, 2) for e in ledger.epsilons()]
      ([3, 3], [1.2, 2.66])
      >>> ledger.rounds_left([0]), ledger.rounds_left([1])  # the small silo runs out first
      (33, 1)
    """

    def __init__(
        self,
        config: DPSGDConfig,
        silo_sizes: Sequence[int],
        *,
        budget_epsilon: float | None = None,
        accountant: accounting.AccountantKind = "rdp",
        sampling: SiloSampling = "poisson",
        max_steps: int | None = None,
        rounds: Sequence[int] | None = None,
    ):
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be positive, got {budget_epsilon}")
        self.config = config
        self.sizes = _sizes(silo_sizes)
        if sampling not in ("poisson", "shuffle"):
            raise ValueError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")
        for n in self.sizes:
            silo_steps(config, n, max_steps=max_steps)
            if n:
                silo_config(config, n)
        accounting.make_accountant(config, accountant)  # validate early
        self.budget_epsilon = budget_epsilon
        self.accountant = accountant
        self.sampling = sampling
        self.max_steps = max_steps
        self.rounds = [0] * len(self.sizes) if rounds is None else [int(r) for r in rounds]
        if len(self.rounds) != len(self.sizes) or min(self.rounds, default=0) < 0:
            raise ValueError(f"rounds must be {len(self.sizes)} counts >= 0, got {rounds}")
        self.history: list[float] = []
        self._cache: dict[tuple[int, int], float] = {}

    def _epsilon(self, n: int, r: int) -> float:
        if (n, r) not in self._cache:
            self._cache[n, r] = silo_epsilon(
                self.config,
                n,
                r,
                accountant=self.accountant,
                sampling=self.sampling,
                max_steps=self.max_steps,
            )
        return self._cache[n, r]

    def _ids(self, participants) -> list[int]:
        """Silo indices from ``None`` (all), a boolean mask ``[silos]`` or ids (negative: padding)."""
        if participants is None:
            return list(range(len(self.sizes)))
        p = np.asarray(participants).reshape(-1)
        if p.dtype == bool:
            if p.shape != (len(self.sizes),):
                raise ValueError(f"a participation mask must have {len(self.sizes)} entries, got {p.shape}")
            return [int(i) for i in np.flatnonzero(p)]
        ids = [int(i) for i in p if i >= 0]
        if any(i >= len(self.sizes) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"silo ids must be distinct and < {len(self.sizes)}, got {ids}")
        return ids

    def epsilons(self) -> list[float]:
        """Each silo's epsilon so far."""
        return [self._epsilon(n, r) for n, r in zip(self.sizes, self.rounds, strict=True)]

    def max_epsilon(self) -> float:
        """The largest epsilon any silo has spent."""
        return max(self.epsilons(), default=0.0)

    def can_run(self, participants=None, rounds: int = 1) -> bool:
        """Whether ``rounds`` more rounds of ``participants`` keep every silo within the budget."""
        if self.budget_epsilon is None:
            return True
        ids = self._ids(participants)
        return all(self._epsilon(self.sizes[i], self.rounds[i] + rounds) <= self.budget_epsilon for i in ids)

    def check(self, participants=None, rounds: int = 1) -> None:
        """Raise :class:`PrivacyBudgetExceededError` if the round(s) would take a silo past the budget."""
        if self.can_run(participants, rounds):
            return
        ids = self._ids(participants)
        over = {i: self._epsilon(self.sizes[i], self.rounds[i] + rounds) for i in ids}
        worst = max(over, key=over.__getitem__)
        raise accounting.PrivacyBudgetExceededError(
            f"privacy budget exhausted: {rounds} more round(s) would take silo {worst} "
            f"({self.sizes[worst]} records, {self.rounds[worst]} rounds spent) to epsilon="
            f"{over[worst]:.4g} > budget {self.budget_epsilon:.4g} (unit: one record of one silo)"
        )

    def step(self, participants=None, rounds: int = 1) -> float:
        """Record ``rounds`` rounds of ``participants`` (after :meth:`check`); returns the largest epsilon."""
        self.check(participants, rounds)
        for i in self._ids(participants):
            self.rounds[i] += rounds
        eps = self.max_epsilon()
        self.history.append(eps)
        return eps

    def rounds_left(self, participants=None, limit: int = 1_000_000) -> int:
        """How many MORE rounds of ``participants`` the budget allows, up to ``limit``."""
        if self.budget_epsilon is None:
            return limit
        if not self.can_run(participants, 1):
            return 0
        lo, hi = 1, 2
        while hi < limit and self.can_run(participants, hi):
            lo, hi = hi, min(2 * hi, limit)
        if self.can_run(participants, hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.can_run(participants, mid) else (lo, mid)
        return lo

    def summary(self) -> dict:
        """:func:`silo_epsilons`'s dict for the rounds recorded so far, plus the budget."""
        out = _summary(
            self.config,
            self.sizes,
            list(self.rounds),
            self.epsilons(),
            accountant=self.accountant,
            sampling=self.sampling,
            max_steps=self.max_steps,
        )
        out["budget_epsilon"] = self.budget_epsilon
        return out
