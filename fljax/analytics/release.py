"""The one way a federated statistic is released: bounded contributions, any sum, Gaussian noise once.

A federated statistic is a SUM of per-client vectors. Each client computes its
contribution ``v_i = f(data_i)`` (``f`` written for ONE client, vmapped over the
population), the release ENFORCES the stated bounds on every ``v_i``, a sum
aggregator adds them (:func:`fljax.aggregators.weighted_sum`,
:func:`fljax.secagg.secure_sum`, :func:`fljax.secagg.protocol_sum`) and Gaussian
noise calibrated to the sum's sensitivity is added ONCE::

    u_i   = clamp(v_i, -linf, linf)                      # optional, coordinate-wise
    u_i   = u_i * min(1, l1 / ||u_i||_1)                 # optional
    u_i   = u_i * min(1, l2 / ||u_i||_2)                 # always (the stated L2 bound)
    total = sum_i m_i u_i                                # m_i = 1 for a real client, 0 for padding
    value = total + N(0, (z * l2)^2 I)

Unit of privacy: one client (all of its records). Neighbouring relation: add or
remove one client. Sensitivity: ``l2`` in L2 norm (:attr:`ReleaseConfig.sensitivity`),
because every contribution has L2 norm at most ``l2`` after the clip. A release is
one "round" of client-level DP in which the whole population takes part:
:meth:`ReleaseConfig.dp_config` is the :class:`~fljax.privacy.DPConfig` with
``cohort_size = population_size`` under Poisson sampling at rate 1 (add/remove one
client, sensitivity ``C = l2``), and its accounting is
:func:`fljax.privacy.accounting.dp_event` of that config for one round, which
``dp_accounting`` treats as the plain Gaussian mechanism with multiplier ``z``.
The noise is drawn by :func:`fljax.privacy.aggregation.gaussian_noise` from the
``"noise"`` stream of the key, as :func:`fljax.privacy.dp` does.

Why not call :func:`fljax.privacy.dp` itself: it scales each update into the unit
ball (divides by ``C``, multiplies the sum back) so that a secure sum needs a fixed
range, which rounds integer counts whenever ``C`` is not a power of two. Here a
contribution within its bounds is multiplied by exactly 1, so without noise the
release equals the pooled computation exactly (bit for bit for integer counts,
through a secure sum too, when its ``clip_range`` covers the contributions and its
scale is a power of two). The noise, the configuration and the accounting are the
same.

Padding clients (``client_mask`` False) contribute exactly zero, whatever their
data; a client whose contribution holds NaN or inf is rejected
(:func:`fljax.aggregators.sanitize`): it contributes zero and is counted in
``num_nonfinite``.

A sum that adds its own noise (:func:`distributed_sum`, the distributed discrete
Gaussian) is used with ``noise_multiplier=0`` here and accounted with its own
configuration (:func:`fljax.privacy.distributed.epsilon`).

``jax.random`` with a seeded key is a reproducible simulation; noise that protects
real data needs a secret key (:func:`fljax.random.secret_key`).

Examples:
  Count the clients holding at least one positive value, without noise and then
  with noise (the third slot is padding and counts for nothing):

  >>> import jax, jax.numpy as jnp
  >>> from fljax.analytics import release
  >>> data = jnp.array([[1.0, -1.0], [-2.0, -3.0], [5.0, 6.0]])
  >>> mask = jnp.array([True, True, False])
  >>> def positive(x):  # one client's data -> its contribution vector
  ...     return jnp.any(x > 0).astype(jnp.float32)[None]
  >>> cfg = release.ReleaseConfig(l2_bound=1.0, noise_multiplier=0.0, population_size=2)
  >>> value, metrics = release.release(positive, data, mask, cfg, jax.random.key(0))
  >>> value.tolist(), int(metrics["num_clients"])
  ([1.0], 2)
  >>> cfg = release.ReleaseConfig(l2_bound=1.0, noise_multiplier=2.0, population_size=2)
  >>> value, metrics = release.release(positive, data, mask, cfg, jax.random.key(1))
  >>> float(metrics["noise_std"]), round(cfg.epsilon(), 2)
  (2.0, 2.17)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fljax import aggregators
from fljax import random as fl_random
from fljax.base import Aggregator
from fljax.privacy import accounting
from fljax.privacy.aggregation import gaussian_noise
from fljax.privacy.config import DPConfig, default_delta

__all__ = [
    "ReleaseConfig",
    "calibrate",
    "distributed_sum",
    "enforce_bounds",
    "host_noise",
    "noised_sum",
    "release",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    """How one statistic is released: the enforced bounds and the Gaussian noise (frozen, hashable).

    Unit of privacy: one client. Neighbouring relation: add/remove one client.
    Sensitivity of the sum: ``l2_bound`` (L2 norm).

    Attributes:
      l2_bound: L2 bound of one client's contribution, ENFORCED by clipping; the
        sensitivity. ``inf`` (no bound) only with ``noise_multiplier=0``.
      noise_multiplier: ``z``: the noise on the sum has std ``z * l2_bound`` per
        coordinate. 0 releases the exact sum (not private).
      population_size: number of clients (public; sets the default delta).
      linf_bound: optional per-coordinate bound, enforced by clamping before the
        L2 clip (e.g. a histogram's per-bin cap).
      l1_bound: optional L1 bound, enforced by scaling before the L2 clip (e.g. a
        histogram's total cap).
      delta: target delta; default :func:`fljax.privacy.config.default_delta` of
        ``population_size``.
    """

    l2_bound: float
    noise_multiplier: float
    population_size: int
    linf_bound: float | None = None
    l1_bound: float | None = None
    delta: float | None = None

    def __post_init__(self):
        if not self.l2_bound > 0:
            raise ValueError(f"l2_bound must be positive, got {self.l2_bound}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if math.isinf(self.l2_bound) and self.noise_multiplier > 0:
            raise ValueError("an infinite l2_bound needs noise_multiplier=0 (the noise would be infinite)")
        if self.population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {self.population_size}")
        for name in ("linf_bound", "l1_bound"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive or None, got {v}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum under add/remove one client: ``l2_bound``."""
        return float(self.l2_bound)

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise on each coordinate of the sum: ``z * l2_bound`` (0 without noise)."""
        return 0.0 if self.noise_multiplier == 0 else float(self.noise_multiplier * self.l2_bound)

    @property
    def target_delta(self) -> float:
        return float(self.delta) if self.delta is not None else default_delta(self.population_size)

    def dp_config(self) -> DPConfig:
        """The equivalent one-round :class:`~fljax.privacy.DPConfig`: the whole population, rate 1.

        ``cohort_size = population_size`` under Poisson sampling (add/remove one
        client, sensitivity ``C = l2_bound``), uniform weight 1, denominator 1.
        """
        return DPConfig(
            clip_norm=self.l2_bound,
            noise_multiplier=self.noise_multiplier,
            population_size=self.population_size,
            cohort_size=self.population_size,
            sampling="poisson",
            expected_cohort_weight=1.0,
            delta=self.target_delta,
        )

    def dp_event(self) -> dp_accounting.DpEvent:
        """The release's ``DpEvent`` under add/remove one client: one round of :meth:`dp_config`."""
        return accounting.dp_event(self.dp_config(), 1)

    def epsilon(self, *, accountant: accounting.AccountantKind = "rdp") -> float:
        """Epsilon of this one release at :attr:`target_delta` (``inf`` without noise)."""
        return accounting.epsilon(self.dp_config(), 1, accountant=accountant)

    def summary(self) -> dict:
        """A JSON-ready description of the release's guarantee."""
        return {
            "unit_of_privacy": "client",
            "neighboring_relation": "add_or_remove_one",
            "sensitivity_l2": self.sensitivity,
            "linf_bound": self.linf_bound,
            "l1_bound": self.l1_bound,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": self.noise_std,
            "epsilon": self.epsilon(),
            "delta": self.target_delta,
            "accountant": "rdp",
        }

    def replace(self, **changes) -> ReleaseConfig:
        return dataclasses.replace(self, **changes)


def calibrate(
    config: ReleaseConfig, *, target_epsilon: float, accountant: accounting.AccountantKind = "rdp"
) -> ReleaseConfig:
    """``config`` with the smallest noise multiplier whose single release spends at most ``target_epsilon``.

    Uses :func:`fljax.privacy.calibrate_noise_multiplier` on :meth:`ReleaseConfig.dp_config`.

    Examples:
      >>> cfg = calibrate(ReleaseConfig(l2_bound=1.0, noise_multiplier=0.0, population_size=1000),
      ...                 target_epsilon=1.0)
      >>> 3.5 < cfg.noise_multiplier < 5.0 and abs(cfg.epsilon() - 1.0) < 0.01
      True
    """
    if math.isinf(config.l2_bound):
        raise ValueError("cannot calibrate noise for an infinite l2_bound")
    z = accounting.calibrate_noise_multiplier(
        config.dp_config().replace(noise_multiplier=1.0),
        target_epsilon=target_epsilon,
        rounds=1,
        accountant=accountant,
    )
    return config.replace(noise_multiplier=float(z))


def enforce_bounds(contributions: jax.Array, config: ReleaseConfig) -> tuple[jax.Array, jax.Array]:
    """Enforce the config's bounds on ``contributions[clients, d]``.

    Coordinate clamp to ``[-linf, linf]`` (if set), then scaling to L1 norm at
    most ``l1`` (if set), then to L2 norm at most ``l2_bound``. A contribution
    already within its bounds is returned unchanged (multiplied by exactly 1).
    Non-finite contributions stay non-finite (the sum rejects them).

    Returns:
      ``(bounded [clients, d], changed [clients] bool)``: whether a client's
      contribution was clamped or scaled.
    """
    x = jnp.asarray(contributions, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"contributions must be [clients, d], got shape {x.shape}")
    tiny = jnp.finfo(jnp.float32).tiny
    changed = jnp.zeros(x.shape[0], jnp.bool_)
    if config.linf_bound is not None:
        b = jnp.float32(config.linf_bound)
        changed = changed | jnp.any(jnp.abs(x) > b, axis=1)
        x = jnp.clip(x, -b, b)
    if config.l1_bound is not None:
        n1 = jnp.sum(jnp.abs(x), axis=1)
        f = jnp.minimum(1.0, jnp.float32(config.l1_bound) / jnp.maximum(n1, tiny))
        changed = changed | (f < 1.0)
        x = x * f[:, None]
    if math.isfinite(config.l2_bound):
        n2 = jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
        f = jnp.minimum(1.0, jnp.float32(config.l2_bound) / jnp.maximum(n2, tiny))
        changed = changed | (f < 1.0)
        x = x * f[:, None]
    return x, changed


def noised_sum(
    contributions: jax.Array,
    client_mask: jax.Array,
    config: ReleaseConfig,
    key: jax.Array,
    *,
    sum: Aggregator | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Release the sum of precomputed contributions ``[clients, d]`` (bounds enforced, noise once).

    Unit of privacy: one client; neighbouring relation: add/remove one client;
    sensitivity ``config.l2_bound``. Jittable (``config`` and ``sum`` static).

    Args:
      contributions: ``[clients, d]`` float, one row per client.
      client_mask: ``[clients]`` bool; False rows are padding and contribute
        exactly zero.
      config: the bounds and the noise.
      key: typed PRNG key. The sum gets ``key`` (a secure sum derives its
        ``"masks"`` and ``"rounding"`` streams from it), the noise
        ``fljax.random.stream(key, "noise")``.
      sum: a sum aggregator (default :func:`fljax.aggregators.weighted_sum`).

    Returns:
      ``(value [d] float32, metrics)`` with metrics ``num_clients`` (clients
      summed), ``num_nonfinite`` (rejected), ``num_clipped`` (contributions
      the bounds changed), ``noise_std`` and ``sensitivity``, plus the sum's
      other metrics (e.g. ``num_range_clipped``, ``aborted`` of a secure sum).
    """
    inner = aggregators.weighted_sum() if sum is None else sum
    mask = jnp.asarray(client_mask, jnp.bool_)
    x = jnp.asarray(contributions, jnp.float32)
    if mask.ndim != 1 or x.ndim != 2 or mask.shape[0] != x.shape[0]:
        raise ValueError(
            f"contributions must be [clients, d] and client_mask [clients], got {x.shape} and {mask.shape}"
        )
    bounded, changed = enforce_bounds(x, config)
    weights, num_nonfinite = aggregators.sanitize(bounded, mask.astype(jnp.float32))
    kept = weights > 0
    bounded = jnp.where(kept[:, None], bounded, jnp.zeros((), jnp.float32))
    template = jnp.zeros(x.shape[1:], jnp.float32)
    _, total, sum_metrics = inner.aggregate(inner.init(template), bounded, weights, key)
    if config.noise_multiplier > 0:
        total = total + gaussian_noise(total, config.noise_std, fl_random.stream(key, "noise"))
    metrics = dict(sum_metrics)
    metrics.update(
        num_clients=jnp.sum(kept).astype(jnp.int32),
        num_nonfinite=num_nonfinite,
        num_clipped=jnp.sum(changed & kept).astype(jnp.int32),
        noise_std=jnp.float32(config.noise_std),
        sensitivity=jnp.float32(config.sensitivity),
    )
    return total, metrics


def release(
    contribution_fn: Callable[[Any], jax.Array],
    client_data: Any,
    client_mask: jax.Array,
    config: ReleaseConfig,
    key: jax.Array,
    *,
    sum: Aggregator | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Release ``sum_i contribution_fn(client_data[i])`` with the config's bounds and noise.

    ``contribution_fn(one_client_data) -> [d]`` is written for ONE client and
    vmapped over the leading ``[clients]`` axis of every leaf of
    ``client_data``; then :func:`noised_sum`. Unit of privacy: one client;
    neighbouring relation: add/remove one client; sensitivity
    ``config.l2_bound`` (enforced, whatever ``contribution_fn`` returns).

    Args:
      contribution_fn: one client's data -> its contribution vector ``[d]``.
      client_data: a pytree whose leaves have a leading ``[clients]`` axis.
      client_mask: ``[clients]`` bool, False for padding slots.
      config: the bounds and the noise.
      key: typed PRNG key (see :func:`noised_sum`).
      sum: a sum aggregator (default :func:`fljax.aggregators.weighted_sum`).

    Returns:
      ``(value [d] float32, metrics)`` as :func:`noised_sum`.
    """
    contributions = jax.vmap(contribution_fn)(client_data)
    contributions = jnp.asarray(contributions, jnp.float32)
    if contributions.ndim == 1:
        contributions = contributions[:, None]
    return noised_sum(contributions, client_mask, config, key, sum=sum)


def host_noise(shape: tuple[int, ...], config: ReleaseConfig, key: jax.Array) -> np.ndarray:
    """Host-side float64 Gaussian noise of std ``config.noise_std``, for sums computed in numpy.

    For statistics summed on the host in float64 (e.g.
    :func:`fljax.analytics.profiling.private_scaler`, which must equal
    :func:`fljax.data.standardize.fit` exactly without noise): the caller
    enforces the same bound, and the noise comes from the ``"noise"`` stream of
    ``key`` (:func:`fljax.random.host_rng`). Zeros when ``noise_multiplier=0``.
    """
    if config.noise_multiplier == 0:
        return np.zeros(shape, np.float64)
    rng = fl_random.host_rng(fl_random.stream(key, "noise"))
    return rng.normal(0.0, config.noise_std, size=shape)


def distributed_sum(dd_config, masking=None) -> Aggregator:
    """The distributed discrete Gaussian (:func:`fljax.privacy.distributed_dp`) as a noised SUM.

    ``distributed_dp`` clips each client to ``dd_config.clip_norm``, adds the
    clients' integer noise before a modular secure sum and divides by the fixed
    ``cohort_size``; this multiplies back by ``cohort_size``, giving the noised
    sum. Use it in a release with ``noise_multiplier=0`` (the noise is already
    there; do not add it twice), ``population_size = cohort_size =
    dd_config.cohort_size``, ``l2_bound <= dd_config.clip_norm``, and account it
    with :func:`fljax.privacy.distributed.epsilon` (``dd_config``, 1 round) or
    :meth:`fljax.analytics.budget.BudgetLedger.spend` of its RDP curve.
    Weights are uniform (1 per client), padding contributes zero.

    Args:
      dd_config: a :class:`fljax.privacy.DistributedDPConfig` with ``dim`` the
        contribution length.
      masking: the secure-aggregation masking (default: the distributed DP default).
    """
    from fljax.privacy import distributed

    agg = (
        distributed.distributed_dp(dd_config)
        if masking is None
        else distributed.distributed_dp(dd_config, masking)
    )
    factor = float(dd_config.cohort_size)

    def aggregate(state, deltas, weights, key):
        state, mean, metrics = agg.aggregate(state, deltas, weights, key)
        return state, jax.tree.map(lambda m: m * jnp.asarray(factor, m.dtype), mean), metrics

    return Aggregator(agg.init, aggregate)
