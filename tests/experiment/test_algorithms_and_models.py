"""The trainer builds and runs every algorithm, aggregator and reference model of its config types."""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import experiment
from fljax.data import FederatedData
from fljax.experiment import config as cfg
from fljax.experiment import trainer

ALGORITHMS = typing.get_args(typing.get_type_hints(cfg.Server)["algorithm"])
AGGREGATORS = typing.get_args(typing.get_args(typing.get_type_hints(cfg.Config)["aggregator"])[0])
MODELS = typing.get_args(typing.get_type_hints(cfg.Model)["name"])


def _population(shape, num_classes, *, tokens=False, clients=4, n=12, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(clients):
        if tokens:
            x = rng.integers(0, num_classes, size=(n, *shape)).astype(np.int32)
            y = np.roll(x, -1, axis=1)
        else:
            x = rng.normal(size=(n, *shape)).astype(np.float32)
            y = rng.integers(0, num_classes, size=n).astype(np.int32)
        parts.append((x, y))
    return FederatedData.from_clients(parts, num_classes=num_classes)


def _train(config, data, model_name="mlp", **model_kwargs):
    model = trainer.build_model(cfg.Model(name=model_name, **model_kwargs), data.num_classes)
    return trainer.train(config, data, model, progress=False)


BASE = experiment.Config(
    model=experiment.Model(hidden=(8,)),
    client=experiment.Client(learning_rate=0.05, batch_size=4, max_steps=2),
    rounds=2,
    checkpoint_every=0,
)


def test_the_types_list_what_the_trainer_knows():
    assert set(ALGORITHMS) == set(cfg.ALGORITHMS)
    assert set(AGGREGATORS) == set(cfg.AGGREGATORS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains(algorithm):
    config = dataclasses.replace(BASE, server=experiment.Server(algorithm=algorithm, learning_rate=0.5))
    cfg.validate(config)
    data = _population((5,), 3)
    trained = _train(config, data)  # under strict dtype promotion (tests/conftest.py), FedAdam too
    assert [r["round"] for r in trained.records] == [1, 2]
    assert np.isfinite(trained.records[-1]["delta_norm"]) and trained.records[-1]["delta_norm"] > 0


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_aggregator_trains(aggregator):
    config = dataclasses.replace(BASE, aggregator=aggregator)
    trained = _train(config, _population((5,), 3))
    assert np.isfinite(trained.records[-1]["delta_norm"]) and trained.records[-1]["delta_norm"] > 0


SHAPES = {  # model -> (input shape of one example, extra Model fields)
    "mlp": ((5,), {}),
    "logistic": ((5,), {}),
    "lenet": ((32, 32, 3), {}),
    "mcmahan_cnn": ((28, 28, 1), {}),
    "emnist_cnn": ((28, 28, 1), {}),
    "char_lstm": ((6,), {"lstm_sizes": (8,), "embed_dim": 4}),
}


def test_every_reference_model_is_built_with_the_data_classes():
    assert set(SHAPES) == set(MODELS)
    for name, (shape, kwargs) in SHAPES.items():
        model = trainer.build_model(cfg.Model(name=name, **kwargs), 7)
        x = jax.ShapeDtypeStruct((2, *shape), jnp.int32 if name == "char_lstm" else jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        out = jax.eval_shape(model.apply, params, x)
        assert out.shape == ((2, 6, 7) if name == "char_lstm" else (2, 7)), name


@pytest.mark.parametrize("name", ["mlp", "logistic", "char_lstm"])
def test_reference_models_train(name):
    # the CNNs' rounds compile for minutes on CPU; their training is tested in tests/models
    shape, kwargs = SHAPES[name]
    data = _population(shape, 5, tokens=name == "char_lstm", clients=2, n=4)
    config = dataclasses.replace(BASE, rounds=1, client=dataclasses.replace(BASE.client, max_steps=1))
    trained = _train(config, data, name, **kwargs)
    assert np.isfinite(trained.records[-1]["client_train_loss_weighted_mean"])
