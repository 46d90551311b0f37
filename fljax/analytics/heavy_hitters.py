"""Federated heavy hitters over strings: a prefix tree grown one level at a time with DP histograms.

The strings that at least ``threshold`` clients hold are discovered without any
client revealing its strings, by the interactive prefix-extension algorithm of
TrieHH (Zhu et al. 2020) in the form TensorFlow Federated uses
(``tff.analytics.heavy_hitters``): the server keeps a set of surviving prefixes;
at each level every client votes for the extensions of the survivors found among
its own strings; the votes are summed into a histogram over the candidates
(every survivor extended by every possible next ``chars_per_level`` symbols), the
histogram is released with Gaussian noise, and the candidates whose noisy count
reaches the threshold survive to the next level.

Encoding. A string is a fixed-length ``[max_length]`` int32 array of symbol ids
in ``1 .. alphabet_size - 1``, followed by zeros: ``0`` is the terminator (and
the padding), so ``"the"`` and ``"there"`` differ at position 3 and a prefix
ending in ``0`` is a complete string. :func:`encode` and :func:`decode` map
Python strings over a given alphabet to this form. A client holds
``words [max_words, max_length]`` and ``word_mask [max_words]``.

Contribution bound. Each client keeps its first ``max_contributions`` (``m``)
DISTINCT valid strings, in the order it lists them (:func:`bound_contributions`;
list them by priority, e.g. most frequent first). All its votes, at every level,
come from those ``m`` strings, and each prefix is voted for once: a client's
contribution to one level's histogram is a 0/1 vector with at most ``m`` ones
(L0 <= m, Linf = 1, hence L2 <= sqrt(m)), whatever it holds (a client repeating
one word 1000 times votes for it once).

Counts. The bounded count of a string ``w`` is the number of clients among whose
``m`` strings ``w`` is; the count of a prefix is the number of clients with at
least one of their ``m`` strings under it. A prefix's count is at least that of
any of its extensions, so without noise the pruning loses nothing: the strings
found are EXACTLY those whose bounded count is ``>= threshold`` (provided no
level has more than ``max_candidates`` prefixes above the threshold; the
metrics report ``num_truncated``). A prefix that ends in the terminator is a
complete string: it is kept with the count released at that level and no
longer voted for, so a short word does not face the noise again at every later
level.

Privacy. Unit: one client (all of its strings). Neighbouring relation:
add/remove one client; every client of the population takes part in every
level (no sampling). Each level is one :func:`fljax.analytics.release.release`
of the candidate histogram with ``l2_bound = sqrt(m)``, ``linf_bound = 1`` and
``l1_bound = m`` (the bounds are enforced there; a correct contribution is left
unchanged), i.e. a Gaussian mechanism of sensitivity ``sqrt(m)`` and noise std
``sigma = noise_multiplier * sqrt(m)`` on every count. The candidate set of a
level is a function of the previous levels' released outputs only (plus the
public alphabet), so the levels compose adaptively: the query is the
composition of ``num_levels`` Gaussian mechanisms of multiplier ``z``, an equal
split of the budget, accounted with ``dp_accounting`` (:func:`dp_event`,
:func:`epsilon`; :func:`calibrate_noise_multiplier` finds ``z`` for a target
epsilon). Composing Gaussians is exactly one Gaussian of multiplier
``z / sqrt(num_levels)``.

Threshold. A candidate whose true count is at most ``c`` passes a level with
probability at most ``Q((threshold - c) / sigma)`` (``Q`` the standard normal
tail). :func:`calibrate_threshold` returns ``c + sigma * Q^{-1}(p / (D * L))``
with ``D`` candidates per level and ``L`` levels, so that, by a union bound,
the probability that ANY candidate held by at most ``c`` clients (default 1: a
string of a single client; ``c = 0``: a string nobody holds) survives ANY level
is at most ``p``.

Vectorisation: the clients are vmapped (:func:`fljax.analytics.release.release`),
candidates are a fixed ``[max_candidates * alphabet_size**chars_per_level]``
histogram, survivors a fixed ``[max_candidates, ...]`` array with a mask, and
the levels are a ``lax.scan``: the whole discovery is one jittable function.
Memory: one ``[clients, num_candidates]`` float32 array per level.

``jax.random`` with a seeded key is a reproducible simulation; noise meant to
protect real data needs a secret key (:func:`fljax.random.secret_key`).

Examples:
  Five clients; ``"the"`` is held by three of them, ``"cat"`` by two, ``"zoo"``
  by one. The fourth client repeats ``"the"`` but votes once; the last slot is
  padding and counts for nothing. Without noise, threshold 2:

  >>> import jax, jax.numpy as jnp
  >>> from fljax.analytics import heavy_hitters as hh
  >>> alphabet = "abcdefghijklmnopqrstuvwxyz"
  >>> clients = [["the", "cat"], ["the", "zoo"], ["cat"], ["the", "the"], ["the", "zoo"]]
  >>> words, word_mask = hh.encode_clients(clients, alphabet=alphabet, max_length=4)
  >>> client_mask = jnp.array([True, True, True, True, False])
  >>> cfg = hh.HeavyHittersConfig(max_length=4, alphabet_size=27, max_contributions=2,
  ...                             max_candidates=8, threshold=2.0, population_size=4)
  >>> state, metrics = hh.discover(cfg, words, word_mask, client_mask, jax.random.key(0))
  >>> hh.found(state, alphabet=alphabet)
  [('the', 3.0), ('cat', 2.0)]

  With noise: the noise multiplier for epsilon 8 over the 4 levels (at
  ``delta = population_size ** -1.1`` capped at 1e-5), and a threshold that
  keeps every single-client string out with probability 0.99:

  >>> cfg = hh.calibrate_noise_multiplier(cfg.replace(population_size=10_000), target_epsilon=8.0)
  >>> cfg = hh.calibrate_threshold(cfg, false_positive_rate=0.01)
  >>> round(hh.epsilon(cfg), 1), cfg.num_levels, cfg.threshold > 1.0
  (8.0, 4, True)

References:
  Zhu, Kairouz, McMahan, Sun, Li. "Federated Heavy Hitters Discovery with
  Differential Privacy". AISTATS 2020 (TrieHH).
  Cormode, Korn, Muthukrishnan, Srivastava. "Finding Hierarchical Heavy
  Hitters in Data Streams". VLDB 2003 (prefix hierarchies).
  TensorFlow Federated, ``tff.analytics.heavy_hitters`` (iterative prefix
  extension with a DP histogram per level).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fljax import random as fl_random
from fljax.analytics import release as release_lib
from fljax.base import Aggregator
from fljax.privacy import accounting

__all__ = [
    "HeavyHittersConfig",
    "TrieState",
    "bound_contributions",
    "calibrate_noise_multiplier",
    "calibrate_threshold",
    "contribution",
    "decode",
    "discover",
    "dp_event",
    "encode",
    "encode_clients",
    "epsilon",
    "extend",
    "found",
    "init",
]

MAX_NUM_CANDIDATES = 2**22
"""Largest histogram (candidates per level) a config may ask for."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeavyHittersConfig:
    """A heavy-hitters query: the encoding, the contribution bound, the noise and the threshold.

    Unit of privacy: one client. Neighbouring relation: add/remove one client.
    Sensitivity of each level's histogram: ``sqrt(max_contributions)`` in L2
    norm (:attr:`release_config`, which enforces it). Frozen and hashable.

    Attributes:
      max_length: symbols per string (longer strings cannot be encoded).
      alphabet_size: ``A``: symbol ids are ``0 .. A - 1``, ``0`` being the terminator.
      max_contributions: ``m``: distinct strings a client contributes (L0 bound
        of its histogram at every level).
      max_candidates: ``S``: surviving prefixes kept per level (the most
        frequent by noisy count when more pass the threshold).
      threshold: a candidate survives when its (noisy) count is ``>= threshold``;
        positive, so a prefix nobody holds never survives without noise.
      noise_multiplier: ``z``: each level's counts get Gaussian noise of std
        ``z * sqrt(m)``. 0 is exact and not private.
      population_size: number of clients (public; sets the default delta).
      chars_per_level: symbols appended per level (``A ** chars_per_level``
        extensions of every survivor are counted).
      delta: target delta; default :func:`fljax.privacy.config.default_delta`
        of ``population_size``.
    """

    max_length: int
    alphabet_size: int
    max_contributions: int
    max_candidates: int
    threshold: float
    noise_multiplier: float = 0.0
    population_size: int
    chars_per_level: int = 1
    delta: float | None = None

    def __post_init__(self):
        for name in (
            "max_length",
            "max_contributions",
            "max_candidates",
            "chars_per_level",
            "population_size",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.alphabet_size, bool) or not isinstance(self.alphabet_size, int | np.integer):
            raise ValueError(f"alphabet_size must be an int, got {self.alphabet_size!r}")
        if self.alphabet_size < 2:
            raise ValueError(
                f"alphabet_size must be >= 2 (the terminator 0 and one symbol), got {self.alphabet_size}"
            )
        if self.chars_per_level > self.max_length:
            raise ValueError(
                f"chars_per_level ({self.chars_per_level}) must be at most max_length ({self.max_length})"
            )
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and positive, got {self.threshold}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.num_candidates > MAX_NUM_CANDIDATES:
            raise ValueError(
                f"max_candidates * alphabet_size ** chars_per_level = {self.num_candidates} candidates per "
                f"level exceeds {MAX_NUM_CANDIDATES}; lower max_candidates or chars_per_level"
            )

    @property
    def num_extensions(self) -> int:
        """``alphabet_size ** chars_per_level``: extensions counted per survivor."""
        return int(self.alphabet_size) ** int(self.chars_per_level)

    @property
    def num_candidates(self) -> int:
        """``D = max_candidates * num_extensions``: the length of each level's histogram."""
        return int(self.max_candidates) * self.num_extensions

    @property
    def num_levels(self) -> int:
        """``ceil(max_length / chars_per_level)``: releases in one query."""
        return -(-int(self.max_length) // int(self.chars_per_level))

    @property
    def padded_length(self) -> int:
        """``num_levels * chars_per_level``: the length of the prefixes kept in :class:`TrieState`."""
        return self.num_levels * int(self.chars_per_level)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one level's histogram: ``sqrt(max_contributions)``."""
        return math.sqrt(self.max_contributions)

    @property
    def noise_std(self) -> float:
        """``sigma = noise_multiplier * sqrt(max_contributions)``: noise std on every count."""
        return float(self.noise_multiplier) * self.sensitivity

    @property
    def release_config(self) -> release_lib.ReleaseConfig:
        """The :class:`~fljax.analytics.release.ReleaseConfig` of ONE level (bounds enforced there)."""
        return release_lib.ReleaseConfig(
            l2_bound=self.sensitivity,
            linf_bound=1.0,
            l1_bound=float(self.max_contributions),
            noise_multiplier=float(self.noise_multiplier),
            population_size=int(self.population_size),
            delta=self.delta,
        )

    @property
    def target_delta(self) -> float:
        return self.release_config.target_delta

    def replace(self, **changes) -> HeavyHittersConfig:
        return dataclasses.replace(self, **changes)


class TrieState(NamedTuple):
    """The surviving prefixes after some levels (``S = max_candidates``, ``Lp = padded_length``).

    Attributes:
      prefixes: ``[S, Lp]`` int32; a prefix of length ``level * chars_per_level``
        followed by zeros (a complete string keeps its terminator and zeros).
      prefix_mask: ``[S]`` bool, which slots hold a prefix.
      complete: ``[S]`` bool, which prefixes are complete strings (they hold a
        terminator, or have the full length).
      counts: ``[S]`` float32, each prefix's noisy count at the level it was
        released (for a complete string: the level where it completed).
      level: ``[]`` int32, levels done.
    """

    prefixes: jax.Array
    prefix_mask: jax.Array
    complete: jax.Array
    counts: jax.Array
    level: jax.Array


# --- encoding -----------------------------------------------------------------------------------


def _check_alphabet(alphabet: str) -> dict[str, int]:
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty str, got {alphabet!r}")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated symbols: {alphabet!r}")
    return {ch: i + 1 for i, ch in enumerate(alphabet)}


def encode(strings: Sequence[str], *, alphabet: str, max_length: int) -> np.ndarray:
    """Strings as ``[len(strings), max_length]`` int32: symbol ``alphabet[i]`` is ``i + 1``, ``0`` pads.

    Use ``alphabet_size = len(alphabet) + 1`` in the config.

    Raises:
      ValueError: a string is empty, longer than ``max_length``, or holds a
        symbol outside ``alphabet``.

    Examples:
      >>> encode(["ab", "c"], alphabet="abc", max_length=3).tolist()
      [[1, 2, 0], [3, 0, 0]]
    """
    ids = _check_alphabet(alphabet)
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if isinstance(strings, str):
        raise ValueError("strings must be a sequence of str, not one str")
    out = np.zeros((len(strings), max_length), np.int32)
    for i, s in enumerate(strings):
        if not s:
            raise ValueError(f"string {i} is empty (the empty string cannot be encoded)")
        if len(s) > max_length:
            raise ValueError(f"string {s!r} has {len(s)} symbols, more than max_length={max_length}")
        bad = [ch for ch in s if ch not in ids]
        if bad:
            raise ValueError(f"string {s!r} holds symbols outside the alphabet: {sorted(set(bad))}")
        out[i, : len(s)] = [ids[ch] for ch in s]
    return out


def encode_clients(
    clients: Sequence[Sequence[str]], *, alphabet: str, max_length: int, max_words: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every client's strings as ``(words [clients, max_words, max_length] int32, word_mask [clients, max_words])``.

    ``max_words`` defaults to the longest list; a longer list raises (truncate
    it first, in priority order). Each client's strings keep their order.

    Examples:
      >>> words, mask = encode_clients([["ab"], ["b", "a"]], alphabet="ab", max_length=2)
      >>> words.shape, mask.tolist()
      ((2, 2, 2), [[True, False], [True, True]])
    """
    if isinstance(clients, str) or any(isinstance(c, str) for c in clients):
        raise ValueError("clients must be a sequence of sequences of str (one list per client)")
    longest = max((len(c) for c in clients), default=0)
    max_words = max(longest, 1) if max_words is None else int(max_words)
    if longest > max_words:
        raise ValueError(f"a client holds {longest} strings, more than max_words={max_words}")
    words = np.zeros((len(clients), max_words, max_length), np.int32)
    mask = np.zeros((len(clients), max_words), bool)
    for i, strings in enumerate(clients):
        if strings:
            words[i, : len(strings)] = encode(list(strings), alphabet=alphabet, max_length=max_length)
            mask[i, : len(strings)] = True
    return words, mask


def decode(codes: np.ndarray | jax.Array, *, alphabet: str) -> list[str]:
    """``[n, length]`` symbol ids back to strings (read up to the first terminator).

    Examples:
      >>> decode(encode(["ab", "c"], alphabet="abc", max_length=3), alphabet="abc")
      ['ab', 'c']
    """
    _check_alphabet(alphabet)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, length], got shape {codes.shape}")
    out = []
    for row in codes:
        chars = []
        for c in row:
            if c == 0:
                break
            if not 0 < c <= len(alphabet):
                raise ValueError(f"symbol id {int(c)} is outside the alphabet of {len(alphabet)} symbols")
            chars.append(alphabet[c - 1])
        out.append("".join(chars))
    return out


# --- one client ---------------------------------------------------------------------------------


def _well_formed(words: jax.Array, alphabet_size: int) -> jax.Array:
    """``[W]`` bool: non-empty, ids in range, nothing but zeros after the first zero."""
    in_range = jnp.all((words >= 0) & (words < alphabet_size), axis=-1)
    ended = jnp.cumsum(words == 0, axis=-1) > 0
    zero_tail = jnp.all(~ended | (words == 0), axis=-1)
    return in_range & zero_tail & (words[..., 0] != 0)


def _pack(words: jax.Array, alphabet_size: int) -> list[jax.Array]:
    """Symbols packed into int32 sort keys, ``floor(31 / bits)`` per key (equal words, equal keys)."""
    bits = max(1, int(alphabet_size - 1).bit_length())
    per_key = max(1, 31 // bits)
    keys = []
    for start in range(0, words.shape[1], per_key):
        chunk = words[:, start : start + per_key]
        shifts = jnp.asarray(bits * np.arange(chunk.shape[1] - 1, -1, -1), jnp.int32)
        keys.append(jnp.sum(jnp.left_shift(chunk, shifts[None, :]), axis=1))
    return keys


def bound_contributions(
    words: jax.Array, word_mask: jax.Array, max_contributions: int, alphabet_size: int
) -> tuple[jax.Array, jax.Array]:
    """ONE client's first ``max_contributions`` distinct valid strings, in its own order.

    A string is valid when its mask is set, it is non-empty, its ids are in
    ``[0, alphabet_size)`` and only zeros follow its first zero; invalid
    strings are ignored. Duplicates are found by one sort of the strings
    packed into int32 keys (``O(W log W)``), not by comparing all pairs.

    Args:
      words: ``[W, L]`` int symbol ids.
      word_mask: ``[W]`` bool.
      max_contributions: ``m``.
      alphabet_size: ``A``.

    Returns:
      ``(kept [m, L] int32, kept_mask [m] bool)``: the kept strings first, in
      their original order; unused rows are zeros with mask False.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[2, 0], [2, 0], [1, 3], [3, 0]])
      >>> kept, mask = bound_contributions(w, jnp.array([True, True, True, True]), 2, 4)
      >>> kept.tolist(), mask.tolist()
      ([[2, 0], [1, 3]], [True, True])
    """
    words = jnp.asarray(words, jnp.int32)
    mask = jnp.asarray(word_mask, jnp.bool_)
    if words.ndim != 2 or mask.shape != words.shape[:1]:
        raise ValueError(f"words must be [W, L] and word_mask [W], got {words.shape} and {mask.shape}")
    num_words = words.shape[0]
    valid = mask & _well_formed(words, alphabet_size)
    index = jnp.arange(num_words, dtype=jnp.int32)
    packed = _pack(jnp.where(valid[:, None], words, 0), alphabet_size)
    # Sort by (invalid, packed symbols..., index): equal strings become adjacent, first occurrence first.
    out = jax.lax.sort((jnp.where(valid, 0, 1), *packed, index), num_keys=len(packed) + 2)
    s_invalid, s_keys, s_index = out[0], jnp.stack(out[1:-1], axis=1), out[-1]
    same_as_previous = jnp.concatenate([jnp.zeros(1, jnp.bool_), jnp.all(s_keys[1:] == s_keys[:-1], axis=1)])
    first_sorted = (s_invalid == 0) & ~same_as_previous
    first = jnp.zeros(num_words, jnp.bool_).at[s_index].set(first_sorted)
    keep = first & (jnp.cumsum(first) <= max_contributions)
    (rows,) = jnp.nonzero(keep, size=max_contributions, fill_value=0)
    kept_mask = jnp.arange(max_contributions) < jnp.sum(keep)
    kept = jnp.where(kept_mask[:, None], words[rows], 0)
    return kept, kept_mask


def _digits_table(config: HeavyHittersConfig) -> np.ndarray:
    """``[num_extensions, chars_per_level]``: the symbols of each extension index (base A, most significant first)."""
    e = np.arange(config.num_extensions)
    c = config.chars_per_level
    powers = config.alphabet_size ** np.arange(c - 1, -1, -1)
    return ((e[:, None] // powers[None, :]) % config.alphabet_size).astype(np.int32)


def _pad(words: jax.Array, config: HeavyHittersConfig) -> jax.Array:
    extra = config.padded_length - words.shape[-1]
    return jnp.pad(words, [(0, 0)] * (words.ndim - 1) + [(0, extra)]) if extra else words


def contribution(
    config: HeavyHittersConfig, state: TrieState, words: jax.Array, word_mask: jax.Array
) -> jax.Array:
    """ONE client's vote at the next level: ``[num_candidates]`` float32 of 0s and at most ``m`` 1s.

    Candidate ``s * num_extensions + e`` is survivor ``s`` (a prefix of length
    ``P = state.level * chars_per_level``) followed by the ``chars_per_level``
    symbols of extension ``e`` (base ``alphabet_size``). The client keeps its
    first ``m`` distinct valid strings (:func:`bound_contributions`) and votes
    once for each candidate that is a prefix of one of them, skipping complete
    survivors (their count is final).

    Args:
      config: the query.
      state: the survivors so far.
      words: ``[W, max_length]`` int symbol ids of this client.
      word_mask: ``[W]`` bool.

    Returns:
      ``[num_candidates]`` float32 with entries in ``{0, 1}`` and at most
      ``max_contributions`` ones.
    """
    words = jnp.asarray(words, jnp.int32)
    if words.ndim != 2 or words.shape[1] != config.max_length:
        raise ValueError(f"one client's words must be [W, max_length={config.max_length}], got {words.shape}")
    kept, kept_mask = bound_contributions(words, word_mask, config.max_contributions, config.alphabet_size)
    kept = _pad(kept, config)
    c = config.chars_per_level
    prefix_len = state.level * c
    in_parent = jnp.arange(config.padded_length) < prefix_len
    open_survivor = state.prefix_mask & ~state.complete
    # [m, S]: does survivor s match the first P symbols of kept string i?
    match = jnp.all((kept[:, None, :] == state.prefixes[None, :, :]) | ~in_parent[None, None, :], axis=-1)
    match = match & open_survivor[None, :]
    parent = jnp.argmax(match, axis=1)
    digits = jax.lax.dynamic_slice_in_dim(kept, prefix_len, c, axis=1)  # [m, c]
    powers = jnp.asarray(config.alphabet_size ** np.arange(c - 1, -1, -1), jnp.int32)
    ext = jnp.sum(digits * powers[None, :], axis=1)
    cand = parent * config.num_extensions + ext
    ok = kept_mask & jnp.any(match, axis=1)
    d = config.num_candidates
    return jnp.zeros(d, jnp.float32).at[jnp.where(ok, cand, d)].max(1.0, mode="drop")


# --- the server ---------------------------------------------------------------------------------


def init(config: HeavyHittersConfig) -> TrieState:
    """The root: one survivor, the empty prefix, at level 0."""
    s, lp = config.max_candidates, config.padded_length
    return TrieState(
        prefixes=jnp.zeros((s, lp), jnp.int32),
        prefix_mask=jnp.arange(s) == 0,
        complete=jnp.zeros(s, jnp.bool_),
        counts=jnp.zeros(s, jnp.float32),
        level=jnp.zeros((), jnp.int32),
    )


def _check_population(config: HeavyHittersConfig, words, word_mask, client_mask):
    words = jnp.asarray(words)
    word_mask = jnp.asarray(word_mask)
    client_mask = jnp.asarray(client_mask)
    if not jnp.issubdtype(words.dtype, jnp.integer):
        raise ValueError(f"words must hold integer symbol ids, got dtype {words.dtype}")
    if words.ndim != 3 or words.shape[2] != config.max_length:
        raise ValueError(
            f"words must be [clients, max_words, max_length={config.max_length}], got shape {words.shape}"
        )
    if word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_mask must be [clients, max_words] = {words.shape[:2]}, got {word_mask.shape}")
    if client_mask.shape != words.shape[:1]:
        raise ValueError(f"client_mask must be [clients] = {words.shape[:1]}, got {client_mask.shape}")
    return words.astype(jnp.int32), word_mask.astype(jnp.bool_), client_mask.astype(jnp.bool_)


def extend(
    config: HeavyHittersConfig,
    state: TrieState,
    words: jax.Array,
    word_mask: jax.Array,
    client_mask: jax.Array,
    key: jax.Array,
    *,
    sum: Aggregator | None = None,
) -> tuple[TrieState, dict[str, jax.Array]]:
    """One level: release the candidate histogram, keep the candidates at or above the threshold.

    Unit of privacy: one client; neighbouring relation: add/remove one client;
    sensitivity ``sqrt(max_contributions)`` (one Gaussian mechanism of
    multiplier ``noise_multiplier``). Jittable (``config`` and ``sum`` static).

    The histogram of :func:`contribution` over the clients is released by
    :func:`fljax.analytics.release.release` with :attr:`HeavyHittersConfig.release_config`.
    Candidates that cannot be prefixes of an encodable string (a symbol after
    the terminator, or the empty string) are discarded (public structure).
    Complete survivors keep their slot and count; the free slots go to the
    surviving candidates with the largest noisy counts.

    Args:
      config: the query.
      state: the survivors so far (:func:`init` at the start).
      words: ``[clients, max_words, max_length]`` int symbol ids.
      word_mask: ``[clients, max_words]`` bool.
      client_mask: ``[clients]`` bool; False rows are padding and contribute exactly zero.
      key: typed PRNG key of this level (the release draws its noise from
        ``fljax.random.stream(key, "noise")``).
      sum: a sum aggregator for the release (default: the plain sum; e.g.
        :func:`fljax.secagg.secure_sum`).

    Returns:
      ``(state, metrics)``; metrics: ``num_above_threshold`` (candidates that
      passed), ``num_survivors``, ``num_complete``, ``num_truncated`` (passed
      but no slot left), ``noise_std``, and the release's ``num_clients``,
      ``num_clipped`` (always 0 for correct contributions) and ``num_nonfinite``.
    """
    words, word_mask, client_mask = _check_population(config, words, word_mask, client_mask)
    s, num_ext, c = config.max_candidates, config.num_extensions, config.chars_per_level
    counts, release_metrics = release_lib.release(
        lambda data: contribution(config, state, *data),
        (words, word_mask),
        client_mask,
        config.release_config,
        key,
        sum=sum,
    )
    counts = counts.reshape(s, num_ext)

    # Which candidates can be prefixes of an encodable string (public structure).
    digits = jnp.asarray(_digits_table(config))  # [E, c]
    digits_ended = jnp.cumsum(digits == 0, axis=1) > 0
    ext_ok = jnp.all(~digits_ended | (digits == 0), axis=1)  # no symbol after a terminator
    ext_zero = jnp.all(digits == 0, axis=1)
    prefix_len = state.level * c
    last = jnp.take(state.prefixes, jnp.maximum(prefix_len - 1, 0), axis=1)
    parent_ended = (prefix_len > 0) & (last == 0)
    allowed = jnp.where(parent_ended[:, None], ext_zero[None, :], ext_ok[None, :])
    allowed = allowed & ~((prefix_len == 0) & ext_zero)[None, :]
    beyond = prefix_len + jnp.arange(c) >= config.max_length  # padding positions stay zero
    allowed = allowed & ~jnp.any(beyond[None, :] & (digits != 0), axis=1)[None, :]
    open_survivor = state.prefix_mask & ~state.complete
    passed = open_survivor[:, None] & allowed & (counts >= jnp.float32(config.threshold))

    # Complete survivors first (they keep their slot), then the best new candidates.
    old_done = state.prefix_mask & state.complete
    scores = jnp.concatenate(
        [jnp.where(old_done, jnp.inf, -jnp.inf), jnp.where(passed, counts, -jnp.inf).ravel()]
    )
    top_scores, top = jax.lax.top_k(scores, s)
    new_mask = top_scores > -jnp.inf
    is_old = top < s
    cand = jnp.maximum(top - s, 0)
    parent, ext = cand // num_ext, cand % num_ext
    extended = jax.lax.dynamic_update_slice_in_dim(state.prefixes[parent], digits[ext], prefix_len, axis=1)
    prefixes = jnp.where(is_old[:, None], state.prefixes[jnp.minimum(top, s - 1)], extended)
    prefixes = jnp.where(new_mask[:, None], prefixes, 0)
    new_len = prefix_len + c
    new_last = jnp.take(prefixes, new_len - 1, axis=1)
    complete = new_mask & (is_old | (new_last == 0) | (new_len >= config.max_length))
    new_counts = jnp.where(is_old, state.counts[jnp.minimum(top, s - 1)], counts.ravel()[cand])
    new_counts = jnp.where(new_mask, new_counts, 0.0)

    num_passed = jnp.sum(passed).astype(jnp.int32)
    num_kept = jnp.sum(new_mask).astype(jnp.int32)
    new_state = TrieState(
        prefixes=prefixes,
        prefix_mask=new_mask,
        complete=complete,
        counts=new_counts.astype(jnp.float32),
        level=state.level + 1,
    )
    metrics = {
        "num_above_threshold": num_passed,
        "num_survivors": num_kept,
        "num_complete": jnp.sum(complete).astype(jnp.int32),
        "num_truncated": num_passed + jnp.sum(old_done).astype(jnp.int32) - num_kept,
        "noise_std": release_metrics["noise_std"],
        "num_clients": release_metrics["num_clients"],
        "num_clipped": release_metrics["num_clipped"],
        "num_nonfinite": release_metrics["num_nonfinite"],
    }
    return new_state, metrics


@functools.partial(jax.jit, static_argnums=0, static_argnames="sum")
def discover(
    config: HeavyHittersConfig,
    words: jax.Array,
    word_mask: jax.Array,
    client_mask: jax.Array,
    key: jax.Array,
    *,
    sum: Aggregator | None = None,
) -> tuple[TrieState, dict[str, jax.Array]]:
    """The whole query: :func:`extend` for ``num_levels`` levels from :func:`init` (a ``lax.scan``).

    Unit of privacy: one client; neighbouring relation: add/remove one client;
    ``num_levels`` Gaussian mechanisms of sensitivity ``sqrt(max_contributions)``
    and multiplier ``noise_multiplier`` (:func:`epsilon`). Level ``l`` uses the
    key ``fljax.random.round_key(key, l)``. Jitted (``config`` and ``sum`` static: one
    compilation per configuration and shapes).

    Args:
      config: the query.
      words: ``[clients, max_words, max_length]`` int symbol ids (:func:`encode`).
      word_mask: ``[clients, max_words]`` bool.
      client_mask: ``[clients]`` bool; padding clients contribute exactly zero.
      key: typed PRNG key.
      sum: a sum aggregator for every level's release (default: the plain sum).

    Returns:
      ``(state, metrics)``: the final :class:`TrieState`, whose complete
      prefixes are the heavy hitters (:func:`found`), and the metrics of
      :func:`extend` stacked over the levels (``[num_levels]`` each).
    """
    words, word_mask, client_mask = _check_population(config, words, word_mask, client_mask)

    def level(state, index):
        return extend(config, state, words, word_mask, client_mask, fl_random.round_key(key, index), sum=sum)

    return jax.lax.scan(level, init(config), jnp.arange(config.num_levels, dtype=jnp.int32))


def found(state: TrieState, *, alphabet: str) -> list[tuple[str, float]]:
    """The heavy hitters of a finished query as ``(string, noisy count)``, most frequent first (host side)."""
    prefixes = np.asarray(state.prefixes)
    keep = np.asarray(state.prefix_mask) & np.asarray(state.complete)
    counts = np.asarray(state.counts)[keep]
    strings = decode(prefixes[keep], alphabet=alphabet)
    order = sorted(range(len(strings)), key=lambda i: (-counts[i], strings[i]))
    return [(strings[i], float(counts[i])) for i in order]


# --- accounting and calibration (host side) -----------------------------------------------------


def dp_event(config: HeavyHittersConfig) -> dp_accounting.DpEvent:
    """The query's ``DpEvent``: ``num_levels`` releases of :attr:`HeavyHittersConfig.release_config`, composed."""
    return dp_accounting.SelfComposedDpEvent(config.release_config.dp_event(), config.num_levels)


def epsilon(config: HeavyHittersConfig, *, accountant: accounting.AccountantKind = "pld") -> float:
    """Epsilon of the whole query at ``config.target_delta`` (``inf`` without noise)."""
    if config.noise_multiplier == 0:
        return math.inf
    acc = accounting.make_accountant(config.release_config.dp_config(), accountant)
    acc.compose(dp_event(config))
    return float(acc.get_epsilon(config.target_delta))


def calibrate_noise_multiplier(
    config: HeavyHittersConfig, *, target_epsilon: float, accountant: accounting.AccountantKind = "pld"
) -> HeavyHittersConfig:
    """``config`` with the smallest noise multiplier whose query spends at most ``target_epsilon``.

    Uses :func:`fljax.privacy.accounting.calibrate_noise_multiplier` on the
    equivalent client-level config over ``num_levels`` rounds (each level is one
    round of the whole population), whose events are exactly :func:`dp_event`'s.
    The threshold is left as it is (see :func:`calibrate_threshold`).
    """
    z = accounting.calibrate_noise_multiplier(
        config.replace(noise_multiplier=1.0).release_config.dp_config(),
        target_epsilon=target_epsilon,
        rounds=config.num_levels,
        accountant=accountant,
    )
    return config.replace(noise_multiplier=float(z))


def calibrate_threshold(
    config: HeavyHittersConfig, *, false_positive_rate: float, count: int = 1
) -> HeavyHittersConfig:
    """``config`` with ``threshold = count + sigma * Q^{-1}(false_positive_rate / (D * num_levels))``.

    With ``D = num_candidates`` per level, a union bound over every candidate
    of every level gives: with probability at least ``1 - false_positive_rate``
    no candidate whose true count is at most ``count`` survives any level (so
    no string held by ``count`` clients or fewer is released). Without noise
    the threshold is ``count + 1``, the smallest integer count above ``count``.

    Examples:
      >>> cfg = HeavyHittersConfig(max_length=8, alphabet_size=27, max_contributions=4,
      ...                          max_candidates=64, threshold=1.0, noise_multiplier=2.0,
      ...                          population_size=1000)
      >>> round(calibrate_threshold(cfg, false_positive_rate=0.05).threshold, 2)  # 1 + 4 * 4.49
      18.95
    """
    if not 0 < false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if config.noise_multiplier == 0:
        return config.replace(threshold=float(count + 1))
    tail = false_positive_rate / (config.num_candidates * config.num_levels)
    k = -statistics.NormalDist().inv_cdf(tail)
    return config.replace(threshold=float(count + config.noise_std * k))
