"""One configuration for secure aggregation: encoding, masking graph, thresholds.

The fixed-point encoding, the vectorised simulation and the cryptographic
protocol are all built from one :class:`SecAggConfig`, so the range, the scale,
the ring size ``2**bits`` and the masking graph cannot drift apart between them.
"""

from __future__ import annotations

import dataclasses
import math

# Largest integer magnitude float32 represents with a fractional part to round:
# stochastic rounding of ``y = x * scale`` needs ``|y| <= 2**24``.
_MAX_EXACT_FLOAT32 = 2**24


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Secure aggregation settings (frozen, hashable: usable as a static argument).

    Attributes:
      clip_range: ``r``. Every coordinate of every client update is clipped to
        ``[-r, r]`` before encoding. This coordinate clip is the range
        requirement of the fixed-point code (without it the integer sum could
        wrap around the ring); it is not a privacy mechanism. An L2 clip for
        differential privacy belongs upstream, in the DP wrapper.
      frac_bits: ``f``; the scale is ``2**f`` unless ``scale`` is given.
      scale: explicit scale (overrides ``frac_bits``). A power of two keeps the
        scaling exact in float32.
      bits: ring bit width ``b`` (arithmetic in ``Z_(2**b)``, 1..32). ``None``
        chooses the smallest width at which the true sum of the cohort can
        never wrap; an explicit width too small for that raises ``ValueError``.
      max_weight: client weights are clipped to ``[0, max_weight]``.
      weight_bits: weights are rounded to the grid ``max_weight / 2**weight_bits``
        (to nearest, deterministic), so the weight total is recovered exactly.
        Integer weights (example counts) up to ``max_weight`` are represented
        exactly when ``max_weight`` is a power of two and
        ``2**weight_bits >= max_weight``.
      num_neighbors: ``None`` masks on the complete graph (Bonawitz et al. 2017);
        an integer ``k`` masks on a random ``k``-regular Harary graph (SecAgg+,
        Bell et al. 2020): a random ring of the clients, each joined to its
        ``ceil(k/2)`` nearest ring neighbours on each side. ``k >= n - 1`` is the
        complete graph.
      threshold: Shamir threshold ``t`` (number of share holders that must
        survive), where a client's ``h`` share holders are the client and its
        graph neighbours (all ``n`` clients on the complete graph). It must
        satisfy ``h/2 < t <= h``: at ``t <= h/2`` a malicious server that tells
        two halves of the holders different stories (the client survived, the
        client dropped) collects ``t`` shares of both its self-mask seed and
        its masking key, hence its input. ``None`` uses
        :func:`default_threshold`, which satisfies the bound.
      dropout_rate: simulation only: the probability that a client drops out
        after the masks are agreed and before its masked input reaches the
        server (each client independently, from the ``"dropout"`` key stream).
        The server then removes the dropped clients' pairwise masks, as the
        protocol does, and the mean is over the survivors.
    """

    clip_range: float = 1.0
    frac_bits: int = 16
    scale: float | None = None
    bits: int | None = None
    max_weight: float = 1.0
    weight_bits: int = 16
    num_neighbors: int | None = None
    threshold: int | None = None
    dropout_rate: float = 0.0

    def __post_init__(self):
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be positive and finite, got {self.clip_range}")
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale}")
        if self.bits is not None and not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be in 1..32, got {self.bits}")
        if not (self.max_weight > 0 and math.isfinite(self.max_weight)):
            raise ValueError(f"max_weight must be positive and finite, got {self.max_weight}")
        if not 0 <= self.weight_bits <= 24:
            raise ValueError(f"weight_bits must be in 0..24, got {self.weight_bits}")
        if self.num_neighbors is not None and self.num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1 or None, got {self.num_neighbors}")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError(f"threshold must be >= 1 or None, got {self.threshold}")
        if self.threshold is not None and self.num_neighbors is not None:
            # On a sparse graph every client has h = 2 * ceil(k / 2) + 1 share holders.
            _check_majority(self.threshold, 2 * math.ceil(self.num_neighbors / 2) + 1)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.max_abs_int > _MAX_EXACT_FLOAT32:
            raise ValueError(
                f"clip_range * scale = {self.clip_range} * {self.scale_value} exceeds 2**24, "
                "beyond which float32 cannot round stochastically; lower frac_bits or clip_range"
            )

    @property
    def scale_value(self) -> float:
        """The fixed-point scale: ``scale`` or ``2**frac_bits``."""
        return float(self.scale) if self.scale is not None else float(2**self.frac_bits)

    @property
    def max_abs_int(self) -> int:
        """Largest magnitude of one encoded update coordinate: ``ceil(r * scale)``."""
        return math.ceil(self.clip_range * self.scale_value)

    @property
    def weight_levels(self) -> int:
        """Encoded weight of a client at ``max_weight``: ``2**weight_bits``."""
        return 2**self.weight_bits

    def ring_bits(self, num_clients: int) -> int:
        """Ring bit width for a cohort of ``num_clients`` clients.

        The decoded sum is signed, so the true sum must satisfy
        ``|sum| <= 2**(b-1) - 1``; each client contributes at most
        ``max(ceil(r * scale), 2**weight_bits)`` in magnitude to any coordinate.

        Raises:
          ValueError: when no width up to 32 bits (or the configured ``bits``)
            can hold the sum, naming the numbers.
        """
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        per_client = max(self.max_abs_int, self.weight_levels)
        worst = num_clients * per_client
        needed = max(2, (worst).bit_length() + 1)  # 2**(b-1) - 1 >= worst
        if self.bits is not None:
            if self.bits < needed:
                raise ValueError(
                    f"bits={self.bits} is too small: {num_clients} clients x max |value| {per_client} "
                    f"(clip_range={self.clip_range}, scale={self.scale_value}, weight levels "
                    f"{self.weight_levels}) = {worst} needs {needed} bits to never wrap"
                )
            return self.bits
        if needed > 32:
            raise ValueError(
                f"cannot encode without wrap-around: {num_clients} clients x max |value| {per_client} "
                f"(clip_range={self.clip_range}, scale={self.scale_value}, weight levels "
                f"{self.weight_levels}) = {worst} needs {needed} bits > 32; lower frac_bits, "
                "clip_range or weight_bits, or use a smaller cohort"
            )
        return needed

    def neighbors_for(self, num_clients: int) -> int:
        """Number of masking neighbours per client (``n - 1`` for the complete graph)."""
        if self.num_neighbors is None or self.num_neighbors >= num_clients - 1:
            return num_clients - 1
        return min(2 * math.ceil(self.num_neighbors / 2), num_clients - 1)

    def is_complete(self, num_clients: int) -> bool:
        return self.neighbors_for(num_clients) >= num_clients - 1

    def threshold_for(self, num_clients: int) -> int:
        """Shamir threshold among one client's ``h = neighbors_for(n) + 1`` share holders.

        Raises:
          ValueError: unless ``h/2 < t <= h`` (``threshold must be ...``).
        """
        holders = self.neighbors_for(num_clients) + 1
        t = self.threshold if self.threshold is not None else default_threshold(holders)
        if t > holders:
            raise ValueError(f"threshold must be <= {holders} (the share holders), got {t}")
        _check_majority(t, holders)
        return t


def _check_majority(threshold: int, holders: int) -> None:
    """``threshold > holders / 2``: two disjoint sets of holders cannot both reach it, so a
    server that asks some holders for a client's self-mask shares and others for its key
    shares (claiming the client both survived and dropped) cannot rebuild both."""
    if 2 * threshold <= holders:
        raise ValueError(
            f"threshold must be > h/2 = {holders / 2:g} for {holders} share holders, got {threshold}"
        )


def default_threshold(holders: int) -> int:
    """Default Shamir threshold: ``floor(2 * holders / 3) + 1`` (and at least 2 when possible).

    It is always above ``holders / 2`` (the bound :meth:`SecAggConfig.threshold_for`
    enforces). With this threshold an honest-but-curious server colluding with
    fewer than a third of a client's share holders learns nothing, and the
    protocol survives up to a third of dropouts (a little less).
    """
    return min(holders, max(2, (2 * holders) // 3 + 1))
