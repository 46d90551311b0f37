"""The Flower ServerApp and ClientApp of a deployment (needs ``flwr``: ``pip install fljax[deploy]``).

The launcher copies this file into the Flower app as ``fljax_flower_app.py`` (its
``pyproject.toml`` names ``fljax_flower_app:server`` and ``fljax_flower_app:client``), so that
the ClientApp, which Flower starts once per message, imports Flower and the standard library
only: it forwards the message's payload to the node's fljax runtime (:mod:`fljax.deploy.node`,
a Unix socket named by the SuperNode's ``--node-config socket=...``) and returns the reply.
The ServerApp imports fljax and runs :func:`server_main`.

Every message carries one :mod:`fljax.deploy.wire` payload in ``ConfigRecord({"payload":
bytes})`` under the record name ``"fljax"``; its type is ``query``.

Run config keys (``[tool.flwr.app.config]``, set by ``flwr run --run-config``): ``config-json``
(the experiment's config, :func:`fljax.experiment.config.to_dict`), ``out`` (run folder),
``num-clients``, ``num-classes``, ``secure`` (``none``, ``secagg``, ``he``), ``timeout``
(seconds per message round), ``wait-nodes`` (seconds to wait for every node to connect),
``max-message-bytes``, ``he-poly-modulus-degree``.
"""

from __future__ import annotations

import socket
import struct
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

RECORD = "fljax"
_FRAME = struct.Struct(">Q")

client = ClientApp()
server = ServerApp()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def forward(socket_path: str, payload: bytes, timeout: float = 600.0) -> bytes:
    """Send ``payload`` to the node runtime at ``socket_path``; its reply (length-prefixed frames)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(_FRAME.pack(len(payload)) + payload)
        (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
        return _recv_exact(sock, size)


def _error(text: str) -> bytes:
    # the same bytes as fljax.deploy.wire.pack({"error": text}), without importing fljax
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{"s:error": np.array(text)})
    return buf.getvalue()


@client.query()
def query(msg: Message, context: Context) -> Message:
    """Forward one request to this node's fljax runtime."""
    try:
        payload = msg.content[RECORD]["payload"]
        reply = forward(str(context.node_config["socket"]), bytes(payload))
    except (OSError, KeyError, TypeError) as e:
        reply = _error(f"node runtime unreachable: {type(e).__name__}: {e}")
    return Message(RecordDict({RECORD: ConfigRecord({"payload": reply})}), reply_to=msg)


class GridExchange:
    """``exchange({client_id: bytes}, timeout)`` over Flower's grid (see :mod:`fljax.deploy.server`).

    Client ids map to Flower node ids through each node's ``hello``; a node id the grid has not
    seen before (a new or restarted SuperNode) is asked for its ``hello`` before each message
    round, and replaces the client's old node (its verify key too): the newest node claiming a
    client serves it. Nodes are not authenticated beyond TLS to the SuperLink; Flower's
    SuperNode authentication (``--enable-supernode-auth``) is the way to bind node keys.
    """

    def __init__(self, grid: Grid, log=print):
        self.grid, self.log = grid, log
        self.node_of: dict[int, int] = {}
        self.known: set[int] = set()
        self.infos: dict = {}  # client id -> NodeInfo of its current node
        self.remote = None  # RemoteClients, whose node table is kept current

    def _send(self, by_node: dict[int, bytes], timeout: float) -> dict[int, bytes | str]:
        messages = [
            Message(RecordDict({RECORD: ConfigRecord({"payload": b})}), dst_node_id=n, message_type="query")
            for n, b in by_node.items()
        ]
        out: dict[int, bytes | str] = {}
        for r in self.grid.send_and_receive(messages, timeout=timeout):
            src = r.metadata.src_node_id
            if r.has_error():
                out[src] = f"Flower error {r.error.code}: {r.error.reason}"
            else:
                out[src] = bytes(r.content[RECORD]["payload"])
        return out

    def refresh(self, timeout: float) -> None:
        """Register node ids not seen before (their ``hello``)."""
        from fljax.deploy import server as server_lib

        new = [n for n in self.grid.get_node_ids() if n not in self.known]
        if not new:
            return
        replies = self._send({n: _hello_request() for n in new}, timeout)
        infos = server_lib.hello(
            lambda reqs, t: {n: replies.get(n, "no answer") for n in reqs}, new, timeout, self.log
        )
        for n, info in infos.items():
            self.known.add(n)
            c = info.client_id
            old = self.node_of.get(c)
            if old is not None and old != n:  # the newest node of a client serves it (a restart)
                self.log(f"fljax deploy: client {c} rejoined as node {n} (was node {old})")
            self.node_of[c] = n
            self.infos[c] = info
            if self.remote is not None:
                self.remote.nodes[c] = info

    def __call__(self, requests: dict[int, bytes], timeout: float) -> dict[int, bytes | str]:
        self.refresh(min(timeout, 30.0))
        by_node = {self.node_of[c]: b for c, b in requests.items() if c in self.node_of}
        replies = self._send(by_node, timeout)
        client_of = {n: c for c, n in self.node_of.items()}
        out: dict[int, bytes | str] = {client_of[n]: r for n, r in replies.items() if n in client_of}
        for c in requests:
            if c not in self.node_of:
                out[c] = "no SuperNode connected for this client"
        return out


def _hello_request() -> bytes:
    from fljax.deploy import wire

    return wire.pack({"op": "hello"})


def server_main(grid: Grid, context: Context) -> None:
    """Wait for the nodes, register them, and run the trainer with them (:func:`fljax.deploy.server.run`)."""
    import json
    import pathlib

    from fljax.deploy import server as server_lib
    from fljax.experiment import config as cfg

    rc = context.run_config
    config = cfg.from_dict(cfg.Config, json.loads(pathlib.Path(str(rc["config-json"])).read_text()))
    num_clients, timeout = int(rc["num-clients"]), float(rc["timeout"])
    exchange = GridExchange(grid)
    deadline = time.monotonic() + float(rc["wait-nodes"])
    while True:
        exchange.refresh(timeout)
        if len(exchange.node_of) >= num_clients or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    nodes = dict(exchange.infos)
    print(f"fljax deploy: {len(nodes)} of {num_clients} clients registered: {sorted(nodes)}", flush=True)
    secure = None if rc["secure"] == "none" else str(rc["secure"])
    remote = server_lib.RemoteClients(
        exchange,
        nodes,
        secure=secure,
        timeout=timeout,
        max_message_bytes=int(rc["max-message-bytes"]),
        he_poly_modulus_degree=int(rc["he-poly-modulus-degree"]),
        log=lambda line: print(line, flush=True),
    )
    exchange.remote = remote
    server_lib.run(
        config, str(rc["out"]), remote, num_clients=num_clients, num_classes=int(rc["num-classes"])
    )


@server.main()
def main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
