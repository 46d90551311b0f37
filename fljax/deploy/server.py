"""The server side of a deployment: the trainer's own round, with the clients on the network.

:class:`RemoteClients` is what :func:`fljax.experiment.trainer.build_algorithm` takes as
``remote``: ``client(update)`` returns a stand-in for the client update that the jitted round
calls for every cohort slot (``jax.pure_callback``): it sends the server params and the key
that :func:`fljax.simulation.run_clients` derived for that client (``fold_in(stream(round_key,
"clients"), client_id)``, exactly as in simulation) to the client's node, which runs the real
update (:mod:`fljax.deploy.node`), and returns the node's delta, weight and metrics. Sampling,
the aggregator (DP included), the server optimizer, metrics and checkpoints are the trainer's
(:func:`run` calls :func:`fljax.experiment.trainer.train`), so a deployed run computes what
the simulation computes, with each client's update computed where its data is.

Secure aggregation (``secure="secagg"`` or ``"he"``): the node keeps its update and the stand-in
returns zeros; ``secure_sum(secagg_config)`` replaces the trainer's secure sum. Each node
encodes its own update (:func:`fljax.secagg.encoding.encode`, its row of the cohort's encoding
with the round's ``"rounding"`` key, so the integers are the simulation's), then either

* ``"secagg"``: the masking protocol's four steps (:class:`fljax.secagg.protocol.Server`), one
  message round each; the server holds the advertised keys, encrypted shares, masked inputs
  and the survivors' sum, never an input. A node that fails or does not answer within the
  timeout at any step is a dropout; the round completes with ``>= t`` survivors and aborts
  below: no sum, a zero delta and ``aborted`` 1 in the metrics (the server optimizer steps on
  the zero delta, which leaves FedAvg's model unchanged);
* ``"he"``: each node encrypts its encoding under the CKKS public key of the key-holding node
  (the first node, :mod:`fljax.secagg.he`), the server adds ciphertexts and the key holder
  decrypts only the sum. The round aborts likewise with fewer than two inputs, without the
  key holder, or on a ciphertext that does not parse.

The decoded sum is the simulation's bit for bit (integer sums are exact). Under secure
aggregation a node whose config sets ``secagg`` never sends its update, its example count
(``hello`` reports -1) or its training metrics (NaN, so the round's ``client_*`` means are
null): the server learns that it takes part (weight 1 or 0), two flags (non-finite update,
range clipped) and the sum. DP-FedAvg over the secure sum (``dp`` with ``secagg``) is
deployable with a fixed clip norm and uniform weighting: each node clips its own update and
divides it by ``C`` exactly as :func:`fljax.privacy.dp` does in simulation
(:func:`fljax.deploy.node.deployable_dp_problem` says what is refused and why), the server adds
the noise to the decoded sum; ``num_clipped`` is then -1 (not observed by the server).

Failures never stop the server: a node that does not answer, answers an error, sends bytes
that do not parse, a message over ``max_message_bytes``, a delta of the wrong shape or a
non-finite update is dropped from the round (weight 0, its delta never averaged), logged in one
line (``fljax deploy: round r: dropped client c (phase): reason``) and recorded in
``events.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import secrets
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fljax import aggregators, evaluation, models
from fljax import random as fl_random
from fljax.base import Aggregator, ClientOutput
from fljax.data import FederatedData
from fljax.deploy import node as node_lib
from fljax.deploy import wire
from fljax.experiment import config as cfg
from fljax.experiment import outputs, trainer
from fljax.secagg import encoding
from fljax.secagg import messages as sa_msg
from fljax.secagg import protocol as sa_protocol

UNKNOWN_CONTEXT = node_lib.UNKNOWN_CONTEXT

Exchange = Callable[[dict[int, bytes], float], dict[int, bytes | str]]
"""``exchange({client_id: request}, timeout) -> {client_id: reply bytes, or a str saying why
there is none}``; a client missing from the result did not answer in time."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """What a node announced at ``hello``: its client id, example count (-1: withheld, under
    secure aggregation), padded size, feature shape and Ed25519 verify key (registered for the
    masking protocol)."""

    client_id: int
    num_examples: int
    padded_examples: int
    feature_shape: tuple[int, ...]
    verify_key: bytes
    has_test: bool = False


def hello(exchange: Exchange, client_ids, timeout: float, log=print) -> dict[int, NodeInfo]:
    """Ask every node for its :class:`NodeInfo`; nodes that fail are left out (logged)."""
    replies = exchange({c: wire.pack({"op": "hello"}) for c in client_ids}, timeout)
    nodes = {}
    for c in client_ids:
        r = replies.get(c, "no answer")
        try:
            if isinstance(r, str):
                raise ValueError(r)
            m = wire.unpack(r)
            if "error" in m:
                raise ValueError(m["error"])
            nodes[c] = NodeInfo(
                client_id=int(m["client_id"]),
                num_examples=int(m["num_examples"]),
                padded_examples=int(m["padded_examples"]),
                feature_shape=tuple(int(v) for v in m["feature_shape"]),
                verify_key=wire.field(m, "verify_key"),
                has_test=bool(m.get("has_test", False)),
            )
        except (ValueError, KeyError) as e:
            log(f"fljax deploy: node of client {c} not registered: {e}")
    return nodes


class RemoteClients:
    """The deployment's clients, as :func:`trainer.build_algorithm`'s ``remote``.

    Args:
      exchange: sends requests to nodes by client id (:data:`Exchange`; Flower's grid in
        :mod:`fljax.deploy.flower_app`, or in-process nodes in tests).
      nodes: the registered nodes (:func:`hello`), by client id.
      secure: ``None`` (plaintext updates), ``"secagg"`` or ``"he"``.
      timeout: seconds to wait for the replies of one message round.
      max_message_bytes: larger replies are refused unread.
      he_poly_modulus_degree: CKKS ring degree with ``secure="he"``.
      events_path: where to append one JSON line per dropped node (optional).
      log: one-line logger.
    """

    def __init__(
        self,
        exchange: Exchange,
        nodes: dict[int, NodeInfo],
        *,
        secure: str | None = None,
        timeout: float = 60.0,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
        he_poly_modulus_degree: int = 8192,
        events_path=None,
        log=print,
    ):
        if secure not in (None, "secagg", "he"):
            raise ValueError(f"secure must be None, 'secagg' or 'he', got {secure!r}")
        self.exchange, self.nodes, self.secure = exchange, dict(nodes), secure
        self.timeout, self.max_bytes, self.log = float(timeout), int(max_message_bytes), log
        self.he_degree = he_poly_modulus_degree
        self.events_path = None if events_path is None else pathlib.Path(events_path)
        self.events: list[dict] = []
        self.stats: list[dict] = []
        self.round = 0
        self._slots: dict[int, int] = {}  # this round's trained slots -> client id
        self._signing = ed25519.Ed25519PrivateKey.generate()
        self._used_rounds: set[int] = set()
        self._he = None  # (key holder's client id, public context, server context)
        self._has_context: set[int] = set()  # clients that hold the current public context

    # ------------------------------------------------------------------ bookkeeping

    def drop(self, client_id: int, phase: str, reason: str) -> None:
        """Record and log that ``client_id`` is out of this round."""
        event = {"round": self.round, "client_id": int(client_id), "phase": phase, "reason": reason}
        self.events.append(event)
        self.log(f"fljax deploy: round {self.round}: dropped client {client_id} ({phase}): {reason}")
        if self.events_path is not None:
            outputs.append_line(self.events_path, json.dumps(event) + "\n")

    def _ask(self, phase: str, requests: dict[int, bytes], quiet: str | None = None) -> dict[int, dict]:
        """One message round: the parsed replies of the clients that answered well; a client
        whose error message contains ``quiet`` is not dropped: it maps to ``quiet`` itself."""
        start = time.perf_counter()
        try:
            raw = self.exchange(requests, self.timeout) if requests else {}
        except Exception as e:  # noqa: BLE001 - a failed transport means no answers, not a crash
            raw = {c: f"transport failed: {type(e).__name__}: {e}" for c in requests}
        stat = self.stats[-1].setdefault(phase, {"sec": 0.0, "bytes_sent": 0, "bytes_received": 0})
        stat["sec"] += time.perf_counter() - start
        stat["bytes_sent"] += sum(len(r) for r in requests.values())
        good = {}
        for c in requests:
            r = raw.get(c)
            if r is None:
                self.drop(c, phase, f"no answer within {self.timeout:g}s")
                continue
            if isinstance(r, str):
                self.drop(c, phase, r)
                continue
            stat["bytes_received"] += len(r)
            try:
                m = wire.unpack(r, self.max_bytes)
            except ValueError as e:
                self.drop(c, phase, str(e))
                continue
            if "error" in m:
                if quiet is not None and quiet in str(m["error"]):
                    good[c] = quiet
                    continue
                self.drop(c, phase, f"node error: {m['error']}")
                continue
            good[c] = m
        return good

    # ------------------------------------------------------------------ client updates

    def client(self, update):
        """A stand-in for ``update`` that runs it on the clients' nodes (see the module docstring)."""

        def remote(server_params, client_data, key):
            shapes = jax.eval_shape(update, server_params, client_data, key)
            first = jax.tree.leaves(client_data.x)[0]
            cid = jnp.round(jnp.reshape(first, (-1,))[0]).astype(jnp.int32) - 1  # placeholder data
            out = (shapes.delta, jax.ShapeDtypeStruct((), jnp.float32), shapes.metrics)

            def host(params, cids, key_data):
                return self._train(params, cids, key_data, shapes)

            delta, weight, metrics = jax.pure_callback(
                host, out, server_params, cid, jax.random.key_data(key), vmap_method="expand_dims"
            )
            return ClientOutput(delta, weight, metrics)

        return remote

    def _train(self, params, cids, key_data, shapes):
        batched = np.ndim(cids) == 1
        cids = np.atleast_1d(np.asarray(cids))
        key_data = np.asarray(key_data).reshape((cids.size, -1))
        if batched:
            params = jax.tree.map(lambda a: np.asarray(a)[0], params)
        self.round += 1
        self.stats.append({"round": self.round})
        n = cids.size
        delta = jax.tree.map(lambda s: np.zeros((n,) + s.shape, s.dtype), shapes.delta)
        weight = np.zeros((n,), np.float32)
        metrics = {k: np.zeros((n,), v.dtype) for k, v in shapes.metrics.items()}
        requests, slot_of = {}, {}
        flat_params = wire.tree_to_arrays(params, "p")
        for slot, c in enumerate(cids.tolist()):
            if c < 0:
                continue
            if c not in self.nodes:
                self.drop(c, "train", "no registered node for this client")
                continue
            slot_of[c] = slot
            requests[c] = wire.pack(
                {"op": "train", **flat_params, "key": key_data[slot], "secure": self.secure is not None}
            )
        template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes.delta)
        self._slots = {}
        for c, m in self._ask("train", requests).items():
            slot = slot_of[c]
            try:
                w = float(wire.field(m, "weight"))
                if not np.isfinite(w) or w < 0:
                    raise ValueError(f"weight {w} is not a finite non-negative number")
                names = [str(s) for s in np.atleast_1d(wire.field(m, "metric_names"))]
                values = np.atleast_1d(wire.field(m, "metrics"))
                if sorted(names) != sorted(shapes.metrics) or values.shape != (len(names),):
                    raise wire.ShapeMismatch(f"metrics {names}, expected {sorted(shapes.metrics)}")
                if self.secure is None:
                    d = wire.arrays_to_tree(m, "d", template)
                    if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(d)):
                        raise ValueError("non-finite update (NaN or inf)")
                elif not bool(wire.field(m, "finite")):
                    raise ValueError("non-finite update (NaN or inf), reported by the node")
            except ValueError as e:
                self.drop(c, "train", str(e))
                continue
            weight[slot] = w
            for k, v in zip(names, values, strict=True):
                metrics[k][slot] = v
            if self.secure is None:
                for acc, leaf in zip(jax.tree.leaves(delta), jax.tree.leaves(d), strict=True):
                    acc[slot] = leaf
            self._slots[slot] = c
        if not batched:
            delta = jax.tree.map(lambda a: a[0], delta)
            return delta, weight[0], {k: v[0] for k, v in metrics.items()}
        return delta, weight, metrics

    # ------------------------------------------------------------------ evaluation

    def evaluator(self, metrics, num_clients: int):
        """The trainer's ``eval_fn``: every node evaluates the model on its held-out rows
        (one message round) and the server combines their parts
        (:func:`fljax.evaluation.combine_client_parts`) into the simulation's ``fed_*``
        metrics, the pooled metrics excepted (they would need every example's output). A node
        that fails counts as a client without held-out data (and is recorded as dropped)."""
        names = node_lib.eval_part_names(metrics)

        def eval_fn(params):
            params = jax.device_get(params)
            request = wire.pack({"op": "evaluate", **wire.tree_to_arrays(params, "p")})
            asked = [c for c in range(num_clients) if c in self.nodes and self.nodes[c].has_test]
            if not self.stats:
                self.stats.append({"round": self.round})
            replies = self._ask("evaluate", {c: request for c in asked})
            parts = []
            for c in range(num_clients):
                part = None
                if c in replies:
                    try:
                        part = {
                            k: np.atleast_1d(np.asarray(wire.field(replies[c], k), np.float64)) for k in names
                        }
                        if any(part[k].shape[0] != 1 for k in names):
                            raise wire.ShapeMismatch("one client's part expected")
                    except ValueError as e:
                        self.drop(c, "evaluate", str(e))
                        part = None
                parts.append(part)
            recall = "per_client_per_class_recall"
            width = next((p[recall].shape[1:] for p in parts if p and recall in p), ())
            empty = {k: np.zeros((1,), np.float64) for k in ("loss_sum", "correct", "count")}
            for m in metrics:
                shape = (1, *width) if m == "per_class_recall" else (1,)
                empty[f"per_client_{m}"] = np.full(shape, np.nan)
            joined = {k: np.concatenate([(p or empty)[k] for p in parts]) for k in names}
            if not joined["count"].sum():
                return {}
            fe = evaluation.combine_client_parts(joined, metrics=metrics)
            return {f"fed_{k}": v for k, v in fe.items() if not k.startswith("per_client_loss")}

        return eval_fn

    # ------------------------------------------------------------------ secure sums

    def secure_sum(self, sa_config) -> Aggregator:
        """The secure weighted sum over the network (a sum, like :func:`fljax.secagg.secure_sum`)."""
        if self.secure is None:
            raise ValueError("config.secagg is set but the deployment has secure=None; pick 'secagg' or 'he'")
        if sa_config.dropout_rate > 0:
            raise ValueError(
                "secagg.dropout_rate simulates dropouts; a deployment has real ones: set it to 0"
            )

        def init(params):
            del params
            return aggregators.EmptyState()

        def aggregate(state, deltas, weights, key):
            n = weights.shape[0]
            dim = sum(int(np.prod(leaf.shape[1:])) for leaf in jax.tree.leaves(deltas))
            bits = sa_config.ring_bits(n)
            out = (
                jax.ShapeDtypeStruct((dim + 1,), jnp.uint32),
                jax.ShapeDtypeStruct((n,), jnp.bool_),
                jax.ShapeDtypeStruct((), jnp.bool_),
                jax.ShapeDtypeStruct((), jnp.int32),
            )
            rounding = jax.random.key_data(fl_random.stream(key, "rounding"))

            def host(w, rk):
                return self._secure_round(np.asarray(w), np.asarray(rk), sa_config, dim, bits)

            total, survived, aborted, clipped = jax.pure_callback(host, out, weights, rounding)
            weighted, total_weight = encoding.decode(total, sa_config, bits)
            counted = encoding.quantize_weights(weights, sa_config) > 0
            metrics = {
                "num_nonfinite": jnp.zeros((), jnp.int32),
                "total_weight": total_weight,
                "num_clients": jnp.sum(counted & survived & ~aborted).astype(jnp.int32),
                "num_dropped": jnp.sum(counted & ~survived).astype(jnp.int32),
                "num_range_clipped": clipped,
                "aborted": aborted.astype(jnp.int32),
                "num_clipped": jnp.int32(-1),  # under DP the nodes clip: the server cannot count
            }
            return state, encoding.unflatten(weighted, deltas), metrics

        return Aggregator(init, aggregate)

    def _secure_round(self, w, rounding_key, sa_config, dim, bits):
        n = w.shape[0]
        live = {slot: c for slot, c in self._slots.items() if w[slot] > 0}
        zeros = np.zeros(dim + 1, np.uint32)
        common = {"num_slots": n, "rounding_key": rounding_key}
        start = time.perf_counter()
        try:
            if self.secure == "secagg":
                total, survivors, clipped = self._masking(live, common, sa_config, n, dim + 1)
            else:
                total, survivors, clipped = self._encrypted(live, common, sa_config, n, dim + 1, bits)
        except Exception as e:  # noqa: BLE001 - ProtocolAbort, or e.g. a ciphertext that does not parse
            reason = str(e) if isinstance(e, sa_msg.ProtocolAbort) else f"{type(e).__name__}: {e}"
            self.log(f"fljax deploy: round {self.round}: secure sum aborted: {reason}")
            event = {"round": self.round, "client_id": -1, "phase": "secure_sum", "reason": reason}
            self.events.append(event)
            if self.events_path is not None:
                outputs.append_line(self.events_path, json.dumps(event) + "\n")
            return zeros, np.zeros(n, np.bool_), np.bool_(True), np.int32(0)
        finally:
            self.stats[-1]["secure_sum_sec"] = time.perf_counter() - start
        survived = np.zeros(n, np.bool_)
        survived[sorted(survivors)] = True
        return np.asarray(total, np.uint32), survived, np.bool_(False), np.int32(clipped)

    def _masking(self, live: dict[int, int], common: dict, sa_config, n: int, dim: int):
        t = sa_config.threshold_for(n)
        if len(live) < t:
            raise sa_msg.ProtocolAbort(f"{len(live)} clients trained < threshold {t}")
        round_id = secrets.randbits(64)
        slots = sorted(live)
        verify = {
            s: ed25519.Ed25519PublicKey.from_public_bytes(self.nodes[live[s]].verify_key) for s in slots
        }
        verify[sa_msg.SERVER] = self._signing.public_key()
        server = sa_protocol.Server(
            self._signing, verify, sa_config, n, dim, round_id, used_round_ids=self._used_rounds
        )
        keys = np.stack([np.frombuffer(self.nodes[live[s]].verify_key, np.uint8) for s in slots])
        first = common | {
            "op": "advertise",
            "round_id": np.uint64(round_id),
            "verify_slots": np.asarray(slots, np.int64),
            "verify_keys": keys,
            "server_key": self._signing.public_key().public_bytes(*node_lib.RAW),
        }
        requests = {live[s]: wire.pack(first | {"slot": s}) for s in slots}
        clipped = 0
        for op in ("advertise", "share", "masked", "unmask"):
            replies = self._ask(op, requests)
            for c, m in replies.items():
                try:
                    server.receive(wire.field(m, "message"))
                except (sa_msg.ProtocolError, ValueError) as e:
                    self.drop(c, op, f"protocol message refused: {type(e).__name__}: {e}")
                    continue
                clipped += int(op == "advertise" and bool(m.get("range_clipped", False)))
            result = server.finish_step()  # ProtocolAbort below the threshold
            if op == "unmask":
                return result, set(server.u3), clipped
            nxt = {"advertise": "share", "share": "masked", "masked": "unmask"}[op]
            requests = {live[s]: wire.pack({"op": nxt, "message": data}) for s, data in result.items()}
        raise AssertionError("unreachable")

    def _encrypted(self, live: dict[int, int], common: dict, sa_config, n: int, dim: int, bits: int):
        from fljax.secagg import he

        min_clients = 2
        if len(live) < min_clients:
            raise sa_msg.ProtocolAbort(
                f"{len(live)} clients trained < {min_clients}: a sum of one is its input"
            )
        he_fields = {"poly_modulus_degree": self.he_degree, "min_clients": min_clients}
        if self._he is None:
            holder = min(self.nodes)
            replies = self._ask("he_keygen", {holder: wire.pack({"op": "he_keygen"} | he_fields)})
            if holder not in replies:
                raise sa_msg.ProtocolAbort(f"the key holder (client {holder}) did not publish a key")
            m = replies[holder]
            self._he = (holder, wire.field(m, "public_context"), wire.field(m, "server_context"))
            self._has_context = set()
        holder, public, server_context = self._he
        he_config = he.HEConfig(poly_modulus_degree=self.he_degree, min_clients=min_clients)
        max_abs = max(sa_config.max_abs_int, sa_config.weight_levels)
        k = he_config.scale_bits(len(live), max_abs)
        # The public context (about 260 KB at N = 8192) goes to a node once per key; later
        # requests name it by its SHA-256. A node that no longer has it (restarted) says so and
        # gets it again within the same message round.
        context_id = np.frombuffer(hashlib.sha256(public).digest(), np.uint8)
        base = (
            common
            | he_fields
            | {"op": "he_encrypt", "context_id": context_id, "scale_bits": k, "max_abs": max_abs}
        )

        def request(c, s, send_context):
            return wire.pack(base | {"slot": s} | ({"public_context": public} if send_context else {}))

        replies = self._ask(
            "he_encrypt",
            {c: request(c, s, c not in self._has_context) for s, c in live.items()},
            quiet=UNKNOWN_CONTEXT,
        )
        again = {c: request(c, s, True) for s, c in live.items() if isinstance(replies.get(c), str)}
        self._has_context -= set(again)
        replies = {c: m for c, m in replies.items() if not isinstance(m, str)}
        if again:
            replies |= self._ask("he_encrypt", again)
        self._has_context |= set(replies)
        cts, survivors, clipped = [], set(), 0
        slot_of = {c: s for s, c in live.items()}
        count = -(-dim // he_config.slots)
        for c, m in replies.items():
            try:
                if int(wire.field(m, "num_ciphertexts")) != count:
                    raise wire.ShapeMismatch(f"{m['num_ciphertexts']} ciphertexts, expected {count}")
                cts.append([wire.field(m, f"ct{i}") for i in range(count)])
            except ValueError as e:
                self.drop(c, "he_encrypt", str(e))
                continue
            survivors.add(slot_of[c])
            clipped += int(bool(m.get("range_clipped", False)))
        if len(cts) < min_clients:
            raise sa_msg.ProtocolAbort(f"{len(cts)} encrypted inputs < {min_clients}")
        start = time.perf_counter()
        total_ct = he.add(server_context, cts)
        self.stats[-1]["he_add_sec"] = time.perf_counter() - start
        request = {"op": "he_decrypt", "num_ciphertexts": len(total_ct), "dim": dim, "num_clients": len(cts)}
        request |= {"max_abs": max_abs} | {f"ct{i}": c for i, c in enumerate(total_ct)}
        replies = self._ask("he_decrypt", {holder: wire.pack(request)})
        if holder not in replies:
            raise sa_msg.ProtocolAbort(f"the key holder (client {holder}) did not decrypt the sum")
        total = np.asarray(wire.field(replies[holder], "total"), np.int64)
        if total.shape != (dim,):
            raise sa_msg.ProtocolAbort(
                f"the key holder returned a sum of shape {total.shape}, expected ({dim},)"
            )
        return (total % (1 << bits)).astype(np.uint32), survivors, clipped


# ---------------------------------------------------------------------- a deployed run


def placeholder_population(nodes: dict[int, NodeInfo], num_clients: int, num_classes: int) -> FederatedData:
    """The server's stand-in population: client ``c``'s rows are all ``c + 1`` (no data).

    Only shapes, the padded size and ids reach the server: the trainer samples, pads and
    derives keys from them exactly as in simulation, and the stand-in client update reads the
    id back. Every stand-in client has the padded size (the nodes' common ``padded_examples``),
    so the round is one cohort, never size buckets (on a heavy-tailed population the simulation
    may bucket its clients: the same training up to float reassociation).
    """
    missing = sorted(set(range(num_clients)) - set(nodes))
    if missing:
        raise ValueError(
            f"no registered node for clients {missing}; every client of the population needs one"
        )
    shapes = {nodes[c].feature_shape for c in nodes}
    if len(shapes) != 1:
        raise ValueError(f"nodes report different feature shapes: {sorted(shapes)}")
    (shape,) = shapes
    padded = {nodes[c].padded_examples for c in nodes}
    if len(padded) != 1:
        raise ValueError(f"nodes' shards are padded to different sizes: {sorted(padded)}")
    (size,) = padded
    clients = [
        (np.full((size,) + shape, c + 1, np.float32), np.zeros((size,), np.int32)) for c in range(num_clients)
    ]
    return FederatedData.from_clients(clients, num_classes=num_classes)


def server_config(config: cfg.Config, secure: str | None) -> cfg.Config:
    """The config the server runs: one vmap over the cohort on one device, so that the clients
    of a round are one callback (performance settings, which change no result)."""
    if config.server.algorithm not in node_lib.STATELESS:
        raise ValueError(
            f"server.algorithm={config.server.algorithm!r} keeps client state; deployable: "
            f"{', '.join(node_lib.STATELESS)}"
        )
    if secure is not None and config.secagg is None:
        raise ValueError(f"secure={secure!r} needs config.secagg (the encoding); set secagg=SecAgg(...)")
    if secure is None and config.secagg is not None:
        raise ValueError("config.secagg is set: deploy with secure='secagg' or 'he'")
    if secure is not None and (problem := node_lib.deployable_dp_problem(config)):
        raise ValueError(problem)
    return dataclasses.replace(config, chunk_size=None, devices=1, secagg_protocol=False)


def run(config: cfg.Config, out, remote: RemoteClients, *, num_clients: int, num_classes: int) -> dict:
    """Train ``config`` with the clients of ``remote``; write the trainer's outputs into ``out``.

    Writes ``config.json``, ``run_info.json``, ``metrics.jsonl`` and checkpoints (the
    trainer's), ``events.jsonl`` (dropped nodes), ``final_params.npz`` and ``summary.json``
    (final metrics, dropped nodes with reasons, seconds and bytes per message round).
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = server_config(config, remote.secure)
    population = placeholder_population(remote.nodes, num_clients, num_classes)
    model = trainer.build_model(config.model, num_classes)
    outputs.write_atomic(out / "config.json", outputs.dumps(cfg.to_dict(config), indent=1))
    outputs.write_atomic(out / "run_info.json", outputs.dumps(outputs.run_info(), indent=1))
    remote.events_path = out / "events.jsonl"
    start = time.perf_counter()
    eval_fn = None
    if (config.deploy is None or config.deploy.evaluate) and any(n.has_test for n in remote.nodes.values()):
        eval_fn = remote.evaluator(config.metrics, num_clients)
    trained = trainer.train(
        config, population, model, eval_fn=eval_fn, out_dir=out, progress=False, remote=remote
    )
    params = jax.device_get(trained.state.params)
    np.savez(out / "final_params.npz", **wire.tree_to_arrays(params, "p"))
    summary = {
        "name": config.name,
        "rounds": config.rounds,
        "final": trained.records[-1] if trained.records else {},
        "deployment": {
            "secure": remote.secure,
            "nodes": {
                str(c): dataclasses.asdict(n) | {"verify_key": n.verify_key.hex()}
                for c, n in remote.nodes.items()
            },
            "dropped": remote.events,
            "rounds": remote.stats,
        },
        "privacy": trained.privacy,
        "wall_sec": time.perf_counter() - start,
    }
    outputs.write_atomic(out / "summary.json", outputs.dumps(summary, indent=1))
    print(f"fljax deploy: done in {summary['wall_sec']:.1f}s -> {out}", file=sys.stderr, flush=True)
    return summary


def load_params(path, template):
    """Final params written by :func:`run`, shaped like ``template``."""
    with np.load(path, allow_pickle=False) as z:
        return wire.arrays_to_tree(dict(z), "p", template)


def init_template(config: cfg.Config, feature_shape, num_classes: int):
    """The model's params shapes (for :func:`load_params`)."""
    model = trainer.build_model(config.model, num_classes)
    return models.init_params(model, tuple(feature_shape), jax.random.key(0))
