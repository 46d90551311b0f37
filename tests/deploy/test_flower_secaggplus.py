"""The SecAgg+ benchmark app (``experiments/flower_secaggplus_app.py``), run in process.

Flower's own ``SecAggPlusWorkflow`` drives the app's ClientApp (``size_mod`` and
``secaggplus_mod``) through a grid that serializes every message both ways, as the SuperLink
does, without processes or sockets: the aggregate is the nodes' weighted mean within the
quantization bound, and the sizes the server records are the sizes each node records.
"""

import importlib.util
import json
import pathlib
import types

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

APP_PATH = pathlib.Path(__file__).parents[2] / "experiments" / "flower_secaggplus_app.py"
SHAPES = [(29, 32), (32,), (32, 2), (2,)]  # the heart-disease MLP's 1,026 parameters
NODE_IDS = [11, 2024, 77777, 31337]
STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]


def load_app():
    spec = importlib.util.spec_from_file_location("flower_secaggplus_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class InProcessGrid:
    """Delivers each message to its node's ClientApp after a serialization round trip."""

    def __init__(self, app, logs: dict[int, pathlib.Path]):
        self.app, self.run = app, types.SimpleNamespace(run_id=1)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"log": str(p)}, state=RecordDict(), run_config={})
            for n, p in logs.items()
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m = serde.message_from_proto(serde.message_to_proto(m))
            reply = self.app.client(m, self.contexts[m.metadata.dst_node_id])
            replies.append(serde.message_from_proto(serde.message_to_proto(reply)))
        return replies


def run(tmp_path, app, rounds=2):
    """Run the app's ServerApp in process; its record and the nodes' lines."""
    logs = {n: tmp_path / f"node_{n}.jsonl" for n in NODE_IDS}
    spec = {
        "shapes": [list(s) for s in SHAPES],
        "rounds": rounds,
        "num-nodes": len(NODE_IDS),
        "num-shares": len(NODE_IDS),
        "reconstruction-threshold": 3,
        "timeout": 30.0,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "server.json"
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"spec": str(tmp_path / "spec.json"), "out": str(out)},
    )
    with pytest.MonkeyPatch.context() as mp:  # what Flower's ServerApp process sets before main
        for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
            mp.setattr(TaskIdentity, name, value)
        app.main(InProcessGrid(app, logs), context)
    nodes = [json.loads(line) for p in logs.values() for line in p.read_text().splitlines()]
    return json.loads(out.read_text()), nodes


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run(tmp_path_factory.mktemp("secaggplus"), load_app())


def test_aggregate_is_the_weighted_mean_within_the_quantization_bound(result):
    server, _ = result
    assert server["num_params"] == 1026
    assert [c["round"] for c in server["checks"]] == [1, 2]
    for c in server["checks"]:
        assert c["nodes"] == len(NODE_IDS) and c["failures"] == 0
        assert c["max_abs_err"] <= c["bound"] < 1e-3


def test_four_message_rounds_per_round_and_sizes_agree_with_the_nodes(result):
    server, nodes = result
    assert [(s["round"], s["stage"]) for s in server["stages"]] == [(r, st) for r in (1, 2) for st in STAGES]
    for s in server["stages"]:
        assert s["messages"] == s["replies"] == len(NODE_IDS) and s["errors"] == 0
        mine = [m for m in nodes if int(m["round"]) == s["round"] and m["stage"] == s["stage"]]
        assert len(mine) == len(NODE_IDS)
        assert s["sent"]["content"] == sum(m["received"]["content"] for m in mine)
        assert s["received"]["content"] == sum(m["sent"]["content"] for m in mine)
        assert s["sent"]["message"] > s["sent"]["content"]  # metadata around the content
    collect = [s for s in server["stages"] if s["stage"] == "collect_masked_vectors"]
    for s in collect:  # parameters out, masked parameters back: more than 4 bytes per parameter
        assert s["received"]["content"] > len(NODE_IDS) * 4 * 1026
        assert s["sent"]["content"] > len(NODE_IDS) * 4 * 1026


def test_a_node_that_sends_a_different_update_breaks_the_check(tmp_path):
    app = load_app()
    honest = app._Client.fit

    def off_by_a_bit(self, parameters, config):
        params, weight, metrics = honest(self, parameters, config)
        return [p + np.float32(0.01) for p in params], weight, metrics

    app._Client.fit = off_by_a_bit
    server, _ = run(tmp_path, app, rounds=1)
    (check,) = server["checks"]
    assert check["max_abs_err"] > 100 * check["bound"]
