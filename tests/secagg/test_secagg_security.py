"""The protocol's security checks against a malicious server or share holder: the threshold
bound against split-view unmasking, fresh round ids against replays, checked reconstruction
against corrupted shares."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from fljax.secagg import messages, protocol, shamir
from fljax.secagg.config import SecAggConfig, default_threshold
from fljax.secagg.messages import (
    BadSignature,
    CorruptShares,
    ProtocolAbort,
    RefusedRequest,
    ReplayedMessage,
    ReusedRound,
)

BITS = 20


def _cfg(**kw):
    return SecAggConfig(bits=BITS, clip_range=1.0, frac_bits=4, weight_bits=4, **kw)


def _parties(keys, cfg, n, dim, round_id):
    used = keys.used_round_ids
    clients = [
        protocol.Client(i, keys.client_keys[i], keys.verify_keys, cfg, n, round_id, used_round_ids=used[i])
        for i in range(n)
    ]
    server = protocol.Server(
        keys.server_key, keys.verify_keys, cfg, n, dim, round_id, used_round_ids=used[messages.SERVER]
    )
    return clients, server


def _through_masked_input(clients, server, values, dropped=()):
    """Honest steps 0-2 (``dropped`` never send their masked input); returns the masked
    inputs as sent and the server's unmasking requests."""
    for c in clients:
        server.receive(c.advertise_keys())
    out = server.finish_step()
    for c in clients:
        server.receive(c.share_keys(out[c.u]))
    out = server.finish_step()
    sent = {c.u: c.masked_input(out[c.u], values[c.u]) for c in clients if c.u not in dropped}
    for data in sent.values():
        server.receive(data)
    return sent, server.finish_step()


def _request(keys, round_id, recipient, survivors, dropped):
    fields = [messages.pack_ints(sorted(survivors)), messages.pack_ints(sorted(dropped))]
    header = messages.Header(messages.UNMASK, round_id, messages.SERVER, recipient)
    return messages.seal(keys.server_key, header, messages.pack_fields(fields))


# ----------------------------------------------------------------------------- 1. threshold


def test_threshold_at_most_half_of_the_holders_is_rejected():
    with pytest.raises(ValueError, match=r"^threshold must be > h/2 = 10 for 20 share holders, got 9$"):
        SecAggConfig(threshold=9).threshold_for(20)
    with pytest.raises(ValueError, match=r"threshold must be > h/2 = 10 for 20 share holders, got 10"):
        SecAggConfig(threshold=10).threshold_for(20)
    assert SecAggConfig(threshold=11).threshold_for(20) == 11
    with pytest.raises(ValueError, match=r"threshold must be > h/2 = 3.5 for 7 share holders, got 3"):
        SecAggConfig(threshold=3).threshold_for(7)
    with pytest.raises(ValueError, match=r"threshold must be > h/2 = 1 for 2 share holders, got 1"):
        SecAggConfig(threshold=1).threshold_for(2)
    with pytest.raises(ValueError, match=r"threshold must be <= 7 \(the share holders\), got 8"):
        SecAggConfig(threshold=8).threshold_for(7)
    # On a sparse graph h = 2 * ceil(k / 2) + 1 is known up front: rejected at construction.
    with pytest.raises(ValueError, match=r"threshold must be > h/2 = 3.5 for 7 share holders, got 3"):
        SecAggConfig(num_neighbors=6, threshold=3)
    with pytest.raises(ValueError, match=r"threshold must be > h/2 = 3.5 for 7 share holders, got 3"):
        SecAggConfig(num_neighbors=5, threshold=3)  # k = 5 rounds up to 6 neighbours
    assert SecAggConfig(num_neighbors=6, threshold=4).threshold_for(30) == 4
    with pytest.raises(ValueError, match=r"threshold must be >= 1 or None, got 0"):
        SecAggConfig(threshold=0)
    # The protocol refuses to start a round under a bad threshold.
    keys = protocol.setup(20)
    with pytest.raises(ValueError, match="threshold must be > h/2 = 10"):
        protocol.run_round(np.zeros((20, 3), np.uint32), _cfg(threshold=9), keys=keys)


def test_default_threshold_is_a_strict_majority():
    for h in range(1, 400):
        assert h / 2 < default_threshold(h) <= h
        assert SecAggConfig().threshold_for(h) == default_threshold(h)


def _split_view_attack(n, split, values):
    """A malicious server runs steps 0-2 honestly, then tells the holders in ``split`` (and
    client 0 itself) that client 0 survived and the others that it dropped, collecting shares
    of both its self-mask seed and its masking key. Returns ``(seed_shares, key_shares,
    recovered input or None)``."""
    cfg = _cfg()
    t = cfg.threshold_for(n)
    keys = protocol.setup(n)
    clients, server = _parties(keys, cfg, n, values.shape[1], 1)
    sent, _ = _through_masked_input(clients, server, values)
    everyone = set(range(n))
    seed_shares, key_shares = {}, {}
    for c in clients:
        survived_view = c.u == 0 or c.u in split
        req = (
            _request(keys, 1, c.u, everyone, set())
            if survived_view
            else _request(keys, 1, c.u, everyone - {0}, {0})
        )
        _, payload = messages.open_message(
            c.unmask(req), keys.verify_keys, step=messages.UNMASK, round_id=1, recipient=messages.SERVER
        )
        fields = messages.unpack_fields(payload)
        for head, share in zip(fields[::2], fields[1::2], strict=True):
            v, kind = messages.unpack_ints(head)
            if v == 0:
                (key_shares if kind else seed_shares)[c.u + 1] = share
    if min(len(seed_shares), len(key_shares)) < t:
        return seed_shares, key_shares, None
    # Both secrets: strip client 0's masks from its masked input.
    seed = shamir.combine(seed_shares, t, protocol.SEED_LEN)
    sk = x25519.X25519PrivateKey.from_private_bytes(shamir.combine(key_shares, t, protocol.KEY_LEN))
    _, payload = messages.open_message(
        sent[0], keys.verify_keys, step=messages.MASKED_INPUT, round_id=1, recipient=messages.SERVER
    )
    dim = values.shape[1]
    x = protocol.unpack_vector(messages.unpack_fields(payload)[0], dim, BITS) - protocol.prg(seed, dim, BITS)
    for v in range(1, n):
        peer = x25519.X25519PublicKey.from_public_bytes(server.adverts[v][1])
        x = x - protocol.prg(protocol.kdf(sk.exchange(peer), b"fljax-secagg mask"), dim, BITS)  # 0 < v: +mask
    return seed_shares, key_shares, x & np.uint32((1 << BITS) - 1)


def test_split_view_attack_recovers_an_input_only_below_the_bound(monkeypatch):
    n = 20
    values = np.random.default_rng(0).integers(0, 2**BITS, (n, 6)).astype(np.uint32)
    # The harness works: with the bound lifted (t = 9 of 20, as before the fix) the split view
    # yields 10 seed shares and 10 key shares, and client 0's exact input.
    with monkeypatch.context() as m:
        m.setattr(SecAggConfig, "threshold_for", lambda self, num_clients: 9)
        seeds, keys_, x = _split_view_attack(n, set(range(1, 10)), values)
        assert len(seeds) == len(keys_) == 10
        np.testing.assert_array_equal(x, values[0])
    # Enforced: the smallest allowed threshold is 11, and an honest client answers once, so
    # whatever the split, at most one of the two secrets reaches the threshold.
    assert _cfg().threshold_for(n) == default_threshold(n) >= 11
    for size in range(n):
        seeds, keys_, x = _split_view_attack(n, set(range(1, size + 1)), values)
        assert len(seeds) + len(keys_) == n and x is None
    monkeypatch.setattr(SecAggConfig, "threshold_for", lambda self, num_clients: 11)
    for size in (8, 9, 10):  # the most even splits at the minimum threshold
        seeds, keys_, x = _split_view_attack(n, set(range(1, size + 1)), values)
        assert min(len(seeds), len(keys_)) < 11 and x is None
        with pytest.raises(shamir.ShamirError, match="need 11 shares"):
            shamir.combine(seeds if len(seeds) < 11 else keys_, 11, 32)


def test_client_refuses_inconsistent_unmask_requests():
    n, dim = 7, 4
    keys = protocol.setup(n)
    clients, server = _parties(keys, _cfg(), n, dim, 3)  # threshold 5 of 7
    # Client 6 vanishes before share_keys: the others never hold its shares.
    for c in clients:
        server.receive(c.advertise_keys())
    out = server.finish_step()
    for c in clients[:6]:
        server.receive(c.share_keys(out[c.u]))
    out = server.finish_step()
    for c in clients[:6]:
        server.receive(c.masked_input(out[c.u], np.zeros(dim, np.uint32)))
    live = set(range(6))
    cases = [
        (live | {6}, set(), "shared keys with it"),  # names a client that never shared keys
        (live - {5}, set(), "shared keys with it"),  # omits one that did
        (live - {5}, {5, 6}, "shared keys with it"),
        (live, {3}, "named both"),
        (live - {0}, {0}, "sent its masked input"),
        (live - {0, 1}, {1}, "not named among the survivors"),
    ]
    for survivors, dropped, match in cases:
        with pytest.raises(RefusedRequest, match=match):
            clients[0].unmask(_request(keys, 3, 0, survivors, dropped))
    # Too few survivors among its holders (4 < 5): it aborts rather than reveal.
    with pytest.raises(ProtocolAbort, match="4 survivors among its share holders < threshold 5"):
        clients[0].unmask(_request(keys, 3, 0, {0, 1, 2, 3}, {4, 5}))
    # A consistent request is answered once; a second one, even consistent, is refused.
    clients[1].unmask(_request(keys, 3, 1, live, set()))
    with pytest.raises(RefusedRequest, match="second unmasking request"):
        clients[1].unmask(_request(keys, 3, 1, live - {2}, {2}))


# ----------------------------------------------------------------------------- 2. round ids


def _client_step(c, step, data, values):
    """Client ``c``'s message of ``step`` in reply to the server's ``data``."""
    if step == messages.ADVERTISE_KEYS:
        return c.advertise_keys()
    if step == messages.SHARE_KEYS:
        return c.share_keys(data)
    if step == messages.MASKED_INPUT:
        return c.masked_input(data, values[c.u])
    return c.unmask(data)


def _splice_old_ciphertext(keys, new_request, old_share_message, sender):
    """The round-2 request for client 0 with ``sender``'s share ciphertext replaced by the one
    ``sender`` sent client 0 in round 1 (``old_share_message``), re-signed by the server."""
    _, payload = messages.open_message(
        new_request, keys.verify_keys, step=messages.MASKED_INPUT, round_id=2, recipient=0
    )
    fields = messages.unpack_fields(payload)
    _, old_payload = messages.open_message(
        old_share_message, keys.verify_keys, step=messages.SHARE_KEYS, round_id=1, recipient=messages.SERVER
    )
    old = messages.unpack_fields(old_payload)
    fields[1 + messages.unpack_ints(fields[0]).index(sender)] = old[1 + messages.unpack_ints(old[0]).index(0)]
    header = messages.Header(messages.MASKED_INPUT, 2, messages.SERVER, 0)
    return messages.seal(keys.server_key, header, messages.pack_fields(fields))


def test_messages_from_an_earlier_round_are_rejected():
    n, dim = 6, 5
    cfg = _cfg()
    keys = protocol.setup(n)
    values = np.arange(n * dim, dtype=np.uint32).reshape(n, dim)
    # Round 1, every message recorded.
    clients, server = _parties(keys, cfg, n, dim, 1)
    old_up, old_down, out = [], [], {}
    for step in range(4):
        up = [_client_step(c, step, out.get(c.u), values) for c in clients]
        for data in up:
            server.receive(data)
        out = server.finish_step()
        old_up.append(up)
        old_down.append(out)
    np.testing.assert_array_equal(out, values.sum(axis=0, dtype=np.uint32))
    # Round 2 under the same keys: each old message, fed at the step it belongs to, is rejected.
    clients, server = _parties(keys, cfg, n, dim, 2)
    out = {}
    for step in range(4):
        with pytest.raises(ReplayedMessage, match="round 1 replayed in round 2"):
            server.receive(old_up[step][0])
        if step > 0:
            with pytest.raises(ReplayedMessage, match="round 1 replayed in round 2"):
                _client_step(clients[0], step, old_down[step - 1][0], values)
        if step == messages.MASKED_INPUT:
            # An old share ciphertext inside a fresh, correctly signed message fails AES-GCM
            # (after shares from 1 and 2 decrypted: the client keeps none of them).
            spliced = _splice_old_ciphertext(keys, out[0], old_up[messages.SHARE_KEYS][3], 3)
            with pytest.raises(BadSignature, match="shares from 3 for client 0 fail authentication"):
                clients[0].masked_input(spliced, values[0])
        up = [_client_step(c, step, out.get(c.u), values) for c in clients]
        for data in up:
            server.receive(data)
        out = server.finish_step()
    np.testing.assert_array_equal(out, values.sum(axis=0, dtype=np.uint32))  # the rejections changed nothing


def test_a_round_id_runs_once_per_signing_key():
    n, dim = 5, 3
    cfg = _cfg()
    keys = protocol.setup(n)
    values = np.ones((n, dim), np.uint32)
    protocol.run_round(values, cfg, keys=keys, round_id=5)
    with pytest.raises(ReusedRound, match="the server already ran round 5 under this signing key"):
        protocol.run_round(values, cfg, keys=keys, round_id=5)
    used = keys.used_round_ids
    with pytest.raises(ReusedRound, match="client 2 already ran round 5"):
        protocol.Client(2, keys.client_keys[2], keys.verify_keys, cfg, n, 5, used_round_ids=used[2])
    with pytest.raises(ValueError, match=r"round_id must be in 0..2\*\*64-1, got -1"):
        protocol.Client(2, keys.client_keys[2], keys.verify_keys, cfg, n, -1, used_round_ids=used[2])
    # The default draws a fresh random id per round, so reusing the keys is safe.
    a = protocol.run_round(values, cfg, keys=keys)
    b = protocol.run_round(values, cfg, keys=keys)
    assert a.stats["round_id"] != b.stats["round_id"]
    np.testing.assert_array_equal(a.total, b.total)
    assert {5, a.stats["round_id"], b.stats["round_id"]} <= used[messages.SERVER] & used[0]


# ----------------------------------------------------------------------------- 3. reconstruction


def _corrupt(share: bytes, rng) -> bytes:
    """One chunk of a Shamir share changed: a different field element, or one bit flipped."""
    row = np.frombuffer(share, "<u4").copy()
    i = int(rng.integers(row.size))
    if rng.integers(2):
        new = int(rng.integers(shamir.PRIME))
        row[i] = new if new != row[i] else (new + 1) % shamir.PRIME
    else:
        row[i] ^= np.uint32(1 << int(rng.integers(32)))
    return row.astype("<u4").tobytes()


def _tampered(keys, response, holder, target, kind, rng, round_id):
    """``holder``'s signed unmasking response with its share of ``target`` (``kind`` 0: seed,
    1: key) corrupted, re-signed by the holder (a faulty or malicious holder)."""
    header, payload = messages.open_message(
        response, keys.verify_keys, step=messages.UNMASK, round_id=round_id, recipient=messages.SERVER
    )
    fields = messages.unpack_fields(payload)
    for i in range(0, len(fields), 2):
        if messages.unpack_ints(fields[i]) == [target, kind]:
            fields[i + 1] = _corrupt(fields[i + 1], rng)
            return messages.seal(keys.client_keys[holder], header, messages.pack_fields(fields))
    raise AssertionError(f"holder {holder} sent no share of {target}")


@pytest.mark.parametrize("kind", [0, 1])
def test_a_corrupted_share_aborts_every_trial(kind):
    """kind 0: a share of a survivor's self-mask seed (checked against its commitment);
    kind 1: a share of a dropped client's masking key (checked against its public key)."""
    n, dim = 8, 6
    cfg = _cfg()
    t = cfg.threshold_for(n)  # 6 of 8
    rng = np.random.default_rng(kind)
    values = rng.integers(0, 2**BITS, (n, dim)).astype(np.uint32)
    for trial in range(20):
        round_id = 100 + trial
        keys = protocol.setup(n)
        clients, server = _parties(keys, cfg, n, dim, round_id)
        dropped = {int(rng.integers(n))} if kind else set()
        _, requests = _through_masked_input(clients, server, values, dropped)
        survivors = sorted(set(range(n)) - dropped)
        target = int(rng.choice(sorted(dropped) if kind else survivors))
        holder = int(rng.choice(survivors[:t]))  # the server combines the t lowest holders' shares
        for c in clients:
            if c.u in survivors:
                response = c.unmask(requests[c.u])
                if c.u == holder:
                    response = _tampered(keys, response, holder, target, kind, rng, round_id)
                server.receive(response)
        what = "dropped client" if kind else "client"
        with pytest.raises(CorruptShares, match=f"{what} {target}\\b.*round aborted"):
            server.finish_step()


def test_honest_rounds_with_checks_stay_exact():
    n, dim = 9, 7
    rng = np.random.default_rng(4)
    values = rng.integers(0, 2**BITS, (n, dim)).astype(np.uint32)
    for neighbors, drops in ((None, {2}), (4, {5})):
        cfg = _cfg(num_neighbors=neighbors)
        result = protocol.run_round(values, cfg, dropouts={messages.MASKED_INPUT: drops})
        expect = values[result.survivors].sum(axis=0, dtype=np.uint32) & np.uint32(2**BITS - 1)
        np.testing.assert_array_equal(result.total, expect)


def test_seed_commitment_binds_round_and_client():
    seed = bytes(range(32))
    c = protocol.commit_seed(seed, 7, 3)
    assert len(c) == protocol.COMMIT_LEN
    assert c == protocol.commit_seed(seed, 7, 3)
    others = {
        protocol.commit_seed(seed, 8, 3),
        protocol.commit_seed(seed, 7, 4),
        protocol.commit_seed(b"\0" * 32, 7, 3),
    }
    assert c not in others and len(others) == 3
