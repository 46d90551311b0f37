"""Bad inputs to the trainer end in ONE line on stderr and exit code 2, before anything trains.

Each line names the key and the offending value and says what is allowed; genuine bugs keep
their traceback (only ``ConfigError`` becomes a one-liner).
"""

import pathlib

import pytest

from tests.experiment import runner

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
HEART = str(CONFIGS / "heart_disease.py")
PRIVATE = str(CONFIGS / "heart_disease_private.py")
CIFAR = str(CONFIGS / "cifar10_founding.py")
TINY = ["rounds=1", "repeats=1", "baselines=()", "eval_every=1", "checkpoint_every=0"]
DP = "dp={'clip_norm': 1.0, 'noise_multiplier': 1.0"


def _runner():
    return runner


RUN = _runner()


def _argv(config, sets, out):
    argv = ["--config", config, "--out", str(out), "--no-progress"]
    for item in [*TINY, *sets]:
        argv += ["--set", item]
    return argv


# (config, --set items, text the one line must contain: key and value, then what is allowed)
BAD = {
    "learning rate not a number": (
        HEART,
        ["client.learning_rate=fast"],
        "client.learning_rate='fast': expected a positive number",
    ),
    "negative learning rate": (HEART, ["client.learning_rate=-0.1"], "client.learning_rate=-0.1: expected"),
    "eval_every zero": (HEART, ["eval_every=0"], "eval_every=0: expected an integer >= 1"),
    "eval_every negative": (HEART, ["eval_every=-2"], "eval_every=-2: expected an integer >= 1"),
    "zero rounds": (HEART, ["rounds=0"], "rounds=0: expected an integer >= 1"),
    "negative rounds": (HEART, ["rounds=-5"], "rounds=-5: expected an integer >= 1"),
    "fractional rounds": (HEART, ["rounds=2.5"], "rounds=2.5: expected an integer"),
    "bool for an int": (HEART, ["repeats=True"], "repeats=True: expected an integer"),
    "zero repeats": (HEART, ["repeats=0"], "repeats=0: expected an integer >= 1"),
    "negative checkpoint_every": (HEART, ["checkpoint_every=-1"], "checkpoint_every=-1: expected"),
    "zero batch size": (HEART, ["client.batch_size=0"], "client.batch_size=0: expected an integer >= 1"),
    "momentum too large": (
        HEART,
        ["client.momentum=1.5"],
        "client.momentum=1.5: expected a number in [0, 1)",
    ),
    "unknown key": (HEART, ["client.learning_rat=0.5"], "client.learning_rat=0.5: unknown key"),
    "unknown section": (HEART, ["optim.lr=0.5"], "optim.lr=0.5: 'optim' is not a section"),
    "set without value": (HEART, ["rounds"], "--set='rounds': expected key=value"),
    "unknown algorithm": (HEART, ["server.algorithm=fedfoo"], "server.algorithm='fedfoo': expected one of"),
    "unknown model": (HEART, ["model.name=resnet"], "model.name='resnet': expected one of"),
    "unknown aggregator": (HEART, ["aggregator=mode"], "aggregator='mode': expected"),
    "unknown data set": (HEART, ["data.name=imagenet"], "data.name='imagenet': expected one of"),
    "data key of another data set after a switch": (
        HEART,
        ["data.name=mnist", "data.test_fraction=0.5"],
        "data.test_fraction=0.5: unknown key",
    ),
    "examples per client with a non-iid split": (
        HEART,
        ["data={'name': 'mnist', 'partition': 'shards', 'examples_per_client': 60}"],
        "data.examples_per_client=60: expected None unless data.partition='iid'",
    ),
    "custom data without a file": (HEART, ["data={'name': 'custom'}"], "data.path: missing"),
    "mnist files missing": (
        HEART,
        ["data={'name': 'mnist', 'source': 'local', 'data_dir': '/nonexistent/mnist'}"],
        "data.data_dir='/nonexistent/mnist'",
    ),
    "poisson cohort without q": (HEART, ["cohort.sampling=poisson"], "cohort.q: missing"),
    "unknown metric": (HEART, ["metrics=('auc', 'f1')"], "metrics=('auc', 'f1'): expected a tuple of"),
    "unknown sampling": (HEART, ["cohort.sampling=random"], "cohort.sampling='random': expected one of"),
    "unknown optimizer": (HEART, ["client.optimizer=lbfgs"], "client.optimizer='lbfgs': expected one of"),
    "unknown baseline": (HEART, ["baselines=('local', 'global')"], "baselines=('local', 'global'): expected"),
    "string for a tuple": (HEART, ["baselines=local"], "baselines='local': expected a tuple"),
    "bad hidden sizes": (HEART, ["model.hidden=(0,)"], "model.hidden=(0,): expected a tuple of positive"),
    "test fraction out of range": (HEART, ["data.test_fraction=1.5"], "data.test_fraction=1.5: expected"),
    "key of another data set": (HEART, ["data.data_dir=/tmp"], "data.data_dir='/tmp': unknown key"),
    "cohort larger than population": (
        HEART,
        ["cohort={'sampling': 'uniform', 'size': 9}"],
        "cohort.size=9: expected at most the population, 4 clients",
    ),
    "uniform cohort without size": (HEART, ["cohort={'sampling': 'uniform'}"], "cohort.size: missing"),
    "fedprox with negative mu": (HEART, ["server.mu=-0.1"], "server.mu=-0.1: expected a number >= 0"),
    "scaffold with momentum": (HEART, ["server.algorithm=scaffold"], "client.momentum=0.9: expected 0"),
    "dp budget below one round": (
        HEART,
        [DP + ", 'budget_epsilon': 0.01}"],
        "dp.budget_epsilon=0.01: one round already spends epsilon",
    ),
    "dp negative clip norm": (
        HEART,
        ["dp={'clip_norm': -1.0, 'noise_multiplier': 1.0}"],
        "dp.clip_norm=-1.0: expected",
    ),
    "dp delta out of range": (HEART, [DP + ", 'delta': 2.0}"], "dp.delta=2.0: expected a value in (0, 1)"),
    "dp unknown sampling": (HEART, [DP + ", 'sampling': 'bogus'}"], "dp.sampling='bogus': expected"),
    "dp unknown field": (HEART, ["dp={'clip_norm': 1.0, 'noise': 1.0}"], "dp.noise=1.0: unknown key"),
    "dp field of wrong type": (
        HEART,
        ["dp={'clip_norm': 'big', 'noise_multiplier': 1.0}"],
        "dp.clip_norm='big'",
    ),
    "dp cohort larger than population": (HEART, [DP + ", 'cohort_size': 7}"], "dp.cohort_size=7: expected"),
    "dp field of a private config": (
        PRIVATE,
        ["dp.noise_multiplier=-1.0"],
        "dp.noise_multiplier=-1.0: expected",
    ),
    "dp field when dp is None": (HEART, ["dp.clip_norm=1.0"], "dp.clip_norm=1.0: dp is None in this config"),
    "secagg bits out of range": (HEART, ["secagg={'bits': 64}"], "secagg.bits=64: expected a value in 1..32"),
    "secagg negative clip range": (
        HEART,
        ["secagg={'clip_range': -1.0}"],
        "secagg.clip_range=-1.0: expected",
    ),
    "cifar cohort larger than population": (CIFAR, ["cohort.size=11"], "cohort.size=11: expected at most"),
    "cifar unknown partition": (CIFAR, ["data.partition=weird"], "data.partition='weird': expected one of"),
    "cifar data missing": (
        CIFAR,
        ["data.source='jpeg'", "data.data_dir='/nonexistent/cifar'"],
        "data.data_dir='/nonexistent/cifar': no CIFAR-10 archive",
    ),
    "config file missing": (str(CONFIGS / "no_such.py"), [], "--config="),
    "config without get_config": (str(REPO / "fljax" / "__init__.py"), [], "defines no get_config()"),
}


@pytest.mark.parametrize("config, sets, expected", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_exit_2(config, sets, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        RUN.main(_argv(config, sets, tmp_path / "out"))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fljax: config error: ")
    assert expected in lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained


def test_cifar_data_dir_is_a_settable_key():
    config = RUN.load_config(CIFAR, ["data.data_dir=/some/folder", "client.learning_rate=1"])
    assert config.data.data_dir == "/some/folder"
    assert config.client.learning_rate == 1.0 and isinstance(config.client.learning_rate, float)


def test_config_error_is_a_value_error_and_bugs_keep_their_traceback(monkeypatch, tmp_path):
    assert issubclass(RUN.ConfigError, ValueError)

    def bug(*args, **kwargs):
        raise ValueError("a genuine bug")

    monkeypatch.setattr(RUN.trainer, "run_once", bug)
    with pytest.raises(ValueError, match="a genuine bug"):
        RUN.main(_argv(HEART, [], tmp_path / "out"))


@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["client.learning_rate=1", "server.algorithm=fedavgm", "cohort={'sampling': 'uniform', 'size': 2}"],
        [DP + ", 'budget_epsilon': 50.0}", "secagg={'clip_range': 1.0}"],
    ],
    ids=["tiny", "int for float, other algorithm", "dp over secagg with budget"],
)
def test_good_inputs_still_run(sets, tmp_path, capsys):
    summary = RUN.main(_argv(HEART, sets, tmp_path / "out"))
    assert summary["rounds"] == 1
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 1
    assert "config error" not in capsys.readouterr().err
