"""Building blocks of the secure aggregation protocol (:mod:`fljax.secagg.protocol`).

All cryptography comes from the ``cryptography`` package: HKDF-SHA256 (:func:`kdf`), the
AES-256-CTR keystream as a PRG (:func:`prg`), a SHA-256 commitment to a self-mask seed
(:func:`commit_seed`); plus the masked vectors' byte packing and the masking graph.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fljax.secagg.config import SecAggConfig
from fljax.secagg.messages import MalformedMessage

KEY_LEN = 32
SEED_LEN = 32
COMMIT_LEN = 32
_COMMIT_LABEL = b"fljax-secagg self-mask seed commitment v1"


def kdf(shared: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 to 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def commit_seed(seed: bytes, round_id: int, client: int) -> bytes:
    """SHA-256 commitment to a self-mask seed: ``SHA-256(label | round_id(u64) | client(u32) | seed)``.

    The label separates it from every other hash in fljax and the fixed-width
    fields make the input unambiguous; binding the round and the client keeps
    one commitment from vouching for another client's or round's seed. It hides
    the seed because the seed is 32 uniform bytes.
    """
    h = hashes.Hash(hashes.SHA256())
    h.update(_COMMIT_LABEL + struct.pack(">QI", round_id, client) + seed)
    return h.finalize()


def prg(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """``dim`` uint32 mask entries in ``Z_(2**bits)``: the AES-256-CTR keystream of ``seed``."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * dim))
    return np.frombuffer(stream, "<u4").astype(np.uint32) & np.uint32((1 << bits) - 1)


def pack_vector(y: np.ndarray, bits: int) -> bytes:
    """``ceil(bits / 8)`` little-endian bytes per entry."""
    nb = -(-bits // 8)
    return np.ascontiguousarray(y.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :nb]).tobytes()


def unpack_vector(data: bytes, dim: int, bits: int) -> np.ndarray:
    nb = -(-bits // 8)
    if len(data) != nb * dim:
        raise MalformedMessage(f"masked vector of {len(data)} bytes, expected {nb * dim}")
    raw = np.zeros((dim, 4), np.uint8)
    raw[:, :nb] = np.frombuffer(data, np.uint8).reshape(dim, nb)
    y = raw.view("<u4").reshape(dim).astype(np.uint32)
    if np.any(y >> np.uint32(bits)) if bits < 32 else False:
        raise MalformedMessage("masked vector entry outside the ring")
    return y


def masking_graph(num_clients: int, config: SecAggConfig, order: list[int]) -> list[frozenset[int]]:
    """Neighbours of each client: all others, or a Harary ring over ``order`` (SecAgg+)."""
    n = num_clients
    if config.is_complete(n):
        return [frozenset(range(n)) - {u} for u in range(n)]
    half = config.neighbors_for(n) // 2
    pos = {u: i for i, u in enumerate(order)}
    return [frozenset(order[(pos[u] + d) % n] for d in range(-half, half + 1) if d) for u in range(n)]
