"""A node's side of a deployment: its data shard, the jitted client update and its secrets.

:class:`Node` answers the server's requests (:mod:`fljax.deploy.wire` messages) for one
client: ``hello`` (its id, example count and signing key), ``train`` (the same client update
the simulation maps over the cohort, built by :func:`fljax.experiment.trainer.build_algorithm`
from the same config, run on the node's shard with the key the server's round derived for
this client), and, under secure aggregation, ``encode`` (the fixed-point encoding of its own
update, :func:`fljax.secagg.encoding.encode`), the four steps of the masking protocol
(:class:`fljax.secagg.protocol.Client`) and, under homomorphic encryption, ``he_encrypt``,
plus ``he_keygen``/``he_decrypt`` on the node that holds the CKKS secret key, and
``evaluate`` (the federated evaluation's part of this client, on its held-out rows). Under secure
aggregation the update never leaves the node in the clear.

Flower starts one ClientApp process per message; the node's runtime is long-lived instead
(:func:`serve`, one per SuperNode, on a Unix socket only its owner can open), so the update is
compiled once and the protocol's secrets stay in one process's memory for the whole round.
The ClientApp (:mod:`fljax.deploy.flower_app`) forwards each message to it.

A shard is an ``.npz`` with ``x``, ``y`` and ``mask`` (one client's examples, padded exactly as
the simulation's cohort pads them) and ``client_id``, written by :func:`write_shard`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pathlib
import signal
import socket
import socketserver
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fljax import evaluation, models, secagg
from fljax import simulation as sim
from fljax import tree as fl_tree
from fljax.base import ClientData, Performance
from fljax.data import FederatedData
from fljax.deploy import wire
from fljax.experiment import config as cfg
from fljax.experiment import trainer
from fljax.secagg import encoding
from fljax.secagg import messages as sa_msg
from fljax.secagg import protocol as sa_protocol

RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
UNKNOWN_CONTEXT = "unknown CKKS context"  # the reply that asks the server for the context again
STATELESS = ("fedavg", "fedavgm", "fedprox", "fedsgd", "fednova", "qffl", "fedadam", "fedyogi", "fedadagrad")
"""Algorithms whose client update is stateless (deployable); the others keep client state."""


def write_shard(path, data: ClientData, client_id: int, num_classes: int, test=None) -> pathlib.Path:
    """Write one client's padded data (``x[num_examples, ...]``, ``y``, ``mask``) to ``path``,
    and its held-out rows ``test = (x, y)`` (unpadded; possibly none) if it has a test split."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    held_out = {} if test is None else {"test_x": np.asarray(test[0]), "test_y": np.asarray(test[1])}
    np.savez(
        path,
        x=np.asarray(data.x),
        y=np.asarray(data.y),
        mask=np.asarray(data.mask),
        client_id=np.int64(client_id),
        num_classes=np.int64(num_classes),
        **held_out,
    )
    return path


def eval_part_names(metrics) -> list[str]:
    """The fields of a node's ``evaluate`` reply, in order."""
    return ["loss_sum", "correct", "count"] + [f"per_client_{m}" for m in metrics]


def deployable_dp_problem(config: cfg.Config) -> str | None:
    """Why ``config``'s DP cannot run over a secure sum in a deployment, or None if it can.

    The nodes clip (the server never sees an update), so everything the DP aggregator computes
    from the updates or their weights must be computable at a node: a fixed clip norm and
    uniform weighting are; adaptive clipping's clipped count and capped weights are not.
    """
    if config.distributed_dp is not None or config.dp_ftrl is not None:
        return "distributed_dp and dp_ftrl over a secure sum are not deployable; use dp (DP-FedAvg)"
    dp = config.dp
    if dp is None:
        return None
    if dp.target_quantile is not None:
        return (
            "dp.target_quantile (adaptive clipping) over a secure sum is not deployable: its clipped "
            "count would have to go through the sum; use a fixed clip_norm"
        )
    if dp.weighting != "uniform":
        return (
            f"dp.weighting={dp.weighting!r} over a secure sum is not deployable: the server would need "
            "each client's weight; use 'uniform'"
        )
    return None


@functools.partial(jax.jit, static_argnums=2)
def _clipped_over_c(delta, clip_norm, per_leaf: bool):
    """One update clipped to L2 norm ``clip_norm`` and divided by it, exactly as
    :func:`fljax.privacy.dp` scales each row of the cohort before its inner sum."""
    batched = jax.tree.map(lambda a: jnp.asarray(a)[None], delta)
    c = jnp.asarray(clip_norm, jnp.float32)
    factors, _ = fl_tree.clip_factors(batched, c, per_leaf=per_leaf)
    factors = jax.tree.map(lambda f: f / c, factors)
    return jax.tree.map(lambda a: a[0], fl_tree.scale(batched, factors))


class _Capture:
    """``remote`` for :func:`trainer.build_algorithm` that keeps the client update it is given."""

    update = None

    def client(self, update):
        self.update = update
        return update

    def secure_sum(self, config):
        return secagg.secure_sum(config)


def client_update(config: cfg.Config, model):
    """The client update the trainer builds for ``config`` (the one the simulation vmaps)."""
    if config.server.algorithm not in STATELESS:
        raise ValueError(
            f"server.algorithm={config.server.algorithm!r} keeps client state across rounds; a deployment "
            f"runs the stateless ones: {', '.join(STATELESS)}"
        )
    capture = _Capture()
    trainer.build_algorithm(config, model, remote=capture)
    return capture.update


class Node:
    """One client's runtime: answers :mod:`fljax.deploy.wire` requests (:meth:`handle`).

    Args:
      config: the experiment's config (the same file the server runs).
      shard: path of this client's shard (:func:`write_shard`).
      fault: for failure tests only: ``"crash:<op>"``: on receiving request ``op``, SIGKILL
        this node's process group (the runtime and its SuperNode), i.e. a crash mid-round;
        ``None`` in a real deployment.
    """

    def __init__(self, config: cfg.Config, shard, *, fault: str | None = None):
        if fault is not None and not fault.startswith("crash:"):
            raise ValueError(f"unknown fault {fault!r}; expected 'crash:<op>'")
        self.config, self.fault = config, fault
        with np.load(shard, allow_pickle=False) as z:
            self.data = ClientData(z["x"], z["y"], z["mask"])
            self.client_id = int(z["client_id"])
            num_classes = int(z["num_classes"])
            self.test = (
                FederatedData.from_clients(
                    [(z["test_x"], z["test_y"])], num_classes=num_classes, allow_empty=True
                )
                if "test_x" in z
                else None
            )
        self.model = trainer.build_model(config.model, num_classes)
        update = sim.apply_performance(client_update(config, self.model), Performance(chunk_size=None))
        self._train = jax.jit(jax.vmap(update, in_axes=(None, 0, 0)))
        self.template = jax.eval_shape(
            lambda: models.init_params(self.model, self.data.x.shape[1:], jax.random.key(0))
        )
        self._signing = ed25519.Ed25519PrivateKey.generate()
        self._used_rounds: set[int] = set()
        self._delta = None  # this round's flattened update, kept here under secure aggregation
        self._weight = 0.0
        self._values = None  # its encoding in Z_(2**bits)
        self._client = None  # the masking protocol's client of this round
        self._key_holder = None
        self._he_context = None  # (SHA-256, bytes) of the CKKS public context, sent once per key

    # ------------------------------------------------------------------ requests

    def handle(self, data: bytes) -> bytes:
        """Answer one request; errors come back as ``{"error": message}``, never raised."""
        try:
            request = wire.unpack(data)
            op = wire.field(request, "op")
            reply = getattr(self, f"_op_{op}", None)
            if reply is None:
                raise wire.MalformedMessage(f"unknown op {op!r}")
            if self.fault == f"crash:{op}":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            out = reply(request)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the server
            return wire.pack({"error": f"{type(e).__name__}: {e}"})
        return wire.pack(out)

    @property
    def secure(self) -> bool:
        """Whether this node's config sets secure aggregation: then its update, weight and
        training metrics never leave it in the clear, whatever the server asks."""
        return self.config.secagg is not None

    def _op_hello(self, request) -> dict:
        return {
            "client_id": self.client_id,
            "num_examples": -1 if self.secure else int(self.data.mask.sum()),
            "padded_examples": int(self.data.mask.shape[0]),
            "has_test": self.test is not None,
            "feature_shape": np.asarray(self.data.x.shape[1:], np.int64),
            "verify_key": self._signing.public_key().public_bytes(*RAW),
        }

    def _op_train(self, request) -> dict:
        if bool(request.get("secure", False)) != self.secure:
            raise ValueError(
                "this node's config sets secagg: its update never leaves it in the clear"
                if self.secure
                else "the server asks for secure aggregation but this node's config has no secagg section"
            )
        params = wire.arrays_to_tree(request, "p", self.template)
        key = jax.random.wrap_key_data(np.asarray(wire.field(request, "key"), np.uint32))
        batch = jax.tree.map(lambda a: a[None], self.data)
        out = self._train(params, batch, key[None])
        out = jax.tree.map(lambda a: np.asarray(a[0]), out)
        names = sorted(out.metrics)
        if not self.secure:
            return {
                "weight": np.float32(out.weight),
                "metric_names": np.array(names),
                "metrics": np.array([out.metrics[k] for k in names], np.float32),
            } | wire.tree_to_arrays(out.delta, "d")
        # Secure aggregation: the update stays here and goes into the secure sum only. The server
        # learns whether this client takes part (weight 1 or 0), not its example count; the
        # training metrics are withheld (NaN).
        finite = all(np.all(np.isfinite(a)) for a in jax.tree.leaves(out.delta))
        weight = float(out.weight) if finite else 0.0
        self._delta, self._weight = self._secure_input(out.delta if finite else None, weight)
        return {
            "weight": np.float32(1.0 if weight > 0 else 0.0),
            "metric_names": np.array(names),
            "metrics": np.full((len(names),), np.nan, np.float32),
            "finite": finite,
        }

    def _secure_input(self, delta, weight: float) -> tuple[np.ndarray, float]:
        """This node's row of the secure sum: ``(flat update, weight)``.

        Without DP, the update and its weight, as the trainer's secure mean sums them. Under
        ``config.dp`` (:func:`fljax.privacy.dp` over the secure sum), what that aggregator hands
        its inner sum in simulation, computed here because the server never sees the update:
        the update clipped to L2 norm ``C`` and divided by ``C`` (``clip_scheme`` as
        configured), and the bounded weight (uniform: 1). ``delta=None`` (a non-finite update)
        contributes zeros with weight 0.
        """
        size = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.template))
        if delta is None or weight <= 0:
            return np.zeros((size,), np.float32), 0.0
        dp = self.config.dp
        if dp is not None:
            unsupported = deployable_dp_problem(self.config)
            if unsupported:
                raise ValueError(unsupported)
            weight = 1.0  # uniform weighting (the only one deployable over a secure sum)
            if math.isfinite(dp.clip_norm):
                delta = _clipped_over_c(delta, np.float32(dp.clip_norm), dp.clip_scheme == "per_layer")
        flat = np.concatenate([np.ravel(np.asarray(a)).astype(np.float32) for a in jax.tree.leaves(delta)])
        return flat, float(weight)

    def _op_evaluate(self, request) -> dict:
        """This client's part of the federated evaluation on its held-out rows
        (:func:`fljax.evaluation.client_parts`: loss sum, correct, count, per-client metrics)."""
        if self.test is None:
            raise wire.MalformedMessage("this node has no held-out data")
        params = wire.arrays_to_tree(request, "p", self.template)
        parts = evaluation.client_parts(self.model, params, self.test, metrics=self.config.metrics)
        return {
            k: np.asarray(v, np.float64)
            for k, v in parts.items()
            if k in eval_part_names(self.config.metrics)
        }

    def _op_encode(self, request) -> dict:
        """This client's row of :func:`fljax.secagg.encoding.encode` over the cohort's slots."""
        if self._delta is None:
            raise wire.MalformedMessage("encode before train")
        sa = self.config.secagg
        n, slot = int(wire.field(request, "num_slots")), int(wire.field(request, "slot"))
        if not 0 <= slot < n:
            raise ValueError(f"slot {slot} outside 0..{n - 1}")
        bits = sa.ring_bits(n)
        key = jax.random.wrap_key_data(np.asarray(wire.field(request, "rounding_key"), np.uint32))
        x = jnp.zeros((n, self._delta.size), jnp.float32).at[slot].set(self._delta)
        w = jnp.zeros((n,), jnp.float32).at[slot].set(self._weight)
        enc = jax.jit(encoding.encode, static_argnums=(3, 4))(x, w, key, sa, bits)
        self._values = np.asarray(enc.values[slot], np.uint32)
        self._bits = bits
        return {"range_clipped": bool(enc.num_range_clipped > 0)}

    # ------------------------------------------------------------------ masking protocol

    def _op_advertise(self, request) -> dict:
        out = self._op_encode(request)
        n = int(request["num_slots"])
        verify = {
            int(s): ed25519.Ed25519PublicKey.from_public_bytes(k.tobytes())
            for s, k in zip(request["verify_slots"], request["verify_keys"], strict=True)
        }
        verify[sa_msg.SERVER] = ed25519.Ed25519PublicKey.from_public_bytes(wire.field(request, "server_key"))
        self._client = sa_protocol.Client(
            int(request["slot"]),
            self._signing,
            verify,
            self.config.secagg,
            n,
            int(wire.field(request, "round_id")),
            used_round_ids=self._used_rounds,
        )
        return out | {"message": self._client.advertise_keys()}

    def _protocol(self):
        if self._client is None:
            raise wire.MalformedMessage("protocol step before advertise")
        return self._client

    def _op_share(self, request) -> dict:
        return {"message": self._protocol().share_keys(wire.field(request, "message"))}

    def _op_masked(self, request) -> dict:
        return {"message": self._protocol().masked_input(wire.field(request, "message"), self._values)}

    def _op_unmask(self, request) -> dict:
        reply = self._protocol().unmask(wire.field(request, "message"))
        self._client, self._delta, self._values = None, None, None
        return {"message": reply}

    # ------------------------------------------------------------------ homomorphic encryption

    def _op_he_keygen(self, request) -> dict:
        from fljax.secagg import he

        self._key_holder = he.KeyHolder(he.HEConfig(**_he_kwargs(request)))
        return {
            "public_context": self._key_holder.public_context,
            "server_context": self._key_holder.server_context,
        }

    def _op_he_encrypt(self, request) -> dict:
        from fljax.secagg import he

        context_id = bytes(np.asarray(wire.field(request, "context_id"), np.uint8))
        if "public_context" in request:
            public = wire.field(request, "public_context")
            if hashlib.sha256(public).digest() != context_id:
                raise wire.MalformedMessage("public_context does not match its context_id")
            self._he_context = (context_id, public)
        elif self._he_context is None or self._he_context[0] != context_id:
            raise wire.MalformedMessage(f"{UNKNOWN_CONTEXT}: send the public context")
        out = self._op_encode(request)
        half = 1 << (self._bits - 1)
        signed = ((self._values.astype(np.int64) + half) % (1 << self._bits)) - half
        cts = he.encrypt(
            self._he_context[1],
            signed,
            he.HEConfig(**_he_kwargs(request)),
            scale_bits=int(request["scale_bits"]),
            max_abs=int(request["max_abs"]),
        )
        self._delta, self._values = None, None
        return out | {"num_ciphertexts": len(cts)} | {f"ct{i}": c for i, c in enumerate(cts)}

    def _op_he_decrypt(self, request) -> dict:
        if self._key_holder is None:
            raise wire.MalformedMessage("this node holds no CKKS secret key")
        count = int(request["num_ciphertexts"])
        total = [wire.field(request, f"ct{i}") for i in range(count)]
        s = self._key_holder.decrypt(
            total,
            dim=int(request["dim"]),
            num_clients=int(request["num_clients"]),
            max_abs=int(request["max_abs"]),
        )
        return {"total": s}


def _he_kwargs(request: dict) -> dict:
    return {
        "poly_modulus_degree": int(request["poly_modulus_degree"]),
        "min_clients": int(request["min_clients"]),
    }


# ---------------------------------------------------------------------- the node's process


_FRAME = struct.Struct(">Q")


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_FRAME.pack(len(data)) + data)


def recv_frame(sock: socket.socket, max_bytes: int = 4 * wire.MAX_MESSAGE_BYTES) -> bytes:
    head = _recv_exact(sock, _FRAME.size)
    (size,) = _FRAME.unpack(head)
    if size > max_bytes:
        raise wire.OversizedMessage(f"frame of {size} bytes > {max_bytes}")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def ask(socket_path, data: bytes, timeout: float = 600.0) -> bytes:
    """Send one request to the node runtime at ``socket_path`` and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        send_frame(sock, data)
        return recv_frame(sock)


def serve(node: Node, socket_path) -> None:
    """Answer requests on the Unix socket ``socket_path`` (mode 0600) until killed."""
    path = pathlib.Path(socket_path)
    path.unlink(missing_ok=True)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data = recv_frame(self.request)
            send_frame(self.request, node.handle(data))

    old = os.umask(0o177)
    try:
        server = socketserver.UnixStreamServer(str(path), Handler)
    finally:
        os.umask(old)
    print(f"fljax node {node.client_id}: ready on {path}", flush=True)
    server.serve_forever()


def main(argv=None) -> None:
    """``python -m fljax.deploy.node --config config.json --shard shard.npz --socket path``."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", required=True, help="config.json of the run (cfg.to_dict)")
    p.add_argument("--shard", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    config = cfg.from_dict(cfg.Config, json.loads(pathlib.Path(args.config).read_text()))
    start = time.perf_counter()
    node = Node(config, args.shard, fault=args.fault)
    print(f"fljax node {node.client_id}: loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    serve(node, args.socket)


if __name__ == "__main__":
    main()
