"""The Skellam mechanism's noise and its RDP bound (sampler: JAX, jittable; bound: host, numpy).

The symmetric Skellam distribution of variance ``v`` is the law of ``P1 - P2``,
``P1, P2`` independent Poisson of mean ``v / 2``: integer, symmetric, and closed
under summation *exactly* (the sum of independent Skellam variables of
variances ``v_i`` is Skellam of variance ``sum_i v_i``), unlike the discrete
Gaussian. So when each of ``m`` clients adds Skellam noise of variance ``s^2``
in every coordinate, the noise on the secure sum is exactly Skellam of
variance ``mu = m s^2`` and the accounting needs no correction for the sum
(no ``tau``). :mod:`fljax.privacy.distributed` chains it with the rotation and
the conditional rounding of :mod:`fljax.privacy.discrete` when
``DistributedDPConfig.mechanism == "skellam"`` (Agarwal, Kairouz, Liu 2021).

Sampler (:func:`skellam`): ``jax.random.poisson`` computes in float32 (it casts
the mean to float32 and evaluates ``-lam + k log(lam) - lgamma(k + 1)``, a
difference of numbers of size ``lam log(lam)``), and measurably departs from
the Poisson pmf from a mean of about ``1e5`` (a chi-square test on 400 000 draws
rejects it at ``1e5``, ``1e6`` and ``8e6``), while the distributed mechanism's
means are ``(z C / gamma)^2 / (2 m)``, often ``1e4``-``1e8``; with int32 outputs
it also overflows past ``2**31``. :func:`skellam` therefore draws each Poisson
*centred*: with ``n0 = floor(lam)`` and ``f = lam - n0`` computed on the host
in float64, it samples the offset ``j = k - n0`` by Hormann's transformed
rejection (PTRS, the algorithm ``jax.random.poisson``, NumPy and TensorFlow
use for ``lam >= 10``) and evaluates the acceptance test through the saddle
point form of the log pmf (Loader 2000), ``log p(k) = -log(2 pi k)/2 -
stirlerr(k) - lam * g((k - lam)/lam)`` with ``g(e) = (1 + e) log(1 + e) - e``
summed as a series near 0: every float32 quantity stays of size
``O(sqrt(lam))`` or ``O(1)``, so the test is accurate whatever ``lam``. The
offsets of the two Poissons are subtracted, ``n0`` cancels, and the result
never overflows. Means below 10 use ``jax.random.poisson`` itself (Knuth's
product of uniforms, accurate there). PTRS accepts a proposal with
probability 0.75 at a mean of 10, rising to 0.89 for large means (measured);
the loop runs until every coordinate has accepted, at most
:data:`PTRS_ROUNDS` rounds (unaccepted with probability about ``0.25**64 =
2**-128``), after which a coordinate falls back to the rounded normal
approximation.

RDP (:func:`rdp`): for the sum ``x + Sk(mu)`` in ``d`` coordinates and
neighbouring integer vectors differing by ``Delta`` with ``||Delta||_2 <=
Delta_2`` and ``||Delta||_1 <= Delta_1``, at every integer order ``alpha >=
2``::

    eps(alpha) <= alpha Delta_2^2 / (2 mu)
                  + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),  3 Delta_1 / (2 mu) )

(Agarwal, Kairouz, Liu 2021, the multi-dimensional Skellam mechanism's bound,
summed over coordinates from their bound on the Renyi divergence of two
shifted Skellam distributions; the same formula as the authors' reference
accounting, google-research/federated ``distributed_dp/accounting_utils.py``,
``_skellam_rdp``, there written in the update's units with the scale ``s =
1/gamma``: ``mu`` its ``central_var s^2``, ``Delta`` its sensitivities times
``s``). The first term is the Gaussian's ``alpha Delta_2^2 / (2 sigma^2)``
at the same variance, the rest vanishes as ``mu`` grows: at large noise the
Skellam mechanism costs what the continuous Gaussian costs. Only integer
orders are used, as in the reference code.

``jax.random`` is not a cryptographic generator: the sampler reproduces the
mechanism in simulation; noise meant to protect real data needs a secret
source (see ``docs/privacy.md``).

References:
  Agarwal, Kairouz, Liu. "The Skellam Mechanism for Differentially Private
  Federated Learning". NeurIPS 2021 (arXiv:2110.04995).
  Hormann. "The transformed rejection method for generating Poisson random
  variables". Insurance: Mathematics and Economics 12, 1993.
  Loader. "Fast and Accurate Computation of Binomial Probabilities". 2000.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

PTRS_ROUNDS = 64
"""Rounds of the vectorised PTRS loop (acceptance about 0.75 per round or more: unaccepted
with probability about ``0.25**64 = 2**-128``)."""

KNUTH_BELOW = 10.0
"""Poisson means below this use ``jax.random.poisson`` (Knuth's method), the rest centred PTRS."""

_SERIES_TERMS = 16  # of g(e) = sum_{n>=2} (-1)^n e^n / (n (n - 1)) for |e| <= 1/4
_STIRLING_FROM = 64.0  # k at which log p(k) switches from lgamma to the saddle point form


def _g(e: jax.Array) -> jax.Array:
    """``(1 + e) log(1 + e) - e`` without cancellation near ``e = 0`` (float32)."""
    small = jnp.abs(e) <= 0.25
    es = jnp.where(small, e, jnp.zeros((), e.dtype))
    acc = jnp.zeros_like(e)
    for n in range(_SERIES_TERMS + 1, 1, -1):  # Horner: e^2 * sum_n (-e)^(n-2) / (n (n - 1))
        acc = acc * -es + jnp.float32(1.0 / (n * (n - 1)))
    series = es * es * acc
    el = jnp.where(small, jnp.zeros((), e.dtype), e)
    direct = (1.0 + el) * jnp.log1p(el) - el
    return jnp.where(small, series, direct)


def _log_pmf(j: jax.Array, n0: int, f: float, lam: float) -> jax.Array:
    """``log P(Poisson(lam) = n0 + j)`` for integer-valued float32 ``j`` with ``n0 + j >= 0``."""
    k = jnp.float32(n0) + j  # approximate for huge n0: only used where relative precision suffices
    # small k (only reachable when lam is small): the direct formula is accurate
    ks = jnp.minimum(k, jnp.float32(_STIRLING_FROM))
    direct = -jnp.float32(lam) + ks * jnp.float32(math.log(lam)) - jax.lax.lgamma(ks + 1.0)
    # large k: -log(2 pi k)/2 - stirlerr(k) - lam g((k - lam) / lam), k - lam = j - f exactly
    kl = jnp.maximum(k, jnp.float32(_STIRLING_FROM))
    inv = 1.0 / kl
    stirlerr = inv * (1.0 / 12.0 - inv * inv * (1.0 / 360.0 - inv * inv / 1260.0))
    e = (j - jnp.float32(f)) / jnp.float32(lam)
    saddle = -0.5 * jnp.log(jnp.float32(2.0 * math.pi) * kl) - stirlerr - jnp.float32(lam) * _g(e)
    return jnp.where(k < _STIRLING_FROM, direct, saddle)


def poisson_offset(key: jax.Array, shape: tuple[int, ...], lam: float) -> jax.Array:
    """``int32`` samples of ``Poisson(lam) - floor(lam)`` (static ``lam >= KNUTH_BELOW``).

    Hormann's PTRS with the proposal and the acceptance test written around
    ``floor(lam)`` (see the module docstring), vectorised: round ``i`` draws
    from ``fold_in(key, i)``; after :data:`PTRS_ROUNDS` rounds an unaccepted
    coordinate takes ``round(sqrt(lam) N(0, 1) + f)``.

    Examples:
      >>> import jax
      >>> x = poisson_offset(jax.random.key(0), (20_000,), 1e9 + 0.5)
      >>> str(x.dtype), abs(float(x.astype("float32").mean()) - 0.5) < 1000, 3e4 < float(x.astype("float32").std()) < 3.3e4
      ('int32', True, True)
    """
    if not (lam >= KNUTH_BELOW and math.isfinite(lam)):
        raise ValueError(f"lam must be finite and >= {KNUTH_BELOW}, got {lam}")
    n0 = math.floor(lam)
    f = lam - n0
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2.0)

    def cond(carry):
        i, _, done = carry
        return (i < PTRS_ROUNDS) & ~jnp.all(done)

    def body(carry):
        i, out, done = carry
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        u = jax.random.uniform(k1, shape, jnp.float32) - 0.5
        v = jax.random.uniform(k2, shape, jnp.float32)
        us = 0.5 - jnp.abs(u)
        j = jnp.floor((2.0 * jnp.float32(a) / us + jnp.float32(b)) * u + jnp.float32(f + 0.43))
        quick = (us >= 0.07) & (v <= jnp.float32(v_r))
        reject = (j < jnp.float32(-n0)) | ((us < 0.013) & (v > us))
        s = jnp.log(v) + jnp.float32(log_inv_alpha) - jnp.log(jnp.float32(a) / (us * us) + jnp.float32(b))
        accept = quick | (~reject & (s <= _log_pmf(jnp.maximum(j, jnp.float32(-n0)), n0, f, lam)))
        out = jnp.where(accept & ~done, j.astype(jnp.int32), out)
        return i + 1, out, done | accept

    init = (jnp.zeros((), jnp.int32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.bool_))
    _, out, done = jax.lax.while_loop(cond, body, init)
    normal = jax.random.normal(jax.random.fold_in(key, PTRS_ROUNDS), shape, jnp.float32)
    fallback = jnp.round(jnp.float32(math.sqrt(lam)) * normal + jnp.float32(f))
    return jnp.where(done, out, fallback.astype(jnp.int32))


def skellam(key: jax.Array, shape: tuple[int, ...], variance: float) -> jax.Array:
    """``int32`` samples of the symmetric Skellam distribution of variance ``variance`` (static).

    ``Poisson(variance/2) - Poisson(variance/2)``, the two Poissons from
    ``split(key)``: below a mean of :data:`KNUTH_BELOW` through
    ``jax.random.poisson``, above through :func:`poisson_offset` (exact for
    any mean; see the module docstring). ``variance = 0`` gives zeros.

    Examples:
      >>> import jax
      >>> x = skellam(jax.random.key(0), (10_000,), 9.0)
      >>> str(x.dtype), abs(float(x.astype("float32").std()) - 3.0) < 0.1
      ('int32', True)
    """
    if variance == 0:
        return jnp.zeros(shape, jnp.int32)
    if not (variance > 0 and math.isfinite(variance)):
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    lam = variance / 2.0
    k1, k2 = jax.random.split(key)
    if lam < KNUTH_BELOW:
        p1 = jax.random.poisson(k1, lam, shape, jnp.int32)
        p2 = jax.random.poisson(k2, lam, shape, jnp.int32)
        return p1 - p2
    return poisson_offset(k1, shape, lam) - poisson_offset(k2, shape, lam)


def rdp(orders, *, l2: float, l1: float, mu: float) -> np.ndarray:
    """RDP of ``x + Sk(mu)`` (integer units) at integer ``orders >= 2`` (Agarwal et al. 2021).

    ``alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))``
    for sensitivities ``l2 = Delta_2`` and ``l1 = Delta_1`` in integer units
    and the total variance ``mu`` (see the module docstring).

    Examples:
      >>> [round(float(e), 6) for e in rdp([2, 4], l2=1.0, l1=1.0, mu=1e6)]  # ~ alpha / (2 mu)
      [1e-06, 2e-06]
    """
    a = np.asarray(orders, np.float64)
    if not np.all((a >= 2) & (a == np.floor(a))):
        raise ValueError("the Skellam bound is used at integer orders >= 2")
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if not (l2 >= 0 and l1 >= 0):
        raise ValueError(f"sensitivities must be >= 0, got l2={l2}, l1={l1}")
    correction = np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
    return a * l2 * l2 / (2 * mu) + correction
