"""The real secure-aggregation protocol inside the trainer, institutions split from grouped rows,
per-client metrics beside the baselines, and the banks_credit data."""

import dataclasses

import jax
import numpy as np
import pytest

from fljax import random as fl_random
from fljax.data import FederatedData
from fljax.data.datasets import paths
from fljax.experiment import DP, Client, Config, ConfigError, Model, SecAgg, Tabular, config, trainer
from fljax.experiment import data as data_lib
from fljax.secagg import protocol
from tests.experiment import runner

# Heart disease (shipped): 4 hospitals of at most 227 training patients, weights exact up to 256.
TINY = Config(
    name="tiny",
    model=Model(name="logistic"),
    client=Client(batch_size=16, max_steps=2),
    rounds=2,
    checkpoint_every=0,
    secagg=SecAgg(clip_range=1.0, frac_bits=16, max_weight=256.0, weight_bits=8),
)
# DP over the secure sum: weights in [0, 1] (max_weight 1), seeded so both runs draw the same noise.
TINY_DP = dataclasses.replace(
    TINY,
    secagg=SecAgg(clip_range=1.0, frac_bits=16),
    dp=DP(clip_norm=0.1, noise_multiplier=1.0, sampling="poisson", delta=1e-5, reproducible=True),
)


def _train(cfg: Config):
    data = data_lib.load(cfg.data, fl_random.stream(fl_random.run_key(cfg.seed), "data"))
    model = trainer.build_model(cfg.model, data.num_classes)
    trained = trainer.train(cfg, data.train, model, progress=False)
    records = [{k: v for k, v in r.items() if k != "round_sec"} for r in trained.records]
    return records, trained.state.params


@pytest.mark.parametrize("base", [TINY, TINY_DP], ids=["mean", "dp"])
def test_protocol_run_equals_the_simulated_run_bit_for_bit(base, monkeypatch):
    calls = []
    real = protocol.run_round
    monkeypatch.setattr(protocol, "run_round", lambda *a, **k: calls.append(1) or real(*a, **k))
    simulated, sim_params = _train(base)  # first, so a cache key without the flag would be caught
    assert calls == []
    protocol_run, proto_params = _train(dataclasses.replace(base, secagg_protocol=True))
    assert len(calls) == base.rounds  # one protocol round per training round: it really ran
    assert protocol_run == simulated
    for a, b in zip(jax.tree.leaves(proto_params), jax.tree.leaves(sim_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_secagg_protocol_needs_a_secagg_section():
    with pytest.raises(ConfigError, match=r"^secagg_protocol=True: expected False without a secagg"):
        config.validate(dataclasses.replace(TINY, secagg=None, secagg_protocol=True))
    with pytest.raises(ConfigError, match=r"^secagg_protocol=True"):
        config.validate(runner.load_config("heart_disease", ["secagg_protocol=True"]))
    ddp = {"clip_norm": 0.1, "noise_multiplier": 1.0, "delta": 1e-5}
    with pytest.raises(ConfigError, match=r"^secagg_protocol=True: expected False with distributed_dp"):
        config.validate(
            runner.load_config(
                "heart_disease", [f"distributed_dp={ddp!r}", "secagg={}", "secagg_protocol=True"]
            )
        )
    config.validate(dataclasses.replace(TINY, secagg_protocol=True))  # with the section: fine


def test_institutions_share_every_row_once_with_different_sizes_and_mixes():
    sizes = [4000, 3000, 1500, 500]  # rows of 4 groups; x holds the row index
    groups = FederatedData.from_clients(
        [
            (np.arange(o, o + n, dtype=np.float32)[:, None], np.zeros(n))
            for o, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)
        ]
    )
    d = data_lib.institutions(groups, 5, 0.5, np.random.default_rng(3))
    assert d.client_names == tuple(f"institution_{i}" for i in range(1, 6))
    rows = np.sort(d.x[:, 0])
    np.testing.assert_array_equal(rows, np.arange(sum(sizes), dtype=np.float32))  # each row exactly once
    assert d.sizes.min() >= data_lib.MIN_INSTITUTION_ROWS
    group_of = np.searchsorted(np.cumsum(sizes), d.x[:, 0], side="right")
    mixes = np.array(
        [
            np.bincount(group_of[s:e], minlength=4) / (e - s)
            for s, e in zip(d.offsets[:-1], d.offsets[1:], strict=True)
        ]
    )
    # Dirichlet(0.5) mixes: far from the population's mix (an IID split would be within ~0.05).
    population_mix = np.array(sizes) / sum(sizes)
    assert np.abs(mixes - population_mix).sum(axis=1).max() > 0.3
    assert len(set(d.sizes.tolist())) == 5


def test_institutions_are_for_credit_default_only():
    cfg = Config(data=Tabular(name="adult", num_institutions=5))
    with pytest.raises(ConfigError, match=r"^data.num_institutions=5: expected None with data.name='adult'"):
        config.validate(cfg)


def test_baseline_table_holds_per_client_auc_for_each_column(tmp_path):
    summary = runner.main(
        [
            "--config", "heart_disease", "--out", str(tmp_path), "--no-progress",
            "--set", "rounds=1", "--set", "repeats=1", "--set", "checkpoint_every=0",
            "--set", "client.max_steps=2", "--set", "model.name=logistic",
            "--set", "baselines=('local', 'pooled')", "--set", "metrics=('auc',)",
        ]
    )  # fmt: skip
    table = summary["per_client_test_accuracy"]
    auc = table["metrics"]["auc"]
    assert auc["federated"] == summary["final"]["fed_per_client_auc"]
    for col in ("federated", "local", "pooled"):
        assert len(auc[col]) == 4 and all(0.0 <= a <= 1.0 for a in auc[col])
        assert auc[f"{col}_std"] == [0.0] * 4  # one repeat
        assert len(table[col]) == 4  # the accuracy columns are unchanged


def test_banks_credit_gives_five_banks_of_different_sizes():
    if not any(p.is_dir() for p in paths.candidates("credit_default_uci")):
        pytest.skip("needs the offline data folder 'credit_default_uci' (../shared/data or $FLJAX_DATA_DIR)")
    cfg = runner.load_config("banks_credit")
    assert cfg.secagg_protocol and cfg.secagg is not None and "auc" in cfg.metrics
    seed = fl_random.stream(fl_random.run_key(cfg.seed), "data")
    d = data_lib.load(cfg.data, seed)
    total = d.train.sizes + d.test.sizes
    assert d.train.num_clients == 5 and int(total.sum()) == 30_000
    assert total.max() > 5 * total.min()  # banks of very different sizes
    assert d.train.sizes.max() <= cfg.secagg.max_weight  # example-count weights exact in the encoding
