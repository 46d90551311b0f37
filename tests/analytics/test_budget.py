"""The shared budget: the composed epsilon equals dp_accounting's on the same events; a query
that would exceed the budget is refused before it runs."""

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fljax import privacy
from fljax.analytics import budget, release

DELTA = 1e-6
TRAIN = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.1, population_size=2000, cohort_size=100)


def _query(z):
    return release.ReleaseConfig(l2_bound=2.0, noise_multiplier=z, population_size=2000)


def test_release_epsilon_is_the_gaussian_mechanism():
    cfg = _query(3.0)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(3.0))
    assert cfg.epsilon() == pytest.approx(acc.get_epsilon(cfg.target_delta), rel=1e-9)
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(3.0))
    assert cfg.epsilon(accountant="pld") == pytest.approx(acc.get_epsilon(cfg.target_delta), rel=1e-3)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_composed_epsilon_equals_dp_accounting(kind):
    ledger = budget.BudgetLedger(budget_epsilon=None, delta=DELTA, accountant=kind)
    ledger.spend_training(TRAIN, rounds=30)
    for z in (4.0, 8.0, 8.0):
        ledger.spend_release(_query(z), label=f"z={z}")
    if kind == "rdp":
        acc = rdp.RdpAccountant()
    else:
        acc = pld.PLDAccountant(value_discretization_interval=privacy.accounting.PLD_DISCRETIZATION)
    acc.compose(privacy.dp_event(TRAIN, 30))
    for z in (4.0, 8.0, 8.0):
        acc.compose(dp_accounting.GaussianDpEvent(z))
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    assert [e[2] for e in ledger.entries] == sorted(e[2] for e in ledger.entries)


def test_refuses_the_query_that_would_exceed_the_budget_before_running_it():
    ledger = budget.BudgetLedger(budget_epsilon=4.0, delta=DELTA)
    ledger.spend_training(TRAIN, rounds=10)
    ran = []

    def run_query(cfg):
        ledger.spend_release(cfg, label="mean")  # raises before the release
        ran.append(cfg)

    cfg = _query(3.0)
    while ledger.can_spend(ledger.release_event(cfg)):
        run_query(cfg)
    spent_before = ledger.epsilon()
    assert spent_before <= 4.0 < ledger.epsilon_with(ledger.release_event(cfg))
    num_entries = len(ledger.entries)
    with pytest.raises(privacy.PrivacyBudgetExceededError, match="refused before running"):
        run_query(cfg)
    assert len(ran) == num_entries - 1 and len(ledger.entries) == num_entries
    assert ledger.epsilon() == spent_before
    with pytest.raises(budget.BudgetExceededError):
        ledger.spend_training(TRAIN, rounds=1000)


def test_replace_one_ledger_doubles_the_release_sensitivity():
    fixed = TRAIN.replace(sampling="fixed")
    ledger = budget.BudgetLedger(budget_epsilon=None, delta=DELTA, neighboring_relation="replace_one")
    ledger.spend_training(fixed, rounds=5)
    ledger.spend_release(_query(4.0))
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(privacy.dp_event(fixed, 5))
    acc.compose(dp_accounting.GaussianDpEvent(2.0))
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    with pytest.raises(ValueError, match="neighbouring relation"):
        budget.BudgetLedger(budget_epsilon=None, delta=DELTA).spend_training(fixed, rounds=1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="budget_epsilon"):
        budget.BudgetLedger(budget_epsilon=0.0, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        budget.BudgetLedger(budget_epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="not private"):
        budget.BudgetLedger(budget_epsilon=1.0, delta=DELTA).spend_release(_query(0.0))
