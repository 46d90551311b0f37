"""Accounting: epsilon against direct dp_accounting computations, calibration, budget enforcement."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fljax.privacy import accounting, config


def _cfg(**kw):
    base = dict(clip_norm=1.0, noise_multiplier=1.1, population_size=1000, cohort_size=50)
    base.update(kw)
    return config.DPConfig(**base)


def test_poisson_epsilon_equals_direct_dp_accounting_and_grows():
    cfg = _cfg()
    previous = 0.0
    for rounds in (1, 10, 100):
        add_remove = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        for kind, direct in (
            ("rdp", rdp.RdpAccountant(neighboring_relation=add_remove)),
            (
                "pld",
                pld.PLDAccountant(
                    neighboring_relation=add_remove,
                    value_discretization_interval=accounting.PLD_DISCRETIZATION,
                ),
            ),
        ):
            direct.compose(
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), rounds
                )
            )
            assert accounting.epsilon(cfg, rounds, accountant=kind) == pytest.approx(
                direct.get_epsilon(cfg.target_delta), rel=1e-9
            )
        eps = accounting.epsilon(cfg, rounds)
        assert eps > previous
        previous = eps


def test_fixed_size_sampling_is_replace_one_with_doubled_sensitivity():
    cfg = _cfg(sampling="fixed", delta=1e-5)
    assert accounting.neighboring_relation(cfg) is dp_accounting.NeighboringRelation.REPLACE_ONE
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(1000, 50, dp_accounting.GaussianDpEvent(0.55)), 20
        )
    )
    assert accounting.epsilon(cfg, 20) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert accounting.summary(cfg, 20)["neighboring_relation"] == "replace_one"
    with pytest.raises(ValueError, match="PLD"):
        accounting.epsilon(cfg, 20, accountant="pld")


def test_no_noise_is_infinite_epsilon():
    assert math.isinf(accounting.epsilon(_cfg(noise_multiplier=0.0), 5))
    assert accounting.epsilon(_cfg(), 0) == 0.0


@pytest.mark.parametrize("kind,targets", [("rdp", (1.0, 4.0)), ("pld", (4.0,))])
def test_calibration_hits_target_within_one_percent(kind, targets):
    cfg = _cfg()
    for target in targets:
        z = accounting.calibrate_noise_multiplier(cfg, target_epsilon=target, rounds=30, accountant=kind)
        eps = accounting.epsilon(cfg.replace(noise_multiplier=z), 30, accountant=kind)
        assert abs(eps - target) / target < 0.01, (target, z, eps)


def test_dpsgd_event_and_calibration():
    cfg = config.DPSGDConfig(
        l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=32, num_examples=1000, num_epochs=2
    )
    assert cfg.steps_per_round == 64
    direct = rdp.RdpAccountant()
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.032, dp_accounting.GaussianDpEvent(1.0)), 64 * 3
        )
    )
    assert accounting.epsilon(cfg, 3) == pytest.approx(direct.get_epsilon(cfg.target_delta), rel=1e-9)
    z = accounting.calibrate_noise_multiplier(cfg, target_epsilon=2.0, rounds=3)
    assert abs(accounting.epsilon(cfg.replace(noise_multiplier=z), 3) - 2.0) < 0.02
    s = accounting.summary(cfg, 3)
    assert s["unit_of_privacy"] == "example" and "poisson" in s["sampling"].lower()


def test_adaptive_clipping_accounted_as_effective_multiplier():
    cfg = _cfg(target_quantile=0.5, clipped_count_stddev=2.5)
    plain = _cfg()
    assert accounting.epsilon(cfg, 10) == pytest.approx(accounting.epsilon(plain, 10))
    assert cfg.update_noise_multiplier > plain.noise_multiplier  # the update pays for the count query


def test_simulated_noise_cohort_accounted_for_production_and_labelled():
    cfg = _cfg(population_size=1_000_000, cohort_size=50, noise_cohort_size=5000)
    production = _cfg(population_size=1_000_000, cohort_size=5000)
    assert accounting.epsilon(cfg, 10) == pytest.approx(accounting.epsilon(production, 10))
    s = accounting.summary(cfg, 10)
    assert s["simulated_noise_cohort"] is True and "simulated noise cohort" in s["note"]


def test_budget_stops_before_exceeding():
    cfg = _cfg()
    budget = accounting.epsilon(cfg, 7) * 1.0001
    ledger = accounting.PrivacyLedger(cfg, budget_epsilon=budget)
    assert ledger.max_rounds() == 7
    spent = []
    with pytest.raises(accounting.PrivacyBudgetExceededError, match="budget"):
        for _ in range(100):
            ledger.check(1)
            spent.append(ledger.step(1))
    assert ledger.rounds == 7 and len(spent) == 7
    assert all(e <= budget for e in spent) and spent == sorted(spent)
    assert not ledger.can_run(1)
    assert ledger.epsilon() <= budget < ledger.epsilon(8)
    summary = ledger.summary()
    assert summary["unit_of_privacy"] == "client" and summary["neighboring_relation"] == "add_or_remove_one"
    assert summary["rounds"] == 7 and summary["budget_epsilon"] == budget


def test_ledger_without_budget_and_resume():
    cfg = _cfg()
    ledger = accounting.PrivacyLedger(cfg, rounds=5)
    assert ledger.can_run(10**6)
    assert ledger.step(2) == pytest.approx(accounting.epsilon(cfg, 7))
