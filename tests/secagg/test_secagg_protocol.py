"""The cryptographic protocol: bit-exact sums (also against the simulation),
dropouts at every step, clean aborts, rejected messages, Shamir sharing."""

import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fljax.secagg import encoding, messages, protocol, shamir, simulation
from fljax.secagg.config import SecAggConfig
from fljax.secagg.messages import (
    BadSignature,
    MalformedMessage,
    ProtocolAbort,
    RefusedRequest,
    ReplayedMessage,
    UnexpectedMessage,
)


def _plain(values, ids, bits):
    return values[sorted(ids)].sum(axis=0, dtype=np.uint32) & np.uint32((1 << bits) - 1)


def test_shamir_round_trip_and_threshold():
    secret = os.urandom(32)
    xs = [3, 9, 10, 11, 40, 41]
    shares = shamir.split(secret, 4, xs)
    by_x = dict(zip(xs, shares, strict=True))
    for subset in ([3, 9, 10, 11], [9, 11, 40, 41], xs):
        assert shamir.combine({x: by_x[x] for x in subset}, 4, 32) == secret
    with pytest.raises(shamir.ShamirError, match="need 4 shares"):
        shamir.combine({x: by_x[x] for x in xs[:3]}, 4, 32)
    with pytest.raises(shamir.ShamirError):
        shamir.split(secret, 7, xs)


def test_shamir_single_share_uniform():
    # With t = 2 a single share of a fixed secret is uniform over the field.
    vals = [np.frombuffer(shamir.split(b"\x00" * 4, 2, [1, 2])[0], "<u4")[0] for _ in range(2000)]
    assert stats.kstest(np.asarray(vals, np.float64) / shamir.PRIME, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("neighbors", [None, 4])
def test_protocol_equals_simulation_and_plain_sum(neighbors):
    n, dim = 10, 40
    cfg = SecAggConfig(clip_range=1.0, frac_bits=12, num_neighbors=neighbors)
    bits = cfg.ring_bits(n)
    kx, kr, km = jax.random.split(jax.random.key(0 if neighbors is None else 1), 3)
    x = jax.random.uniform(kx, (n, dim - 1), jnp.float32, -1.0, 1.0)
    w = jnp.linspace(0.1, 1.0, n, dtype=jnp.float32)
    enc = jax.jit(lambda a, b, k: encoding.encode(a, b, k, cfg, bits).values)(x, w, kr)
    dropped = {2, 7} if neighbors is None else {5}
    survived = jnp.asarray([i not in dropped for i in range(n)])
    sim_total, aborted = jax.jit(lambda v, s, k: simulation.masked_ring_sum(v, s, k, cfg, bits))(
        enc, survived, km
    )
    assert not bool(aborted)
    result = protocol.run_round(np.asarray(enc), cfg, dropouts={messages.MASKED_INPUT: dropped})
    assert result.survivors == [i for i in range(n) if i not in dropped]
    np.testing.assert_array_equal(result.total, np.asarray(sim_total))
    np.testing.assert_array_equal(result.total, _plain(np.asarray(enc), result.survivors, bits))


@pytest.mark.parametrize(
    "dropouts",
    [
        {messages.ADVERTISE_KEYS: {0}},
        {messages.SHARE_KEYS: {3}},
        {messages.MASKED_INPUT: {1, 8}},
        {messages.UNMASK: {4, 5}},
        {
            messages.ADVERTISE_KEYS: {9},
            messages.SHARE_KEYS: {0},
            messages.MASKED_INPUT: {6},
            messages.UNMASK: {2},
        },
    ],
)
def test_dropouts_at_every_step(dropouts):
    n, dim, bits = 12, 30, 20
    cfg = SecAggConfig(bits=bits, clip_range=1.0, frac_bits=8, weight_bits=8, threshold=7)
    values = np.random.default_rng(2).integers(0, 2**bits, (n, dim)).astype(np.uint32)
    result = protocol.run_round(values, cfg, dropouts=dropouts)
    gone = set().union(*(dropouts.get(s, set()) for s in (0, 1, 2)))
    assert result.survivors == sorted(set(range(n)) - gone)
    np.testing.assert_array_equal(result.total, _plain(values, result.survivors, bits))


def test_sparse_graph_with_dropouts():
    n, dim, bits = 16, 20, 32
    cfg = SecAggConfig(bits=bits, clip_range=1.0, frac_bits=8, num_neighbors=6)
    values = np.random.default_rng(3).integers(0, 2**32, (n, dim), dtype=np.uint64).astype(np.uint32)
    result = protocol.run_round(values, cfg, dropouts={messages.MASKED_INPUT: {4}, messages.UNMASK: {11}})
    assert result.stats["graph"] == "harary_k6"
    np.testing.assert_array_equal(result.total, _plain(values, result.survivors, bits))


@pytest.mark.parametrize(
    "step", [messages.ADVERTISE_KEYS, messages.SHARE_KEYS, messages.MASKED_INPUT, messages.UNMASK]
)
def test_below_threshold_aborts(step):
    n = 9  # threshold 7
    cfg = SecAggConfig(bits=16, clip_range=1.0, frac_bits=4, weight_bits=4)
    values = np.ones((n, 8), np.uint32)
    with pytest.raises(ProtocolAbort, match="threshold 7"):
        protocol.run_round(values, cfg, dropouts={step: {0, 1, 2}})


def _start(n=6, dim=5, cfg=None, round_id=7):
    cfg = cfg or SecAggConfig(bits=16, clip_range=1.0, frac_bits=4, weight_bits=4)  # threshold 5 of 6
    keys = protocol.setup(n)
    used = keys.used_round_ids
    clients = [
        protocol.Client(i, keys.client_keys[i], keys.verify_keys, cfg, n, round_id, used_round_ids=used[i])
        for i in range(n)
    ]
    server = protocol.Server(
        keys.server_key, keys.verify_keys, cfg, n, dim, round_id, used_round_ids=used[messages.SERVER]
    )
    return keys, clients, server


def test_masked_input_uniform_and_abort_reveals_nothing():
    n, dim = 6, 20000
    keys, clients, server = _start(n, dim)
    adv = [c.advertise_keys() for c in clients]
    for a in adv:
        server.receive(a)
    out = server.finish_step()
    shares = [c.share_keys(out[c.u]) for c in clients]
    for s in shares:
        server.receive(s)
    out = server.finish_step()
    zero = np.zeros(dim, np.uint32)
    y0 = clients[0].masked_input(out[0], zero)
    server.receive(y0)
    _, payload = messages.open_message(
        y0, keys.verify_keys, step=messages.MASKED_INPUT, round_id=7, recipient=messages.SERVER
    )
    y = protocol.unpack_vector(messages.unpack_fields(payload)[0], dim, 16)
    counts = np.bincount((y >> np.uint32(10)).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-3  # an all-zero input looks uniform
    # Only 1 of 6 masked inputs arrives (< threshold 5): the server aborts before asking for shares.
    with pytest.raises(ProtocolAbort, match="masked_input: 1 clients alive < threshold 5"):
        server.finish_step()
    # A server that asks anyway (a forged small survivor set) is refused by the client.
    forged = messages.seal(
        keys.server_key,
        messages.Header(messages.UNMASK, 7, messages.SERVER, 0),
        messages.pack_fields([messages.pack_ints([0]), messages.pack_ints([1, 2, 3, 4, 5])]),
    )
    with pytest.raises(ProtocolAbort, match="refuses to unmask"):
        clients[0].unmask(forged)


def test_client_refuses_to_reveal_both_masks():
    keys, clients, server = _start()
    for c in clients:
        server.receive(c.advertise_keys())
    out = server.finish_step()
    for c in clients:
        server.receive(c.share_keys(out[c.u]))
    out = server.finish_step()
    for c in clients:
        server.receive(c.masked_input(out[c.u], np.zeros(5, np.uint32)))

    def request(survivors, dropped):
        fields = [messages.pack_ints(survivors), messages.pack_ints(dropped)]
        return messages.seal(
            keys.server_key,
            messages.Header(messages.UNMASK, 7, messages.SERVER, 0),
            messages.pack_fields(fields),
        )

    with pytest.raises(RefusedRequest, match="named both"):
        clients[0].unmask(request([0, 1, 2, 3, 4, 5], [3]))
    with pytest.raises(RefusedRequest, match="sent its masked input"):
        clients[0].unmask(request([1, 2, 3, 4, 5], [0]))


def test_rejects_malformed_replayed_and_forged_messages():
    keys, clients, server = _start()
    adv = [c.advertise_keys() for c in clients]
    server.receive(adv[0])
    with pytest.raises(ReplayedMessage, match="second advertise_keys"):
        server.receive(adv[0])
    with pytest.raises(MalformedMessage):
        server.receive(adv[1][:-70])
    with pytest.raises(MalformedMessage):
        server.receive(b"garbage" * 20)
    tampered = bytearray(adv[1])
    tampered[30] ^= 1
    with pytest.raises(BadSignature):
        server.receive(bytes(tampered))
    # Client 2's message re-signed by client 3's key: wrongly signed.
    header, payload = messages.open_message(
        adv[2], keys.verify_keys, step=messages.ADVERTISE_KEYS, round_id=7, recipient=messages.SERVER
    )
    with pytest.raises(BadSignature):
        server.receive(messages.seal(keys.client_keys[3], header, payload))
    # A message from another round (replay across rounds).
    old = protocol.Client(
        1,
        keys.client_keys[1],
        keys.verify_keys,
        clients[1].config,
        6,
        6,
        used_round_ids=keys.used_round_ids[1],
    ).advertise_keys()
    with pytest.raises(ReplayedMessage, match="round 6 replayed in round 7"):
        server.receive(old)
    # Wrong step.
    wrong = messages.seal(
        keys.client_keys[4], messages.Header(messages.UNMASK, 7, 4, messages.SERVER), payload
    )
    with pytest.raises(UnexpectedMessage, match="expected step advertise_keys"):
        server.receive(wrong)
    # A well-signed message with a malformed payload.
    bad = messages.seal(
        keys.client_keys[5], messages.Header(0, 7, 5, messages.SERVER), messages.pack_fields([b"x"])
    )
    with pytest.raises(MalformedMessage, match="two 32-byte keys"):
        server.receive(bad)
    # The rejected messages changed nothing: the round completes.
    for a in adv[1:]:
        server.receive(a)
    out = server.finish_step()
    # Clients reject server messages that are tampered or addressed to someone else.
    with pytest.raises(BadSignature):
        clients[0].share_keys(out[0][:-1] + bytes([out[0][-1] ^ 1]))
    with pytest.raises(UnexpectedMessage, match="addressed to party 1"):
        clients[0].share_keys(out[1])
    for c in clients:
        server.receive(c.share_keys(out[c.u]))
    out = server.finish_step()
    values = np.arange(30, dtype=np.uint32).reshape(6, 5)
    for c in clients:
        server.receive(c.masked_input(out[c.u], values[c.u]))
    out = server.finish_step()
    for c in clients:
        server.receive(c.unmask(out[c.u]))
    np.testing.assert_array_equal(server.finish_step(), values.sum(axis=0, dtype=np.uint32))


def test_wire_format_strict():
    assert messages.unpack_fields(messages.pack_fields([b"", b"ab"])) == [b"", b"ab"]
    with pytest.raises(MalformedMessage):
        messages.unpack_fields(messages.pack_fields([b"ab"]) + b"\x00")
    with pytest.raises(MalformedMessage):
        messages.unpack_fields(struct.pack(">II", 1, 99) + b"ab")
    v = np.asarray([0, 1, 2**24 - 1, 77], np.uint32)
    np.testing.assert_array_equal(protocol.unpack_vector(protocol.pack_vector(v, 24), 4, 24), v)
    with pytest.raises(MalformedMessage):
        protocol.unpack_vector(protocol.pack_vector(v, 24), 5, 24)
