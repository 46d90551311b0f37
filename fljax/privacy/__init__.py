"""Differential privacy: mechanisms (JAX) and their accounting (host, ``dp_accounting``).

One config object builds both sides, so noise and epsilon cannot drift:

* :class:`DPConfig` -> :func:`dp` (client-level DP-FedAvg around any sum, e.g.
  ``dp(cfg, sum=secagg.secure_sum(sa))``; adaptive clipping, simulated noise
  cohort) and :func:`accounting.dp_event`;
* :class:`DPSGDConfig` -> :func:`dp_sgd_client` / :func:`dp_sgd_gradient`
  (example-level DP-SGD inside a client) and :func:`accounting.dp_event`;
  across silos of different sizes, :func:`silo_epsilons` / :class:`SiloLedger`
  account each silo with its own size, steps and rounds (``epsilon(cfg, rounds)``
  is a silo of ``cfg.num_examples`` records only);
* :class:`DistributedDPConfig` -> :func:`distributed_dp` (the distributed discrete
  Gaussian: clients add integer noise before a modular secure sum, or Skellam noise
  with ``mechanism="skellam"``, Agarwal, Kairouz, Liu 2021) and
  :func:`distributed.epsilon` (their RDP bounds, Kairouz, Liu, Steinke 2021);
* :class:`MFConfig` -> :func:`dp_ftrl` (DP-FTRL / banded and BLT matrix
  factorisation through ``jax_privacy``: correlated noise, no sampling
  amplification) and :func:`matrix_factorization.epsilon`.

:class:`PrivacyLedger` enforces a budget on the host, round by round.
"""

from fljax.privacy import (
    accounting,
    aggregation,
    config,
    discrete,
    distributed,
    dp_sgd,
    ghost_clipping,
    matrix_factorization,
    silo_accounting,
    skellam,
)
from fljax.privacy.accounting import (
    PrivacyBudgetExceededError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    dp_event,
    epsilon,
    summary,
)
from fljax.privacy.aggregation import DPState, dp, sample_cohort
from fljax.privacy.config import DPConfig, DPSGDConfig, expected_capped_weight
from fljax.privacy.distributed import DistributedDPConfig, distributed_dp
from fljax.privacy.dp_sgd import dp_sgd_client, dp_sgd_gradient, per_example_gradients
from fljax.privacy.matrix_factorization import MFConfig, MFState, dp_ftrl
from fljax.privacy.silo_accounting import SiloLedger, SiloSizeWarning, silo_epsilons, silo_steps

__all__ = [
    "DPConfig",
    "DPSGDConfig",
    "DPState",
    "DistributedDPConfig",
    "MFConfig",
    "MFState",
    "PrivacyBudgetExceededError",
    "PrivacyLedger",
    "SiloLedger",
    "SiloSizeWarning",
    "accounting",
    "aggregation",
    "calibrate_noise_multiplier",
    "config",
    "discrete",
    "distributed",
    "distributed_dp",
    "dp",
    "dp_event",
    "dp_ftrl",
    "dp_sgd",
    "dp_sgd_client",
    "dp_sgd_gradient",
    "epsilon",
    "expected_capped_weight",
    "ghost_clipping",
    "matrix_factorization",
    "per_example_gradients",
    "sample_cohort",
    "silo_accounting",
    "silo_epsilons",
    "silo_steps",
    "skellam",
    "summary",
]
