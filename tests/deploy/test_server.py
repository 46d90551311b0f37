"""The deployment's server and nodes in one process (no Flower): equality with the simulation,
and what happens to bad, missing and late replies.

Nodes are real :class:`fljax.deploy.node.Node` objects on the heart-disease shards; the
exchange calls them directly and can corrupt, withhold or drop their replies per client and
step. The same code runs behind Flower in tests/deploy/test_flower.py.
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from fljax import evaluation
from fljax.deploy import local, server, wire
from fljax.deploy import node as node_lib
from fljax.experiment import cli, trainer
from fljax.experiment import config as cfg

OVERRIDES = ["rounds=2", "baselines=()", "repeats=1", "checkpoint_every=0", "eval_every=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = cli.load_config("experiments/configs/heart_disease.py", OVERRIDES)
    secure = dataclasses.replace(base, secagg=cfg.SecAgg())
    prepared = local.load_data(base)
    train_data, num_classes = prepared.train, prepared.num_classes
    tmp = tmp_path_factory.mktemp("shards")
    paths = [
        node_lib.write_shard(tmp / f"{c}.npz", d, c, num_classes, test=prepared.test.client(c))
        for c, d in enumerate(local.shards(base, train_data))
    ]

    @functools.cache
    def nodes(config):
        """The nodes of a run of ``config`` (a node reads the run's config, as in a deployment)."""
        return {c: node_lib.Node(config, path) for c, path in enumerate(paths)}

    model = trainer.build_model(base.model, num_classes)
    return dict(
        base=base,
        secure=secure,
        data=train_data,
        test=prepared.test,
        num_classes=num_classes,
        nodes=nodes,
        model=model,
    )


def exchange(nodes, faults=None):
    """Call the nodes directly; ``faults[(client, op)]`` rewrites a reply (None: no answer)."""
    faults = faults or {}

    def call(requests, timeout):
        out = {}
        for c, r in requests.items():
            op = wire.unpack(r)["op"]
            reply = nodes[c].handle(r)
            if (c, op) in faults:
                reply = faults[(c, op)](reply)
                if reply is None:
                    continue
            out[c] = reply
        return out

    return call


def deploy(world, tmp_path, config, secure=None, faults=None, **kwargs):
    nodes = world["nodes"](config)
    call = exchange(nodes, faults)
    remote = server.RemoteClients(call, server.hello(call, list(nodes), 5), secure=secure, **kwargs)
    summary = server.run(config, tmp_path, remote, num_clients=4, num_classes=world["num_classes"])
    params = server.load_params(tmp_path / "final_params.npz", _template(world))
    return summary, params, remote


def _template(world):
    return server.init_template(world["base"], world["data"].x.shape[1:], world["num_classes"])


@functools.cache
def _simulated(config):
    train_data, num_classes = local.load_train_data(config)
    model = trainer.build_model(config.model, num_classes)
    return trainer.train(config, train_data, model, progress=False)


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# Tolerance: the node runs the update for one client, the simulation vmaps 4 clients on 2
# devices; XLA may reassociate float32 sums differently (measured: 0 on one device). 2 rounds of
# SGD on params of size ~1 keep such differences below 1e-6.
TOL = 1e-6


# Masking ("secagg") is run under DP below (the same path with the nodes clipping).
@pytest.mark.parametrize("secure", [None, "he"])
def test_deployed_run_equals_the_simulation(world, tmp_path, secure):
    config = world["base"] if secure is None else world["secure"]
    faults = None
    if secure == "he":  # client 2 restarts before every round: it no longer has the CKKS context

        def forget(reply):
            world["nodes"](config)[2]._he_context = None
            return reply

        faults = {(2, "train"): forget}
    summary, params, remote = deploy(world, tmp_path, config, secure, faults=faults)
    sim = _simulated(config)
    assert max_diff(params, sim.state.params) <= TOL
    assert summary["deployment"]["dropped"] == []
    rec = sim.records[-1]
    for k in ("total_weight", "num_clients"):
        assert summary["final"][k] == rec[k]
    stats = summary["deployment"]["rounds"]
    assert [s["round"] for s in stats] == [1, 2]
    phases = {
        "secagg": {"train", "advertise", "share", "masked", "unmask"},
        "he": {"train", "he_encrypt", "he_decrypt"},
    }
    assert phases.get(secure, {"train"}) <= set(stats[-1])
    assert all(s["train"]["bytes_sent"] > 0 for s in stats)
    if secure == "he":  # the public context goes once per node (again to client 2 only)
        first, second = (r["he_encrypt"]["bytes_sent"] for r in stats)
        context = len(remote._he[1])
        assert first > 4 * context and 1.5 * context < first - second < 3.5 * context
    # The nodes evaluated the final model on their held-out rows: the simulation's fed_* metrics.
    reference = evaluation.federated_evaluate(world["model"], params, world["test"], metrics=config.metrics)
    fed = {k[4:]: v for k, v in summary["final"].items() if k.startswith("fed_")}
    assert set(fed) == {
        k for k in reference if not k.endswith("_pooled") and not k.startswith("per_client_loss")
    }
    assert fed["per_client_accuracy"] == reference["per_client_accuracy"]
    assert fed["weighted_accuracy"] == reference["weighted_accuracy"]
    for k, v in fed.items():
        np.testing.assert_allclose(v, reference[k], rtol=1e-6)
    assert stats[-1]["evaluate"]["bytes_received"] > 0 and "evaluate" not in stats[0]
    info = summary["deployment"]["nodes"]
    if secure is None:
        loss = rec["client_train_loss_weighted_mean"]
        assert summary["final"]["client_train_loss_weighted_mean"] == pytest.approx(loss, rel=1e-6)
        assert all(n["num_examples"] > 0 for n in info.values())
    else:  # the server learns neither example counts nor training losses
        assert np.isnan(summary["final"]["client_train_loss_weighted_mean"])
        written = json.loads((tmp_path / "summary.json").read_text())["final"]
        assert written["client_train_loss_weighted_mean"] is None  # strict JSON: null, "nan" beside it
        assert all(n["num_examples"] == -1 for n in info.values())


def test_dp_over_the_secure_sum_deployed_equals_the_simulation(world, tmp_path):
    # The nodes clip (the server never sees an update); the server adds the noise to the
    # decoded sum. With reproducible noise the deployed run is the simulation's.
    dp = cfg.DP(clip_norm=0.05, noise_multiplier=0.3, reproducible=True, release_unnoised_metrics=True)
    config = dataclasses.replace(world["secure"], dp=dp)
    summary, params, _ = deploy(world, tmp_path, config, "secagg")
    sim = _simulated(config)
    assert max_diff(params, sim.state.params) <= TOL
    base = _simulated(dataclasses.replace(config, dp=None))
    assert max_diff(params, base.state.params) > 10 * TOL  # clipping and noise did act
    rec, final = sim.records[-1], summary["final"]
    assert rec["unnoised_num_clipped"] > 0  # the simulation clips (and counts in the clear) ...
    assert final["unnoised_num_clipped"] == -1  # ... the deployment's server cannot count
    assert final["unnoised_num_clients"] == rec["unnoised_num_clients"] == 4
    assert final["dp_noise_std"] == rec["dp_noise_std"] > 0
    assert np.isnan(final["unnoised_client_train_loss_weighted_mean"])  # withheld by the nodes
    assert all(n["num_examples"] == -1 for n in summary["deployment"]["nodes"].values())
    stats = summary["deployment"]["rounds"]
    assert {"train", "advertise", "share", "masked", "unmask"} <= set(stats[-1])
    assert summary["deployment"]["dropped"] == []


@pytest.mark.parametrize(
    ("dp", "match"),
    [
        (cfg.DP(clip_norm=0.1, noise_multiplier=1.0, target_quantile=0.5), "adaptive clipping"),
        (
            cfg.DP(
                clip_norm=0.1,
                noise_multiplier=1.0,
                weighting="capped",
                max_weight=50.0,
                expected_cohort_weight=2.0,
            ),
            "weighting='capped'",
        ),
    ],
)
def test_dp_the_nodes_cannot_compute_is_refused(world, dp, match):
    config = dataclasses.replace(world["secure"], dp=dp)
    with pytest.raises(ValueError, match=match):
        server.server_config(config, "secagg")


def test_a_secure_node_never_sends_its_update_in_the_clear(world):
    node = world["nodes"](world["secure"])[0]
    params = trainer.models.init_params(world["model"], world["data"].x.shape[1:], _init_key(world["base"]))
    request = {"op": "train", **wire.tree_to_arrays(params, "p"), "key": np.zeros(2, np.uint32)}
    reply = wire.unpack(node.handle(wire.pack(request | {"secure": False})))
    assert "never leaves it in the clear" in reply["error"]
    reply = wire.unpack(node.handle(wire.pack(request | {"secure": True})))
    assert not any(k.startswith("d") and k[1:].isdigit() for k in reply)
    assert float(reply["weight"]) == 1.0 and np.all(np.isnan(reply["metrics"]))


def _nan(reply):
    m = wire.unpack(reply)
    return wire.pack(
        {k: (np.full_like(v, np.nan) if k.startswith("d") and k[1:].isdigit() else v) for k, v in m.items()}
    )


def _wrong_shape(reply):
    m = wire.unpack(reply)
    return wire.pack(m | {"d0": np.zeros(m["d0"].size + 1, m["d0"].dtype)})


def _oversized(reply):
    return wire.pack(wire.unpack(reply) | {"padding": np.zeros(300_000, np.uint8)})


def test_bad_replies_are_dropped_with_their_reason_and_never_averaged(world, tmp_path):
    bad = {
        (0, "train"): lambda r: b"\x00 not a message",
        (1, "train"): _nan,
        (2, "train"): _wrong_shape,
        (3, "train"): _oversized,
    }
    # Round by round the same bad clients: every one of them is dropped, the others averaged.
    faulty = {k: v for k, v in bad.items() if k[0] in (0, 1)}
    summary, params, _ = deploy(
        world, tmp_path / "a", world["base"], faults=faulty, max_message_bytes=200_000
    )
    missing = {(c, "train"): (lambda r: None) for c in (0, 1)}
    _, params_missing, _ = deploy(world, tmp_path / "b", world["base"], faults=missing)
    assert max_diff(params, params_missing) == 0.0  # a bad update counts exactly as no update
    reasons = {(e["round"], e["client_id"]): e["reason"] for e in summary["deployment"]["dropped"]}
    assert set(reasons) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert "malformed" in reasons[(1, 0)] and "non-finite" in reasons[(1, 1)]
    assert summary["final"]["num_clients"] == 2
    events = [line for line in (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 4
    other = {k: v for k, v in bad.items() if k[0] in (2, 3)}
    summary, _, _ = deploy(world, tmp_path / "c", world["base"], faults=other, max_message_bytes=200_000)
    reasons = {e["client_id"]: e["reason"] for e in summary["deployment"]["dropped"] if e["round"] == 1}
    assert "expected" in reasons[2] and "shape" in reasons[2]
    assert "oversized" in reasons[3]
    assert np.isfinite(summary["final"]["delta_norm"])


def test_secagg_completes_with_a_dropout_mid_round_and_aborts_below_threshold(world, tmp_path):
    # Client 3 vanishes after sharing its keys (before its masked input): t = 3 of 4 survive.
    late = {(3, "masked"): lambda r: None}
    summary, params, _ = deploy(world, tmp_path / "a", world["secure"], "secagg", faults=late)
    early = {(3, "train"): lambda r: None}
    _, params_early, _ = deploy(world, tmp_path / "b", world["secure"], "secagg", faults=early)
    assert max_diff(params, params_early) == 0.0  # its masks are removed exactly: the sum of 3
    assert summary["final"]["num_clients"] == 3 and summary["final"]["aborted"] == 0
    assert {(e["client_id"], e["phase"]) for e in summary["deployment"]["dropped"]} == {(3, "masked")}
    # Two of four vanish after the key agreement: below t = 3, every round aborts, nothing moves.
    two = {(c, "share"): (lambda r: None) for c in (2, 3)}
    summary, params, _ = deploy(world, tmp_path / "c", world["secure"], "secagg", faults=two)
    assert summary["final"]["aborted"] == 1 and summary["final"]["delta_norm"] == 0.0
    init = trainer.models.init_params(world["model"], world["data"].x.shape[1:], _init_key(world["base"]))
    assert max_diff(params, init) == 0.0
    assert any(
        e["phase"] == "secure_sum" and "threshold" in e["reason"] for e in summary["deployment"]["dropped"]
    )


def _init_key(config):
    from fljax import random as fl_random

    return fl_random.stream(fl_random.run_key(config.seed), "init")


def test_unsupported_settings_are_refused(world):
    with pytest.raises(ValueError, match="keeps client state"):
        server.server_config(
            dataclasses.replace(world["base"], server=cfg.Server(algorithm="scaffold")), None
        )
    with pytest.raises(ValueError, match="needs config.secagg"):
        server.server_config(world["base"], "secagg")
    with pytest.raises(ValueError, match="secure must be"):
        server.RemoteClients(lambda r, t: {}, {}, secure="plain")


def test_a_node_answers_bad_requests_with_an_error_not_a_crash(world):
    node = world["nodes"](world["base"])[0]
    for request, expected in [
        (b"junk", "MalformedMessage"),
        (wire.pack({"op": "reboot"}), "unknown op"),
        (
            wire.pack({"op": "train", "p0": np.zeros(3, np.float32), "key": np.zeros(2, np.uint32)}),
            "ShapeMismatch",
        ),
        (wire.pack({"op": "masked", "message": b"x"}), "MalformedMessage"),  # no round, or junk
    ]:
        assert expected in wire.unpack(node.handle(request))["error"]
    assert wire.unpack(node.handle(wire.pack({"op": "hello"})))["client_id"] == 0


def test_the_config_selects_a_deployment_and_bad_ones_fail_before_any_process(world, tmp_path):
    stateful = dataclasses.replace(
        world["base"], server=cfg.Server(algorithm="mimelite"), deploy=cfg.Deploy(secure="secagg")
    )
    with pytest.raises(ValueError, match="keeps client state"):
        trainer.run(stateful, tmp_path / "run")  # trainer.run -> fljax.deploy.local.run
    assert not (tmp_path / "run" / "deploy").exists()


def test_a_failing_transport_drops_the_round_not_the_server(world, tmp_path):
    def broken(reply):
        raise ConnectionError("grid unreachable")

    summary, params, _ = deploy(world, tmp_path, world["base"], faults={(0, "train"): broken})
    assert summary["final"]["num_clients"] == 0 and summary["final"]["delta_norm"] == 0.0
    reasons = {e["reason"] for e in summary["deployment"]["dropped"]}
    assert reasons == {"transport failed: ConnectionError: grid unreachable"}
    init = trainer.models.init_params(world["model"], world["data"].x.shape[1:], _init_key(world["base"]))
    assert max_diff(params, init) == 0.0


def test_a_node_that_fails_the_evaluation_counts_as_one_without_held_out_data(world, tmp_path):
    junk = {(1, "evaluate"): lambda r: b"\x00 not a message"}
    summary, params, _ = deploy(world, tmp_path, world["base"], faults=junk)
    assert [(e["client_id"], e["phase"]) for e in summary["deployment"]["dropped"]] == [(1, "evaluate")]
    final = summary["final"]
    assert np.isnan(final["fed_per_client_accuracy"][1])
    others = [0, 2, 3]
    reference = evaluation.federated_evaluate(world["model"], params, world["test"].subset(others))
    assert [final["fed_per_client_accuracy"][c] for c in others] == reference["per_client_accuracy"]
    assert final["fed_weighted_accuracy"] == reference["weighted_accuracy"]
