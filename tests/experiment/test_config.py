"""Typed configs: defaults live in the types, overrides are type-checked, dicts round-trip."""

import dataclasses
import json

import pytest

from fljax import experiment
from fljax.experiment import config as cfg
from fljax.experiment.config import ConfigError


def test_defaults_live_in_the_types():
    c = experiment.Config()
    assert c.client == experiment.Client() and c.client.learning_rate == 0.1
    assert c.data == experiment.HeartDisease() and c.cohort.sampling == "all"
    assert c.dp is None and c.secagg is None
    cfg.validate(c)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rounds = 3  # a typo cannot create a field, a value cannot change in place


def test_override_converts_to_the_annotated_type():
    c = experiment.Config()
    assert cfg.override(c, "client.learning_rate=1").client.learning_rate == 1.0
    assert isinstance(cfg.override(c, "client.learning_rate=1").client.learning_rate, float)
    assert cfg.override(c, "model.hidden=[8, 4]").model.hidden == (8, 4)
    assert cfg.override(c, "server.algorithm=fedadam").server.algorithm == "fedadam"
    assert cfg.override(c, "chunk_size=None").chunk_size is None
    assert cfg.override(c, "chunk_size=3").chunk_size == 3
    dp = cfg.override(c, "dp={'clip_norm': 1, 'noise_multiplier': 0.5}").dp
    assert isinstance(dp, experiment.DP) and dp.clip_norm == 1.0 and dp.sampling == "poisson"
    assert cfg.override(cfg.override(c, "dp={'clip_norm': 1, 'noise_multiplier': 0.5}"), "dp=None").dp is None
    secure = cfg.override(c, "secagg={'frac_bits': 12}").secagg
    assert isinstance(secure, experiment.SecAgg) and secure.frac_bits == 12
    # the original is untouched
    assert c.client.learning_rate == 0.1 and c.dp is None


def test_switching_the_data_set_switches_the_section_type():
    c = cfg.override(experiment.Config(), "data.name=mnist")
    assert isinstance(c.data, experiment.Images) and c.data.name == "mnist"
    c = cfg.override(c, "data.num_clients=7")
    assert c.data.num_clients == 7
    c = cfg.override(c, "data.name=cifar10")  # same type: fields kept
    assert c.data.name == "cifar10" and c.data.num_clients == 7
    c = cfg.override(c, "data={'name': 'adult', 'client_column': 'sex'}")
    assert isinstance(c.data, experiment.Tabular) and c.data.client_column == "sex"
    with pytest.raises(ConfigError, match=r"data.num_clients=3: unknown key"):
        cfg.override(c, "data.num_clients=3")


@pytest.mark.parametrize(
    "item, message",
    [
        ("rounds=ten", "rounds='ten': expected an integer >= 1"),
        ("seed=-1", "seed=-1: expected an integer >= 0"),
        ("client.momentum=1", "client.momentum=1: expected a number in [0, 1)"),
        (
            "client.weighting=examples",
            "client.weighting='examples': expected one of 'num_examples', 'uniform'",
        ),
        ("cohort.q=0", "cohort.q=0: expected a number in (0, 1]"),
        ("model.name=vit", "model.name='vit': expected one of"),
        ("dp.delta=0.1", "dp.delta=0.1: dp is None in this config"),
        ("rounds.max=3", "'rounds' is not a section of the config (rounds is a value)"),
        ("client..lr=1", "expected a dotted key"),
        ("data={'name': 'mnist', 'alpha': -1}", "data.alpha=-1: expected a positive number"),
        ("data={'name': 'mnist', 'colour': 1}", "data.colour=1: unknown key"),
        ("dp={'noise_multiplier': 1.0}", "dp.clip_norm: missing"),
        ("data.split_seed=1.5", "data.split_seed=1.5: expected an integer >= 0"),
    ],
)
def test_bad_override_names_key_value_and_what_is_allowed(item, message):
    with pytest.raises(ConfigError) as e:
        cfg.override(experiment.Config(), item)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_check_catches_wrong_types_written_in_a_config_file():
    # a dataclass does not check types itself; validate does, naming the key
    with pytest.raises(ConfigError, match=r"client.learning_rate='0.1': expected a positive number"):
        cfg.validate(experiment.Config(client=experiment.Client(learning_rate="0.1")))
    with pytest.raises(ConfigError, match=r"model.hidden=\[32\]: expected a tuple of positive integers"):
        cfg.validate(experiment.Config(model=experiment.Model(hidden=[32])))
    with pytest.raises(ConfigError, match=r"data=Client"):
        cfg.validate(experiment.Config(data=experiment.Client()))


def test_dict_round_trip_through_json():
    c = experiment.Config(
        name="x",
        data=experiment.Images(name="cifar10", num_clients=5, partition="dirichlet", alpha=0.3),
        model=experiment.Model(name="lenet"),
        cohort=experiment.Cohort(sampling="uniform", size=2),
        dp=experiment.DP(clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, sampling="fixed", cohort_size=2),
        secagg=experiment.SecAgg(frac_bits=12),
        baselines=("local", "pooled"),
        metrics=("auc",),
    )
    cfg.validate(c)
    back = cfg.from_dict(experiment.Config, json.loads(json.dumps(cfg.to_dict(c))))
    assert back == c and hash(back) == hash(c)


def test_dp_and_cohort_sections_must_sample_alike():
    dp = experiment.DP(clip_norm=1.0, noise_multiplier=1.0, cohort_size=2)  # Poisson, q = 2/4
    with pytest.raises(
        ConfigError, match=r"cohort.sampling='uniform': expected Poisson sampling with q = .* 0.5"
    ):
        cfg.validate(experiment.Config(dp=dp, cohort=experiment.Cohort(sampling="uniform", size=2)))
    cfg.validate(experiment.Config(dp=dp, cohort=experiment.Cohort(sampling="poisson", q=0.5)))
    cfg.validate(experiment.Config(dp=dp))  # all: the dp section decides
    with pytest.raises(
        ConfigError, match=r"dp.population_size=100: expected None or the data's population, 4"
    ):
        cfg.validate(experiment.Config(dp=dataclasses.replace(dp, population_size=100)))


def test_cross_field_checks():
    c = experiment.Config(cohort=experiment.Cohort(sampling="uniform", size=5))
    with pytest.raises(ConfigError, match="cohort.size=5: expected at most the population, 4 clients"):
        cfg.validate(c)
    cfg.validate(dataclasses.replace(c, cohort=experiment.Cohort(sampling="uniform", size=4)))
    # a population known only once the data is loaded is checked then
    adult = experiment.Config(data=experiment.Tabular(), cohort=experiment.Cohort(sampling="uniform", size=9))
    cfg.validate(adult)
    with pytest.raises(ConfigError, match="cohort.size=9: expected at most the population, 5 clients"):
        cfg.validate(adult, population=5)
    scaffold = experiment.Config(
        server=experiment.Server(algorithm="scaffold"), client=experiment.Client(optimizer="adam")
    )
    with pytest.raises(ConfigError, match="client.optimizer='adam': expected 'sgd' with scaffold"):
        cfg.validate(scaffold)


def test_dp_section_mirrors_dpconfig():
    dp_fields = {f.name for f in dataclasses.fields(experiment.DP)}
    from fljax import privacy

    trainer_fields = {"budget_epsilon", "reproducible", "release_unnoised_metrics"}
    assert dp_fields == {f.name for f in dataclasses.fields(privacy.DPConfig)} | trainer_fields
    c = experiment.Config(dp=experiment.DP(clip_norm=1.0, noise_multiplier=1.0))
    built = cfg.dp_config(c, 4)
    assert built.population_size == 4 and built.cohort_size == 4 and built.clip_norm == 1.0
    with pytest.raises(ConfigError, match=r"dp.clip_norm=-1.0: expected a positive number"):
        cfg.validate(experiment.Config(dp=experiment.DP(clip_norm=-1.0, noise_multiplier=1.0)))
