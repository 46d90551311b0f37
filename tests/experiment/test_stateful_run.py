"""SCAFFOLD through the one trainer: client states live with the run and resume bit for bit."""

import jax
import numpy as np

from fljax import checkpoint, models
from tests import helpers
from tests.experiment.test_run import HEART, _metrics, _runner

SCAFFOLD = [
    "--config", HEART, "--set", "baselines=()", "--set", "eval_every=2", "--set", "checkpoint_every=2",
    "--set", "repeats=1", "--no-progress", "--set", "server.algorithm='scaffold'",
    "--set", "client.momentum=0", "--set", "cohort={'sampling': 'uniform', 'size': 2}",
]  # fmt: skip


def test_scaffold_run_resumes_with_its_client_states_bit_for_bit(tmp_path):
    run = _runner()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run.main(SCAFFOLD + ["--set", "rounds=4", "--out", str(straight)])
    run.main(SCAFFOLD + ["--set", "rounds=2", "--out", str(resumed)])
    run.main(SCAFFOLD + ["--set", "rounds=4", "--out", str(resumed), "--resume"])
    assert _metrics(straight) == _metrics(resumed)
    config = run.load_config(HEART, ["server.algorithm='scaffold'", "client.momentum=0"])
    model = run.build_model(config.model, 2)
    params = models.init_params(model, (29,), jax.random.key(0))
    states = run.build_client_states(config, model, params, 4)
    template = (run.build_algorithm(config, model, num_clients=4).init(params), states.tree)
    (a, a_clients), _ = checkpoint.restore(straight / "checkpoints", 4, template)
    (b, b_clients), _ = checkpoint.restore(resumed / "checkpoints", 4, template)
    helpers.assert_trees_equal((a, a_clients), (b, b_clients))
    # Two of the four hospitals per round: after 4 rounds some control variates moved, and the
    # server's variate is their mean (every client started at zero).
    c_i = np.concatenate([np.asarray(x).reshape(4, -1) for x in jax.tree.leaves(a_clients)], axis=1)
    c = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(a.control)])
    assert np.any(np.abs(c_i) > 0)
    np.testing.assert_allclose(c, c_i.mean(axis=0), rtol=1e-4, atol=1e-6)
