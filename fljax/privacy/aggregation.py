"""Client-level DP aggregation: DP-FedAvg's clipped, noised sum, with adaptive clipping.

:func:`dp_aggregator` turns a :class:`~fljax.privacy.config.DPConfig` into an
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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax import random as fl_random
from fljax import tree
from fljax.base import Aggregator, Params, PyTree
from fljax.data import sampling
from fljax.privacy.config import DPConfig


class DPAggregatorState(NamedTuple):
    """State of :func:`dp_aggregator`.

    Attributes:
      clip_norm: ``[]`` float32, the clip norm the next round uses (constant
        unless adaptive clipping is on).
    """

    clip_norm: jax.Array


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


def clip_factors(deltas: Params, clip_norm: jax.Array, scheme: str) -> tuple[PyTree, jax.Array]:
    """Per-client (flat) or per-client-per-leaf (per-layer) clip factors, and the flat norms.

    ``"flat"``: one factor ``min(1, C / ||delta_i||)`` per client (one global-norm
    pass). ``"per_layer"``: leaf ``l`` of client ``i`` gets ``min(1, C_l /
    ||delta_i^l||)`` with ``C_l = C / sqrt(L)``, so the whole update has norm <= C.

    Returns:
      ``(factors, norms)``: factors is a ``[clients]`` array (flat) or a list of
      ``[clients]`` arrays, one per leaf (per-layer); norms are the unclipped
      whole-update norms ``[clients]``.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    leaves = jax.tree.leaves(deltas)
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves]
    norms = jnp.sqrt(sum(sq))
    c = jnp.asarray(clip_norm, jnp.float32)
    if scheme == "flat":
        return jnp.minimum(1.0, c / jnp.maximum(norms, tiny)), norms
    c_leaf = c / jnp.float32(math.sqrt(len(leaves)))
    return [jnp.minimum(1.0, c_leaf / jnp.maximum(jnp.sqrt(s), tiny)) for s in sq], norms


def gaussian_noise(template: Params, std: jax.Array | float, key: jax.Array) -> Params:
    """Independent ``N(0, std^2)`` noise shaped like ``template`` (one unbatched pytree)."""
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    noise = [
        jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) * jnp.asarray(std, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def dp_aggregator(config: DPConfig) -> Aggregator:
    """DP-FedAvg aggregation: clip, bounded-weight sum, Gaussian noise once, fixed denominator.

    Unit of privacy: one client. Neighbouring relation: add/remove one client
    (``config.sampling="poisson"``) or replace one (``"fixed"``). Sensitivity of
    the sum: ``C`` or ``2C`` (``config.sensitivity``; reported per round as
    ``dp_sensitivity``), where ``C`` is the round's clip norm.

    Round computation::

        b_i   = bounded weight in [0, 1] (config.weighting); 0 for padding and invalid clients
        s     = sum_i b_i * clip(delta_i, C)                      # one global-norm pass
        delta = (s + N(0, (z_delta * C * scale)^2 I)) / config.denominator

    with ``scale = config.noise_cohort_scale`` (1 unless a production noise
    cohort is simulated). The noise key is ``fljax.random.stream(key, "noise")``
    of the aggregate key. A client whose update contains NaN/inf or whose
    weight is non-finite/negative contributes exactly zero and is counted in
    ``num_nonfinite``; padding slots (weight 0) contribute exactly zero.

    Adaptive clipping (``config.target_quantile`` set; Andrew et al. 2021): the
    centred clipped count ``sum_i (1[||delta_i|| <= C] - 1/2)`` over valid clients
    (sensitivity 1/2 under add/remove) is noised with std ``sigma_b * scale``,
    ``b = noised / cohort_size + 1/2`` estimates the unclipped fraction, and
    ``C <- C * exp(-eta_C * (b - gamma))``. The update noise uses
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so both queries together are
    accounted as one Gaussian with multiplier ``z``.

    Args:
      config: a :class:`DPConfig`.

    Returns:
      An :class:`~fljax.base.Aggregator` with state :class:`DPAggregatorState`.
      Metrics: ``num_nonfinite``, ``num_clipped``, ``num_clients``,
      ``total_weight`` (sum of bounded weights), ``dp_clip_norm``,
      ``dp_noise_std`` (std on the sum), ``dp_sensitivity``,
      ``dp_simulated_noise_cohort`` (1 when the noise is a simulated production
      cohort's, else 0), and with adaptive clipping ``dp_unclipped_fraction``
      (the noised estimate).

    Examples:
      >>> cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=1000, cohort_size=100)
      >>> algo = fedavg.fedavg(client_update, aggregator=dp_aggregator(cfg))
    """
    denom = config.denominator
    rel_std = config.relative_noise_std
    noisy = config.noise_multiplier > 0
    sens_factor = config.sensitivity / config.clip_norm if math.isfinite(config.clip_norm) else 1.0
    count_std = config.count_stddev * config.noise_cohort_scale
    simulated = jnp.int32(config.noise_cohort_size is not None)

    def init(params: Params) -> DPAggregatorState:
        del params
        return DPAggregatorState(clip_norm=jnp.asarray(config.clip_norm, jnp.float32))

    def aggregate(state: DPAggregatorState, deltas: Params, weights: jax.Array, key: jax.Array):
        c = state.clip_norm
        b, participating, valid_weight = bounded_weights(weights, config)
        finite = tree.is_finite(deltas)
        valid = valid_weight & finite
        num_nonfinite = jnp.sum(participating & ~valid).astype(jnp.int32)
        b = jnp.where(valid, b, 0.0)
        factors, norms = clip_factors(deltas, c, config.clip_scheme)
        if config.clip_scheme == "flat":
            coef = jnp.where(valid, b * factors, 0.0)
            total = tree.weighted_sum(deltas, coef)
            clipped = valid & (norms > c)
        else:
            leaves, treedef = jax.tree.flatten(deltas)
            sums = [
                tree.weighted_sum(x, jnp.where(valid, b * f, 0.0))
                for x, f in zip(leaves, factors, strict=True)
            ]
            total = jax.tree.unflatten(treedef, sums)
            any_clipped = jnp.zeros(norms.shape, bool)
            for f in factors:
                any_clipped = any_clipped | (f < 1.0)
            clipped = valid & any_clipped

        noise_std = jnp.zeros((), jnp.float32)
        metrics = {}
        new_state = state
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
            new_state = DPAggregatorState(clip_norm=new_c.astype(jnp.float32))
            metrics["dp_unclipped_fraction"] = unclipped
        delta = jax.tree.map(lambda s: s / jnp.asarray(denom, s.dtype), total)
        metrics.update(
            num_nonfinite=num_nonfinite,
            num_clipped=jnp.sum(clipped).astype(jnp.int32),
            num_clients=jnp.sum(valid).astype(jnp.int32),
            total_weight=jnp.sum(b),
            dp_clip_norm=c,
            dp_noise_std=noise_std,
            dp_sensitivity=c * jnp.float32(sens_factor),
            dp_simulated_noise_cohort=simulated,
        )
        return new_state, delta, metrics

    return Aggregator(init, aggregate)


def sample_cohort(
    config: DPConfig, key: jax.Array, *, max_cohort: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a round's cohort the way ``config`` is accounted (host side).

    Poisson: each of ``population_size`` clients joins with probability
    ``cohort_size / population_size`` (padded to a fixed capacity, see
    :func:`fljax.data.sampling.poisson`). Fixed: ``cohort_size`` distinct clients
    uniformly. With a simulated noise cohort the simulated ``cohort_size`` is
    sampled (the accounting is the production cohort's).

    Returns:
      ``(client_ids, client_mask)`` for :meth:`fljax.data.FederatedData.cohort`.
    """
    if config.sampling == "poisson":
        q = config.cohort_size / config.population_size
        return sampling.poisson(key, config.population_size, q, max_cohort)
    return sampling.uniform(key, config.population_size, config.cohort_size)
