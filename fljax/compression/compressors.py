"""Compressors of one client's upload: unbiased quantizers and top-k sparsification.

A :class:`Compressor` is a tuple of pure functions written for ONE client's
flattened delta ``x[dim]`` (float32; :func:`fljax.compression.rounds.compressed`
flattens the pytree with ``jax.flatten_util.ravel_pytree``):

* ``encode(x, key) -> payload``: jittable; the payload is a NamedTuple of
  arrays, exactly what goes on the wire;
* ``decode(payload, dim) -> x_hat[dim]``: jittable; what the server adds up;
* ``num_bytes(dim) -> int``: the bytes one encoded upload occupies (host);
* ``pack(payload) -> bytes`` and ``unpack(data, dim) -> payload`` (numpy, host):
  the byte format itself, so ``len(pack(p)) == num_bytes(dim)`` and
  ``unpack(pack(p), dim)`` gives ``p`` back bit for bit (tested).

Byte formats are little-endian; ``b``-bit codes are packed back to back, least
significant bit first (``numpy.packbits(..., bitorder="little")``), the last
byte zero-padded. One upload of ``dim`` coordinates takes:

* :func:`identity`: ``4 dim`` (float32 values);
* :func:`qsgd`: ``4 n_b`` (a float32 norm per bucket) + ``ceil(dim b / 8)``,
  ``b = ceil(log2(2 s + 1))`` bits per signed level;
* :func:`rotated_quantization`: ``8`` (the rotation seed) + ``8 n_b`` (float32
  minimum and maximum per block) + ``ceil(n_b B k / 8)`` (``k``-bit codes of
  the ``n_b`` zero-padded blocks of size ``B``);
* :func:`top_k`: ``8 k`` (an int32 index and a float32 value per kept coordinate).

The download is the float32 model (:func:`download_bytes`), uncompressed.

Unbiasedness. :func:`qsgd` and :func:`rotated_quantization` are unbiased,
``E[decode(encode(x))] = x`` (stochastic rounding between neighbouring
levels), so the server's weighted mean of decoded deltas is an unbiased
estimate of the uncompressed one. QSGD's variance bound (Alistarh et al.
2017, Lemma 3.1), per bucket of ``d`` coordinates with ``s`` levels:
``E||Q(x) - x||^2 <= min(d / s^2, sqrt(d) / s) ||x||^2``. :func:`top_k` is
biased (it keeps the ``k`` largest magnitudes); error feedback
(:func:`fljax.compression.rounds.error_feedback`) adds what it dropped to the
next round's delta.

References:
  Alistarh, Grubic, Li, Tomioka, Vojnovic. "QSGD: Communication-Efficient SGD
  via Gradient Quantization and Encoding". NeurIPS 2017.
  Suresh, Yu, Kumar, McMahan. "Distributed Mean Estimation with Limited
  Communication". ICML 2017.
  Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory". NeurIPS 2018.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax.base import Params, PyTree
from fljax.privacy import discrete

MAX_LEVELS = 2**24
"""Largest QSGD level count: beyond it float32 cannot resolve the rounding."""

MAX_BITS = 24
"""Largest code width of :func:`rotated_quantization` (float32 resolution)."""


class Compressor(NamedTuple):
    """Encode/decode pair for one client's flat delta, with its byte format.

    Attributes:
      encode: ``encode(x[dim] float32, key) -> payload`` (jittable).
      decode: ``decode(payload, dim) -> x_hat[dim]`` float32 (jittable, static ``dim``).
      num_bytes: ``num_bytes(dim) -> int``, bytes of one encoded upload.
      pack: ``pack(payload) -> bytes`` (host, numpy).
      unpack: ``unpack(data, dim) -> payload`` of numpy arrays (host).
    """

    encode: Callable[[jax.Array, jax.Array], PyTree]
    decode: Callable[[PyTree, int], jax.Array]
    num_bytes: Callable[[int], int]
    pack: Callable[[PyTree], bytes]
    unpack: Callable[[bytes, int], PyTree]


class Dense(NamedTuple):
    """Uncompressed upload: ``values`` ``[dim]`` float32."""

    values: jax.Array


class QsgdPayload(NamedTuple):
    """QSGD upload.

    Attributes:
      norms: ``[num_buckets]`` float32, the L2 norm of each bucket.
      levels: ``[dim]`` int32 signed levels in ``[-s, s]``.
    """

    norms: jax.Array
    levels: jax.Array


class RotatedPayload(NamedTuple):
    """Rotated ``k``-bit upload.

    Attributes:
      seed: the rotation's key data (``uint32[2]`` for ``threefry2x32``): the
        server rebuilds the random signs from it.
      lo: ``[num_blocks]`` float32 minimum of each rotated block.
      hi: ``[num_blocks]`` float32 maximum of each rotated block.
      codes: ``[num_blocks * block_size]`` int32 in ``[0, 2**k - 1]``.
    """

    seed: jax.Array
    lo: jax.Array
    hi: jax.Array
    codes: jax.Array


class Sparse(NamedTuple):
    """Sparse upload: ``indices`` ``[k]`` int32 and ``values`` ``[k]`` float32."""

    indices: jax.Array
    values: jax.Array


def download_bytes(params: Params) -> int:
    """Bytes of one download: every leaf of ``params`` as stored (the float32 model)."""
    return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def num_params(params: Params) -> int:
    """Number of coordinates of ``params`` (the ``dim`` of the flattened delta)."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def upload_bytes(compressor: Compressor, params: Params) -> int:
    """Bytes of one client's encoded upload for a model shaped like ``params``."""
    return compressor.num_bytes(num_params(params))


def _check_flat(x: jax.Array) -> None:
    if x.ndim != 1:
        raise ValueError(f"a compressor encodes one flat vector x[dim], got shape {x.shape}")


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integer ``codes`` (each ``< 2**bits``) into ``ceil(n bits / 8)`` bytes.

    Examples:
      >>> import numpy as np
      >>> data = pack_bits(np.array([1, 2, 3]), 2)
      >>> len(data), unpack_bits(data, 3, 2).tolist()
      (1, [1, 2, 3])
    """
    v = np.asarray(codes, np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2**{bits}), got {v.min()}..{v.max()}")
    planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` codes of ``bits`` bits, int64."""
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=n * bits, bitorder="little")
    planes = planes.reshape(n, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=1)


def _read(data: bytes, sizes: list[int]) -> list[bytes]:
    if len(data) != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} bytes, got {len(data)}")
    out, start = [], 0
    for s in sizes:
        out.append(data[start : start + s])
        start += s
    return out


def identity() -> Compressor:
    """No compression: the float32 delta itself (``4 dim`` bytes).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = identity()
      >>> x = jnp.array([1.0, -2.0])
      >>> c.decode(c.encode(x, jax.random.key(0)), 2).tolist(), c.num_bytes(2)
      ([1.0, -2.0], 8)
    """

    def encode(x, key):
        del key
        _check_flat(x)
        return Dense(x.astype(jnp.float32))

    def decode(payload, dim):
        return jnp.asarray(payload.values, jnp.float32)

    def pack(payload):
        return np.asarray(payload.values, "<f4").tobytes()

    def unpack(data, dim):
        (values,) = _read(data, [4 * dim])
        return Dense(np.frombuffer(values, "<f4").astype(np.float32))

    return Compressor(encode, decode, lambda dim: 4 * dim, pack, unpack)


def _num_blocks(dim: int, block: int) -> int:
    return -(-dim // block)


def qsgd(levels: int, *, bucket_size: int | None = None) -> Compressor:
    """QSGD: stochastic uniform quantization of ``|x_i| / ||x||`` to ``levels`` levels, with signs.

    For each bucket (``bucket_size`` consecutive coordinates, the last one
    shorter; ``None``: the whole vector) with L2 norm ``n`` and ``s = levels``,
    coordinate ``x_i`` becomes ``sign(x_i) l_i`` with ``l_i = floor(r) +
    Bernoulli(r - floor(r))``, ``r = s |x_i| / n``, and decodes to ``n
    sign(x_i) l_i / s``: unbiased, and ``E||Q(x) - x||^2 <= min(d / s^2,
    sqrt(d) / s) ||x||^2`` per bucket of ``d`` coordinates (Alistarh et al.
    2017, Lemma 3.1).

    Payload (:class:`QsgdPayload`): one float32 norm per bucket and one signed
    level per coordinate, stored as ``l + s`` in ``b = ceil(log2(2 s + 1))``
    bits (as many bits as a sign bit plus ``ceil(log2(s + 1))`` level bits).
    ``num_bytes(dim) = 4 num_buckets + ceil(dim b / 8)``. The paper's Elias
    coding of the levels would be shorter for small ``s``; this fixed-width
    format is what :func:`~Compressor.pack` writes.

    Args:
      levels: ``s >= 1`` (``s = 1``: ternary, 2 bits a coordinate), at most
        :data:`MAX_LEVELS`.
      bucket_size: coordinates per norm (the paper's bucketing), or ``None``.

    Returns:
      A :class:`Compressor`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = qsgd(1)
      >>> p = c.encode(jnp.array([3.0, -4.0]), jax.random.key(0))
      >>> float(p.norms[0]), set(p.levels.tolist()) <= {-1, 0, 1}, c.num_bytes(2)
      (5.0, True, 5)
    """
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an int in [1, {MAX_LEVELS}], got {levels!r}")
    if bucket_size is not None and (isinstance(bucket_size, bool) or bucket_size < 1):
        raise ValueError(f"bucket_size must be a positive int or None, got {bucket_size!r}")
    s = int(levels)
    bits = math.ceil(math.log2(2 * s + 1))

    def layout(dim):
        b = dim if bucket_size is None else min(bucket_size, dim)
        return _num_blocks(dim, b), b

    def encode(x, key):
        _check_flat(x)
        x = x.astype(jnp.float32)
        dim = x.shape[0]
        nb, b = layout(dim)
        buckets = jnp.pad(x, (0, nb * b - dim)).reshape(nb, b)
        norms = jnp.sqrt(jnp.sum(buckets * buckets, axis=1))
        safe = jnp.where(norms > 0, norms, 1.0)
        r = (jnp.abs(buckets) / safe[:, None] * jnp.float32(s)).reshape(-1)[:dim]
        r = jnp.minimum(r, jnp.float32(s))
        lo = jnp.floor(r)
        u = jax.random.uniform(key, (dim,), jnp.float32)
        level = jnp.minimum(lo + (u < r - lo).astype(jnp.float32), jnp.float32(s)).astype(jnp.int32)
        return QsgdPayload(norms, jnp.where(x < 0, -level, level))

    def decode(payload, dim):
        nb, b = layout(dim)
        scale = jnp.repeat(jnp.asarray(payload.norms, jnp.float32), b)[:dim]
        return scale * jnp.asarray(payload.levels).astype(jnp.float32) / jnp.float32(s)

    def num_bytes(dim):
        return 4 * layout(dim)[0] + -(-dim * bits // 8)

    def pack(payload):
        norms = np.asarray(payload.norms, "<f4").tobytes()
        return norms + pack_bits(np.asarray(payload.levels, np.int64) + s, bits)

    def unpack(data, dim):
        nb, _ = layout(dim)
        norms, codes = _read(data, [4 * nb, -(-dim * bits // 8)])
        levels = (unpack_bits(codes, dim, bits) - s).astype(np.int32)
        return QsgdPayload(np.frombuffer(norms, "<f4").astype(np.float32), levels)

    return Compressor(encode, decode, num_bytes, pack, unpack)


@functools.cache
def _seed_shape() -> tuple[tuple[int, ...], np.dtype]:
    shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return shape.shape, np.dtype(shape.dtype)


def rotated_quantization(bits: int, *, block_size: int | None = None) -> Compressor:
    """Randomized Hadamard rotation then stochastic ``k``-bit quantization (Suresh et al. 2017).

    The flat delta is zero-padded and cut into blocks of ``B`` coordinates
    (``block_size``, a power of two; ``None``: one block of
    :func:`fljax.privacy.discrete.padded_dim` ``(dim)``). Each block is rotated,
    ``y = H D x`` (:func:`fljax.privacy.discrete.rotate`, fresh random signs
    ``D`` per block drawn from a seed the client sends), which spreads its mass
    so that ``max(y) - min(y)`` is of order ``sqrt(log B / B) ||x||``. Each
    ``y_j`` is then rounded stochastically to one of the ``2**k`` evenly spaced
    levels between the block's minimum and maximum (unbiased), and the server
    decodes ``x_hat = D H y_hat`` (:func:`fljax.privacy.discrete.unrotate`):
    unbiased, with ``E||x_hat - x||^2 = E||y_hat - y||^2 <= sum_j (max - y_j)(y_j
    - min) / (2**k - 1)**2`` (their ``pi_srk``, Theorem 3: ``O(log B / (2**k -
    1)**2) ||x||^2``).

    Payload (:class:`RotatedPayload`): the rotation seed (the key's data, 8
    bytes for ``threefry2x32``), float32 minimum and maximum per block, and one
    ``k``-bit code per padded coordinate: ``num_bytes(dim) = 8 + 8 n_b +
    ceil(n_b B k / 8)``. The padding is sent (its codes carry the rounding of
    the rotated block), so ``B`` close to a divisor of ``dim`` wastes less.

    Args:
      bits: ``k``, bits per coordinate, in ``[1, MAX_BITS]``.
      block_size: a power of two, or ``None`` (one block).

    Returns:
      A :class:`Compressor`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = rotated_quantization(2)
      >>> p = c.encode(jnp.array([3.0, -4.0, 1.0]), jax.random.key(0))
      >>> p.codes.shape, int(p.codes.max()) <= 3, c.num_bytes(3)
      ((4,), True, 17)
    """
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two or None, got {block_size!r}")
    k = int(bits)
    top = float(2**k - 1)
    seed_shape, seed_dtype = _seed_shape()
    seed_bytes = int(np.prod(seed_shape)) * seed_dtype.itemsize

    def layout(dim):
        b = discrete.padded_dim(dim) if block_size is None else block_size
        return _num_blocks(dim, b), b

    def signs(seed, nb, b):
        key = jax.random.wrap_key_data(seed)
        return discrete.random_signs(key, nb * b).reshape(nb, b)

    def encode(x, key):
        _check_flat(x)
        x = x.astype(jnp.float32)
        dim = x.shape[0]
        nb, b = layout(dim)
        key_signs, key_round = jax.random.split(key)
        seed = jax.random.key_data(key_signs)
        blocks = jnp.pad(x, (0, nb * b - dim)).reshape(nb, b)
        y = jax.vmap(discrete.rotate)(blocks, signs(seed, nb, b))
        lo, hi = jnp.min(y, axis=1), jnp.max(y, axis=1)
        step = (hi - lo) / jnp.float32(top)
        safe = jnp.where(step > 0, step, 1.0)
        r = jnp.clip((y - lo[:, None]) / safe[:, None], 0.0, jnp.float32(top))
        floor = jnp.floor(r)
        u = jax.random.uniform(key_round, r.shape, jnp.float32)
        codes = jnp.minimum(floor + (u < r - floor).astype(jnp.float32), jnp.float32(top))
        return RotatedPayload(seed, lo, hi, codes.astype(jnp.int32).reshape(-1))

    def decode(payload, dim):
        nb, b = layout(dim)
        lo = jnp.asarray(payload.lo, jnp.float32)[:, None]
        hi = jnp.asarray(payload.hi, jnp.float32)[:, None]
        codes = jnp.asarray(payload.codes).astype(jnp.float32).reshape(nb, b)
        y = lo + codes * ((hi - lo) / jnp.float32(top))
        seed = jnp.asarray(payload.seed, seed_dtype)
        x = jax.vmap(discrete.unrotate, in_axes=(0, 0, None))(y, signs(seed, nb, b), b)
        return x.reshape(-1)[:dim]

    def num_bytes(dim):
        nb, b = layout(dim)
        return seed_bytes + 8 * nb + -(-nb * b * k // 8)

    def pack(payload):
        head = np.asarray(payload.seed, seed_dtype.newbyteorder("<")).tobytes()
        head += np.asarray(payload.lo, "<f4").tobytes() + np.asarray(payload.hi, "<f4").tobytes()
        return head + pack_bits(np.asarray(payload.codes), k)

    def unpack(data, dim):
        nb, b = layout(dim)
        seed, lo, hi, codes = _read(data, [seed_bytes, 4 * nb, 4 * nb, -(-nb * b * k // 8)])
        seed = np.frombuffer(seed, seed_dtype.newbyteorder("<")).astype(seed_dtype).reshape(seed_shape)
        return RotatedPayload(
            seed,
            np.frombuffer(lo, "<f4").astype(np.float32),
            np.frombuffer(hi, "<f4").astype(np.float32),
            unpack_bits(codes, nb * b, k).astype(np.int32),
        )

    return Compressor(encode, decode, num_bytes, pack, unpack)


def top_k(k: int) -> Compressor:
    """Top-``k`` sparsification: keep the ``k`` coordinates of largest magnitude.

    Deterministic (the key is unused) and biased; pair it with
    :func:`fljax.compression.rounds.error_feedback` (Stich et al. 2018,
    Karimireddy et al. 2019). ``k >= dim`` keeps every coordinate (the
    decoded vector is then exactly ``x``).

    Payload (:class:`Sparse`): ``min(k, dim)`` int32 indices and float32
    values, ``num_bytes(dim) = 8 min(k, dim)``.

    Args:
      k: coordinates kept, ``>= 1``.

    Returns:
      A :class:`Compressor`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = top_k(2)
      >>> x = jnp.array([0.1, -3.0, 2.0, 0.5])
      >>> c.decode(c.encode(x, jax.random.key(0)), 4).tolist(), c.num_bytes(4)
      ([0.0, -3.0, 2.0, 0.0], 16)
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")

    def encode(x, key):
        del key
        _check_flat(x)
        x = x.astype(jnp.float32)
        kk = min(int(k), x.shape[0])
        _, idx = jax.lax.top_k(jnp.abs(x), kk)
        return Sparse(idx.astype(jnp.int32), x[idx])

    def decode(payload, dim):
        values = jnp.asarray(payload.values, jnp.float32)
        return jnp.zeros((dim,), jnp.float32).at[jnp.asarray(payload.indices)].set(values)

    def pack(payload):
        return np.asarray(payload.indices, "<i4").tobytes() + np.asarray(payload.values, "<f4").tobytes()

    def unpack(data, dim):
        kk = min(int(k), dim)
        idx, values = _read(data, [4 * kk, 4 * kk])
        return Sparse(
            np.frombuffer(idx, "<i4").astype(np.int32), np.frombuffer(values, "<f4").astype(np.float32)
        )

    return Compressor(encode, decode, lambda dim: 8 * min(int(k), dim), pack, unpack)
