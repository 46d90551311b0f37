"""Empirical privacy auditing in one training run (Steinke, Nasr and Jagielski 2023).

An accountant's epsilon is an upper bound proved for the mechanism as written; a bug in the
clipping, the noise scale or the sampling makes it wrong without any error. An audit measures a
LOWER bound from the run itself: ``m`` canary clients are created, each is included in the
federation with probability 1/2 (a secret coin), the run trains as usual, and an auditor who sees
only the released outputs guesses which canaries were included. If the mechanism is
``(eps, delta)``-DP for one client, guesses cannot be much better than coin flips; Steinke et al.
turn the number of correct guesses into an epsilon that holds with confidence
``1 - significance``. The statistics are ``jax_privacy.auditing.CanaryScoreAuditor``'s
(:meth:`~jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run`, all thresholds with a
Bonferroni correction); nothing of them is re-written here.

Canaries (Andrew et al. 2024, "One-shot empirical privacy estimation for federated learning"):
canary ``i`` is a client whose update is a fixed random direction ``u_i`` (i.i.d. Gaussian
coordinates, normalised) scaled to ``canary_norm``; with a norm far above the clip norm, DP clips
it to exactly the clip norm, the largest contribution any client can make. An included canary
takes part in each round independently with probability ``participation`` (the Poisson rate of
the real clients), so it is one more client of the population as the accountant sees it (unit:
one client; add/remove neighbours). The auditor's score of canary ``i`` is ``<observed, u_i>``
where ``observed`` is the sum of the released deltas (``theta_0 - theta_T`` for a server that
applies them with SGD): a post-processing of the released outputs, so the lower bound is valid
whatever the score, and random directions in ``d >> m`` dimensions are nearly orthogonal, so
one canary's signal barely leaks into another's score.

A lower bound above the accountant's epsilon is impossible for a correct mechanism (up to the
``significance`` failure probability): :func:`estimate` reports it and :class:`AuditResult`'s
``passed`` is False; the trainer then refuses to call the run private. One-run audits of the
Gaussian mechanism are loose (the bound is well below the accountant's epsilon); a failure is a
bug, a pass is not a proof.

Canaries are real updates: they move the model (by at most ``clip_norm`` per sampled canary and
round, like any client) and take cohort slots of their own (capacity from a Chernoff bound,
:func:`fljax.data.sampling.poisson_max_cohort` with tail ``1e-12``; a round that samples more
reports ``audit_canaries_dropped``). Audit runs are measurements, not production runs.

Keys: canary directions and inclusion come from ``fljax.random.stream(run_key, "audit")``
(public: the canaries are synthetic data, knowing them reveals nothing about real clients);
each round's participation from the ``"audit"`` sub-stream of the aggregator's key.

References:
  Steinke, Nasr, Jagielski. "Privacy Auditing with One (1) Training Run". NeurIPS 2023.
  Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar. "One-shot Empirical Privacy Estimation for
  Federated Learning". ICLR 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax_privacy import auditing

from fljax import random as fl_random
from fljax.base import Aggregator, Params
from fljax.data import sampling


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """One-run audit with random-direction canary clients.

    Attributes:
      num_canaries: ``m``, canary clients; each included with probability 1/2. More canaries
        allow a larger lower bound (with ``m`` canaries all guessed right the bound is about
        ``log(m) - 1``) but move the model more.
      participation: probability that an included canary takes part in a round: the real
        clients' Poisson rate ``q`` (1 when every client takes part in every round).
      canary_norm: L2 norm of a canary's update before the mechanism clips it; keep it far
        above the clip norm so that every canary contributes exactly the clip norm.
      canary_weight: the weight a canary reports (1 for uniform DP weighting; the cap for
        capped weighting, so that its bounded weight is 1).
      significance: the audit's failure probability (confidence ``1 - significance``).
    """

    num_canaries: int = 1000
    participation: float = 1.0
    canary_norm: float = 1e3
    canary_weight: float = 1.0
    significance: float = 0.05

    def __post_init__(self):
        if not (isinstance(self.num_canaries, int) and self.num_canaries >= 2):
            raise ValueError(f"num_canaries must be an integer >= 2, got {self.num_canaries!r}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation must be in (0, 1], got {self.participation}")
        if not (math.isfinite(self.canary_norm) and self.canary_norm > 0):
            raise ValueError(f"canary_norm must be positive and finite, got {self.canary_norm}")
        if not (math.isfinite(self.canary_weight) and self.canary_weight > 0):
            raise ValueError(f"canary_weight must be positive and finite, got {self.canary_weight}")
        if not 0 < self.significance < 0.5:
            raise ValueError(f"significance must be in (0, 0.5), got {self.significance}")


class AuditResult(NamedTuple):
    """What an audit found.

    Attributes:
      epsilon_lower_bound: empirical epsilon, a lower bound with confidence ``1 - significance``.
      accountant_epsilon: the accountant's epsilon at the same delta (None if not given).
      passed: ``epsilon_lower_bound <= accountant_epsilon`` (True without an accountant value).
      auroc: area under the ROC curve of the canary scores (0.5: no signal).
      num_included: canaries included.
      num_excluded: canaries left out.
      delta: the delta of both epsilons.
      significance: the audit's failure probability.
    """

    epsilon_lower_bound: float
    accountant_epsilon: float | None
    passed: bool
    auroc: float
    num_included: int
    num_excluded: int
    delta: float
    significance: float

    def report(self) -> dict:
        """A JSON-ready dict with a one-line verdict."""
        out = {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in self._asdict().items()}
        out["method"] = "one-run audit (Steinke et al. 2023), jax_privacy.auditing, random-direction canaries"
        out["verdict"] = (
            "consistent: the empirical lower bound does not exceed the accountant's epsilon"
            if self.passed
            else "FAILED: the empirical lower bound exceeds the accountant's epsilon; the run must not "
            "be called private (a bug in the mechanism or its accounting)"
        )
        return out


def _keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(directions, coins)`` keys of the audit key (fold-ins: the audit key itself is reused)."""
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def inclusion(config: AuditConfig, key: jax.Array) -> np.ndarray:
    """The secret coins: ``bool[num_canaries]``, each canary included with probability 1/2."""
    return np.asarray(jax.random.bernoulli(key, 0.5, (config.num_canaries,)))


def _direction(template_flat: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
    u = jax.random.normal(jax.random.fold_in(key, index), template_flat.shape, jnp.float32)
    return u / jnp.linalg.norm(u)


def canary_updates(template: Params, indices: jax.Array, config: AuditConfig, key: jax.Array) -> Params:
    """The updates of canaries ``indices`` (``int[k]``): ``canary_norm * u_i``, leading axis ``k``."""
    flat, unravel = ravel_pytree(template)
    dirs = jax.vmap(lambda i: _direction(flat, key, i))(indices) * config.canary_norm
    return jax.vmap(unravel)(dirs.astype(flat.dtype))


def capacity(config: AuditConfig, num_included: int) -> int:
    """Cohort slots reserved for canaries in a round (all included ones when ``participation`` is 1)."""
    if num_included == 0:
        return 0
    if config.participation >= 1:
        return num_included
    return min(num_included, sampling.poisson_max_cohort(num_included, config.participation, tail=1e-12))


def with_canaries(aggregator: Aggregator, config: AuditConfig, key: jax.Array) -> Aggregator:
    """``aggregator`` with the audit's included canaries as extra clients of every round.

    Each round, every included canary takes part with probability ``config.participation``
    (key: the ``"audit"`` sub-stream of the round's aggregate key); the sampled ones are
    appended to the cohort's deltas (weight ``canary_weight``; unused slots weight 0, i.e.
    padding) before ``aggregator`` runs, so they go through the same clipping, secure sum and
    noise as the real clients.

    Args:
      aggregator: the round's aggregator (e.g. :func:`fljax.privacy.dp`).
      config: the :class:`AuditConfig`.
      key: the audit key (the trainer uses ``fljax.random.stream(run_key, "audit")``); the same
        key must be given to :func:`scores` and :func:`inclusion`.

    Returns:
      An :class:`~fljax.base.Aggregator` with ``aggregator``'s state and metrics, plus
      ``audit_canaries`` (canaries in this round) and ``audit_canaries_dropped`` (sampled
      canaries beyond the reserved slots).
    """
    dir_key, coin_key = _keys(key)
    included = inclusion(config, coin_key)
    cap = capacity(config, int(included.sum()))
    included_ids = jnp.asarray(np.flatnonzero(included), jnp.int32)

    def aggregate(state, deltas: Params, weights: jax.Array, key: jax.Array):
        if cap == 0:
            state, delta, metrics = aggregator.aggregate(state, deltas, weights, key)
            zero = jnp.zeros((), jnp.int32)
            return state, delta, metrics | {"audit_canaries": zero, "audit_canaries_dropped": zero}
        take = jax.random.bernoulli(fl_random.stream(key, "audit"), config.participation, included_ids.shape)
        slots = jnp.nonzero(take, size=cap, fill_value=-1)[0]
        valid = slots >= 0
        ids = included_ids[jnp.maximum(slots, 0)]
        template = jax.tree.map(lambda x: x[0], deltas)
        canaries = canary_updates(template, ids, config, dir_key)
        both = jax.tree.map(lambda a, c: jnp.concatenate([a, c.astype(a.dtype)]), deltas, canaries)
        canary_weights = jnp.where(valid, config.canary_weight, 0.0).astype(weights.dtype)
        state, delta, metrics = aggregator.aggregate(
            state, both, jnp.concatenate([weights, canary_weights]), key
        )
        num = jnp.sum(valid).astype(jnp.int32)
        return (
            state,
            delta,
            metrics
            | {
                "audit_canaries": num,
                "audit_canaries_dropped": jnp.sum(take).astype(jnp.int32) - num,
            },
        )

    return Aggregator(aggregator.init, aggregate)


def scores(observed: Params, config: AuditConfig, key: jax.Array, *, chunk_size: int = 64) -> np.ndarray:
    """The auditor's scores ``<observed, u_i>`` of every canary (``float[num_canaries]``).

    Args:
      observed: what the auditor saw, summed over rounds: the released deltas' sum, or
        ``initial_params - final_params`` (for a server applying the deltas with SGD, the sum
        times the learning rate).
      config: the :class:`AuditConfig`.
      key: the audit key given to :func:`with_canaries`.
      chunk_size: canaries scored at once (memory ``chunk_size * num_params``).
    """
    dir_key, _ = _keys(key)
    return np.asarray(_scores(observed, dir_key, config.num_canaries, chunk_size))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _scores(observed: Params, key: jax.Array, num_canaries: int, chunk_size: int) -> jax.Array:
    flat, _ = ravel_pytree(observed)
    flat = flat.astype(jnp.float32)
    return jax.lax.map(
        lambda i: jnp.dot(_direction(flat, key, i), flat), jnp.arange(num_canaries), batch_size=chunk_size
    )


def estimate(
    canary_scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    significance: float = 0.05,
    accountant_epsilon: float | None = None,
) -> AuditResult:
    """Empirical epsilon lower bound from the canaries' scores (``jax_privacy.auditing``).

    Args:
      canary_scores: ``float[m]``, higher for canaries believed included.
      included: ``bool[m]``, the true coins.
      delta: the delta of the bound (use the accountant's).
      significance: failure probability of the bound.
      accountant_epsilon: the accountant's epsilon at ``delta``, to compare against.

    Returns:
      An :class:`AuditResult`.

    Examples:
      Scores that carry no information give a lower bound of (about) zero:

      >>> import numpy as np
      >>> from fljax.leakage import audit
      >>> rng = np.random.default_rng(0)
      >>> r = audit.estimate(rng.normal(size=1000), rng.random(1000) < 0.5, delta=1e-5, accountant_epsilon=1.0)
      >>> r.epsilon_lower_bound < 0.5, r.passed
      (True, True)
    """
    s = np.asarray(canary_scores, dtype=np.float64)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.shape != s.shape:
        raise ValueError(
            f"canary_scores and included must be 1-d of one length, got {s.shape} and {inc.shape}"
        )
    if inc.dtype != bool:
        raise ValueError(f"included must be boolean, got dtype {inc.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary_scores contain NaN or inf")
    if inc.all() or not inc.any():
        raise ValueError("an audit needs both included and excluded canaries")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    auditor = auditing.CanaryScoreAuditor(s[inc], s[~inc])
    lower = float(auditor.epsilon_one_run(significance, delta))
    passed = accountant_epsilon is None or lower <= accountant_epsilon
    return AuditResult(
        epsilon_lower_bound=lower,
        accountant_epsilon=None if accountant_epsilon is None else float(accountant_epsilon),
        passed=bool(passed),
        auroc=float(auditor.attack_auroc()),
        num_included=int(inc.sum()),
        num_excluded=int((~inc).sum()),
        delta=float(delta),
        significance=float(significance),
    )


def run_audit(
    observed: Params, config: AuditConfig, key: jax.Array, *, delta: float, accountant_epsilon=None
):
    """:func:`scores` then :func:`estimate` with the coins of ``key``: the whole audit after a run."""
    _, coin_key = _keys(key)
    return estimate(
        scores(observed, config, key),
        inclusion(config, coin_key),
        delta=delta,
        significance=config.significance,
        accountant_epsilon=accountant_epsilon,
    )
