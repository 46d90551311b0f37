"""The secure aggregation protocol of Bonawitz et al. 2017, with SecAgg+ graphs.

Parties exchange ``bytes`` (:mod:`fljax.secagg.messages`: signed,
length-prefixed, no pickle), so the same :class:`Client` and :class:`Server`
can later sit on either side of a network; :func:`run_round` drives a cohort
in one process with a chosen dropout pattern at each step.

Steps (Bonawitz et al. 2017, section 4; the honest-but-curious variant with
every message signed by its sender, Ed25519 keys registered at :func:`setup`):

0. ``advertise_keys``: client ``u`` makes two X25519 key pairs ``(c_u, s_u)``
   and a self-mask seed ``b_u``, and sends the public halves with the
   commitment ``SHA-256(label | round_id | u | b_u)`` (:func:`commit_seed`).
   The server picks the masking graph (complete, or a random ``k``-regular
   Harary ring for SecAgg+, Bell et al. 2020) and forwards to each client its
   neighbours' signed advertisements.
1. ``share_keys``: ``u`` splits ``b_u`` and ``s_u``'s private key into
   ``t``-of-``(k+1)`` Shamir shares (:mod:`fljax.secagg.shamir`) among its
   neighbours and itself, and sends each neighbour ``v`` its shares encrypted
   with AES-GCM under ``HKDF(X25519(c_u, c_v))``.
2. ``masked_input``: ``u`` sends ``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)``
   mod ``2**bits`` over the neighbours ``v`` that shared keys (``+`` when
   ``u < v``), with ``s_uv = HKDF(X25519(s_u, s_v))`` and the PRG the
   AES-256-CTR keystream read as little-endian uint32, masked to ``bits`` bits.
3. ``unmask``: the server names the survivors ``U3`` and the dropped clients
   ``D``; each survivor returns its shares of ``b_v`` for ``v`` in ``U3`` and of
   ``s_v`` for ``v`` in ``D``, never both for one client. It answers one
   request only, and refuses one that names a client in both sets, names
   itself as dropped, or does not split exactly the neighbours that shared
   keys with it into the two sets; with fewer than ``t`` survivors among its
   own share holders it aborts. The server reconstructs, checks every seed
   against its commitment and every key against its advertised public key
   (:class:`~fljax.secagg.messages.CorruptShares` on a mismatch: the round
   aborts, no wrong sum is returned), removes the survivors' self-masks and
   the dropped clients' pairwise masks, and obtains ``sum_{u in U3} x_u`` mod
   ``2**bits``.

The integer arithmetic is the simulation's (:mod:`fljax.secagg.simulation`):
for the same encoded inputs and survivors the sums agree bit for bit. Every
step tolerates dropouts down to the threshold ``t``; below it the server (and
each client, before revealing shares) raises :class:`ProtocolAbort`.
:func:`ring_sum` runs a round over inputs that are already integers in
``Z_(2**bits)`` at a given width (no fixed-point encoding; e.g. the noised
vectors of :func:`fljax.privacy.distributed_dp`), and :func:`ring_sum_callback`
calls it from inside ``jit``.

Security checks: (1) ``t > h/2`` for ``h`` share holders
(:meth:`SecAggConfig.threshold_for`) with one answer per client, so a server
that claims to some holders that ``u`` survived and to others that ``u``
dropped gets at most one of ``b_u`` and ``s_u``; (2) every message, share
ciphertext and commitment is bound to the round id, and a party refuses to run
a round id twice under one signing key (:class:`Setup`); (3) reconstructed
seeds and keys are checked (above). Against a server colluding with ``c`` of
a client's holders the bound in (1) becomes ``t > (h + c) / 2``; the default
``floor(2h/3) + 1`` allows ``c <= floor(h/3)``. Not covered: the
active-adversary variant's consistency-check round (clients signing ``U3``);
transport encryption beyond the shares' AES-GCM.

References:
  Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
  Machine Learning", CCS 2017.
  Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
  Overhead", CCS 2020.
"""

from __future__ import annotations

import operator
import os
import secrets
import struct
import time
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import constant_time, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fljax.secagg import messages as msg
from fljax.secagg import shamir
from fljax.secagg.config import SecAggConfig
from fljax.secagg.messages import (
    CorruptShares,
    MalformedMessage,
    ProtocolAbort,
    RefusedRequest,
    ReplayedMessage,
    ReusedRound,
    UnexpectedMessage,
)
from fljax.secagg.primitives import (  # re-exported: the protocol's building blocks
    COMMIT_LEN,
    KEY_LEN,
    SEED_LEN,
    commit_seed,
    kdf,
    masking_graph,
    pack_vector,
    prg,
    unpack_vector,
)

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_DONE = -1  # a party's step once its round is over


class Setup(NamedTuple):
    """Long-term signing keys: one per client and the server's; ``verify_keys``
    maps each party id (clients ``0..n-1``, :data:`messages.SERVER`) to its public key.
    ``used_round_ids`` maps each party id to the round ids it has run under its
    key (a :class:`Client` or :class:`Server` adds its round id, and refuses one
    already there: a reused id would let that round's messages replay)."""

    client_keys: list[ed25519.Ed25519PrivateKey]
    server_key: ed25519.Ed25519PrivateKey
    verify_keys: dict[int, ed25519.Ed25519PublicKey]
    used_round_ids: dict[int, set[int]]


def setup(num_clients: int) -> Setup:
    """Generate and register every party's Ed25519 signing key."""
    client_keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(num_clients)]
    server_key = ed25519.Ed25519PrivateKey.generate()
    verify = {i: k.public_key() for i, k in enumerate(client_keys)}
    verify[msg.SERVER] = server_key.public_key()
    used: dict[int, set[int]] = {p: set() for p in verify}
    return Setup(client_keys, server_key, verify, used)


def _claim_round(used_round_ids: set[int], round_id: int, party: str) -> int:
    """Record ``round_id`` as run by ``party``; refuse it if it was run before."""
    round_id = operator.index(round_id)
    if not 0 <= round_id < 2**64:
        raise ValueError(f"round_id must be in 0..2**64-1, got {round_id}")
    if round_id in used_round_ids:
        raise ReusedRound(
            f"{party} already ran round {round_id} under this signing key; "
            "every round needs a fresh round id (its old messages would authenticate)"
        )
    used_round_ids.add(round_id)
    return round_id


def _ring_bits(config: SecAggConfig, num_clients: int, bits: int | None) -> int:
    """``bits`` when given (inputs already in ``Z_(2**bits)``), else the encoding's :meth:`SecAggConfig.ring_bits`."""
    if bits is None:
        return config.ring_bits(num_clients)
    bits = operator.index(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    return bits


def _ids(data: bytes, n: int) -> list[int]:
    ids = msg.unpack_ints(data)
    if len(set(ids)) != len(ids) or any(i >= n for i in ids):
        raise MalformedMessage("client id list with duplicates or unknown ids")
    return ids


class Client:
    """One client's side of one round. Call the four steps in order.

    ``used_round_ids`` is this client's record of the round ids it has run
    under ``signing_key`` (``Setup.used_round_ids[index]``): ``round_id`` must
    not be in it (:class:`~fljax.secagg.messages.ReusedRound`) and is added.
    ``bits``: the ring width; ``None`` takes the encoding's (``config.ring_bits``).
    """

    def __init__(
        self,
        index: int,
        signing_key,
        verify_keys,
        config: SecAggConfig,
        num_clients: int,
        round_id: int,
        *,
        used_round_ids: set[int],
        bits: int | None = None,
    ):
        self.u, self.n, self.config = index, num_clients, config
        self._sign, self._verify = signing_key, verify_keys
        self.bits = _ring_bits(config, num_clients, bits)
        self.t = config.threshold_for(num_clients)
        self.round_id = _claim_round(used_round_ids, round_id, f"client {index}")
        self._step = msg.ADVERTISE_KEYS

    def _seal(self, step: int, payload: bytes) -> bytes:
        return msg.seal(self._sign, msg.Header(step, self.round_id, self.u, msg.SERVER), payload)

    def _open(self, data: bytes, step: int) -> list[bytes]:
        if self._step != step:
            raise UnexpectedMessage(f"client {self.u} is not at step {msg.STEP_NAMES[step]}")
        header, payload = msg.open_message(
            data, {msg.SERVER: self._verify[msg.SERVER]}, step=step, round_id=self.round_id, recipient=self.u
        )
        return msg.unpack_fields(payload)

    def advertise_keys(self) -> bytes:
        if self._step != msg.ADVERTISE_KEYS:
            raise UnexpectedMessage(f"client {self.u} already advertised its keys")
        self._c, self._s = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        self._b = os.urandom(SEED_LEN)
        self._step = msg.SHARE_KEYS
        public = [k.public_key().public_bytes(*_RAW) for k in (self._c, self._s)]
        return self._seal(
            msg.ADVERTISE_KEYS, msg.pack_fields(public + [commit_seed(self._b, self.round_id, self.u)])
        )

    def share_keys(self, data: bytes) -> bytes:
        fields = self._open(data, msg.SHARE_KEYS)
        if len(fields) < 2:
            raise MalformedMessage("advertisement list too short")
        order = msg.unpack_ints(fields[0])
        if sorted(order) != list(range(self.n)):
            raise MalformedMessage("masking graph order is not a permutation of the cohort")
        graph = masking_graph(self.n, self.config, order)[self.u]
        self._graph = graph
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        for raw in fields[1:]:
            header, payload = msg.open_message(
                raw, self._verify, step=msg.ADVERTISE_KEYS, round_id=self.round_id, recipient=msg.SERVER
            )
            keys = msg.unpack_fields(payload)
            if (
                header.sender not in graph
                or header.sender in self._peers
                or [len(k) for k in keys] != [KEY_LEN, KEY_LEN, COMMIT_LEN]
            ):
                raise MalformedMessage(f"bad advertisement from {header.sender} for client {self.u}")
            self._peers[header.sender] = (keys[0], keys[1])
        if len(self._peers) + 1 < self.t:
            raise ProtocolAbort(
                f"client {self.u}: {len(self._peers) + 1} share holders alive < threshold {self.t}"
            )
        holders = sorted(self._peers) + [self.u]
        xs = [h + 1 for h in holders]
        sk = self._s.private_bytes_raw()
        shares_b = dict(zip(holders, shamir.split(self._b, self.t, xs), strict=True))
        shares_s = dict(zip(holders, shamir.split(sk, self.t, xs), strict=True))
        self._held = {self.u: (shares_b[self.u], shares_s[self.u])}  # shares this client holds, by owner
        recipients, cts = sorted(self._peers), []
        for v in recipients:
            key = kdf(
                self._c.exchange(x25519.X25519PublicKey.from_public_bytes(self._peers[v][0])),
                b"fljax-secagg enc",
            )
            plain = msg.pack_fields([msg.pack_ints([self.u, v]), shares_b[v], shares_s[v]])
            nonce = os.urandom(12)
            cts.append(nonce + AESGCM(key).encrypt(nonce, plain, self._aad(self.u, v)))
        self._step = msg.MASKED_INPUT
        return self._seal(msg.SHARE_KEYS, msg.pack_fields([msg.pack_ints(recipients)] + cts))

    def _aad(self, sender: int, recipient: int) -> bytes:
        return struct.pack(">QII", self.round_id, sender, recipient)

    def masked_input(self, data: bytes, values: np.ndarray) -> bytes:
        """``values``: this client's encoded input, ``[dim]`` uint32 in ``Z_(2**bits)``."""
        fields = self._open(data, msg.MASKED_INPUT)
        if not fields:
            raise MalformedMessage("empty share list")
        senders = _ids(fields[0], self.n)
        if len(senders) != len(fields) - 1:
            raise MalformedMessage("share list and ciphertexts differ in number")
        held = dict(self._held)  # committed only once the whole message checks out
        for v, ct in zip(senders, fields[1:], strict=True):
            if v not in self._peers or v in held or len(ct) < 12:
                raise MalformedMessage(f"unexpected shares from {v} for client {self.u}")
            key = kdf(
                self._c.exchange(x25519.X25519PublicKey.from_public_bytes(self._peers[v][0])),
                b"fljax-secagg enc",
            )
            try:
                plain = AESGCM(key).decrypt(ct[:12], ct[12:], self._aad(v, self.u))
            except InvalidTag:
                raise msg.BadSignature(f"shares from {v} for client {self.u} fail authentication") from None
            parts = msg.unpack_fields(plain)
            if len(parts) != 3 or msg.unpack_ints(parts[0]) != [v, self.u]:
                raise MalformedMessage(f"shares from {v} name the wrong parties")
            held[v] = (parts[1], parts[2])
        if len(held) < self.t:
            raise ProtocolAbort(f"client {self.u}: {len(held)} share holders alive < threshold {self.t}")
        x = np.asarray(values, np.uint32)
        mask = np.uint32((1 << self.bits) - 1)
        if x.ndim != 1 or np.any(x & ~mask):
            raise ValueError("values must be a [dim] uint32 vector in Z_(2**bits)")
        y = x + prg(self._b, x.size, self.bits)
        for v in senders:
            seed = kdf(
                self._s.exchange(x25519.X25519PublicKey.from_public_bytes(self._peers[v][1])),
                b"fljax-secagg mask",
            )
            m = prg(seed, x.size, self.bits)
            y = y + m if self.u < v else y - m
        self._held, self._step = held, msg.UNMASK
        return self._seal(msg.MASKED_INPUT, msg.pack_fields([pack_vector(y & mask, self.bits)]))

    def unmask(self, data: bytes) -> bytes:
        """Answer the server's one unmasking request (survivors, dropped clients).

        Raises:
          RefusedRequest: a second request (a client answers once, so it never
            reveals both a seed share and a key share of one peer), a client
            named both survivor and dropped, this client named dropped or not
            named a survivor, or neighbours split otherwise than exactly the
            ones that shared keys with this client.
          ProtocolAbort: fewer than ``t`` survivors among this client's share
            holders (the server could not rebuild its seed anyway).
        """
        if self._step == _DONE:
            raise RefusedRequest(
                f"client {self.u} refuses a second unmasking request: it answers once, "
                "so it never reveals both kinds of shares of one client"
            )
        fields = self._open(data, msg.UNMASK)
        if len(fields) != 2:
            raise MalformedMessage("unmasking request must list survivors and dropped clients")
        survivors, dropped = set(_ids(fields[0], self.n)), set(_ids(fields[1], self.n))
        if survivors & dropped:
            raise RefusedRequest(
                f"client {self.u} refuses: clients {sorted(survivors & dropped)} named both survivor and dropped"
            )
        if self.u in dropped:
            raise RefusedRequest(f"client {self.u} refuses: it sent its masked input but is named as dropped")
        if self.u not in survivors:
            raise RefusedRequest(f"client {self.u} refuses: not named among the survivors")
        shared = set(self._held) - {self.u}  # the neighbours that shared keys with this client
        named = (survivors | dropped) & self._graph
        if named != shared:
            raise RefusedRequest(
                f"client {self.u} refuses: the request names neighbours {sorted(named)} as survivors "
                f"or dropped, but {sorted(shared)} shared keys with it"
            )
        alive = len(survivors & set(self._held))
        if alive < self.t:
            raise ProtocolAbort(
                f"client {self.u} refuses to unmask: {alive} survivors among its share holders "
                f"< threshold {self.t}"
            )
        out = []
        for v, (share_b, share_s) in sorted(self._held.items()):
            if v in survivors:
                out += [msg.pack_ints([v, 0]), share_b]
            elif v in dropped:
                out += [msg.pack_ints([v, 1]), share_s]
        self._step = _DONE  # never answer twice
        return self._seal(msg.UNMASK, msg.pack_fields(out))


class Server:
    """The server's side of one round: :meth:`receive` each message, then
    :meth:`finish_step` to get the replies (``{client: bytes}``) or, after the
    unmasking step, the sum.

    ``used_round_ids`` is the server's record of the round ids it has run under
    ``signing_key`` (``Setup.used_round_ids[messages.SERVER]``): ``round_id``
    must not be in it (:class:`~fljax.secagg.messages.ReusedRound`) and is added.
    ``bits``: the ring width; ``None`` takes the encoding's (``config.ring_bits``).
    """

    def __init__(
        self,
        signing_key,
        verify_keys,
        config: SecAggConfig,
        num_clients: int,
        dim: int,
        round_id: int,
        *,
        used_round_ids: set[int],
        bits: int | None = None,
    ):
        self.n, self.dim, self.config = num_clients, dim, config
        self._sign, self._verify = signing_key, verify_keys
        self.bits = _ring_bits(config, num_clients, bits)
        self.t = config.threshold_for(num_clients)
        self.round_id = _claim_round(used_round_ids, round_id, "the server")
        order = list(range(num_clients))
        secrets.SystemRandom().shuffle(order)
        self.order = order
        self.graph = masking_graph(num_clients, config, order)
        self.step = msg.ADVERTISE_KEYS
        self._inbox: dict[int, object] = {}
        self.adverts: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}  # (c_pk, s_pk, commitment, raw)
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.dropped: set[int] = set()
        self.bytes_received = 0
        self.bytes_sent = 0

    def receive(self, data: bytes) -> None:
        """Authenticate and store one client message of the current step.

        A rejected message (any of the errors below) leaves the server's
        state unchanged.

        Raises:
          MalformedMessage: bytes that do not parse.
          BadSignature: a signature that does not verify.
          ReplayedMessage: a message from another round, or a second one in a step.
          UnexpectedMessage: the wrong step or recipient, or an unknown sender.
        """
        header, payload = msg.open_message(
            data, self._verify, step=self.step, round_id=self.round_id, recipient=msg.SERVER
        )
        u = header.sender
        if u in self._inbox:
            raise ReplayedMessage(f"second {msg.STEP_NAMES[self.step]} message from client {u}")
        allowed = {
            msg.ADVERTISE_KEYS: range(self.n),
            msg.SHARE_KEYS: self.u1,
            msg.MASKED_INPUT: self.u2,
            msg.UNMASK: self.u3,
        }
        if u not in allowed[self.step]:
            raise UnexpectedMessage(f"client {u} is not part of step {msg.STEP_NAMES[self.step]}")
        fields = msg.unpack_fields(payload)
        parsed: object
        if self.step == msg.ADVERTISE_KEYS:
            if [len(f) for f in fields] != [KEY_LEN, KEY_LEN, COMMIT_LEN]:
                raise MalformedMessage(
                    f"advertisement from {u} must hold two 32-byte keys and a 32-byte seed commitment"
                )
            parsed = (fields[0], fields[1], fields[2], bytes(data))
        elif self.step == msg.SHARE_KEYS:
            if not fields:
                raise MalformedMessage("empty share message")
            recipients = _ids(fields[0], self.n)
            if len(recipients) != len(fields) - 1 or set(recipients) != (self.graph[u] & self.u1):
                raise MalformedMessage(f"shares from {u} must go to exactly its live neighbours")
            parsed = dict(zip(recipients, fields[1:], strict=True))
        elif self.step == msg.MASKED_INPUT:
            if len(fields) != 1:
                raise MalformedMessage("masked input must be one field")
            parsed = unpack_vector(fields[0], self.dim, self.bits)
        else:
            if len(fields) % 2:
                raise MalformedMessage("unmasking response must hold (id, kind) and share pairs")
            parsed = []
            for head, share in zip(fields[::2], fields[1::2], strict=True):
                v, kind = msg.unpack_ints(head)
                if kind not in (0, 1) or not (v == u or v in self.graph[u]):
                    raise MalformedMessage(f"client {u} sent a share it cannot hold")
                if (kind == 0) != (v in self.u3) or (kind == 1 and v not in self.dropped):
                    raise MalformedMessage(f"client {u} sent a share the server did not ask for")
                parsed.append((v, kind, share))
        self._inbox[u] = parsed
        self.bytes_received += len(data)

    def _need(self, alive: set[int], what: str) -> None:
        if len(alive) < self.t:
            raise ProtocolAbort(
                f"{what}: {len(alive)} clients alive < threshold {self.t}; nothing is revealed"
            )

    def _send(self, v: int, step: int, fields: list[bytes]) -> bytes:
        data = msg.seal(self._sign, msg.Header(step, self.round_id, msg.SERVER, v), msg.pack_fields(fields))
        self.bytes_sent += len(data)
        return data

    def finish_step(self):
        inbox, self._inbox = self._inbox, {}
        step = self.step
        if step == msg.ADVERTISE_KEYS:
            self.adverts, self.u1 = inbox, set(inbox)
            self._need(self.u1, "advertise_keys")
            order = msg.pack_ints(self.order)
            out = {
                v: self._send(
                    v, msg.SHARE_KEYS, [order] + [self.adverts[w][3] for w in sorted(self.graph[v] & self.u1)]
                )
                for v in sorted(self.u1)
            }
        elif step == msg.SHARE_KEYS:
            self.u2 = set(inbox)
            self._need(self.u2, "share_keys")
            out = {}
            for v in sorted(self.u2):
                senders = [w for w in sorted(self.u2) if v in inbox[w]]
                out[v] = self._send(
                    v, msg.MASKED_INPUT, [msg.pack_ints(senders)] + [inbox[w][v] for w in senders]
                )
        elif step == msg.MASKED_INPUT:
            self.masked, self.u3 = inbox, set(inbox)
            self._need(self.u3, "masked_input")
            self.dropped = self.u2 - self.u3
            req = [msg.pack_ints(sorted(self.u3)), msg.pack_ints(sorted(self.dropped))]
            out = {v: self._send(v, msg.UNMASK, req) for v in sorted(self.u3)}
        elif step == msg.UNMASK:
            self._need(set(inbox), "unmask")
            self.step = _DONE
            return self._unmask(inbox)
        else:
            raise UnexpectedMessage("the round is over")
        self.step = step + 1
        return out

    def _combine(self, got: dict[int, bytes], secret_len: int, what: str) -> bytes:
        """Reconstruct ``what`` from ``{x: share}``, a failure being corruption, not a bad request."""
        try:
            return shamir.combine(got, self.t, secret_len)
        except shamir.ShamirError as e:
            raise CorruptShares(f"{what}: {e}; round aborted") from None

    def _unmask(self, inbox) -> np.ndarray:
        shares: dict[tuple[int, int], dict[int, bytes]] = {}
        for holder, items in inbox.items():
            for v, kind, share in items:
                shares.setdefault((v, kind), {})[holder + 1] = share
        mask = np.uint32((1 << self.bits) - 1)
        total = np.zeros(self.dim, np.uint32)
        for u in sorted(self.u3):
            total += self.masked[u]
        for u in sorted(self.u3):
            got = shares.get((u, 0), {})
            if len(got) < self.t:
                raise ProtocolAbort(f"only {len(got)} shares of survivor {u}'s seed < threshold {self.t}")
            used = [x - 1 for x in sorted(got)[: self.t]]
            seed = self._combine(got, SEED_LEN, f"self-mask seed of client {u}")
            if not constant_time.bytes_eq(commit_seed(seed, self.round_id, u), self.adverts[u][2]):
                raise CorruptShares(
                    f"the reconstructed self-mask seed of client {u} does not match its commitment: "
                    f"a share from holders {used} is corrupt; round aborted"
                )
            total -= prg(seed, self.dim, self.bits)
        for d in sorted(self.dropped):
            got = shares.get((d, 1), {})
            if len(got) < self.t:
                raise ProtocolAbort(
                    f"only {len(got)} shares of dropped client {d}'s key < threshold {self.t}"
                )
            used = [x - 1 for x in sorted(got)[: self.t]]
            sk = x25519.X25519PrivateKey.from_private_bytes(
                self._combine(got, KEY_LEN, f"masking key of dropped client {d}")
            )
            if not constant_time.bytes_eq(sk.public_key().public_bytes(*_RAW), self.adverts[d][1]):
                raise CorruptShares(
                    f"the reconstructed masking key of dropped client {d} does not match its advertised "
                    f"public key: a share from holders {used} is corrupt; round aborted"
                )
            for v in sorted(self.graph[d] & self.u3):
                seed = kdf(
                    sk.exchange(x25519.X25519PublicKey.from_public_bytes(self.adverts[v][1])),
                    b"fljax-secagg mask",
                )
                m = prg(seed, self.dim, self.bits)
                total = total - m if v < d else total + m  # v added +m iff v < d
        return total & mask


class RoundResult(NamedTuple):
    """Outcome of :func:`run_round`.

    Attributes:
      total: ``[dim]`` uint32, the survivors' sum mod ``2**bits``.
      survivors: sorted ids of the clients whose inputs are in the sum.
      stats: ``client_sec`` (mean over the survivors of their computing
        time), ``server_sec``, ``client_bytes_sent`` (mean over survivors),
        ``server_bytes_received`` and ``server_bytes_sent`` (totals),
        ``graph``, ``threshold`` and ``round_id``.
    """

    total: np.ndarray
    survivors: list[int]
    stats: dict


def run_round(
    values: np.ndarray,
    config: SecAggConfig,
    *,
    dropouts: dict[int, Iterable[int]] | None = None,
    round_id: int | None = None,
    keys: Setup | None = None,
    bits: int | None = None,
) -> RoundResult:
    """Run one round in process over ``values[clients, dim]`` (uint32 in ``Z_(2**bits)``).

    Args:
      dropouts: ``{step: client ids}``: those clients vanish just before
        sending their message of that step (steps from :mod:`messages`:
        ``ADVERTISE_KEYS``, ``SHARE_KEYS``, ``MASKED_INPUT``, ``UNMASK``).
      round_id: the round's id, bound into every message; ``None`` draws a
        fresh random 64-bit id. An id already run under ``keys`` is refused.
      keys: long-term signing keys (default: fresh from :func:`setup`).
      bits: ring width of every party; ``None``: ``config.ring_bits(clients)``,
        the fixed-point encoding's width.

    Raises:
      ProtocolAbort: when fewer than the threshold survive a step, or
        (:class:`~fljax.secagg.messages.CorruptShares`) a reconstructed secret
        fails its check.
      ReusedRound: ``round_id`` was already run under ``keys``.
    """
    values = np.asarray(values, np.uint32)
    n, dim = values.shape
    keys = keys or setup(n)
    round_id = secrets.randbits(64) if round_id is None else round_id
    dropouts = {s: set(ids) for s, ids in (dropouts or {}).items()}
    used = keys.used_round_ids
    server = Server(
        keys.server_key,
        keys.verify_keys,
        config,
        n,
        dim,
        round_id,
        used_round_ids=used[msg.SERVER],
        bits=bits,
    )
    clients = [
        Client(
            i, keys.client_keys[i], keys.verify_keys, config, n, round_id, used_round_ids=used[i], bits=bits
        )
        for i in range(n)
    ]
    client_sec, client_bytes = np.zeros(n), np.zeros(n)
    server_sec = 0.0
    alive = set(range(n))
    inbox: dict[int, bytes] = {}
    for step in (msg.ADVERTISE_KEYS, msg.SHARE_KEYS, msg.MASKED_INPUT, msg.UNMASK):
        alive -= dropouts.get(step, set())
        sent = []
        for u in sorted(alive if step == msg.ADVERTISE_KEYS else alive & set(inbox)):
            start = time.perf_counter()
            c = clients[u]
            if step == msg.ADVERTISE_KEYS:
                out = c.advertise_keys()
            elif step == msg.SHARE_KEYS:
                out = c.share_keys(inbox[u])
            elif step == msg.MASKED_INPUT:
                out = c.masked_input(inbox[u], values[u])
            else:
                out = c.unmask(inbox[u])
            client_sec[u] += time.perf_counter() - start
            client_bytes[u] += len(out)
            sent.append(out)
        start = time.perf_counter()
        for data in sent:
            server.receive(data)
        result = server.finish_step()
        server_sec += time.perf_counter() - start
        if step != msg.UNMASK:
            inbox = result
    survivors = sorted(server.u3)
    stats = {
        "client_sec": float(np.mean(client_sec[survivors])),
        "server_sec": server_sec,
        "client_bytes_sent": float(np.mean(client_bytes[survivors])),
        "server_bytes_received": server.bytes_received,
        "server_bytes_sent": server.bytes_sent,
        "graph": "complete" if config.is_complete(n) else f"harary_k{config.neighbors_for(n)}",
        "threshold": server.t,
        "round_id": server.round_id,
    }
    return RoundResult(result, survivors, stats)


def ring_sum(
    values: np.ndarray,
    alive: np.ndarray,
    bits: int,
    config: SecAggConfig,
    *,
    round_id: int | None = None,
    keys: Setup | None = None,
) -> tuple[np.ndarray, bool]:
    """Sum integer vectors already in ``Z_(2**bits)`` with one :func:`run_round`, no encoding.

    The counterpart of :func:`fljax.secagg.simulation.masked_ring_sum` with the
    real protocol: every slot is a client; the ones with ``alive`` False vanish
    after the key agreement, just before sending their masked input (the
    simulation's dropouts). Only ``config``'s masking graph and threshold are
    used; the ring is ``bits`` wide, whatever ``config.bits``. The server sees
    the masked vectors and the survivors' sum, never an input.

    Args:
      values: ``[clients, dim]`` uint32 in ``Z_(2**bits)``.
      alive: ``[clients]`` bool, the clients whose masked input reaches the server.
      bits: ring width, 1..32.
      config: masking graph and threshold.
      round_id: as in :func:`run_round`.
      keys: as in :func:`run_round`.

    Returns:
      ``(total[dim] uint32, aborted)``: the survivors' sum mod ``2**bits``, and
      False; or zeros and True when the round aborts (:class:`ProtocolAbort`:
      survivors below the threshold, or a reconstructed secret failing its check).

    Examples:
      >>> import numpy as np
      >>> from fljax.secagg import SecAggConfig, protocol
      >>> values = np.array([[1, 7], [6, 5], [3, 3]], np.uint32)  # in Z_8
      >>> total, aborted = protocol.ring_sum(values, np.array([True, True, True]), 3, SecAggConfig())
      >>> total.tolist(), aborted
      ([2, 7], False)
      >>> protocol.ring_sum(values, np.array([True, False, False]), 3, SecAggConfig())[1]
      True
    """
    values = np.asarray(values, np.uint32)
    alive = np.asarray(alive, np.bool_)
    if values.ndim != 2 or alive.shape != values.shape[:1]:
        raise ValueError(
            f"values must be [clients, dim] and alive [clients], got {values.shape} and {alive.shape}"
        )
    dropped = {int(i) for i in np.flatnonzero(~alive)}
    try:
        result = run_round(
            values, config, dropouts={msg.MASKED_INPUT: dropped}, round_id=round_id, keys=keys, bits=bits
        )
    except ProtocolAbort:
        return np.zeros(values.shape[1], np.uint32), True
    return np.asarray(result.total, np.uint32), False


def ring_sum_callback(
    values: jax.Array, alive: jax.Array, bits: int, config: SecAggConfig
) -> tuple[jax.Array, jax.Array]:
    """:func:`ring_sum` callable inside ``jit`` (``jax.pure_callback``, run on the host).

    Its secrets come from the OS (``cryptography``, ``secrets``), so the masks
    differ from call to call but the sum does not: on the complete graph the
    result, abort flag included, equals
    :func:`fljax.secagg.simulation.masked_ring_sum`'s bit for bit for the same
    inputs and survivors (on a sparse graph with dropouts whether a round
    aborts can differ, as each draws its own graph). Every party lives in this
    one process: it exercises the protocol end to end, it does not distribute trust.

    Returns:
      ``(total[dim] uint32, aborted bool)``, as :func:`ring_sum`.
    """

    def host(v, a):
        total, aborted = ring_sum(np.asarray(v), np.asarray(a), bits, config)
        return total, np.bool_(aborted)

    out = (jax.ShapeDtypeStruct(values.shape[1:], jnp.uint32), jax.ShapeDtypeStruct((), jnp.bool_))
    return jax.pure_callback(host, out, values.astype(jnp.uint32), alive.astype(jnp.bool_))
