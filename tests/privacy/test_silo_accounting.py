"""Per-silo DP-SGD accounting: each silo's own size, steps and rounds, against dp_accounting."""

import math
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp

from fljax import client, privacy
from fljax.base import ClientData
from fljax.models import zoo
from fljax.privacy import accounting, dp_sgd, silo_accounting


def _cfg(**kw):
    base = dict(l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=50, num_examples=5000, delta=1e-5)
    return privacy.DPSGDConfig(**{**base, **kw})


def _direct(n, batch, z, steps, delta, kind="rdp"):
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps, straight from dp_accounting."""
    if kind == "rdp":
        acc = rdp.RdpAccountant()
    else:
        acc = pld.PLDAccountant(value_discretization_interval=accounting.PLD_DISCRETIZATION)
    event = dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_small_silo_spends_more_and_matches_dp_accounting(kind):
    cfg = _cfg()
    out = privacy.silo_epsilons(cfg, [5000, 1000], rounds=20, accountant=kind)
    big, small = out["per_silo_epsilon"]
    # 1 epoch of ceil(n / 50) steps per round, 20 rounds
    assert out["per_silo_steps"] == [20 * 100, 20 * 20]
    assert out["per_silo_sampling_probability"] == [50 / 5000, 50 / 1000]
    assert big == pytest.approx(_direct(5000, 50, 1.0, 2000, 1e-5, kind), rel=1e-9)
    assert small == pytest.approx(_direct(1000, 50, 1.0, 400, 1e-5, kind), rel=1e-9)
    assert small > big
    assert out["max_epsilon"] == small and out["max_epsilon_silo"] == 1
    assert out["delta"] == 1e-5 and out["accountant"] == kind
    # the single-size API is the epsilon of a silo of config.num_examples only: it under-reports
    assert accounting.epsilon(cfg, 20, accountant=kind) == pytest.approx(big, rel=1e-9)
    assert accounting.epsilon(cfg, 20, accountant=kind) < out["max_epsilon"]


def test_equal_silos_give_equal_epsilons_and_the_single_size_value():
    cfg = _cfg(num_examples=1000, num_epochs=2)
    out = privacy.silo_epsilons(cfg, [1000, 1000, 1000], rounds=5)
    assert len(set(out["per_silo_epsilon"])) == 1
    assert out["max_epsilon"] == pytest.approx(accounting.epsilon(cfg, 5), rel=1e-12)


def test_default_delta_is_the_configs_rule_per_silo():
    cfg = _cfg(delta=None)
    out = privacy.silo_epsilons(cfg, [5000, 1000, 0], rounds=3)
    for n, eps, delta in zip([5000, 1000], out["per_silo_epsilon"], out["per_silo_delta"], strict=False):
        own = cfg.replace(num_examples=n)
        assert delta == own.target_delta
        assert eps == pytest.approx(accounting.epsilon(own, 3), rel=1e-12)
    assert out["per_silo_epsilon"][2] == 0.0 and out["per_silo_steps"][2] == 0  # no records, nothing spent
    assert out["delta"] == max(out["per_silo_delta"])


def test_participation_counts_and_mask():
    cfg = _cfg()
    mask = np.array([[True, True, False], [True, False, False], [True, True, False]])  # [rounds, silos]
    by_mask = privacy.silo_epsilons(cfg, [5000, 1000, 1000], rounds=3, participation=mask)
    by_count = privacy.silo_epsilons(cfg, [5000, 1000, 1000], rounds=3, participation=[3, 2, 0])
    assert by_mask == by_count
    assert by_mask["per_silo_rounds"] == [3, 2, 0]
    assert by_mask["per_silo_epsilon"][1] == pytest.approx(_direct(1000, 50, 1.0, 2 * 20, 1e-5), rel=1e-9)
    assert by_mask["per_silo_epsilon"][2] == 0.0
    with pytest.raises(ValueError, match="rounds"):
        privacy.silo_epsilons(cfg, [5000, 1000], rounds=3, participation=[4, 1])


def test_shuffle_upper_bound_is_one_gaussian_per_epoch():
    cfg = _cfg(num_epochs=2)
    out = privacy.silo_epsilons(cfg, [5000, 1000], rounds=4, sampling="shuffle")
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 2 * 4))
    for eps in out["per_silo_epsilon"]:
        assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert out["neighboring_relation"] == "zero_out_one" and "upper bound" in out["sampling"]
    poisson = privacy.silo_epsilons(cfg, [5000, 1000], rounds=4)
    assert all(s >= p for s, p in zip(out["per_silo_epsilon"], poisson["per_silo_epsilon"], strict=True))


def test_no_noise_is_infinite_and_small_silos_refused():
    out = privacy.silo_epsilons(_cfg(noise_multiplier=0.0), [5000, 1000], rounds=1)
    assert all(math.isinf(e) for e in out["per_silo_epsilon"])
    with pytest.raises(ValueError, match="smaller than batch_size"):
        privacy.silo_epsilons(_cfg(), [5000, 20], rounds=1)


@pytest.mark.parametrize("max_steps", [None, 2])
def test_steps_equal_what_train_locally_runs(max_steps):
    """The accounted step count is the number of real steps train_locally takes with DP-SGD."""
    batch, padded, epochs = 5, 20, 2
    cfg = privacy.DPSGDConfig(
        l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch, num_examples=padded, num_epochs=epochs
    )
    model = zoo.MLP(hidden=(4,), num_classes=3)
    k_init, kx, ky, k_run = jax.random.split(jax.random.key(0), 4)
    params = zoo.init_params(model, (3,), k_init)
    x = jax.random.normal(kx, (padded, 3), jnp.float32)
    y = jax.random.randint(ky, (padded,), 0, 3, jnp.int32)
    grad = dp_sgd.dp_sgd_gradient(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch)

    @jax.jit
    def steps_taken(mask, key):
        data = ClientData(x=x, y=y, mask=mask)
        _, _, steps = client.train_locally(
            grad, optax.sgd(0.1), params, data, key, batch_size=batch, num_epochs=epochs, max_steps=max_steps
        )
        return steps

    for i, n in enumerate([20, 17, 11, 10, 6, 5, 1, 0]):
        ran = int(steps_taken(jnp.arange(padded) < n, jax.random.fold_in(k_run, i)))
        assert ran == silo_accounting.silo_steps(cfg, n, 1, max_steps=max_steps), n
        assert ran == epochs * client.num_steps(n, batch, max_steps), n


def test_dp_sgd_client_refuses_small_silos_and_warns_on_single_size():
    model = zoo.MLP(hidden=(4,), num_classes=3)
    opt = optax.sgd(0.1)
    with pytest.warns(privacy.SiloSizeWarning, match="under-reports"):
        dp_sgd.dp_sgd_client(model, opt, _cfg(num_examples=5000), silo_sizes=[5000, 1000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sized for the smallest silo: no warning
        dp_sgd.dp_sgd_client(model, opt, _cfg(num_examples=1000), silo_sizes=[5000, 1000, 0])
        dp_sgd.dp_sgd_client(model, opt, _cfg())  # no sizes given: unchanged behaviour
    with pytest.raises(ValueError, match="smaller than batch_size"):
        dp_sgd.dp_sgd_client(model, opt, _cfg(num_examples=1000), silo_sizes=[1000, 30])


def test_ledger_tracks_each_silo_and_stops_before_the_small_one_overspends():
    cfg = _cfg()
    sizes = [5000, 1000]
    ledger = privacy.SiloLedger(cfg, sizes)
    rounds = [[True, True], [True, False], [True, True]]
    for mask in rounds:
        ledger.check(np.array(mask))
        ledger.step(np.array(mask))
    expected = privacy.silo_epsilons(cfg, sizes, rounds=3, participation=np.array(rounds))
    assert ledger.epsilons() == expected["per_silo_epsilon"]
    summary = ledger.summary()
    assert summary["per_silo_epsilon"] == expected["per_silo_epsilon"]
    assert summary["max_epsilon"] == expected["max_epsilon"] and summary["budget_epsilon"] is None
    assert ledger.history[-1] == expected["max_epsilon"]

    # a budget just above the small silo's epsilon after 2 of its rounds
    budget = silo_accounting.silo_epsilon(cfg, 1000, 2) * 1.0001
    ledger = privacy.SiloLedger(cfg, sizes, budget_epsilon=budget)
    ledger.step([0, 1])
    ledger.step([1, -1])  # ids; -1 is a padding slot
    assert ledger.rounds == [1, 2] and ledger.rounds_left([1]) == 0
    with pytest.raises(privacy.PrivacyBudgetExceededError, match="silo 1"):
        ledger.check([0, 1])
    assert ledger.rounds == [1, 2]  # refused before anything was recorded
    assert ledger.can_run([0]) and ledger.rounds_left([0]) > 0
    ledger.step([0])
    assert ledger.max_epsilon() <= budget
