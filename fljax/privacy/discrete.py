"""Integer building blocks of the distributed discrete Gaussian (JAX, jittable).

Three pieces that :mod:`fljax.privacy.distributed` chains into a mechanism:

1. :func:`hadamard`, :func:`rotate`, :func:`unrotate`: the randomized Hadamard
   rotation ``x -> H D x`` (``D`` a diagonal of random signs shared by all
   clients, ``H`` the normalised Walsh-Hadamard matrix of size ``2**k``, the
   vector zero-padded to that size). ``H D`` is orthogonal, so L2 norms are
   kept (up to float32 rounding, relative ``~k * 2**-24``), and it spreads a
   vector's mass evenly over the coordinates, which keeps the integer sum
   inside a small ring. ``H`` is symmetric and ``H H = I``, so the inverse is
   ``D H``. The transform is the fast one, ``O(d log d)``: ``k`` butterfly
   stages written as reshapes.
2. :func:`conditional_round`: randomized (unbiased stochastic) rounding to
   integers, repeated until the rounded vector's squared L2 norm is within the
   bound of Kairouz, Liu and Steinke 2021 (their Theorem 1 /
   :func:`fljax.privacy.distributed.rounded_l2_bound`), at most ``max_tries``
   times; if every try fails (probability at most ``beta ** max_tries``) the
   vector is rounded towards zero, whose norm never exceeds the input's, so
   the sensitivity bound holds on every path.
3. :func:`discrete_gaussian`: samples of ``N_Z(0, sigma^2)``, ``P(x) ∝
   exp(-x^2 / (2 sigma^2))`` on the integers, by the rejection sampler of
   Canonne, Kamath and Steinke 2020 (Algorithm 3): with ``t = floor(sigma) +
   1``, propose ``Y`` from the discrete Laplace ``P(y) ∝ exp(-|y| / t)`` (a
   difference of two geometric variables, each ``floor(t E)`` with ``E``
   standard exponential) and accept with probability ``exp(-(|Y| -
   sigma^2/t)^2 / (2 sigma^2))``. Vectorised in one pass: :func:`proposal_count`
   i.i.d. proposals are drawn at once and the first accepted ones, in proposal
   order, fill the output (which proposals are kept depends only on the
   acceptance pattern, so the kept values are i.i.d. ``N_Z(0, sigma^2)``). The
   count is chosen by a Chernoff bound so that fewer proposals than needed are
   accepted with probability at most ``2**-64`` per call; the missing
   coordinates then fall back to ``round(sigma * N(0, 1))``. About ``1/p``
   (1.4-1.6) proposals per coordinate, against the ~15 rounds a loop over
   every coordinate until the last one accepts needs for a 65,536-coordinate
   update. The arithmetic is float32 (not the
   exact rational arithmetic of the paper): the proposal's geometric
   variables are exact to float32 resolution, which for ``sigma`` up to
   ``~1e5`` changes the pmf far below what any test detects.

``jax.random`` is not a cryptographic generator: these samplers reproduce the
mechanism in simulation; noise meant to protect real data needs a secret
source (see ``docs/privacy.md``).

References:
  Canonne, Kamath, Steinke. "The Discrete Gaussian for Differential Privacy".
  NeurIPS 2020.
  Kairouz, Liu, Steinke. "The Distributed Discrete Gaussian Mechanism for
  Federated Learning with Secure Aggregation". ICML 2021.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_FAILURE = 2.0**-64
"""Probability that one call of the discrete Gaussian sampler has too few accepted proposals."""


def padded_dim(dim: int) -> int:
    """The smallest power of two ``>= dim`` (the Hadamard transform's size)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def hadamard(x: jax.Array) -> jax.Array:
    """Normalised fast Walsh-Hadamard transform over the last axis (a power of two).

    Examples:
      >>> import jax.numpy as jnp
      >>> hadamard(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
      [0.5, 0.5, 0.5, 0.5]
      >>> [round(v, 5) for v in hadamard(hadamard(jnp.array([3.0, -1.0]))).tolist()]  # H H = I
      [3.0, -1.0]
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the last axis must be a power of two, got {d}")
    batch = x.shape[:-1]
    h = 1
    while h < d:
        y = x.reshape(batch + (d // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(batch + (d,))
        h *= 2
    return x * jnp.asarray(1.0 / math.sqrt(d), x.dtype)


def random_signs(key: jax.Array, size: int) -> jax.Array:
    """``[size]`` float32 of independent ``+1`` / ``-1`` (the diagonal ``D``)."""
    return jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0).astype(jnp.float32)


def rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
    """``H D [x, 0]``: zero-pad the last axis to ``signs.shape[0]``, flip signs, transform."""
    pad = signs.shape[0] - x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return hadamard(x * signs.reshape((1,) * (x.ndim - 1) + signs.shape))


def unrotate(y: jax.Array, signs: jax.Array, dim: int) -> jax.Array:
    """Inverse of :func:`rotate`: ``(D H y)[..., :dim]``."""
    return (hadamard(y) * signs.reshape((1,) * (y.ndim - 1) + signs.shape))[..., :dim]


def stochastic_round(y: jax.Array, key: jax.Array) -> jax.Array:
    """Unbiased randomized rounding of float32 ``y`` to int32: ``floor(y) + Bernoulli(frac(y))``."""
    lo = jnp.floor(y)
    u = jax.random.uniform(key, y.shape, jnp.float32)
    return (lo + (u < (y - lo)).astype(jnp.float32)).astype(jnp.int32)


def conditional_round(
    y: jax.Array, bound_sq: float, key: jax.Array, max_tries: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Round ONE vector ``y[dim]`` until ``||round(y)||^2 <= bound_sq`` (the caller vmaps).

    Try ``i`` uses ``fold_in(key, i)``. The check is done on the integers
    (their squares summed in float32; ``bound_sq`` should already include a
    small margin for that sum's rounding, see
    :func:`fljax.privacy.distributed.rounded_l2_bound`).

    Returns:
      ``(q[dim] int32, tries int32, fell_back bool)``: after ``max_tries``
      failures ``q`` is ``y`` rounded towards zero (``||q|| <= ||y||``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> q, tries, fell_back = conditional_round(jnp.array([0.5, -1.5]), 10.0, jax.random.key(0), 4)
      >>> int(tries), bool(fell_back), bool(jnp.all(jnp.abs(q.astype(jnp.float32) - jnp.array([0.5, -1.5])) < 1))
      (1, False, True)
    """
    limit = jnp.float32(bound_sq)

    def attempt(i):
        q = stochastic_round(y, jax.random.fold_in(key, i))
        qf = q.astype(jnp.float32)
        return q, jnp.sum(qf * qf) <= limit

    def cond(carry):
        i, _, ok = carry
        return (~ok) & (i < max_tries)

    def body(carry):
        i, _, _ = carry
        q, ok = attempt(i)
        return i + 1, q, ok

    init = (jnp.zeros((), jnp.int32), jnp.zeros(y.shape, jnp.int32), jnp.zeros((), jnp.bool_))
    tries, q, ok = jax.lax.while_loop(cond, body, init)
    q = jnp.where(ok, q, jnp.trunc(y).astype(jnp.int32))
    return q, tries, ~ok


def acceptance_probability(sigma: float) -> float:
    """Probability that one proposal of :func:`discrete_gaussian`'s sampler is accepted.

    Computed on the host from the exact pmfs (sums over ``|y| <= 60 t``):
    ``sum_y DLap_t(y) exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``.

    Examples:
      >>> 0.5 < acceptance_probability(1.0) < 1 and 0.5 < acceptance_probability(1000.0) < 1
      True
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    t = math.floor(sigma) + 1
    y = np.arange(-60 * t, 60 * t + 1, dtype=np.float64)
    lap = np.exp(-np.abs(y) / t)
    lap /= lap.sum()
    s2 = sigma * sigma
    return float(np.sum(lap * np.exp(-((np.abs(y) - s2 / t) ** 2) / (2 * s2))))


def proposal_count(size: int, sigma: float) -> int:
    """Proposals :func:`discrete_gaussian` draws for ``size`` samples: the smallest ``M`` whose
    expected accepted count ``mu = M p`` satisfies the Chernoff bound ``P(Binomial(M, p) < size)
    <= exp(-(mu - size)^2 / (2 mu)) <= MAX_FAILURE``, i.e. ``mu >= size + L + sqrt(L^2 + 2 L size)``
    with ``L = ln(1 / MAX_FAILURE)``.

    Examples:
      >>> 65_536 < proposal_count(65_536, 30.0) < 2 * 65_536
      True
    """
    p = acceptance_probability(sigma)
    log_inv = -math.log(MAX_FAILURE)
    mu = size + log_inv + math.sqrt(log_inv * log_inv + 2.0 * log_inv * size)
    return math.ceil(mu / p) + 1


def discrete_gaussian(key: jax.Array, shape: tuple[int, ...], sigma: float) -> jax.Array:
    """``int32`` samples of the discrete Gaussian ``N_Z(0, sigma^2)`` (static ``sigma >= 0``).

    Canonne-Kamath-Steinke rejection sampling through a discrete Laplace
    proposal, vectorised in one pass of :func:`proposal_count` proposals (see
    the module docstring for its ``2**-64`` failure probability per call and
    the fallback). ``sigma = 0`` gives zeros.

    Examples:
      >>> import jax
      >>> x = discrete_gaussian(jax.random.key(0), (10_000,), 3.0)
      >>> str(x.dtype), abs(float(x.astype("float32").std()) - 3.0) < 0.1
      ('int32', True)
    """
    if sigma == 0:
        return jnp.zeros(shape, jnp.int32)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    t = math.floor(sigma) + 1
    s2 = float(sigma) ** 2
    size = math.prod(shape)
    m = proposal_count(size, sigma)
    tf, centre, denom = jnp.float32(t), jnp.float32(s2 / t), jnp.float32(2.0 * s2)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    g1 = jnp.floor(tf * jax.random.exponential(k1, (m,), jnp.float32))
    g2 = jnp.floor(tf * jax.random.exponential(k2, (m,), jnp.float32))
    y = g1 - g2
    u = jax.random.uniform(k3, (m,), jnp.float32)
    accept = u < jnp.exp(-jnp.square(jnp.abs(y) - centre) / denom)
    # The i-th accepted proposal (in proposal order) becomes coordinate i.
    position = jnp.cumsum(accept.astype(jnp.int32)) - 1
    slot = jnp.where(accept & (position < size), position, size)
    out = jnp.zeros((size,), jnp.int32).at[slot].set(y.astype(jnp.int32), mode="drop")
    filled = jnp.arange(size, dtype=jnp.int32) < jnp.sum(accept.astype(jnp.int32))
    fallback = jnp.round(jnp.float32(sigma) * jax.random.normal(k4, (size,), jnp.float32))
    return jnp.where(filled, out, fallback.astype(jnp.int32)).reshape(shape)
