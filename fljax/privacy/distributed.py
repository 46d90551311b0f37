"""Distributed DP over secure aggregation: the distributed discrete Gaussian and Skellam.

Each client adds its share of integer noise to its own discretised update
before secure aggregation, so the server only ever sees the noised sum modulo
``2**bits`` (Kairouz, Liu, Steinke 2021; with ``mechanism="skellam"``, Skellam
noise, Agarwal, Kairouz, Liu 2021). One frozen
:class:`DistributedDPConfig` builds both the mechanism (:func:`distributed_dp`,
jitted) and its accounting (:func:`rdp`, :func:`epsilon`, host, plain numpy),
so noise and epsilon cannot drift apart.

Mechanism, per round, for client ``i`` with flattened update ``x_i`` (``d``
coordinates, padded with zeros to ``d' = 2**ceil(log2 d)``):

1. clip: ``x_i <- x_i * min(1, C' / ||x_i||)`` (``C' = (1 - 2**-16) C``, float32 slack,
   see :data:`ROUNDING_MARGIN`);
2. rotate: ``H D x_i`` (randomized Hadamard; signs ``D`` shared by all clients);
3. scale by ``1 / gamma`` (``gamma``: the granularity);
4. conditional randomized rounding to integers until ``||q_i|| <= Delta_2 /
   gamma`` (:func:`rounded_l2_bound`), at most ``max_rounding_tries`` tries,
   then rounding towards zero (:func:`fljax.privacy.discrete.conditional_round`);
5. add ``N_Z(0, s^2)`` noise in every coordinate, ``s = z C / (gamma sqrt(m))``
   (``m = min_clients``, default ``cohort_size``), so that ``m`` shares add up
   to about the continuous Gaussian's ``z C`` (:func:`fljax.privacy.discrete.discrete_gaussian`);
   or Skellam noise of variance ``s^2`` (``mechanism="skellam"``, :func:`fljax.privacy.skellam.skellam`);
6. reduce mod ``2**bits``; the ring sum over clients goes through the masking
   simulation of :func:`fljax.secagg.simulation.masked_ring_sum` (or a plain
   modular sum), or with ``protocol=True`` through the real protocol on the
   host (:func:`fljax.secagg.protocol.ring_sum_callback`), so the server sees
   only masked inputs and ``sum_i (q_i + noise_i) mod 2**bits``;
7. decode: centred representative in ``[-2**(bits-1), 2**(bits-1))``, times
   ``gamma``, inverse rotation, first ``d`` coordinates, divided by the fixed
   denominator ``cohort_size``.

Accounting (:func:`rdp`), following the paper: the sum of ``m`` independent
``N_Z(0, s^2)`` in ``d'`` dimensions, with the L2 sensitivity ``Delta_2`` of
one client's rounded vector (their Theorem 1, with ``c = C``: ``Delta_2^2 =
min(c^2 + gamma^2 d'/4 + sqrt(2 log(1/beta)) gamma (c + gamma sqrt(d')/2),
(c + gamma sqrt(d'))^2)``; the rounding slack) and ``Delta_1 <= Delta_2
min(sqrt(d'), Delta_2 / gamma)`` (on the integer grid ``|x| <= x^2``), satisfies
for every order ``alpha >= 1`` (their Proposition 14 / Eq. 17, with their bound
on sums of discrete Gaussians; the same formulas as the authors' reference
code, google-research/federated ``distributed_dp/accounting_utils.py``)::

    eps(alpha) = min( alpha/2 * l2^2 + tau d',
                      alpha/2 * (l2^2 + 2 l1 tau + tau^2 d'),
                      alpha/2 * (l2 + tau sqrt(d'))^2 )
    l2 = Delta_2 / (gamma sqrt(m) s),  l1 = Delta_1 / (gamma sqrt(m) s),
    tau = 10 * sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k / (k + 1)).

With ``mechanism="skellam"`` the summed noise is exactly Skellam of variance
``mu = m s^2`` (no ``tau``): :func:`fljax.privacy.skellam.rdp` at integer orders
with the same ``Delta_2`` and ``Delta_1`` in integer units (Agarwal et al. 2021).

The modular reduction is post-processing of the noised sum and costs no
privacy (the paper's treatment); it only costs accuracy when the true noised
sum leaves the ring, which :func:`distributed_dp` reports in simulation as
``dp_wrapped_coordinates``. ``gamma`` defaults to the paper's heuristic
(Section 4; :attr:`DistributedDPConfig.gamma_value`) that keeps ``k_stddevs``
standard deviations of the aggregate inside the ring. Rounds compose by adding
RDP; with ``amplification=True`` each round is amplified by Poisson sampling
of rate ``cohort_size / population_size`` through the general upper bound of
Zhu and Wang 2019 (Theorem 5, integer orders), as the paper's experiments do;
``amplification=False`` accounts every round at full cost (valid whatever the
sampling). Epsilon comes from the composed RDP with ``dp_accounting``'s
conversion (``rdp_privacy_accountant.compute_epsilon``), at
``config.target_delta``.

Unit of privacy: one client. Neighbouring relation: one client's update
replaced by zero (zero-out), with the noise shares of ``m`` clients present in
both neighbours, the relation of the paper's analysis; under Poisson sampling
this is the add/remove relation the amplification bound is applied to.
Sensitivity: ``Delta_2`` above (``>= C``).

What this is not: the noise and (without ``protocol=True``) the masks come
from ``jax.random`` (not a cryptographic generator) and every party lives in
one process: it reproduces the mechanism's arithmetic, accuracy and
accounting. The accounting assumes at least ``m`` clients' noise shares in the
sum; a round with fewer (Poisson sampling drew fewer clients, or some dropped
out after adding noise) is withheld: the aggregate is zero and ``aborted`` and
``dp_noise_shortfall`` are 1, so no sum is ever released with less noise than
accounted.

References:
  Kairouz, Liu, Steinke. "The Distributed Discrete Gaussian Mechanism for
  Federated Learning with Secure Aggregation". ICML 2021 (arXiv:2102.06387).
  Canonne, Kamath, Steinke. "The Discrete Gaussian for Differential Privacy".
  NeurIPS 2020.
  Agarwal, Kairouz, Liu. "The Skellam Mechanism for Differentially Private
  Federated Learning". NeurIPS 2021.
  Zhu, Wang. "Poisson Subsampled Renyi Differential Privacy". ICML 2019.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

from fljax import aggregators
from fljax import random as fl_random
from fljax.base import Aggregator, Params, PyTree
from fljax.privacy import discrete, skellam
from fljax.privacy.accounting import MechanismLedger
from fljax.privacy.config import default_delta
from fljax.secagg import encoding, simulation
from fljax.secagg import protocol as secagg_protocol
from fljax.secagg.config import SecAggConfig

DEFAULT_MASKING = SecAggConfig()
"""The default masking graph of :func:`distributed_dp`: the complete graph (Bonawitz et al. 2017)."""

MECHANISMS = ("discrete_gaussian", "skellam")
"""The noise of :attr:`DistributedDPConfig.mechanism`."""

SUBSAMPLED_ORDERS = tuple(range(2, 257))
"""Integer RDP orders of the subsampled bound (Zhu and Wang's Theorem 5 needs integers)."""

ROUNDING_MARGIN = 2.0**-16
"""Float32 slack. The clip is to ``(1 - ROUNDING_MARGIN) C``, so that the rotated vector's norm
(float32 Hadamard error, relative ``~log2(d') 2**-24``) stays below ``C`` and the rounding
fallback (towards zero) stays below ``Delta_2``; the rounding check accepts ``||q||^2 <=
(1 - ROUNDING_MARGIN) Delta_2^2`` (integer units), room for float32 rounding in the sum of
squares."""


POISSON_MARGIN = 3.0
"""Standard deviations of the Poisson cohort size below its mean at which the default
:attr:`DistributedDPConfig.num_shares` is set (a round with fewer clients is withheld)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedDPConfig:
    """Distributed discrete Gaussian or Skellam over secure aggregation (frozen, hashable).

    Unit of privacy: one client. Neighbouring relation: one client's update
    zeroed, noise shares of ``min_clients`` clients kept (add/remove under
    Poisson sampling). Sensitivity: :meth:`sensitivity` (the clip norm plus the
    rounding slack of Theorem 1 of Kairouz et al. 2021).

    Attributes:
      clip_norm: L2 clip norm ``C`` of one client's flattened update.
      noise_multiplier: ``z``: the ``m`` noise shares add up to a discrete
        noise of std about ``z C`` on the sum (each share ``z C / sqrt(m)``).
      dim: number of coordinates of the flattened update (the model's size);
        the aggregator checks it, the accounting uses its padded size.
      cohort_size: expected clients per round, the fixed denominator.
      population_size: clients in the population (sampling rate and delta).
      bits: ring bit width (2..32); the server sees sums mod ``2**bits``.
      gamma: granularity; ``None`` picks the paper's heuristic from ``bits``
        (:attr:`gamma_value`).
      beta: conditional rounding parameter in ``[0, 1)`` (paper default
        ``exp(-0.5)``); ``0`` disables the conditioning (looser ``Delta_2``).
      k_stddevs: standard deviations of the aggregate the heuristic ``gamma``
        keeps inside the ring.
      min_clients: ``m``, the number of noise shares the accounting counts; a
        round in which fewer than ``m`` clients' noised inputs reach the sum
        (Poisson sampling drew fewer, or some dropped out) is withheld (zero
        update, ``aborted``), never released with less noise than accounted.
        Default (:attr:`num_shares`): ``cohort_size`` without amplification;
        with Poisson sampling, :data:`POISSON_MARGIN` standard deviations below
        the expected cohort. With dropouts, set it below the expected survivors.
      max_rounding_tries: tries of the conditional rounding before rounding
        towards zero (probability at most ``beta ** max_rounding_tries``).
      amplification: account Poisson sampling at rate ``cohort_size /
        population_size`` (Zhu-Wang bound); False: no amplification.
      delta: target delta; default :func:`fljax.privacy.config.default_delta`.
      mechanism: the clients' integer noise, ``"discrete_gaussian"`` (Kairouz
        et al. 2021) or ``"skellam"`` (Agarwal et al. 2021; exactly closed
        under summation, accounted at integer orders only).
    """

    clip_norm: float
    noise_multiplier: float
    dim: int
    cohort_size: int
    population_size: int
    bits: int = 16
    gamma: float | None = None
    beta: float = math.exp(-0.5)
    k_stddevs: float = 4.0
    min_clients: int | None = None
    max_rounding_tries: int = 32
    amplification: bool = True
    delta: float | None = None
    mechanism: Literal["discrete_gaussian", "skellam"] = "discrete_gaussian"

    def __post_init__(self):
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be positive and finite, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not 0 < self.cohort_size <= self.population_size:
            raise ValueError(
                f"cohort_size must be in [1, population_size={self.population_size}], got {self.cohort_size}"
            )
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in 2..32, got {self.bits}")
        if self.gamma is not None and not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be positive and finite, got {self.gamma}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not self.k_stddevs > 0:
            raise ValueError(f"k_stddevs must be positive, got {self.k_stddevs}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.cohort_size:
            raise ValueError(
                f"min_clients must be in [1, cohort_size={self.cohort_size}], got {self.min_clients}"
            )
        if self.max_rounding_tries < 1:
            raise ValueError(f"max_rounding_tries must be >= 1, got {self.max_rounding_tries}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.rounded_l2_bound > 2**23:
            raise ValueError(
                f"C / gamma = {self.clip_norm / self.gamma_value:.4g} is too large for float32 rounding "
                "(the rounded norm must stay below 2**23); raise gamma or lower bits"
            )
        if self.mechanism == "discrete_gaussian" and self.noise_multiplier > 0 and self.local_sigma < 0.5:
            raise ValueError(
                f"each client's noise std s = {self.local_sigma:.4g} (integer units) must be >= 1/2 for "
                "the paper's bound; raise noise_multiplier or lower gamma (more bits)"
            )

    # --- the mechanism's parameters ------------------------------------------------
    @property
    def padded_dim(self) -> int:
        """``d'``: ``dim`` padded to a power of two (the Hadamard transform's size)."""
        return discrete.padded_dim(self.dim)

    @property
    def num_shares(self) -> int:
        """``m``: noise shares the accounting counts, and the fewest noised inputs a released
        round has. ``min_clients``; else ``cohort_size`` (fixed cohorts, ``amplification=False``);
        else, under Poisson sampling at rate ``q = cohort_size / population_size``,
        ``floor(n - k sqrt(n (1 - q)))`` with ``n = cohort_size`` and ``k =``
        :data:`POISSON_MARGIN` (at least 1): a round drawing fewer clients (probability about
        0.1%) is withheld, and each client's share is ``sqrt(n / m)`` times larger than an
        exact count would need."""
        if self.min_clients is not None:
            return self.min_clients
        if not self.amplification:
            return self.cohort_size
        n, q = self.cohort_size, self.cohort_size / self.population_size
        return max(1, math.floor(n - POISSON_MARGIN * math.sqrt(n * (1.0 - q))))

    @property
    def local_stddev(self) -> float:
        """One client's noise std in the update's units: ``z C / sqrt(m)``."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.num_shares)

    @property
    def gamma_value(self) -> float:
        """``gamma``: given, or the paper's heuristic for ``bits`` (Section 4.2/4.4).

        Chosen so that ``k = k_stddevs`` standard deviations of one aggregate
        coordinate fit in the ring: ``2**bits = 2 k sqrt(n^2 C^2 / d' + n
        (gamma^2 / 4 + sigma^2)) / gamma`` (``n = cohort_size``, ``sigma`` =
        :attr:`local_stddev`, every client aligned: the worst case), i.e.
        ``gamma = 2 k sqrt(n^2 C^2 / d' + n sigma^2) / sqrt(4**bits - n k^2)``.
        """
        if self.gamma is not None:
            return float(self.gamma)
        n, k = self.cohort_size, self.k_stddevs
        room = 4.0**self.bits - n * k * k
        if room <= 0:
            raise ValueError(f"bits={self.bits} cannot hold {n} clients' rounding at {k} standard deviations")
        var = n * n * self.clip_norm**2 / self.padded_dim + n * self.local_stddev**2
        return 2.0 * k * math.sqrt(var) / math.sqrt(room)

    @property
    def local_sigma(self) -> float:
        """``s``: one client's noise std in integer units, ``local_stddev / gamma``."""
        return self.local_stddev / self.gamma_value

    @property
    def rounded_l2_bound(self) -> float:
        """``Delta_2 / gamma``: bound on the rounded vector's L2 norm, in integer units.

        Kairouz et al. 2021, Theorem 1: with ``c = C / gamma``,
        ``min(c + sqrt(d'), sqrt(c^2 + d'/4 + sqrt(2 log(1/beta)) (c + sqrt(d')/2)))``
        (the second only when ``beta > 0``); randomized rounding exceeds the
        second with probability at most ``beta``, hence the conditioning.
        """
        c, d = self.clip_norm / self.gamma_value, self.padded_dim
        loose = c + math.sqrt(d)
        if self.beta == 0:
            return loose
        tight = c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
        return min(loose, math.sqrt(tight))

    @property
    def rounded_l1_bound(self) -> float:
        """``Delta_1 / gamma <= Delta_2/gamma * min(sqrt(d'), Delta_2/gamma)`` (integers: ``|x| <= x^2``)."""
        l2 = self.rounded_l2_bound
        return l2 * min(math.sqrt(self.padded_dim), l2)

    @property
    def tau(self) -> float:
        """``tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k / (k + 1))``: the sum's distance from a discrete Gaussian.

        ``0`` for Skellam noise (a sum of Skellam shares is exactly Skellam).
        """
        if self.noise_multiplier == 0:
            return math.inf
        if self.mechanism == "skellam":
            return 0.0
        k = np.arange(1, self.num_shares, dtype=np.float64)
        return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * self.local_sigma**2 * k / (k + 1))))

    # --- what the accounting uses --------------------------------------------------
    @property
    def unit_of_privacy(self) -> str:
        return "client"

    @property
    def neighboring_relation(self) -> str:
        return "add_or_remove_one" if self.amplification else "zero_out_one"

    @property
    def sensitivity(self) -> float:
        """``Delta_2``, in the update's units (``>= clip_norm``)."""
        return self.rounded_l2_bound * self.gamma_value

    @property
    def sampling_probability(self) -> float:
        return self.cohort_size / self.population_size if self.amplification else 1.0

    @property
    def target_delta(self) -> float:
        return float(self.delta) if self.delta is not None else default_delta(self.population_size)

    @property
    def denominator(self) -> float:
        return float(self.cohort_size)

    def replace(self, **changes) -> DistributedDPConfig:
        return dataclasses.replace(self, **changes)


# --- accounting (host) -----------------------------------------------------------------


def rdp(config: DistributedDPConfig, orders) -> np.ndarray:
    """RDP of ONE round without sampling at ``orders`` (Kairouz et al. 2021, Proposition 14;
    Skellam: Agarwal et al. 2021, :func:`fljax.privacy.skellam.rdp`, integer orders only).

    ``inf`` without noise. See the module docstring for the formulas.
    """
    a = np.asarray(orders, np.float64)
    if config.noise_multiplier == 0:
        return np.full(a.shape, np.inf)
    if config.mechanism == "skellam":
        mu = config.num_shares * config.local_sigma**2  # (z C / gamma)^2
        return skellam.rdp(a, l2=config.rounded_l2_bound, l1=config.rounded_l1_bound, mu=mu)
    total = config.gamma_value * math.sqrt(config.num_shares) * config.local_sigma  # = z C
    l2 = config.rounded_l2_bound * config.gamma_value / total
    l1 = config.rounded_l1_bound * config.gamma_value / total
    tau, d = config.tau, config.padded_dim
    t1 = a / 2 * l2**2 + tau * d
    t2 = a / 2 * (l2**2 + 2 * l1 * tau + tau**2 * d)
    t3 = a / 2 * (l2 + math.sqrt(d) * tau) ** 2
    return np.minimum(np.minimum(t1, t2), t3)


def poisson_subsampled_rdp(base_rdp, q: float, orders) -> np.ndarray:
    """Zhu and Wang 2019, Theorem 5: RDP of a Poisson-subsampled mechanism at integer orders.

    For a mechanism with RDP ``eps(l)`` at every integer ``l >= 2`` (``base_rdp(l_array)``) and
    sampling rate ``q``, at each integer ``alpha >= 2``::

        (alpha - 1) eps'(alpha) <= log( (1-q)^(alpha-1) (alpha q - q + 1)
                                         + C(alpha, 2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                                         + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} )

    and never more than ``eps(alpha)`` itself (sampling is post-processing of
    the unsampled mechanism on the sampled set). Vectorised with ``logsumexp``.
    """
    alphas = np.asarray(orders)
    if not np.all((alphas >= 2) & (alphas == np.floor(alphas))):
        raise ValueError("the subsampled bound needs integer orders >= 2")
    full = np.asarray(base_rdp(alphas.astype(np.float64)), np.float64)
    if q >= 1:
        return full
    top = int(alphas.max())
    ls = np.arange(2, top + 1, dtype=np.float64)
    eps_l = np.asarray(base_rdp(ls), np.float64)
    out = np.empty(alphas.shape, np.float64)
    lq, l1q = math.log(q), math.log1p(-q)
    for i, alpha in enumerate(alphas.astype(int)):
        j = ls[: alpha - 1]
        log_comb = special.gammaln(alpha + 1) - special.gammaln(j + 1) - special.gammaln(alpha - j + 1)
        terms = log_comb + j * lq + (alpha - j) * l1q + (j - 1) * eps_l[: alpha - 1]
        terms[1:] += math.log(3.0)
        first = (alpha - 1) * l1q + math.log(alpha * q - q + 1)
        out[i] = special.logsumexp(np.concatenate([[first], terms])) / (alpha - 1)
    return np.minimum(out, full)


def round_rdp(config: DistributedDPConfig, orders) -> np.ndarray:
    """RDP of one round as accounted: :func:`rdp`, amplified when ``config.amplification``."""
    q = config.sampling_probability
    if q >= 1:
        return rdp(config, orders)
    return poisson_subsampled_rdp(lambda a: rdp(config, a), q, orders)


def accounting_orders(config: DistributedDPConfig) -> tuple[float, ...]:
    """Integer orders 2..256 with amplification or Skellam noise, else ``dp_accounting``'s defaults."""
    if config.sampling_probability < 1 or config.mechanism == "skellam":
        return SUBSAMPLED_ORDERS
    return tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def epsilon(config: DistributedDPConfig, rounds: int) -> float:
    """Epsilon at ``config.target_delta`` after ``rounds`` rounds (``inf`` without noise).

    Examples:
      >>> from fljax import privacy
      >>> cfg = privacy.DistributedDPConfig(
      ...     clip_norm=1.0, noise_multiplier=1.0, dim=1000, cohort_size=100, population_size=10_000
      ... )
      >>> 0 < privacy.distributed.epsilon(cfg, 10) < privacy.distributed.epsilon(cfg, 100) < 10
      True
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if config.noise_multiplier == 0:
        return math.inf
    orders = accounting_orders(config)
    total = rounds * round_rdp(config, orders)
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, config.target_delta)
    return float(eps)


def summary(config: DistributedDPConfig, rounds: int) -> dict:
    """A JSON-ready description of the guarantee and the mechanism's parameters."""
    return {
        "mechanism": f"distributed_{config.mechanism}",
        "unit_of_privacy": config.unit_of_privacy,
        "neighboring_relation": config.neighboring_relation,
        "epsilon": epsilon(config, rounds),
        "delta": config.target_delta,
        "accountant": "rdp",
        "rounds": rounds,
        "noise_multiplier": config.noise_multiplier,
        "clip_norm": config.clip_norm,
        "sensitivity": config.sensitivity,
        "bits": config.bits,
        "gamma": config.gamma_value,
        "local_sigma": config.local_sigma,
        "tau": config.tau,
        "sampling_probability": config.sampling_probability,
        "cohort_size": config.cohort_size,
        "population_size": config.population_size,
    }


# --- the mechanism (jit) -----------------------------------------------------------------


def _init(params: Params) -> aggregators.EmptyState:
    del params
    return aggregators.EmptyState()


def distributed_dp(
    config: DistributedDPConfig, masking: SecAggConfig | None = DEFAULT_MASKING, *, protocol: bool = False
) -> Aggregator:
    """The distributed discrete Gaussian (or Skellam) mechanism as a complete mean aggregator.

    A complete aggregator (not a sum): the noise is added by the clients
    before the modular sum, so the sum cannot be swapped for another one; the
    result is the decoded noised sum divided by the fixed ``cohort_size``
    (never the observed weight). Weighting is uniform: a client takes part
    when its weight is positive and its update finite (weight 1), padding
    slots (weight 0) and non-finite clients contribute exactly zero (no
    rounding, no noise) and non-finite ones are counted in ``num_nonfinite``.

    Unit of privacy: one client. Neighbouring relation: one client's update
    zeroed with ``m`` noise shares present (add/remove under Poisson sampling;
    see the module docstring). Sensitivity: ``config.sensitivity``
    (``Delta_2``, reported as ``dp_sensitivity``).

    Key streams of the aggregate key: ``stream(key, "rounding")`` gives the
    rotation signs (``fold_in(., 0)``, shared) and, through
    :func:`fljax.random.client_keys` of ``fold_in(., 1)`` by slot, each
    client's rounding; ``stream(key, "noise")`` gives each client's noise
    (``client_keys`` by slot); ``stream(key, "masks")`` the secure-aggregation
    masks (``masking``; ``None``: a plain sum mod ``2**bits``). The decoded sum
    does not depend on the masks.

    With ``protocol=True`` the ring sum is one round of the real protocol
    (:func:`fljax.secagg.protocol.ring_sum_callback`, ``jax.pure_callback``;
    X25519, AES-GCM, Shamir, secrets from the OS, ``masking``'s graph and
    threshold, the ring ``2**bits``): every slot is a party, padding and
    non-finite slots send masked zero vectors, and the protocol's server holds
    only masked inputs and the noised sum. Pairwise masks cancel and self-masks
    are removed exactly, so the result, ``aborted`` included, is bit for bit
    that of the simulation for the same ``key``, whatever the protocol's own
    keys. Host cost ``O(n * k * d')`` AES work: for tests and small models.

    Error: the decoded sum minus the sum of clipped updates is ``gamma H^T D``
    applied to the rounding errors (each coordinate within 1, so at most
    ``n gamma sqrt(d')`` in L2 norm for ``n`` clients) plus the noise (std
    ``gamma s sqrt(n)`` per coordinate), as long as no coordinate of the
    integer sum leaves the ring (``dp_wrapped_coordinates``, a simulation
    diagnostic computed from the unreduced sum, which the real server never sees).

    Args:
      config: the mechanism and its accounting.
      masking: secure-aggregation masking graph for the ring sum
        (:func:`fljax.secagg.simulation.masked_ring_sum`), or ``None``. Its
        ``dropout_rate`` simulates clients that drop out after adding their
        noise, before sending their masked input (stream ``"dropout"``): their
        noise share leaves with them, so a round whose survivors number fewer
        than ``config.num_shares`` is withheld.
      protocol: run the ring sum through the real protocol on the host
        instead of the masking simulation (needs ``masking``).

    Returns:
      ``Aggregator(init, aggregate)``, stateless. Metrics: ``num_nonfinite``,
      ``num_clients``, ``num_clipped``, ``total_weight``, ``dp_clip_norm``,
      ``dp_noise_std`` (std of the summed noise in update units),
      ``dp_sensitivity``, ``dp_gamma``, ``dp_rounding_tries`` (mean over
      clients), ``dp_rounding_fallbacks``, ``dp_noise_shortfall`` (1 when fewer
      than ``m`` noised inputs reached the sum: the round is withheld),
      ``num_dropped``, ``dp_wrapped_coordinates``, ``aborted`` (withheld:
      a noise shortfall, or the masking would abort; the update is zero).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fljax import privacy
      >>> cfg = privacy.DistributedDPConfig(
      ...     clip_norm=1.0, noise_multiplier=0.5, dim=3, cohort_size=2, population_size=100, bits=20
      ... )
      >>> agg = privacy.distributed_dp(cfg)
      >>> deltas = {"w": jnp.array([[0.3, 0.4, 0.0], [3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])}
      >>> weights = jnp.array([1.0, 1.0, 0.0])  # the third slot is padding
      >>> _, mean, metrics = jax.jit(agg.aggregate)(agg.init({"w": jnp.zeros(3)}), deltas, weights, jax.random.key(0))
      >>> mean["w"].shape, int(metrics["num_clipped"]), int(metrics["dp_wrapped_coordinates"])
      ((3,), 1, 0)
    """
    if protocol and masking is None:
        raise ValueError("protocol=True needs a masking config (the protocol's graph and threshold)")
    gamma = config.gamma_value
    sigma = config.local_sigma
    dim, dpad, bits = config.dim, config.padded_dim, config.bits
    bound_sq = (1.0 - ROUNDING_MARGIN) * config.rounded_l2_bound**2
    c = jnp.float32(config.clip_norm)
    c_inner = jnp.float32(config.clip_norm * (1.0 - ROUNDING_MARGIN))
    half = float(2 ** (bits - 1))

    def noise(key):
        if config.mechanism == "skellam":
            return skellam.skellam(key, (dpad,), sigma * sigma)
        return discrete.discrete_gaussian(key, (dpad,), sigma)

    def client(y, rounding_key, noise_key):
        q, tries, fell_back = discrete.conditional_round(y, bound_sq, rounding_key, config.max_rounding_tries)
        return q + noise(noise_key), tries, fell_back

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        w, num_bad = aggregators.sanitize(deltas, weights)
        x = encoding.flatten(deltas)
        n = x.shape[0]
        if x.shape[1] != dim:
            raise ValueError(f"the flattened update has {x.shape[1]} coordinates, config.dim={dim}")
        valid = w > 0
        x = jnp.where(valid[:, None], x, jnp.zeros((), jnp.float32))
        norms = jnp.sqrt(jnp.sum(x * x, axis=1))
        factor = jnp.minimum(1.0, c_inner / jnp.maximum(norms, jnp.float32(1e-30)))
        rounding = fl_random.stream(key, "rounding")
        signs = discrete.random_signs(jax.random.fold_in(rounding, 0), dpad)
        y = discrete.rotate(x * factor[:, None], signs) * jnp.float32(1.0 / gamma)
        slots = jnp.arange(n, dtype=jnp.int32)
        round_keys = fl_random.client_keys(jax.random.fold_in(rounding, 1), slots)
        noise_keys = fl_random.client_keys(fl_random.stream(key, "noise"), slots)
        v, tries, fell_back = jax.vmap(client)(y, round_keys, noise_keys)
        v = jnp.where(valid[:, None], v, jnp.zeros((), jnp.int32))
        ring = encoding.to_ring(v, bits)
        if masking is not None and masking.dropout_rate > 0:
            u = jax.random.uniform(fl_random.stream(key, "dropout"), (n,), jnp.float32)
            alive = u >= jnp.float32(masking.dropout_rate)
        else:
            alive = jnp.ones((n,), jnp.bool_)  # every slot takes part; padding sends zeros
        if masking is None:
            total, aborted = encoding.ring_sum(ring, bits), jnp.zeros((), jnp.bool_)
        elif protocol:
            total, aborted = secagg_protocol.ring_sum_callback(ring, alive, bits, masking)
        else:
            total, aborted = simulation.masked_ring_sum(
                ring, alive, fl_random.stream(key, "masks"), masking, bits
            )
        # Fewer noise shares than accounted reach the sum: withhold the round (release nothing).
        num_noised = jnp.sum(valid & alive).astype(jnp.int32)
        shortfall = num_noised < config.num_shares
        aborted = aborted | shortfall
        total = jnp.where(aborted, jnp.zeros_like(total), total)
        decoded = encoding.from_ring(total, bits).astype(jnp.float32) * jnp.float32(gamma)
        flat = discrete.unrotate(decoded, signs, dim) / jnp.float32(config.denominator)
        unreduced = jnp.sum(jnp.where(alive[:, None], v, 0).astype(jnp.float32), axis=0)
        num_valid = jnp.sum(valid).astype(jnp.int32)
        metrics = {
            "num_nonfinite": num_bad,
            "num_clients": num_noised,
            "num_dropped": jnp.sum(valid & ~alive).astype(jnp.int32),
            "num_clipped": jnp.sum(valid & (norms > c)).astype(jnp.int32),
            "total_weight": num_noised.astype(jnp.float32),
            "dp_clip_norm": c,
            "dp_noise_std": jnp.float32(gamma * sigma) * jnp.sqrt(num_noised.astype(jnp.float32)),
            "dp_sensitivity": jnp.float32(config.sensitivity),
            "dp_gamma": jnp.float32(gamma),
            "dp_rounding_tries": jnp.sum(jnp.where(valid, tries, 0)).astype(jnp.float32)
            / jnp.maximum(num_valid, 1).astype(jnp.float32),
            "dp_rounding_fallbacks": jnp.sum(valid & fell_back).astype(jnp.int32),
            "dp_noise_shortfall": shortfall.astype(jnp.int32),
            "dp_wrapped_coordinates": jnp.sum((unreduced >= half) | (unreduced < -half)).astype(jnp.int32),
            "aborted": aborted.astype(jnp.int32),
        }
        return state, encoding.unflatten(flat, deltas), metrics

    return Aggregator(_init, aggregate)


def ledger(config: DistributedDPConfig, *, budget_epsilon: float | None = None) -> MechanismLedger:
    """A budget ledger for ``config`` (:class:`~fljax.privacy.accounting.MechanismLedger` over
    :func:`epsilon` and :func:`summary`).

    Examples:
      >>> from fljax import privacy
      >>> cfg = privacy.DistributedDPConfig(
      ...     clip_norm=1.0, noise_multiplier=1.0, dim=100, cohort_size=10, population_size=1000
      ... )
      >>> ledger(cfg, budget_epsilon=5.0).step(3) == privacy.distributed.epsilon(cfg, 3)
      True
    """
    return MechanismLedger(config, epsilon, summary, budget_epsilon=budget_epsilon)
