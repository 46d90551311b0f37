"""Shamir t-of-n secret sharing of byte strings over the prime field ``GF(2**31 - 1)``.

A secret of ``L`` bytes is cut into ``ceil(8 L / 30)`` chunks of 30 bits, each
below the prime ``p = 2**31 - 1``; every chunk is shared with its own random
polynomial of degree ``t - 1`` (coefficients from ``os.urandom``). Any ``t``
shares determine every chunk by Lagrange interpolation at 0; any ``t - 1``
reveal nothing about it (perfect secrecy per chunk, hence for the secret). The
evaluation point of a holder is ``x`` in ``1..p-1`` (the protocol uses the
holder's client index + 1). Arithmetic is vectorised with numpy int64 (all
products stay below ``2**62``).

A share is ``4 * num_chunks`` bytes (the chunk values, uint32 little-endian).
"""

from __future__ import annotations

import functools
import os

import numpy as np

PRIME = 2**31 - 1
CHUNK_BITS = 30


class ShamirError(ValueError):
    """Too few, duplicate or inconsistent shares."""


def num_chunks(secret_len: int) -> int:
    return -(-8 * secret_len // CHUNK_BITS)


def _to_chunks(secret: bytes) -> np.ndarray:
    v = int.from_bytes(secret, "little")
    m = num_chunks(len(secret))
    return np.asarray([(v >> (CHUNK_BITS * i)) & ((1 << CHUNK_BITS) - 1) for i in range(m)], np.int64)


def _from_chunks(chunks: np.ndarray, secret_len: int) -> bytes:
    v = 0
    for i, c in enumerate(chunks.tolist()):
        if not 0 <= c < (1 << CHUNK_BITS):
            raise ShamirError("inconsistent shares: a reconstructed chunk is out of range")
        v |= int(c) << (CHUNK_BITS * i)
    if v >> (8 * secret_len):
        raise ShamirError("inconsistent shares: the reconstructed secret is too long")
    return v.to_bytes(secret_len, "little")


def _random_field(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform-ish elements of GF(p) from os.urandom (64-bit draws mod p: bias < 2**-33)."""
    raw = np.frombuffer(os.urandom(8 * int(np.prod(shape))), np.uint64).reshape(shape)
    return (raw % np.uint64(PRIME)).astype(np.int64)


def split(secret: bytes, threshold: int, xs: list[int]) -> list[bytes]:
    """Shares of ``secret`` for the holders at evaluation points ``xs`` (distinct, in 1..p-1).

    Raises:
      ShamirError: if ``threshold`` is not in ``1..len(xs)`` or points are invalid.
    """
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ShamirError("evaluation points must be distinct and in 1..p-1")
    chunks = _to_chunks(secret)
    coeffs = _random_field((threshold - 1, chunks.size))  # degree 1..t-1
    x = np.asarray(xs, np.int64)[:, None]
    acc = np.zeros((len(xs), chunks.size), np.int64)
    for c in coeffs[::-1]:  # Horner, highest degree first
        acc = (acc + c[None, :]) * x % PRIME
    acc = (acc + chunks[None, :]) % PRIME
    return [row.astype("<u4").tobytes() for row in acc]


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, PRIME - 2, PRIME) % PRIME)
    return np.asarray(out, np.int64)


def combine(shares: dict[int, bytes], threshold: int, secret_len: int) -> bytes:
    """Reconstruct a ``secret_len``-byte secret from ``{x: share}``.

    Uses the ``threshold`` shares with the smallest ``x`` (any ``t`` suffice).

    Raises:
      ShamirError: fewer than ``threshold`` shares, malformed shares, or
        shares that do not come from one secret of that length.
    """
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    m = num_chunks(secret_len)
    xs = tuple(sorted(shares)[:threshold])
    rows = []
    for x in xs:
        s = shares[x]
        if not 0 < x < PRIME or len(s) != 4 * m:
            raise ShamirError(f"malformed share for point {x}")
        row = np.frombuffer(s, "<u4").astype(np.int64)
        if np.any(row >= PRIME):
            raise ShamirError(f"malformed share for point {x}")
        rows.append(row)
    lam = _lagrange_at_zero(xs)
    chunks = np.sum(lam[:, None] * np.stack(rows) % PRIME, axis=0) % PRIME
    return _from_chunks(chunks, secret_len)
