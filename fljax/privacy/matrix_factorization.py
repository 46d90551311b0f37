"""DP-FTRL / DP matrix factorization: correlated noise across rounds, through ``jax_privacy``.

DP-FedAvg adds independent noise each round and relies on sampling amplification.
The matrix mechanism (DP-FTRL, Kairouz et al. 2021; banded MF, Choquette-Choo et
al. 2023; BLT, Dvijotham et al. 2024) instead adds noise that is CORRELATED
across rounds, so that the noise in the running sum of updates (the model
trajectory) partly cancels, and it needs no amplification: it suits cohorts
that are NOT drawn at random, e.g. a fixed cyclic schedule.

Write ``x_t`` for round ``t``'s clipped sum and ``C`` for a lower-triangular
Toeplitz strategy matrix over ``total_rounds`` rounds, normalised so that its
largest column has L2 norm 1. Round ``t`` releases::

    x_t + sigma * (C^-1 xi)_t,   xi ~ N(0, I) independent per round, sigma = z * clip_norm

which is a post-processing of ``C x + sigma xi``: ONE Gaussian mechanism on the
whole run, whose sensitivity is the largest ``||C (x - x')||`` over the
participation pattern. The strategies all come from ``jax_privacy`` (nothing is
re-optimised here):

* ``"banded"``: ``jax_privacy.matrix_factorization.toeplitz.optimize_banded_toeplitz``
  (``num_bands`` non-zero diagonals, optimised for the mean error of the prefix
  sums); the noise state holds ``num_bands - 1`` copies of the model;
* ``"blt"``: ``jax_privacy.matrix_factorization.buffered_toeplitz.optimize`` for
  the min-separation pattern, a buffered linear Toeplitz matrix (a memory-light
  approximation of the optimal full Toeplitz factorisation): ``num_buffers``
  copies of the model;
* ``"independent"``: ``C = I``, independent noise each round (DP-FedAvg's noise
  without any amplification), the baseline.

``C^-1`` is applied in streaming form (``inverse_as_streaming_matrix``, a
``jax_privacy`` ``StreamingMatrix``) and the sensitivity is
``jax_privacy.matrix_factorization.toeplitz.minsep_sensitivity_squared`` of the
same coefficients; :func:`epsilon` composes nothing: it is one
``dp_accounting.GaussianDpEvent`` with multiplier ``z / sensitivity``, evaluated
with ``dp_accounting``'s PLD accountant.

Unit of privacy: one client (all its examples, all its rounds). Participation
(what the accounting assumes, and what :func:`cohort_schedule` produces): every
client takes part at most ``max_participations`` times, any two of its rounds at
least ``min_separation`` rounds apart (default: the cyclic schedule, ``min_separation
= population_size // cohort_size``). NO sampling amplification is claimed: the
schedule may be public, random or adversarial, as long as it respects the pattern.
Neighbouring relation: ``"zero_out"`` (one client's updates replaced by zeros,
``jax_privacy``'s default ``REPLACE_SPECIAL``; sensitivity ``clip_norm * sens(C)``)
or ``"replace_one"`` (its updates replaced by anything, ``2 * clip_norm * sens(C)``).

``jax_privacy``'s own privatizer (``noise_addition.matrix_factorization_privatizer``)
keeps its PRNG key in its state; fljax passes keys as arguments (STYLE.md), so
:func:`dp_ftrl` drives the same ``StreamingMatrix`` with noise drawn from the
round's ``"noise"`` key stream. A seeded key is a reproducible simulation: real
deployments draw the noise from the OS CSPRNG.

References:
  Kairouz, McMahan, Song, Thakkar, Thakurta, Xu. "Practical and Private (Deep)
  Learning without Sampling or Shuffling". ICML 2021 (DP-FTRL).
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu. "(Amplified)
  Banded Matrix Factorization: A unified approach to private training".
  NeurIPS 2023.
  Dvijotham, McMahan, Pillutla, Steinke, Thakurta. "Efficient and Near-Optimal
  Noise Generation for Streaming Differential Privacy". FOCS 2024 (BLT).
  McKenna et al. "Correlated Noise Mechanisms for Differentially Private
  Learning". arXiv:2506.08201, 2025 (``jax_privacy``'s implementation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy.matrix_factorization import buffered_toeplitz, sensitivity, streaming_matrix, toeplitz

from fljax import aggregators, tree
from fljax import random as fl_random
from fljax.base import Aggregator, Params, PyTree
from fljax.privacy.accounting import MechanismLedger
from fljax.privacy.config import default_delta

Strategy = Literal["banded", "blt", "independent"]
Relation = Literal["zero_out", "replace_one"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MFConfig:
    """Client-level DP with correlated noise (DP-FTRL / matrix factorisation), no amplification.

    One object builds the mechanism (:func:`dp_ftrl`), its accounting
    (:func:`dp_event`, :func:`epsilon`) and a cohort schedule that satisfies the
    accounted participation (:func:`cohort_schedule`).

    Unit of privacy: one client. Participation: at most ``max_participations``
    rounds per client, any two at least ``min_separation`` rounds apart, over
    ``total_rounds`` rounds; no sampling amplification. Neighbouring relation and
    sensitivity: ``neighboring_relation`` (``"zero_out"``: ``clip_norm *
    sens(C)``; ``"replace_one"``: twice that), where ``sens(C)`` is the largest
    norm of a sum of ``C``'s columns over the pattern (1 for one participation,
    ``C`` being normalised to unit largest column).

    Attributes:
      clip_norm: L2 clip norm ``C`` of one client's update (finite).
      noise_multiplier: ``z``: the noise on ``C x`` (the strategy's release of the
        sums) has std ``z * clip_norm``; with one participation per client the
        accounted Gaussian multiplier is ``z`` (``z / 2`` under replace-one).
      total_rounds: ``n``, the rounds the strategy is built for.
      cohort_size: the fixed cohort size, also the fixed denominator.
      population_size: number of clients ``N``.
      strategy: ``"banded"``, ``"blt"`` or ``"independent"``.
      num_bands: bands of the ``"banded"`` strategy (required for it; at most
        ``min_separation`` for the best utility, any value is accounted exactly).
      num_buffers: buffers of the ``"blt"`` strategy.
      min_separation: smallest gap between two rounds of one client (1 allows
        consecutive rounds); default ``population_size // cohort_size``, the cyclic
        schedule.
      max_participations: most rounds per client; default as many as
        ``min_separation`` allows (``ceil(n / min_separation)``).
      neighboring_relation: ``"zero_out"`` or ``"replace_one"``.
      delta: target delta; default :func:`~fljax.privacy.config.default_delta` of
        ``population_size``.
      optimizer_steps: steps of ``jax_privacy``'s strategy optimisation (``None``:
        its defaults, 250 for banded and 600 for BLT).
    """

    clip_norm: float
    noise_multiplier: float
    total_rounds: int
    cohort_size: int
    population_size: int
    strategy: Strategy = "banded"
    num_bands: int | None = None
    num_buffers: int = 2
    min_separation: int | None = None
    max_participations: int | None = None
    neighboring_relation: Relation = "zero_out"
    delta: float | None = None
    optimizer_steps: int | None = None

    def __post_init__(self):
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be positive and finite, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.total_rounds < 1:
            raise ValueError(f"total_rounds must be positive, got {self.total_rounds}")
        if not 0 < self.cohort_size <= self.population_size:
            raise ValueError(
                f"cohort_size must be in [1, population_size={self.population_size}], got {self.cohort_size}"
            )
        if self.strategy not in ("banded", "blt", "independent"):
            raise ValueError(f"strategy must be 'banded', 'blt' or 'independent', got {self.strategy!r}")
        if self.strategy == "banded" and (
            self.num_bands is None or not 1 <= self.num_bands <= self.total_rounds
        ):
            raise ValueError(f"strategy='banded' needs num_bands in [1, total_rounds], got {self.num_bands}")
        if self.strategy == "blt" and not 1 <= self.num_buffers <= 15:
            raise ValueError(f"num_buffers must be in [1, 15], got {self.num_buffers}")
        if self.neighboring_relation not in ("zero_out", "replace_one"):
            raise ValueError(
                f"neighboring_relation must be 'zero_out' or 'replace_one', got {self.neighboring_relation!r}"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.min_separation is not None and self.min_separation < 1:
            raise ValueError(f"min_separation must be positive, got {self.min_separation}")
        if self.max_participations is not None and self.max_participations < 1:
            raise ValueError(f"max_participations must be positive, got {self.max_participations}")
        # Necessary conditions for a schedule of fixed cohorts of distinct clients to exist.
        window = min(self.separation, self.total_rounds)
        if window * self.cohort_size > self.population_size:
            raise ValueError(
                f"min_separation={self.separation} needs {window} * cohort_size={self.cohort_size} "
                f"distinct clients in a window, more than population_size={self.population_size}"
            )
        if self.participations * self.population_size < self.total_rounds * self.cohort_size:
            raise ValueError(
                f"{self.total_rounds} rounds of {self.cohort_size} clients need more than "
                f"max_participations={self.participations} rounds per client of {self.population_size}"
            )

    @property
    def separation(self) -> int:
        """The accounted minimum separation (``population_size // cohort_size`` unless given)."""
        if self.min_separation is not None:
            return self.min_separation
        return self.population_size // self.cohort_size

    @property
    def participations(self) -> int:
        """The accounted maximum participations over ``total_rounds`` rounds."""
        return int(
            sensitivity.minsep_true_max_participations(
                n=self.total_rounds, min_sep=self.separation, max_participations=self.max_participations
            )
        )

    @property
    def relation_factor(self) -> float:
        """1 under zero-out, 2 under replace-one (a replaced update moves the sum by up to ``2C``)."""
        return 1.0 if self.neighboring_relation == "zero_out" else 2.0

    @property
    def unit_of_privacy(self) -> str:
        return "client"

    @property
    def target_delta(self) -> float:
        return float(self.delta) if self.delta is not None else default_delta(self.population_size)

    def replace(self, **changes) -> MFConfig:
        return dataclasses.replace(self, **changes)


# --- the strategy, from jax_privacy -----------------------------------------------


class _Strategy(NamedTuple):
    coefs: np.ndarray  # [n] float64: Toeplitz coefficients of C (first column), float32-representable
    blt: tuple[np.ndarray, np.ndarray] | None  # (buf_decay, output_scale) float32 for "blt"


@contextlib.contextmanager
def _host_setup():
    """``jax_privacy``'s host-side optimisation and sensitivity code relies on standard dtype and
    rank promotion (int32 with int64, implicit broadcasting); allow both there (host only)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@functools.cache
def _build_strategy(
    strategy: Strategy,
    n: int,
    num_bands: int | None,
    num_buffers: int,
    min_sep: int,
    max_participations: int | None,
    steps: int | None,
) -> _Strategy:
    kw = {} if steps is None else {"max_optimizer_steps": steps}
    if strategy == "independent":
        return _Strategy(np.pad(np.ones(1), (0, n - 1)), None)
    if strategy == "banded":
        assert num_bands is not None
        if num_bands == 1:
            bands = np.ones(1, np.float32)
        else:
            with _host_setup():
                bands = toeplitz.optimize_banded_toeplitz(n=n, bands=num_bands, **kw)
            bands = np.asarray(bands, np.float32)
        return _Strategy(np.pad(bands.astype(np.float64), (0, n - num_bands)), None)
    # BLT: optimised in float64 (jax_privacy requires it), run in float32.
    with jax.enable_x64(True), _host_setup():
        blt = buffered_toeplitz.optimize(
            n=n,
            min_sep=min_sep,
            max_participations=max_participations,
            error="mean",
            min_buffers=num_buffers,
            max_buffers=num_buffers,
            **kw,
        )
        decay = np.asarray(blt.buf_decay, np.float32)
        scale = np.asarray(blt.output_scale, np.float32)
        rounded = buffered_toeplitz.BufferedToeplitz.build(
            buf_decay=decay.astype(np.float64), output_scale=scale.astype(np.float64)
        )
        coefs = np.asarray(rounded.toeplitz_coefs(n), np.float64)
    return _Strategy(coefs, (decay, scale))


def _strategy(config: MFConfig) -> _Strategy:
    return _build_strategy(
        config.strategy,
        config.total_rounds,
        config.num_bands,
        config.num_buffers,
        config.separation,
        config.max_participations,
        config.optimizer_steps,
    )


def strategy_coefs(config: MFConfig) -> np.ndarray:
    """Toeplitz coefficients of the strategy ``C`` (its first column), ``[total_rounds]`` float64.

    Not normalised: the mechanism and the accounting both divide by their norm
    (:func:`column_norm`). The first call for a configuration runs
    ``jax_privacy``'s optimisation (seconds); later calls are cached.
    """
    return _strategy(config).coefs.copy()


def column_norm(config: MFConfig) -> float:
    """Largest column norm of the unnormalised ``C`` (``jax_privacy`` ``toeplitz.sensitivity_squared``)."""
    with jax.enable_x64(True), _host_setup():
        return math.sqrt(float(toeplitz.sensitivity_squared(jnp.asarray(_strategy(config).coefs))))


def noising_matrix(config: MFConfig) -> streaming_matrix.StreamingMatrix:
    """``C^-1`` (unnormalised ``C``) as ``jax_privacy``'s float32 ``StreamingMatrix``."""
    s = _strategy(config)
    if config.strategy == "independent":
        return streaming_matrix.identity()
    if config.strategy == "banded":
        return toeplitz.inverse_as_streaming_matrix(jnp.asarray(s.coefs[: config.num_bands], jnp.float32))
    assert s.blt is not None
    with _host_setup():
        blt = buffered_toeplitz.BufferedToeplitz.build(
            buf_decay=s.blt[0], output_scale=s.blt[1], dtype=jnp.float32
        )
    return blt.inverse_as_streaming_matrix()


def noise_std(config: MFConfig) -> float:
    """Std of the i.i.d. noise fed to ``C^-1``: ``z * clip_norm * column_norm`` (``C`` normalised)."""
    return config.noise_multiplier * config.clip_norm * column_norm(config)


# --- accounting (host) ------------------------------------------------------------


def sensitivity_multiplier(config: MFConfig, rounds: int | None = None) -> float:
    """``sens(C)`` over the first ``rounds`` rounds, with ``C`` normalised to unit largest column.

    ``sqrt(toeplitz.minsep_sensitivity_squared(c, min_separation,
    max_participations, n=rounds)) / column_norm`` (``jax_privacy``; exact for
    non-negative, non-increasing coefficients, which it checks). Multiply by
    ``clip_norm * relation_factor`` for the L2 sensitivity of ``C x``.
    """
    rounds = _rounds(config, rounds)
    with jax.enable_x64(True), _host_setup():
        sq = toeplitz.minsep_sensitivity_squared(
            jnp.asarray(_strategy(config).coefs),
            min_sep=config.separation,
            max_participations=config.max_participations,
            n=rounds,
        )
        return math.sqrt(float(sq)) / column_norm(config)


def _rounds(config: MFConfig, rounds: int | None) -> int:
    rounds = config.total_rounds if rounds is None else int(rounds)
    if not 0 < rounds <= config.total_rounds:
        raise ValueError(f"rounds must be in [1, total_rounds={config.total_rounds}], got {rounds}")
    return rounds


def accounting_noise_multiplier(config: MFConfig, rounds: int | None = None) -> float:
    """``z / (relation_factor * sens(C))``: the multiplier of the one Gaussian that is accounted."""
    return config.noise_multiplier / (config.relation_factor * sensitivity_multiplier(config, rounds))


def dp_event(config: MFConfig, rounds: int | None = None) -> dp_accounting.DpEvent:
    """The whole run's (first ``rounds`` rounds') event: ONE ``GaussianDpEvent``, no sampling."""
    return dp_accounting.GaussianDpEvent(accounting_noise_multiplier(config, rounds))


def epsilon(config: MFConfig, rounds: int | None = None) -> float:
    """Epsilon at ``config.target_delta`` after ``rounds`` rounds (default all), PLD accountant.

    Examples:
      >>> from fljax.privacy import matrix_factorization as mf
      >>> cfg = mf.MFConfig(clip_norm=1.0, noise_multiplier=2.0, total_rounds=8, cohort_size=10,
      ...                   population_size=40, strategy="banded", num_bands=1)
      >>> cfg.separation, cfg.participations  # cyclic schedule: every 4th round, twice
      (4, 2)
      >>> round(mf.accounting_noise_multiplier(cfg), 4)  # 2 / sqrt(2)
      1.4142
      >>> 0 < mf.epsilon(cfg, rounds=4) < mf.epsilon(cfg)
      True
    """
    if config.noise_multiplier == 0:
        return math.inf
    accountant = dp_accounting.pld.PLDAccountant()
    return float(accountant.compose(dp_event(config, rounds)).get_epsilon(config.target_delta))


def summary(config: MFConfig, rounds: int | None = None) -> dict:
    """A JSON-ready description of the guarantee after ``rounds`` rounds (default all)."""
    r = 0 if rounds == 0 else _rounds(config, rounds)
    return {
        "mechanism": f"matrix_factorization:{config.strategy}",
        "unit_of_privacy": "client",
        "neighboring_relation": config.neighboring_relation,
        "epsilon": 0.0 if r == 0 else epsilon(config, r),
        "delta": config.target_delta,
        "accountant": "pld",
        "rounds": r,
        "total_rounds": config.total_rounds,
        "noise_multiplier": config.noise_multiplier,
        "clip_norm": config.clip_norm,
        "min_separation": config.separation,
        "max_participations": config.participations,
        "sampling_amplification": False,
        "cohort_size": config.cohort_size,
        "population_size": config.population_size,
    }


def ledger(config: MFConfig, *, budget_epsilon: float | None = None) -> MechanismLedger:
    """A budget ledger for ``config`` (:class:`~fljax.privacy.accounting.MechanismLedger`)."""
    return MechanismLedger(
        config, lambda c, r: 0.0 if r == 0 else epsilon(c, r), summary, budget_epsilon=budget_epsilon
    )


def calibrate_noise_multiplier(
    config: MFConfig, *, target_epsilon: float, rounds: int | None = None, tol: float = 1e-4
) -> float:
    """The smallest ``noise_multiplier`` with :func:`epsilon` at most ``target_epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` on :func:`dp_event`; apply it with
    ``config.replace(noise_multiplier=z)``.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    sens = config.relation_factor * sensitivity_multiplier(config, rounds)
    z = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.pld.PLDAccountant,
        lambda z: dp_accounting.GaussianDpEvent(z / sens),
        target_epsilon,
        config.target_delta,
        tol=tol,
    )
    return float(z)


def cohort_schedule(config: MFConfig, key: jax.Array) -> np.ndarray:
    """A cyclic schedule that satisfies the accounted participation: ``[total_rounds, cohort_size]`` ids.

    The population is permuted once (``key``, a run-level key) and cut into
    ``G = population_size // cohort_size`` groups; round ``t`` takes group
    ``t mod G``. So a client's rounds are exactly ``G`` apart and it takes part
    ``ceil(total_rounds / G)`` times at most; both are checked against the
    config. (Any other schedule with that pattern is accounted the same: the
    randomness of this one is NOT used by the accounting.)

    Raises:
      ValueError: if the cyclic schedule violates ``min_separation`` or
        ``max_participations``.
    """
    num_groups = config.population_size // config.cohort_size
    times = math.ceil(config.total_rounds / num_groups)
    if num_groups < min(config.separation, config.total_rounds) or times > config.participations:
        raise ValueError(
            f"the cyclic schedule ({num_groups} groups, {times} participations) does not satisfy "
            f"min_separation={config.separation}, max_participations={config.participations}"
        )
    perm = np.asarray(jax.random.permutation(key, config.population_size), np.int32)
    groups = perm[: num_groups * config.cohort_size].reshape(num_groups, config.cohort_size)
    return groups[np.arange(config.total_rounds) % num_groups]


# --- the mechanism (jit) ----------------------------------------------------------


class MFState(NamedTuple):
    """State of :func:`dp_ftrl`.

    Attributes:
      round: ``[]`` int32, rounds aggregated so far.
      noise_state: the ``StreamingMatrix`` state of ``C^-1``: leaves
        ``[num_bands - 1, *param]`` (banded), ``[num_buffers, *param]`` (BLT), or
        ``()`` (independent).
      sum_state: the inner sum's state.
    """

    round: jax.Array
    noise_state: PyTree
    sum_state: PyTree


def dp_ftrl(config: MFConfig, sum: Aggregator | None = None) -> Aggregator:
    """DP-FTRL / DP-MF aggregation: clip, sum (any inner sum), correlated noise, fixed denominator.

    Unit of privacy: one client. Neighbouring relation: ``config.neighboring_relation``.
    Sensitivity of ``C x`` over the run: ``relation_factor * clip_norm * sens(C)``
    (:func:`sensitivity_multiplier`); what is accounted is :func:`dp_event`.

    Round ``t`` computes::

        u_i   = clip(delta_i, C) / C                   # unit L2 ball; 0 for padding and non-finite
        s_t   = C * sum(u, 1)                          # the inner sum, called once, weight 1 per client
        w_t   = (C^-1 xi)_t,  xi_t ~ N(0, sigma^2 I)   # jax_privacy StreamingMatrix, sigma = noise_std
        delta = (s_t + w_t) / cohort_size

    Every participating client has weight 1 (its example count is ignored); a
    weight-0 slot is padding and contributes exactly zero, a non-finite update or
    weight contributes zero and is counted in ``num_nonfinite``. The noise key is
    ``fljax.random.stream(key, "noise")``; the inner sum gets ``key``. The noise
    state advances every round (rounds past ``total_rounds`` continue the
    Toeplitz pattern but are not accounted: :func:`epsilon` refuses them).

    Returns:
      ``Aggregator`` with metrics ``num_nonfinite``, ``num_clipped``,
      ``num_clients``, ``total_weight``, ``dp_clip_norm``, ``dp_noise_std`` (the
      marginal std of this round's correlated noise on the sum, from
      ``StreamingMatrix.row_norms_squared``), ``dp_round`` and the inner sum's.

    Examples:
      Without noise it is the clipped sum over the fixed cohort size:

      >>> import jax, jax.numpy as jnp
      >>> from fljax.privacy import matrix_factorization as mf
      >>> cfg = mf.MFConfig(clip_norm=1.0, noise_multiplier=0.0, total_rounds=4, cohort_size=2,
      ...                   population_size=8, strategy="banded", num_bands=2)
      >>> agg = mf.dp_ftrl(cfg)
      >>> deltas = {"w": jnp.array([[0.3, 0.4], [3.0, 4.0], [1.0, 1.0]])}
      >>> weights = jnp.array([1.0, 1.0, 0.0])  # the third slot is padding
      >>> _, delta, metrics = agg.aggregate(agg.init({"w": jnp.zeros(2)}), deltas, weights, jax.random.key(0))
      >>> [round(float(v), 4) for v in delta["w"]], int(metrics["num_clipped"])
      ([0.45, 0.6], 1)
    """
    inner = aggregators.weighted_sum() if sum is None else sum
    cinv = noising_matrix(config)
    noisy = config.noise_multiplier > 0
    sigma = noise_std(config)
    c = float(config.clip_norm)
    denom = float(config.cohort_size)
    n = config.total_rounds
    with _host_setup():
        row_std = np.sqrt(np.asarray(cinv.row_norms_squared(n), np.float64)) * sigma

    def init(params: Params) -> MFState:
        noise_state = cinv.init_multiply(params) if noisy else ()
        return MFState(round=jnp.zeros((), jnp.int32), noise_state=noise_state, sum_state=inner.init(params))

    def aggregate(state: MFState, deltas: Params, weights: jax.Array, key: jax.Array):
        w = jnp.asarray(weights, jnp.float32)
        participating = w != 0
        valid = jnp.isfinite(w) & (w > 0) & tree.is_finite(deltas)
        num_nonfinite = jnp.sum(participating & ~valid).astype(jnp.int32)
        b = jnp.where(valid, 1.0, 0.0).astype(jnp.float32)
        factors, _ = tree.clip_factors(deltas, c)
        clipped = valid & (factors < 1.0)
        unit = tree.scale(deltas, factors / jnp.float32(c))
        sum_state, total, sum_metrics = inner.aggregate(state.sum_state, unit, b, key)
        total = jax.tree.map(lambda s: s * jnp.asarray(c, s.dtype), total)
        noise_state = state.noise_state
        std_t = jnp.zeros((), jnp.float32)
        if noisy:
            xi = jax.tree.map(
                lambda s, k: jax.random.normal(k, s.shape, jnp.float32) * jnp.float32(sigma),
                total,
                _leaf_keys(total, fl_random.stream(key, "noise")),
            )
            # jax_privacy's BLT adds xi to every buffer by implicit broadcasting: allow it there.
            with jax.numpy_rank_promotion("allow"):
                corr, noise_state = cinv.multiply_next(xi, noise_state)
            total = jax.tree.map(lambda s, z: s + z.astype(s.dtype), total, corr)
            std_t = jnp.asarray(row_std, jnp.float32)[jnp.minimum(state.round, n - 1)]
        delta = jax.tree.map(lambda s: s / jnp.asarray(denom, s.dtype), total)
        metrics = dict(sum_metrics)
        metrics.update(
            num_nonfinite=num_nonfinite,
            num_clipped=jnp.sum(clipped).astype(jnp.int32),
            num_clients=jnp.sum(valid).astype(jnp.int32),
            total_weight=jnp.sum(b),
            dp_clip_norm=jnp.float32(c),
            dp_noise_std=std_t,
            dp_round=state.round,
        )
        return MFState(round=state.round + 1, noise_state=noise_state, sum_state=sum_state), delta, metrics

    return Aggregator(init, aggregate)


def _leaf_keys(template: PyTree, key: jax.Array) -> PyTree:
    leaves, treedef = jax.tree.flatten(template)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
