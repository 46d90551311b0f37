"""A Flower app that runs Flower's own SecAgg+ workflow, measured (numpy and Flower only, no JAX).

``experiments/bench_flower_secaggplus.py`` copies this file into a Flower app folder as
``secaggplus_app.py`` (its ``pyproject.toml`` names ``secaggplus_app:server`` and
``secaggplus_app:client``) and runs it on a local TLS deployment. Flower starts one ClientApp
process per message, so the ClientApp imports numpy and Flower only.

Server: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares, reconstruction_threshold))``
on a legacy ``FedAvg`` that samples every node, sends no evaluation messages and starts from
zero float32 parameters of the spec file's shapes (so no message asks a node for initial
parameters); each aggregate, which SecAgg+ dequantizes to float64, is cast back to float32.
Every ``grid.send_and_receive`` is measured: per FL round and stage, the wall seconds and the
serialized size (``flwr.common.serde``) of each message sent and received, both the whole
``Message`` proto and its content (``RecordDict``) alone. The aggregate that SecAgg+ hands to
``FedAvg.aggregate_fit`` is compared with the plaintext weighted mean of the nodes' updates,
which the server can recompute because the updates are a function of the node id and the round
(:func:`update_for`): the benchmark measures the protocol, not training.

Client: a ``NumPyClient`` whose ``fit`` returns :func:`update_for` (the received parameters plus a
pseudo-random step drawn from the node id and the round) with weight :func:`weight_for`, behind
``mods=[size_mod, secaggplus_mod]``: :func:`size_mod`, outermost, appends one JSON line per
message to the file named by the SuperNode's ``--node-config log="..."``: stage, round, sizes in
and out, seconds inside the mod, and the ClientApp process's age on entry.

Run config keys (``[tool.flwr.app.config]``): ``spec`` (a JSON file: ``shapes``, ``rounds``,
``num-nodes``, ``num-shares``, ``reconstruction-threshold``, ``timeout``) and ``out`` (a JSON file
the ServerApp writes).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays, serde
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

STEP = 0.5  # each coordinate of a node's step lies in [-STEP, STEP)


def weight_for(node_id: int) -> int:
    """The example count a node reports (50..100; below SecAgg+'s ``max_weight`` of 1000)."""
    return 50 + int(node_id) % 51


def update_for(node_id: int, server_round: int, params: list[np.ndarray]) -> list[np.ndarray]:
    """A node's returned parameters: ``params`` plus a uniform step seeded by node id and round."""
    rng = np.random.default_rng([int(node_id) % 2**63, int(server_round)])
    return [(p + rng.uniform(-STEP, STEP, size=p.shape)).astype(np.float32, copy=False) for p in params]


def sizes(msg: Message) -> dict:
    """Serialized bytes of ``msg``: the whole ``Message`` proto and its content alone."""
    content = serde.recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0
    return {"message": serde.message_to_proto(msg).ByteSize(), "content": content}


def _stage(msg: Message) -> str:
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
    return msg.metadata.message_type


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        start_ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in pathlib.Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK"))


def size_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Record each message's stage, sizes in and out and seconds (a JSON line per message)."""
    age = _process_age()
    stage, got = _stage(msg), sizes(msg)  # before secaggplus_mod pops the stage
    start = time.perf_counter()
    reply = call_next(msg, ctxt)
    sec = time.perf_counter() - start
    line = {
        "node_id": int(msg.metadata.dst_node_id),
        "round": msg.metadata.group_id,
        "stage": stage,
        "received": got,
        "sent": sizes(reply),
        "sec_in_mods": sec,
        "process_age_on_entry": age,
    }
    path = ctxt.node_config.get("log")
    if path:
        with open(str(path), "a") as f:
            f.write(json.dumps(line) + "\n")
    return reply


class _Client(NumPyClient):
    def __init__(self, node_id: int):
        self.node_id = node_id

    def fit(self, parameters, config):
        server_round = int(config.get("round", 0))
        return update_for(self.node_id, server_round, parameters), weight_for(self.node_id), {}


def _client_fn(context: Context):
    return _Client(int(context.node_id)).to_client()


client = ClientApp(client_fn=_client_fn, mods=[size_mod, secaggplus_mod])


class _MeasuredGrid:
    """Forwards to a Grid; ``send_and_receive`` records seconds and sizes per stage."""

    def __init__(self, grid: Grid, log: list):
        self._grid, self._log, self.stage, self.round = grid, log, "init", 0

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        sent = [sizes(m) for m in messages]
        start = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sec = time.perf_counter() - start
        self._log.append(
            {
                "round": self.round,
                "stage": self.stage,
                "sec": sec,
                "messages": len(messages),
                "replies": len(replies),
                "errors": sum(r.has_error() for r in replies),
                "sent": {k: sum(s[k] for s in sent) for k in ("message", "content")},
                "received": {k: sum(sizes(r)[k] for r in replies) for k in ("message", "content")},
            }
        )
        return replies


class _TimedSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ whose stages name themselves to the measured grid."""

    def _named(self, name, stage, grid, context, state):
        grid.stage = name
        grid.round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        return stage(grid, context, state)

    def setup_stage(self, grid, context, state):
        return self._named("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):
        return self._named("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        return self._named(
            "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid, context, state):
        return self._named("unmask", super().unmask_stage, grid, context, state)


class _CheckedFedAvg(FedAvg):
    """FedAvg that sends the round to the nodes, checks each SecAgg+ aggregate, keeps float32."""

    def __init__(self, checks: list, clipping_range: float, quantization_range: int, **kwargs):
        super().__init__(**kwargs)
        self.checks, self.clip, self.q = checks, clipping_range, quantization_range
        self.current: list[np.ndarray] = []

    def configure_fit(self, server_round, parameters, client_manager):
        self.current = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, fit_ins in pairs:
            fit_ins.config["round"] = server_round
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        got = parameters_to_ndarrays(results[0][1].parameters) if results else []
        ids = [proxy.node_id for proxy, _ in results]
        weights = np.array([weight_for(n) for n in ids], dtype=np.float64)
        updates = [update_for(n, server_round, self.current) for n in ids]
        want = [
            sum(w * u[i].astype(np.float64) for w, u in zip(weights, updates, strict=True)) / weights.sum()
            for i in range(len(self.current))
        ]
        err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True)) if got else None
        # Each node's weighted vector is stochastically rounded to a step of 2 clip / Q: at most
        # one step per node in the sum, divided by the summed weight ratio (weights / 1000).
        bound = len(ids) * (2 * self.clip / self.q) / (weights.sum() / 1000.0)
        self.checks.append(
            {
                "round": server_round,
                "nodes": len(ids),
                "max_abs_err": err,
                "bound": bound,
                "failures": len(failures),
            }
        )
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return params, metrics
        # SecAgg+ dequantizes to float64; the model is float32, as the nodes' updates are.
        return ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(params)]), metrics


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` FL rounds of SecAgg+ FedAvg and write the measurements to ``out``."""
    spec = json.loads(pathlib.Path(str(context.run_config["spec"])).read_text())
    n = int(spec["num-nodes"])
    params = [np.zeros(s, np.float32) for s in spec["shapes"]]
    stages: list = []
    checks: list = []
    workflow = _TimedSecAggPlus(
        num_shares=int(spec["num-shares"]),
        reconstruction_threshold=int(spec["reconstruction-threshold"]),
        timeout=float(spec["timeout"]),
    )
    strategy = _CheckedFedAvg(
        checks,
        workflow.clipping_range,
        workflow.quantization_range,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(params),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=int(spec["rounds"])), strategy=strategy
    )
    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=workflow)(_MeasuredGrid(grid, stages), legacy)
    out = {
        "num_params": int(sum(p.size for p in params)),
        "wall_sec": time.perf_counter() - start,
        "stages": stages,
        "checks": checks,
    }
    pathlib.Path(str(context.run_config["out"])).write_text(json.dumps(out, indent=1))
