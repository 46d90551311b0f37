"""Client-level DP aggregation: DP-FedAvg's clipped, noised sum, with adaptive clipping.

:func:`dp` turns a :class:`~fljax.privacy.config.DPConfig` and any inner sum
(plain, or secure aggregation: ``dp(cfg, sum=secagg.secure_sum(sa))``) into an
:class:`~fljax.base.Aggregator`; :func:`fljax.privacy.accounting.dp_event` turns
the SAME config into the accounting event, so noise and epsilon cannot drift.

Unit of privacy: one client. Neighbouring relation: add/remove one client
(Poisson sampling) or replace one client (fixed-size sampling). Sensitivity of
the noised sum: ``C`` (add/remove) or ``2C`` (replace-one), where ``C`` is the
clip norm of the round, because every client's contribution is its update
clipped to L2 norm ``C`` times a weight in ``[0, 1]``.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models". ICLR 2018 (DP-FedAvg).
  Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with
  Adaptive Clipping". NeurIPS 2021.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax import aggregators, tree
from fljax import random as fl_random
from fljax.base import Aggregator, Params, PyTree
from fljax.data import sampling
from fljax.privacy.config import DPConfig


class DPState(NamedTuple):
    """State of :func:`dp`.

    Attributes:
      clip_norm: ``[]`` float32, the clip norm the next round uses (constant
        unless adaptive clipping is on).
      sum_state: the inner sum's state (``EmptyState()`` for the plain and
        secure sums).
    """

    clip_norm: jax.Array
    sum_state: PyTree


def bounded_weights(weights: jax.Array, config: DPConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-client weights in ``[0, 1]`` and which clients are valid.

    A client takes part if its weight is non-zero. Uniform weighting gives each
    participant 1; capped weighting ``min(w, max_weight) / max_weight``. A
    participant whose weight is NaN, inf or negative is treated as invalid
    (weight 0), like a non-finite update.

    Returns:
      ``(bounded [clients] float32, participating [clients] bool, valid_weight [clients] bool)``.
    """
    w = jnp.asarray(weights, jnp.float32)
    participating = w != 0
    valid = jnp.isfinite(w) & (w > 0)
    if config.weighting == "uniform":
        b = jnp.where(valid, 1.0, 0.0)
    else:
        cap = jnp.float32(config.max_weight)
        b = jnp.where(valid, jnp.minimum(w, cap) / cap, 0.0)
    return b.astype(jnp.float32), participating, valid


def gaussian_noise(template: Params, std: jax.Array | float, key: jax.Array) -> Params:
    """Independent ``N(0, std^2)`` noise shaped like ``template`` (one unbatched pytree)."""
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    noise = [
        jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) * jnp.asarray(std, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def dp(config: DPConfig, sum: Aggregator | None = None) -> Aggregator:
    """DP-FedAvg aggregation around any sum: clip, bounded weights, sum, Gaussian noise once, fixed denominator.

    Unit of privacy: one client. Neighbouring relation: add/remove one client
    (``config.sampling="poisson"``) or replace one (``"fixed"``). Sensitivity of
    the sum: ``C`` or ``2C`` (``config.sensitivity``; reported per round as
    ``dp_sensitivity``), where ``C`` is the round's clip norm.

    Round computation::

        b_i   = bounded weight in [0, 1] (config.weighting); 0 for padding and invalid clients
        u_i   = clip(delta_i, C) / C                      # in the unit L2 ball (C finite)
        s     = C * sum(u, b)                             # the inner sum, called once
        delta = (s + N(0, (z_delta * C * scale)^2 I)) / config.denominator

    with ``scale = config.noise_cohort_scale`` (1 unless a production noise
    cohort is simulated). The clip is one global-norm pass (``clip_scheme=
    "flat"``) or per leaf (``"per_layer"``, :func:`fljax.tree.clip_factors`).
    The noise key is ``fljax.random.stream(key, "noise")`` of the aggregate
    key; the inner sum gets the aggregate key itself (a secure sum derives its
    ``"masks"``, ``"rounding"`` and ``"dropout"`` streams from it). A client
    whose update contains NaN/inf or whose weight is non-finite/negative
    contributes exactly zero and is counted in ``num_nonfinite``; padding slots
    (weight 0) contribute exactly zero. With ``C = inf`` (no clipping, no
    noise) the updates are passed unscaled.

    The inner sum sees each update divided by ``C``, so every coordinate it
    sums lies in ``[-1, 1]`` and every weight in ``[0, 1]``, whatever ``C``
    (adaptive included). Over :func:`fljax.secagg.secure_sum` with
    ``SecAggConfig(clip_range=1.0, max_weight=1.0)`` (the defaults) nothing
    wraps and nothing is range-clipped (a coordinate can exceed 1 by one
    float32 ulp only for an update with a single non-zero coordinate). Error
    bound: with ``n`` contributing clients, each coordinate of ``delta`` is
    within::

        C * n * max_weight * (1 / scale + e_w) / config.denominator

    (plus float32 rounding) of DP over the plain sum with the same key, hence
    the same noise: ``scale`` is the encoding's (``2**frac_bits``) and
    ``e_w = 2**-(weight_bits + 1)`` the weight quantisation (``e_w = 0`` when
    every ``b_i`` is on the grid, e.g. uniform weighting). Simulated dropouts
    remove the dropped clients from the sum. With ``max_weight`` a power of two
    the quantised weights stay in ``[0, 1]``; the stochastic rounding can move
    one client's contribution by up to ``C * sqrt(d) * max_weight / scale`` in
    L2 norm (``d`` coordinates), which the accounting (sensitivity ``C``)
    ignores: keep ``sqrt(d) / 2**frac_bits`` negligible. The clipped count of
    adaptive clipping is computed here, in the clear, not through the sum.

    Adaptive clipping (``config.target_quantile`` set; Andrew et al. 2021): the
    centred clipped count ``sum_i (1[||delta_i|| <= C] - 1/2)`` over valid clients
    (sensitivity 1/2 under add/remove) is noised with std ``sigma_b * scale``,
    ``b = noised / cohort_size + 1/2`` estimates the unclipped fraction, and
    ``C <- C * exp(-eta_C * (b - gamma))``. The update noise uses
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so both queries together are
    accounted as one Gaussian with multiplier ``z``.

    Args:
      config: a :class:`DPConfig`.
      sum: the inner sum (default :func:`fljax.aggregators.weighted_sum`), e.g.
        :func:`fljax.secagg.secure_sum`.

    Returns:
      An :class:`~fljax.base.Aggregator` with state :class:`DPState`.
      Metrics: ``num_nonfinite``, ``num_clipped``, ``num_clients``,
      ``total_weight`` (sum of bounded weights), ``dp_clip_norm``,
      ``dp_noise_std`` (std on the sum), ``dp_sensitivity``,
      ``dp_simulated_noise_cohort`` (1 when the noise is a simulated production
      cohort's, else 0; ``num_clipped`` is the inner sum's own when it reports one, e.g.
      -1 from a deployment's sum, whose clients clip), with adaptive clipping ``dp_unclipped_fraction``
      (the noised estimate), and the inner sum's other metrics (e.g.
      ``num_dropped``, ``num_range_clipped``, ``aborted``).

    Examples:
      Without noise, the result is the sum of the clipped updates over the fixed
      denominator (``cohort_size``), whatever weight was observed:

      >>> import jax, jax.numpy as jnp, optax
      >>> from fljax import client, models, privacy, secagg
      >>> from fljax.algorithms import fedavg
      >>> params = {"w": jnp.zeros(2)}
      >>> deltas = {"w": jnp.array([[0.3, 0.4], [3.0, 4.0], [1.0, 1.0]])}  # norms 0.5, 5, 1.41
      >>> weights = jnp.array([10.0, 20.0, 0.0])  # uniform weighting: 1 per client; 0 is padding
      >>> cfg = privacy.DPConfig(clip_norm=1.0, noise_multiplier=0.0, population_size=100, cohort_size=2)
      >>> agg = privacy.dp(cfg)
      >>> _, delta, metrics = agg.aggregate(agg.init(params), deltas, weights, jax.random.key(0))
      >>> [round(float(v), 4) for v in delta["w"]]  # ([0.3, 0.4] + [0.6, 0.8]) / 2
      [0.45, 0.6]
      >>> int(metrics["num_clipped"])
      1

      With noise, as FedAvg's aggregator, over the plain or a secure sum:

      >>> cfg = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=1000, cohort_size=100)
      >>> client_update = client.local_sgd(models.LogisticRegression(), optax.sgd(0.1), batch_size=8)
      >>> algo = fedavg.fedavg(client_update, aggregator=privacy.dp(cfg))
      >>> secure_sum = secagg.secure_sum(secagg.SecAggConfig())
      >>> algo = fedavg.fedavg(client_update, aggregator=privacy.dp(cfg, sum=secure_sum))
    """
    inner = aggregators.weighted_sum() if sum is None else sum
    per_leaf = config.clip_scheme == "per_layer"
    unit_ball = math.isfinite(config.clip_norm)
    denom = config.denominator
    rel_std = config.relative_noise_std
    noisy = config.noise_multiplier > 0
    sens_factor = config.sensitivity / config.clip_norm if unit_ball else 1.0
    count_std = config.count_stddev * config.noise_cohort_scale
    simulated = jnp.int32(config.noise_cohort_size is not None)

    def init(params: Params) -> DPState:
        return DPState(clip_norm=jnp.asarray(config.clip_norm, jnp.float32), sum_state=inner.init(params))

    def aggregate(state: DPState, deltas: Params, weights: jax.Array, key: jax.Array):
        c = state.clip_norm
        b, participating, valid_weight = bounded_weights(weights, config)
        valid = valid_weight & tree.is_finite(deltas)
        num_nonfinite = jnp.sum(participating & ~valid).astype(jnp.int32)
        b = jnp.where(valid, b, 0.0)
        factors, norms = tree.clip_factors(deltas, c, per_leaf=per_leaf)
        clipped = valid & functools.reduce(jnp.logical_or, [f < 1.0 for f in jax.tree.leaves(factors)])
        if unit_ball:
            factors = jax.tree.map(lambda f: f / c, factors)
        sum_state, total, sum_metrics = inner.aggregate(state.sum_state, tree.scale(deltas, factors), b, key)
        if unit_ball:
            total = jax.tree.map(lambda s: s * c.astype(s.dtype), total)

        noise_std = jnp.zeros((), jnp.float32)
        metrics = dict(sum_metrics)
        new_c = c
        if noisy or config.adaptive:
            noise_keys = jax.random.split(fl_random.stream(key, "noise"), 2)
        if noisy:
            noise_std = jnp.float32(rel_std) * c
            noise = gaussian_noise(total, noise_std, noise_keys[0])
            total = jax.tree.map(lambda s, n: s + n, total, noise)
        if config.adaptive:
            centred = jnp.where(valid, (norms <= c).astype(jnp.float32) - 0.5, 0.0)
            count = jnp.sum(centred)
            if noisy:
                count = count + jnp.float32(count_std) * jax.random.normal(noise_keys[1], (), jnp.float32)
            unclipped = count / jnp.float32(config.cohort_size) + 0.5
            new_c = c * jnp.exp(
                -jnp.float32(config.clip_learning_rate) * (unclipped - config.target_quantile)
            )
            metrics["dp_unclipped_fraction"] = unclipped
        delta = jax.tree.map(lambda s: s / jnp.asarray(denom, s.dtype), total)
        metrics.update(
            num_nonfinite=num_nonfinite,
            num_clipped=sum_metrics.get("num_clipped", jnp.sum(clipped).astype(jnp.int32)),
            num_clients=jnp.sum(valid).astype(jnp.int32),
            total_weight=jnp.sum(b),
            dp_clip_norm=c,
            dp_noise_std=noise_std,
            dp_sensitivity=c * jnp.float32(sens_factor),
            dp_simulated_noise_cohort=simulated,
        )
        return DPState(clip_norm=new_c.astype(jnp.float32), sum_state=sum_state), delta, metrics

    return Aggregator(init, aggregate)


def sample_cohort(
    config: DPConfig, key: jax.Array, *, max_cohort: int | None = None, num_clients: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a round's cohort the way ``config`` is accounted (host side).

    Poisson: each of ``population_size`` clients joins with probability
    ``cohort_size / population_size`` (padded to a fixed capacity, see
    :func:`fljax.data.sampling.poisson`). Fixed: ``cohort_size`` distinct clients
    uniformly.

    With a simulated noise cohort (``noise_cohort_size``), ``population_size`` is the
    PRODUCTION population and the simulated one is smaller: pass its size as ``num_clients``;
    the simulated cohort (``cohort_size``) is then drawn from those clients the same way
    (Poisson rate ``cohort_size / num_clients``), while the accounting is the production
    cohort's.

    Returns:
      ``(client_ids, client_mask)`` for :meth:`fljax.data.FederatedData.cohort`.
    """
    n = config.population_size if num_clients is None else int(num_clients)
    if n != config.population_size and config.noise_cohort_size is None:
        raise ValueError(
            f"num_clients={n} differs from population_size={config.population_size}: the "
            "accounting assumes sampling from the whole population (only a simulated noise cohort "
            "samples a smaller simulated population)"
        )
    if not 0 < config.cohort_size <= n:
        raise ValueError(f"cohort_size={config.cohort_size} must be in [1, num_clients={n}]")
    if config.sampling == "poisson":
        return sampling.poisson(key, n, config.cohort_size / n, max_cohort)
    return sampling.uniform(key, n, config.cohort_size)
