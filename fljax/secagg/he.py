"""Secure sum by homomorphic encryption: clients encrypt, the server adds ciphertexts, a key holder decrypts the sum.

An alternative backend to the masking protocol (:mod:`fljax.secagg.protocol`)
behind the same contract: :func:`encrypted_sum` is a SUM in the sense of
:mod:`fljax.aggregators` built on the same fixed-point encoding
(:mod:`fljax.secagg.encoding`), so ``aggregators.mean(he.encrypted_sum(sa))``
is an encrypted weighted mean and ``privacy.dp(dp_cfg, sum=he.encrypted_sum(sa))``
is DP-FedAvg over it; for the same key its result equals
:func:`fljax.secagg.secure_sum`'s bit for bit.

Scheme: CKKS (Cheon et al. 2017) from TenSEAL (Microsoft SEAL), ring degree
``N``, ``N/2`` real slots per ciphertext, ciphertext modulus ``q``: ``L`` data
primes of 60 bits (``q > 2**(59 L)``) and SEAL's key-switching prime (unused
by additions), all within the homomorphic-encryption standard's 128-bit bound for
``N`` (SEAL's table: 109, 218, 438, 881 bits for ``N`` = 4096 .. 32768).

Parties and what each holds:

* the **key holder** (:class:`KeyHolder`) generates the key pair, publishes
  the public key, and decrypts the sum (only);
* each **client** (:func:`encrypt`) encrypts its encoded integer vector under
  the public key, in ``ceil(dim / (N/2))`` ciphertexts;
* the **server** (:func:`add`) holds a context with no key at all (the
  parameters only), adds the ciphertexts slot-wise and forwards the sum's
  ciphertexts to the key holder, whose reply is the integer sum.

Exactness, step by step. Client ``i`` encrypts the signed integers ``x_i`` of
the fixed-point encoding, ``|x_i| <= A`` per coordinate (``A =
max(ceil(r * scale), 2**weight_bits)``, :class:`~fljax.secagg.SecAggConfig`),
so the sum ``S`` of ``n`` clients satisfies ``|S| <= n A``.

1. Encrypting at scale ``Delta = 2**k`` and decrypting gives ``Delta x + e``,
   whose error has canonical-embedding norm at most
   ``B = 8 sqrt(2) sigma N + 6 sigma sqrt(N) + 16 sigma sqrt(h N) + N / 2``
   (Cheon et al. 2017, Lemma 1, for a fresh ciphertext, with ``sigma = 3.2``
   and the secret's Hamming weight ``h`` taken as ``N``; ``N / 2`` bounds the
   rounding of ``Delta x`` to integer coefficients). This is the scheme's
   standard high-probability bound, not a worst case; measured errors are
   80 to 400 times smaller (``N = 8192``: ``B < 2**19.5``).
2. Adding ``n`` ciphertexts adds their errors (``<= n B``); every slot's error
   is at most the canonical norm, so each decrypted coordinate is ``S + eps``
   with ``|eps| <= n B / Delta + delta``, where ``delta = 2**-50 N n A`` bounds
   the double-precision FFTs of encoding and decoding.
3. :meth:`HEConfig.scale_bits` picks the smallest ``k`` with
   ``n B / 2**k + delta <= 1/8``, so rounding to the nearest integer recovers
   ``S`` exactly, and checks ``2**k n A + n B < 2**(59 L - 1)`` (no wrap modulo
   ``q``), raising ``ValueError`` with the numbers otherwise (more data primes,
   fewer ``frac_bits`` or a smaller cohort fix it). ``N = 8192``, ``L = 1``,
   ``A = 2**16``: 100 clients take ``k = 30`` (``2**k n A = 2**52.6``); the
   largest cohort is 741 clients (131,071 with ``L = 2``).
4. The key holder rounds and raises if any coordinate lies more than ``1/4``
   from an integer (an error beyond the bound), rather than return a wrong sum.

The encoding's sum never wraps ``Z_(2**bits)`` (:meth:`SecAggConfig.ring_bits`),
so ``S mod 2**bits`` is exactly the ring sum the masking protocol computes.
Releasing the rounded integers, a function of the plaintext sum alone, also
removes the decryption noise from which CKKS secret keys can be recovered
(Li and Micciancio 2021).

Trust: the server sees ciphertexts and the sum, as with masking; dropouts cost
nothing (a client that does not send is not in the sum). Unlike masking, one
party holds the whole secret key: a key holder colluding with the server
decrypts every client's update, and the key holder cannot tell a sum from a
single client's ciphertext. Threshold CKKS (keys generated jointly, decryption
by partial decryptions) removes that party; OpenFHE implements it, but its
Python wheels (``openfhe`` 1.6.1) ship an extension built for CPython 3.10 or
3.12 only, none for 3.11. There is no integrity check: as with masking, a
client may send any vector in range, and keys should come over authenticated
channels. Here every party lives in one process, exchanging ``bytes``.

Cost: a client sends ``ceil(dim / (N/2))`` ciphertexts of about ``2 N L 8``
bytes, i.e. ``32 L`` bytes per coordinate (8 times float32 at ``L = 1``), and
downloads the public key once per key (about 262 KB at ``N = 8192``).

References:
  Cheon, Kim, Kim, Song. "Homomorphic Encryption for Arithmetic of
  Approximate Numbers". ASIACRYPT 2017.
  Benaissa et al. "TenSEAL: A Library for Encrypted Tensor Operations Using
  Homomorphic Encryption". ICLR 2021 workshop (arXiv:2104.03152).
  Li, Micciancio. "On the Security of Homomorphic Encryption on Approximate
  Numbers". EUROCRYPT 2021.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax.base import Aggregator
from fljax.secagg import simulation
from fljax.secagg.config import SecAggConfig
from fljax.secagg.messages import ProtocolAbort

_PRIME_BITS = 60  # SEAL's largest prime; a 60-bit prime exceeds 2**59
_SIGMA = 3.2  # SEAL's error standard deviation (3.19)
_MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # 128-bit security (HE standard)


def _tenseal():
    try:
        import tenseal
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("fljax.secagg.he needs TenSEAL: pip install 'fljax[he]' (tenseal>=0.3.18)") from e
    return tenseal


@dataclasses.dataclass(frozen=True, kw_only=True)
class HEConfig:
    """CKKS parameters (frozen, hashable: usable as a static argument).

    Attributes:
      poly_modulus_degree: ``N``, one of 4096, 8192, 16384, 32768; ``N / 2``
        coordinates per ciphertext.
      data_primes: ``L``, 60-bit primes in the ciphertext modulus; bytes grow
        linearly with it, and so does the room for larger cohorts.
      min_clients: the key holder refuses (:class:`~fljax.secagg.messages.ProtocolAbort`)
        to decrypt a sum declared to hold fewer ciphertexts than this (it
        cannot verify the count: it trusts the server's word).
    """

    poly_modulus_degree: int = 8192
    data_primes: int = 1
    min_clients: int = 1

    def __post_init__(self):
        if self.poly_modulus_degree not in _MAX_COEFF_BITS:
            raise ValueError(
                f"poly_modulus_degree must be one of {sorted(_MAX_COEFF_BITS)}, got {self.poly_modulus_degree}"
            )
        if self.data_primes < 1:
            raise ValueError(f"data_primes must be >= 1, got {self.data_primes}")
        if self.special_prime_bits < 20:
            raise ValueError(
                f"data_primes={self.data_primes} x {_PRIME_BITS} bits leaves no room for a special prime "
                f"within {_MAX_COEFF_BITS[self.poly_modulus_degree]} bits (128-bit security at "
                f"N={self.poly_modulus_degree}); use fewer data primes or a larger poly_modulus_degree"
            )
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")

    @property
    def special_prime_bits(self) -> int:  # SEAL's key-switching prime, unused by sums
        return min(_PRIME_BITS, _MAX_COEFF_BITS[self.poly_modulus_degree] - _PRIME_BITS * self.data_primes)

    @property
    def coeff_mod_bit_sizes(self) -> list[int]:
        """Bit sizes of the primes of ``q``, data primes first, special prime last."""
        return [_PRIME_BITS] * self.data_primes + [self.special_prime_bits]

    @property
    def slots(self) -> int:
        """Coordinates per ciphertext, ``N / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def noise_bound(self) -> float:
        """``B``: the canonical-norm error bound of one fresh ciphertext (module docstring, step 1)."""
        n = self.poly_modulus_degree
        return (8 * math.sqrt(2) + 16) * _SIGMA * n + 6 * _SIGMA * math.sqrt(n) + n / 2

    def scale_bits(self, num_clients: int, max_abs: int) -> int:
        """``k``, the scale ``2**k`` at which a sum of ``num_clients`` vectors, each
        coordinate at most ``max_abs`` in magnitude, decrypts within 1/8 of the
        integer sum (module docstring, steps 2 and 3).

        Raises:
          ValueError: when no scale keeps the error below 1/8 without wrapping
            modulo ``q``, naming the numbers.
        """
        num_clients, max_abs = operator.index(num_clients), operator.index(max_abs)
        if num_clients < 1 or max_abs < 1:
            raise ValueError(f"num_clients and max_abs must be >= 1, got {num_clients} and {max_abs}")
        bound = num_clients * max_abs
        fp = self.poly_modulus_degree * bound * 2.0**-50
        noise = num_clients * self.noise_bound
        top = _PRIME_BITS * self.data_primes - self.data_primes - 1  # q / 2 > 2**(59 L - 1)
        if fp < 1 / 16:
            k = max(1, math.ceil(math.log2(noise / (1 / 8 - fp))))
            if 2.0**k * bound + noise < 2.0**top:
                return k
        raise ValueError(
            f"CKKS cannot sum {num_clients} clients x max |value| {max_abs} exactly at N="
            f"{self.poly_modulus_degree} with {self.data_primes} data prime(s): the scale that bounds the "
            f"error ({num_clients} x noise {self.noise_bound:.3g}) times the sum bound {bound} exceeds "
            f"q/2 = 2**{top}; raise data_primes, lower frac_bits or weight_bits, or use a smaller cohort"
        )


class KeyHolder:
    """The party that holds the CKKS secret key and decrypts sums only.

    Attributes:
      public_context: ``bytes`` for clients: the parameters and the public key.
      server_context: ``bytes`` for the server: the parameters, no key.
      keygen_sec: seconds spent generating the keys.
    """

    def __init__(self, config: HEConfig):
        ts = _tenseal()
        self.config = config
        start = time.perf_counter()
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=config.poly_modulus_degree,
            coeff_mod_bit_sizes=config.coeff_mod_bit_sizes,
            n_threads=1,
        )
        self.keygen_sec = time.perf_counter() - start
        no_keys = dict(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        self.public_context = self._context.serialize(save_public_key=True, **no_keys)
        self.server_context = self._context.serialize(save_public_key=False, **no_keys)

    def decrypt(self, total: Sequence[bytes], *, dim: int, num_clients: int, max_abs: int) -> np.ndarray:
        """Decrypt the sum of ``num_clients`` encrypted vectors and round it to integers.

        Args:
          total: the sum's ciphertexts, from :func:`add`.
          dim: vector length.
          num_clients: how many ciphertexts the server says it added.
          max_abs: the per-coordinate bound the clients encrypted under.

        Returns:
          ``[dim]`` int64, the exact integer sum.

        Raises:
          ProtocolAbort: ``num_clients < config.min_clients``.
          ValueError: ciphertexts of the wrong count or length, or a coordinate
            further than 1/4 from an integer or beyond ``num_clients * max_abs``
            (decryption error beyond the bound, or a sum not made as declared).
        """
        if num_clients < self.config.min_clients:
            raise ProtocolAbort(
                f"{num_clients} clients in the sum < min_clients {self.config.min_clients}; not decrypted"
            )
        if len(total) != -(-dim // self.config.slots):
            raise ValueError(
                f"expected {-(-dim // self.config.slots)} ciphertexts for dim {dim}, got {len(total)}"
            )
        y = self._decrypt_raw(total)
        if y.shape != (dim,):
            raise ValueError(f"ciphertexts hold {y.size} coordinates, expected {dim}")
        s = np.rint(y)
        worst = float(np.max(np.abs(y - s), initial=0.0))
        if worst > 0.25 or np.any(np.abs(s) > num_clients * max_abs):
            raise ValueError(
                f"decrypted sum is off an integer by up to {worst:.3g} or beyond {num_clients} x {max_abs}: "
                "the CKKS error exceeds its bound or the sum is not of the declared clients"
            )
        return s.astype(np.int64)

    def _decrypt_raw(self, total: Sequence[bytes]) -> np.ndarray:
        """The approximate (unrounded) decryption; never released (module docstring)."""
        ts = _tenseal()
        parts = [np.asarray(ts.ckks_vector_from(self._context, bytes(c)).decrypt()) for c in total]
        return np.concatenate(parts) if parts else np.zeros(0)


def encrypt(
    public_context: bytes, values: np.ndarray, config: HEConfig, *, scale_bits: int, max_abs: int
) -> list[bytes]:
    """A client's side: encrypt ``values[dim]`` (integers, ``|values| <= max_abs``) at scale ``2**scale_bits``.

    Returns:
      the serialized ciphertexts, one per ``N / 2`` coordinates.

    Raises:
      ValueError: non-integer values, a coordinate beyond ``max_abs``, or a context holding the secret key.
    """
    ts = _tenseal()
    x = np.asarray(values)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"values must be a [dim] integer vector, got {x.dtype} of shape {x.shape}")
    if np.any(np.abs(x.astype(np.int64)) > max_abs):
        raise ValueError(f"values must lie in [-{max_abs}, {max_abs}] (max_abs), the bound the scale assumes")
    ctx = ts.context_from(public_context, n_threads=1)
    if ctx.is_private():
        raise ValueError("a client encrypts under the public context, which must not hold the secret key")
    xf, scale, step = x.astype(np.float64), 2.0**scale_bits, config.slots
    return [
        ts.ckks_vector(ctx, xf[i : i + step].tolist(), scale=scale).serialize()
        for i in range(0, x.size, step)
    ]


def add(server_context: bytes, ciphertexts: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The server's side: add the clients' encrypted vectors slot-wise, in a context with no key.

    Args:
      server_context: :attr:`KeyHolder.server_context` (parameters only).
      ciphertexts: one list of serialized ciphertexts per client, all of one length.

    Returns:
      the sum's serialized ciphertexts, for :meth:`KeyHolder.decrypt`.

    Raises:
      ValueError: no clients, unequal numbers of ciphertexts, or a context holding a key.
    """
    ts = _tenseal()
    if not ciphertexts:
        raise ValueError("no ciphertexts to add")
    lengths = {len(c) for c in ciphertexts}
    if len(lengths) != 1:
        raise ValueError(f"clients sent different numbers of ciphertexts: {sorted(lengths)}")
    ctx = ts.context_from(server_context, n_threads=1)
    if ctx.is_private() or ctx.has_public_key():
        raise ValueError("the server's context must hold no key, only the parameters")
    total = [ts.ckks_vector_from(ctx, bytes(c)) for c in ciphertexts[0]]
    for client in ciphertexts[1:]:
        for acc, c in zip(total, client, strict=True):
            acc.add_(ts.ckks_vector_from(ctx, bytes(c)))
    return [acc.serialize() for acc in total]


class RoundResult(NamedTuple):
    """Outcome of :func:`run_round`.

    Attributes:
      total: ``[dim]`` int64, the exact sum of the contributing clients' vectors.
      stats: ``client_sec`` (mean encryption seconds per client, public key
        loading included), ``server_sec`` (adding, (de)serialising),
        ``keyholder_sec`` (decrypting and rounding), ``keygen_sec``,
        ``client_bytes_sent`` (mean), ``client_bytes_received`` (the public
        context, once per key), ``server_bytes_received``,
        ``server_bytes_sent`` (the sum's ciphertexts, to the key holder),
        ``keyholder_bytes_sent`` (the int64 sum), ``scale_bits``,
        ``num_clients``.
    """

    total: np.ndarray
    stats: dict


def run_round(
    values: np.ndarray,
    config: HEConfig,
    *,
    max_abs: int,
    alive: np.ndarray | None = None,
    key_holder: KeyHolder | None = None,
) -> RoundResult:
    """One encrypted sum in process over ``values[clients, dim]`` (signed integers, ``|values| <= max_abs``).

    Args:
      values: every client's integer vector.
      config: CKKS parameters.
      max_abs: per-coordinate bound of every client's values (sets the scale).
      alive: ``[clients]`` bool, the clients that send (default all); the
        others are simply not in the sum.
      key_holder: an existing key holder (keys can serve many rounds); default
        a fresh one.

    Raises:
      ProtocolAbort: fewer than ``config.min_clients`` clients send.
      ValueError: see :meth:`HEConfig.scale_bits`, :func:`encrypt`.
    """
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"values must be [clients, dim], got shape {x.shape}")
    n, dim = x.shape
    alive = np.ones(n, np.bool_) if alive is None else np.asarray(alive, np.bool_)
    if alive.shape != (n,):
        raise ValueError(f"alive must be [clients] = [{n}], got shape {alive.shape}")
    senders = np.flatnonzero(alive)
    if senders.size < config.min_clients:
        raise ProtocolAbort(f"{senders.size} clients send < min_clients {config.min_clients}")
    holder = key_holder or KeyHolder(config)
    k = config.scale_bits(senders.size, max_abs)
    sent, client_sec = [], []
    for u in senders:
        start = time.perf_counter()
        sent.append(encrypt(holder.public_context, x[u], config, scale_bits=k, max_abs=max_abs))
        client_sec.append(time.perf_counter() - start)
    start = time.perf_counter()
    total_ct = add(holder.server_context, sent)
    server_sec = time.perf_counter() - start
    start = time.perf_counter()
    total = holder.decrypt(total_ct, dim=dim, num_clients=int(senders.size), max_abs=max_abs)
    keyholder_sec = time.perf_counter() - start
    up = [sum(len(c) for c in cts) for cts in sent]
    stats = {
        "client_sec": float(np.mean(client_sec)),
        "server_sec": server_sec,
        "keyholder_sec": keyholder_sec,
        "keygen_sec": holder.keygen_sec,
        "client_bytes_sent": float(np.mean(up)),
        "client_bytes_received": len(holder.public_context),
        "server_bytes_received": int(sum(up)),
        "server_bytes_sent": int(sum(len(c) for c in total_ct)),
        "keyholder_bytes_sent": int(total.nbytes),
        "scale_bits": k,
        "num_clients": int(senders.size),
    }
    return RoundResult(total, stats)


def ring_sum(
    values: np.ndarray, alive: np.ndarray, bits: int, config: HEConfig, *, max_abs: int | None = None
) -> tuple[np.ndarray, bool]:
    """The sum mod ``2**bits`` of the alive clients' vectors in ``Z_(2**bits)``, by :func:`run_round`.

    The counterpart of :func:`fljax.secagg.protocol.ring_sum`: each input is
    lifted to its signed representative in ``[-2**(bits-1), 2**(bits-1))``, the
    integers are summed exactly under encryption, and the sum is reduced mod
    ``2**bits``.

    Args:
      values: ``[clients, dim]`` uint32 in ``Z_(2**bits)``.
      alive: ``[clients]`` bool.
      bits: ring width, 1..32.
      config: CKKS parameters.
      max_abs: a bound on the signed inputs (e.g. the encoding's); default
        ``2**(bits-1)``. A tighter bound allows a larger cohort.

    Returns:
      ``(total[dim] uint32, aborted)``; zeros and True when fewer than
      ``config.min_clients`` clients are alive.

    Examples:
      >>> import numpy as np
      >>> from fljax.secagg import he
      >>> values = np.array([[1, 7], [6, 5], [3, 3]], np.uint32)  # in Z_8
      >>> total, aborted = he.ring_sum(values, np.array([True, True, True]), 3, he.HEConfig(poly_modulus_degree=4096))
      >>> total.tolist(), aborted
      ([2, 7], False)
    """
    bits = operator.index(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    v = np.asarray(values, np.int64)
    half = 1 << (bits - 1)
    signed = ((v + half) % (1 << bits)) - half
    bound = half if max_abs is None else operator.index(max_abs)
    try:
        result = run_round(signed, config, max_abs=bound, alive=alive)
    except ProtocolAbort:
        return np.zeros(v.shape[1], np.uint32), True
    return (result.total % (1 << bits)).astype(np.uint32), False


def encrypted_sum(secagg_config: SecAggConfig, config: HEConfig | None = None) -> Aggregator:
    """:func:`fljax.secagg.secure_sum` with the ring sum done under CKKS encryption on the host.

    The same sanitising, fixed-point encoding (``"rounding"`` stream),
    simulated dropouts (``"dropout"``) and decoding run in jit
    (:func:`fljax.secagg.simulation.encoded_sum`); the encoded vectors go
    through ``jax.pure_callback`` to :func:`ring_sum` with the encoding's bound
    ``A = max(ceil(clip_range * scale), 2**weight_bits)``, with fresh keys each
    round. The sum is exact (module docstring), so for the same key the result
    equals ``secure_sum(secagg_config)``'s bit for bit, including under
    dropouts, which never abort here (unless fewer than ``min_clients``
    survive); ``secagg_config``'s masking graph and threshold are unused.
    Every party lives in this one process.

    Args:
      secagg_config: the encoding (range, scale, weights, dropout simulation).
      config: CKKS parameters (default ``HEConfig()``).

    Returns:
      an :class:`~fljax.base.Aggregator` with ``secure_sum``'s outputs and metrics.

    Examples:
      DP-FedAvg over an encrypted sum equals DP over the masked sum, bit for bit:

      >>> import jax, jax.numpy as jnp
      >>> from fljax import privacy, secagg
      >>> from fljax.secagg import he
      >>> sa = secagg.SecAggConfig(frac_bits=12, weight_bits=8)
      >>> cfg = privacy.DPConfig(clip_norm=1.0, noise_multiplier=1.0, population_size=100, cohort_size=3)
      >>> deltas = {"w": jnp.array([[0.3, -0.4], [1.0, 2.0], [0.1, 0.1]])}
      >>> key = jax.random.key(0)
      >>> outs = []
      >>> for inner in (he.encrypted_sum(sa, he.HEConfig(poly_modulus_degree=4096)), secagg.secure_sum(sa)):
      ...     agg = privacy.dp(cfg, sum=inner)
      ...     outs.append(agg.aggregate(agg.init({"w": jnp.zeros(2)}), deltas, jnp.ones(3), key)[1]["w"])
      >>> bool(jnp.array_equal(outs[0], outs[1]))
      True
    """
    he_config = HEConfig() if config is None else config
    max_abs = max(secagg_config.max_abs_int, secagg_config.weight_levels)

    def ring(values: jax.Array, survived: jax.Array, key: jax.Array, bits: int):
        del key  # the keys come from SEAL's generator, not from jax.random

        def host(v, a):
            total, aborted = ring_sum(np.asarray(v), np.asarray(a), bits, he_config, max_abs=max_abs)
            return total, np.bool_(aborted)

        out = (jax.ShapeDtypeStruct(values.shape[1:], jnp.uint32), jax.ShapeDtypeStruct((), jnp.bool_))
        return jax.pure_callback(host, out, values, survived)

    return simulation.encoded_sum(secagg_config, ring)
