"""Wire format of the secure aggregation protocol: signed, length-prefixed bytes.

Every message is one ``bytes`` object (no pickle), so the same code can cross a
network::

    header  = MAGIC(4) | version(u8) | step(u8) | round_id(u64) | sender(u32) | recipient(u32)
    message = header | payload_len(u32) | payload | Ed25519 signature(64)

integers big-endian; the signature covers everything before it, so the round id
and the step are authenticated (a message replayed from another round or step
is rejected). That only helps if round ids are fresh: a party refuses to start
a round id it has already run under the same signing key (:class:`ReusedRound`,
see :class:`fljax.secagg.protocol.Setup`), so an old message can never match
the current round. ``SERVER`` (``0xFFFFFFFF``) is the server's party id; clients are
``0..n-1``. A payload is a list of fields: ``count(u32)`` then, per field,
``len(u32) | bytes``. Parsing is strict: any truncation, trailing byte or bad
length raises :class:`MalformedMessage`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

MAGIC = b"FLSA"
VERSION = 2  # 2: advertisements carry a self-mask seed commitment
SERVER = 0xFFFFFFFF
SIGNATURE_LEN = 64
_HEADER = struct.Struct(">4sBBQII")

# Protocol steps (Bonawitz et al. 2017 rounds 0..3; server replies reuse the step).
ADVERTISE_KEYS = 0
SHARE_KEYS = 1
MASKED_INPUT = 2
UNMASK = 3
STEP_NAMES = {
    ADVERTISE_KEYS: "advertise_keys",
    SHARE_KEYS: "share_keys",
    MASKED_INPUT: "masked_input",
    UNMASK: "unmask",
}


class ProtocolError(Exception):
    """Base class of every protocol failure."""


class MalformedMessage(ProtocolError):
    """Bytes that do not parse as a message of the expected shape."""


class BadSignature(ProtocolError):
    """A signature that does not verify under the sender's registered key."""


class ReplayedMessage(ProtocolError):
    """A message from another round, or a second message from a party in one step."""


class UnexpectedMessage(ProtocolError):
    """A well-formed, authentic message at the wrong step or for another party."""


class ReusedRound(ProtocolError):
    """A round id this party already ran under the same signing key: its old messages would
    authenticate in the new round, so a stale one could be replayed into the sum."""


class ProtocolAbort(ProtocolError):
    """The round stops without a sum: too few parties survive to continue without breaking
    privacy or correctness, or (:class:`CorruptShares`) a secret fails its check."""


class CorruptShares(ProtocolAbort):
    """Shares that reconstruct a secret other than the one its owner committed to (a self-mask
    seed against its commitment, a masking key against its advertised public key)."""


class RefusedRequest(ProtocolError):
    """A client refuses a request that would reveal what the protocol must hide."""


class Header(NamedTuple):
    step: int
    round_id: int
    sender: int
    recipient: int


def pack_fields(fields: list[bytes]) -> bytes:
    out = [struct.pack(">I", len(fields))]
    for f in fields:
        out.append(struct.pack(">I", len(f)))
        out.append(bytes(f))
    return b"".join(out)


def unpack_fields(data: bytes) -> list[bytes]:
    if len(data) < 4:
        raise MalformedMessage("truncated field list")
    (count,) = struct.unpack_from(">I", data, 0)
    pos, fields = 4, []
    for _ in range(count):
        if pos + 4 > len(data):
            raise MalformedMessage("truncated field length")
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise MalformedMessage("field runs past the end of the message")
        fields.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise MalformedMessage("trailing bytes after the last field")
    return fields


def pack_ints(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def unpack_ints(data: bytes) -> list[int]:
    if len(data) % 4:
        raise MalformedMessage("integer list of bad length")
    return list(struct.unpack(f">{len(data) // 4}I", data))


def seal(key: ed25519.Ed25519PrivateKey, header: Header, payload: bytes) -> bytes:
    """Serialise and sign one message."""
    body = (
        _HEADER.pack(MAGIC, VERSION, header.step, header.round_id, header.sender, header.recipient)
        + struct.pack(">I", len(payload))
        + payload
    )
    return body + key.sign(body)


def peek(data: bytes) -> Header:
    """Parse the header without checking the signature (to find the sender's key)."""
    if not isinstance(data, bytes | bytearray) or len(data) < _HEADER.size + 4 + SIGNATURE_LEN:
        raise MalformedMessage("message too short")
    magic, version, step, round_id, sender, recipient = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise MalformedMessage("bad magic or version")
    (size,) = struct.unpack_from(">I", data, _HEADER.size)
    if _HEADER.size + 4 + size + SIGNATURE_LEN != len(data):
        raise MalformedMessage("payload length does not match the message length")
    return Header(step, round_id, sender, recipient)


def open_message(
    data: bytes,
    verify_keys: dict[int, ed25519.Ed25519PublicKey],
    *,
    step: int,
    round_id: int,
    recipient: int,
) -> tuple[Header, bytes]:
    """Parse, authenticate and check one message; return its header and payload.

    Raises:
      MalformedMessage: bytes that do not parse.
      BadSignature: a signature that does not verify.
      ReplayedMessage: a message from another round, or a second one in a step.
      UnexpectedMessage: the wrong step or recipient, or an unknown sender.
    """
    header = peek(data)
    key = verify_keys.get(header.sender)
    if key is None:
        raise UnexpectedMessage(f"message from unregistered party {header.sender}")
    body, signature = data[:-SIGNATURE_LEN], data[-SIGNATURE_LEN:]
    try:
        key.verify(bytes(signature), bytes(body))
    except InvalidSignature:
        raise BadSignature(f"bad signature on a message claiming to be from party {header.sender}") from None
    if header.round_id != round_id:
        raise ReplayedMessage(f"message for round {header.round_id} replayed in round {round_id}")
    if header.step != step:
        raise UnexpectedMessage(
            f"expected step {STEP_NAMES.get(step, step)}, got {STEP_NAMES.get(header.step, header.step)}"
        )
    if header.recipient != recipient:
        raise UnexpectedMessage(f"message addressed to party {header.recipient}, not {recipient}")
    return header, bytes(data[_HEADER.size + 4 : -SIGNATURE_LEN])
