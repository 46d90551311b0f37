"""A real local deployment on 127.0.0.1: SuperLink and 4 SuperNodes (heart disease, one hospital
each) as separate processes, TLS with certificates generated here, the app submitted with
``flwr run``. The nodes read the masking run's config (secagg); the run has a node that crashes
mid-round (its whole process group SIGKILLed on the ``masked`` step) and restarts.
"""

import dataclasses
import json
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from fljax.deploy import local, server  # noqa: E402
from fljax.experiment import cli  # noqa: E402
from fljax.experiment import config as cfg  # noqa: E402

OVERRIDES = ["baselines=()", "repeats=1", "checkpoint_every=0", "eval_every=2"]
CRASHER = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    base = cli.load_config("experiments/configs/heart_disease.py", OVERRIDES + ["rounds=2"])
    secure = dataclasses.replace(base, secagg=cfg.SecAgg())
    work = tmp_path_factory.mktemp("deploy")
    configs = {
        # no evaluation message round after the last round: the kill test is about training
        "secagg": dataclasses.replace(secure, deploy=cfg.Deploy(secure="secagg", evaluate=False)),
    }
    dep, facts = local.prepare(configs["secagg"], work)  # the nodes read the secure run's config
    for name, c in configs.items():
        (work / f"{name}.json").write_text(json.dumps(cfg.to_dict(c)))
    dep.start_superlink()
    for c in range(facts["num-clients"]):
        dep.start_node(c, fault="crash:masked" if c == CRASHER else None)
    groups = []
    try:
        dep.wait_ready()
        groups = [dep.superlink.pid] + [p.pid for p in dep.nodes.values()]
        yield dep, facts, configs, work
    finally:
        groups += [p.pid for p in dep.nodes.values()]
        dep.stop()
        time.sleep(1)
        for g in groups:  # nothing left behind: no process of any group still runs
            assert local.live_processes(g) == [], g


def submit(deployment, name, secure, timeout):
    dep, facts, configs, work = deployment
    out = work / f"run_{name}"
    result = dep.submit(
        facts
        | {"config-json": str(work / f"{name}.json"), "out": str(out), "secure": secure, "timeout": timeout},
        timeout=420,
    )
    log = result.stdout + result.stderr
    assert (out / "summary.json").exists(), log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    config = configs[name]
    template = server.init_template(config, summary["deployment"]["nodes"]["0"]["feature_shape"], 2)
    return summary, server.load_params(out / "final_params.npz", template), log


# Equality with the simulation (plaintext, masking under DP, HE) and the nodes' refusal of a
# plaintext run under secure aggregation run through the same server and node code in process
# (tests/deploy/test_server.py), and equality over Flower in experiments/results/deploy_local.md
# (max abs diff 0); here, real processes: a node killed mid-round.
def test_secagg_survives_a_node_killed_mid_round_which_then_rejoins(deployment):
    dep = deployment[0]
    crashed = dep.nodes[CRASHER]

    def restart():  # as an operator would: start the crashed node again, without the fault
        crashed.wait()
        time.sleep(1)
        dep.nodes.pop(CRASHER, None)
        dep.start_node(CRASHER)

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    summary, params, log = submit(deployment, "secagg", "secagg", 20.0)  # waits this out once
    restarter.join(timeout=5)
    rounds = [
        json.loads(line) for line in (deployment[3] / "run_secagg" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds[0]["num_clients"] == 3 and rounds[0]["aborted"] == 0  # t = 3 of 4 survived
    assert rounds[1]["num_clients"] == 4  # the restarted node is back
    dropped = summary["deployment"]["dropped"]
    assert [(e["round"], e["client_id"], e["phase"]) for e in dropped] == [(1, CRASHER, "masked")]
    assert f"dropped client {CRASHER} (masked)" in log and f"client {CRASHER} rejoined" in log
    assert np.all(np.isfinite(np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])))
