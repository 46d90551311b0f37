"""Partitioners: split a central labelled data set into clients.

Every partitioner is deterministic given its ``key`` (a typed ``jax.random.key``;
an ``int`` seed is accepted too) and returns a :class:`Partition` with one
index array per client. Feed it to
:meth:`fljax.data.FederatedData.from_partition`::

    p = partition.dirichlet(y, num_clients=100, alpha=0.5, key=jax.random.key(0))
    data = FederatedData.from_partition(x, y, p.indices, num_classes=10)
    print(partition.report(p, y, 10)["mean_tv_distance"])
    partition.plot(p, y, 10, "labels.png")

The key is turned into a numpy ``Generator`` on the host (partitioning is a
one-off host computation over data that stays in host memory).

References:
  McMahan et al. "Communication-Efficient Learning of Deep Networks from
  Decentralized Data". AISTATS 2017 (shards).
  Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification". 2019 (Dirichlet label skew).
  Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An Experimental
  Study". ICDE 2022 (quantity skew, #C=k label skew).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Partition(NamedTuple):
    """How a central data set is split into clients.

    Attributes:
      indices: one int64 index array per client (rows of the central data set).
      client_names: optional client names (natural partitions keep the id values).
      dropped: int64 indices of examples assigned to no client (empty unless
        the partitioner says why it drops, e.g. a class no client holds).
    """

    indices: list[np.ndarray]
    client_names: tuple[str, ...] | None = None
    dropped: np.ndarray = np.zeros(0, np.int64)

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        """``[num_clients]`` examples per client."""
        return np.array([len(i) for i in self.indices], np.int64)


def _rng(key: jax.Array | int) -> np.random.Generator:
    """A numpy Generator seeded from a JAX key (consumes the key) or an int seed."""
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"key must be a typed key from jax.random.key(seed) (or an int seed), got {key!r}")
    bits = np.asarray(jax.random.bits(key, (4,), jnp.uint32))
    return np.random.default_rng([int(b) for b in bits])


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [num_examples], got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, found {y.min()}")
    return y.astype(np.int64)


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if int(num_clients) != num_clients or num_clients <= 0:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients}")
    if num_clients > num_examples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the {num_examples} examples: some clients would be empty"
        )


def _split_by_sizes(order: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(order, bounds)]


def iid(labels: np.ndarray, num_clients: int, key: jax.Array) -> Partition:
    """Uniformly random split into ``num_clients`` clients of (almost) equal size.

    Sizes differ by at most one; every example is used exactly once.

    Args:
      labels: ``[N]`` labels (only the length is used; any array works).
      num_clients: number of clients.
      key: typed key (or int seed).

    Returns:
      A :class:`Partition`.
    """
    n = len(labels)
    _check_num_clients(num_clients, n)
    order = _rng(key).permutation(n)
    return Partition([np.sort(p).astype(np.int64) for p in np.array_split(order, num_clients)])


def classes_per_client(
    labels: np.ndarray, num_clients: int, classes_per_client: int, key: jax.Array
) -> Partition:
    """Label skew: each client holds exactly ``classes_per_client`` classes.

    Client-class slots are dealt round-robin over a random class order (client
    ``i`` takes classes ``perm[(i*k + j) % C]``, ``j < k``), so each class is
    held by ``floor`` or ``ceil(num_clients*k / C)`` clients; then each class's
    examples are shuffled and split evenly among the clients holding it. Every
    example is used exactly once, except the examples of classes no client
    holds (only when ``num_clients * k < C``), which are returned in
    ``Partition.dropped``. With 10 clients x 2 classes on CIFAR-10, every class
    is split between two clients.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: number of clients.
      classes_per_client: ``k``, classes per client (``1 <= k <= C``, where
        ``C`` is the number of distinct labels).
      key: typed key (or int seed).

    Returns:
      A :class:`Partition`.
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients, len(y))
    classes = np.unique(y)
    c = len(classes)
    k = int(classes_per_client)
    if not 1 <= k <= c:
        raise ValueError(
            f"classes_per_client must be in [1, {c}] (distinct labels present), got {classes_per_client}"
        )
    rng = _rng(key)
    perm = classes[rng.permutation(c)]
    holders: dict[int, list[int]] = {int(cl): [] for cl in classes}
    client_order = rng.permutation(num_clients)
    for slot_group, client in enumerate(client_order):
        for j in range(k):
            holders[int(perm[(slot_group * k + j) % c])].append(int(client))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    dropped = []
    for cl in classes:
        rows = rng.permutation(np.flatnonzero(y == cl))
        owners = holders[int(cl)]
        if not owners:
            dropped.append(rows)
            continue
        for owner, chunk in zip(owners, np.array_split(rows, len(owners)), strict=True):
            parts[owner].append(chunk)
    indices = [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]
    drop = np.sort(np.concatenate(dropped)).astype(np.int64) if dropped else np.zeros(0, np.int64)
    return Partition(indices, dropped=drop)


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, key: jax.Array) -> Partition:
    """McMahan et al. (2017)'s pathological non-IID split.

    Sort the examples by label (ties in random order), cut them into
    ``num_clients * shards_per_client`` contiguous shards of (almost) equal size,
    and give each client ``shards_per_client`` random shards. Every example is
    used exactly once. With 100 clients x 2 shards on MNIST most clients see
    two digits.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: number of clients.
      shards_per_client: shards per client.
      key: typed key (or int seed).

    Returns:
      A :class:`Partition`.
    """
    y = _check_labels(labels)
    if int(shards_per_client) != shards_per_client or shards_per_client <= 0:
        raise ValueError(f"shards_per_client must be a positive integer, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    _check_num_clients(num_clients, len(y))
    if num_shards > len(y):
        raise ValueError(f"{num_shards} shards for {len(y)} examples: some shards would be empty")
    rng = _rng(key)
    shuffled = rng.permutation(len(y))
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return Partition(
        [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in assignment]
    )


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    key: jax.Array,
    *,
    min_size: int = 1,
    max_retries: int = 100,
) -> Partition:
    """Dirichlet label skew (Hsu et al. 2019).

    For every class, client proportions are drawn from ``Dirichlet(alpha * 1)``
    and the class's shuffled examples are split by them. Small ``alpha`` (0.1)
    gives each client few classes; large ``alpha`` (100) approaches IID. The
    whole draw is repeated until every client holds at least ``min_size``
    examples (at most ``max_retries`` draws). Every example is used exactly once.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: number of clients.
      alpha: concentration (> 0).
      key: typed key (or int seed).
      min_size: each client's minimum number of examples.
      max_retries: draws before giving up.

    Returns:
      A :class:`Partition`.

    Raises:
      ValueError: when ``num_clients * min_size > N``, or when no draw meets
        ``min_size`` within ``max_retries`` (lower ``min_size``, raise ``alpha``
        or use fewer clients).
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients, len(y))
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size < 0 or num_clients * min_size > len(y):
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {len(y)} examples")
    rng = _rng(key)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == cl) for cl in classes]
    smallest = 0
    for _ in range(max(1, int(max_retries))):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for rows in by_class:
            rows = rng.permutation(rows)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(rows)).astype(np.int64)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        smallest = min(sizes)
        if smallest >= min_size:
            return Partition([np.sort(np.concatenate(p)).astype(np.int64) for p in parts])
    raise ValueError(
        f"dirichlet(alpha={alpha}) could not give all {num_clients} clients at least min_size={min_size} "
        f"examples in {max_retries} draws (smallest client in the last draw: {smallest}); lower min_size, "
        "raise alpha or use fewer clients"
    )


def quantity_skew(
    num_examples: int | np.ndarray,
    num_clients: int,
    key: jax.Array,
    *,
    distribution: Literal["lognormal", "powerlaw"] = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_size: int = 1,
) -> Partition:
    """Quantity skew: IID examples, heavy-tailed client sizes.

    Client sizes are proportional to draws from a log-normal
    ``exp(N(0, sigma^2))`` or a power law (Pareto with tail index
    ``exponent``, i.e. ``P[size > s] ~ s^-exponent``), rescaled so they sum to
    ``num_examples`` with at least ``min_size`` each (largest-remainder
    rounding); examples are assigned uniformly at random. Every example is used
    exactly once.

    Args:
      num_examples: ``N`` (or any array, whose length is used).
      num_clients: number of clients.
      key: typed key (or int seed).
      distribution: ``"lognormal"`` or ``"powerlaw"``.
      sigma: log-normal shape (larger is more skewed).
      exponent: power-law tail index (smaller is more skewed).
      min_size: each client's minimum number of examples.

    Returns:
      A :class:`Partition`.
    """
    n = int(num_examples) if np.ndim(num_examples) == 0 else len(num_examples)
    _check_num_clients(num_clients, n)
    if min_size < 0 or num_clients * min_size > n:
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {n} examples")
    rng = _rng(key)
    if distribution == "lognormal":
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        raw = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "powerlaw":
        if not exponent > 0:
            raise ValueError(f"exponent must be positive, got {exponent}")
        raw = rng.pareto(exponent, num_clients) + 1.0
    else:
        raise ValueError(f"distribution must be 'lognormal' or 'powerlaw', got {distribution!r}")
    free = n - num_clients * min_size
    share = raw / raw.sum() * free
    sizes = np.floor(share).astype(np.int64)
    rest = free - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:rest]] += 1
    sizes += min_size
    return Partition(_split_by_sizes(rng.permutation(n), sizes))


def natural(ids: np.ndarray) -> Partition:
    """One client per distinct value of an id column (writer, speaker, hospital).

    Clients are ordered by sorted id value; ``client_names`` keeps the values as
    strings. Each client's indices keep the data set's row order.

    Args:
      ids: ``[N]`` client id of every example (any sortable dtype).

    Returns:
      A :class:`Partition` with ``client_names``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    if ids.dtype == object:
        ids = ids.astype(str)
    values, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse, minlength=len(values))
    indices = [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
    return Partition(indices, client_names=tuple(str(v) for v in values))


def label_histogram(partition: Partition, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[clients, num_classes]`` int64 counts of each label at each client."""
    y = _check_labels(labels)
    if y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {y.max()}")
    hist = np.zeros((partition.num_clients, num_classes), np.int64)
    for c, idx in enumerate(partition.indices):
        hist[c] = np.bincount(y[np.asarray(idx, np.int64)], minlength=num_classes)
    return hist


def report(partition: Partition, labels: np.ndarray, num_classes: int) -> dict:
    """Statistics of a partition: sizes, label histogram, heterogeneity.

    Args:
      partition: a :class:`Partition`.
      labels: ``[N]`` integer labels of the central data set.
      num_classes: number of classes.

    Returns:
      A dict with ``num_clients``, ``num_examples`` (assigned), ``num_dropped``,
      ``duplicates`` (examples assigned more than once), ``size_min/median/mean/max``,
      ``sizes`` (``[clients]`` array), ``label_histogram`` (``[clients, classes]``),
      ``global_distribution`` (``[classes]``), ``mean_tv_distance`` (mean over
      non-empty clients of the total-variation distance between the client's
      and the global label distribution: 0 is IID, close to 1 is disjoint),
      ``mean_classes_per_client`` (classes with at least one example) and
      ``mean_effective_classes`` (``exp`` of the label entropy, averaged).
    """
    hist = label_histogram(partition, labels, num_classes)
    sizes = hist.sum(axis=1)
    total = hist.sum(axis=0)
    glob = total / max(total.sum(), 1)
    nonempty = sizes > 0
    dist = hist[nonempty] / sizes[nonempty, None]
    tv = 0.5 * np.abs(dist - glob[None]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(dist > 0, dist * np.log(np.where(dist > 0, dist, 1.0)), 0.0), axis=1)
    all_idx = (
        np.concatenate([np.asarray(i, np.int64) for i in partition.indices]) if partition.indices else []
    )
    assigned = int(len(all_idx))
    unique = int(len(np.unique(all_idx)))
    return {
        "num_clients": partition.num_clients,
        "num_examples": assigned,
        "num_dropped": int(len(partition.dropped)),
        "duplicates": assigned - unique,
        "num_empty_clients": int((~nonempty).sum()),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_mean": float(sizes.mean()),
        "size_max": int(sizes.max()),
        "sizes": sizes,
        "label_histogram": hist,
        "global_distribution": glob,
        "mean_tv_distance": float(tv.mean()) if tv.size else 0.0,
        "mean_classes_per_client": float((hist[nonempty] > 0).sum(axis=1).mean()) if nonempty.any() else 0.0,
        "mean_effective_classes": float(np.exp(ent).mean()) if ent.size else 0.0,
    }


def plot(
    partition: Partition,
    labels: np.ndarray,
    num_classes: int,
    path: str,
    *,
    max_clients: int = 200,
    title: str | None = None,
) -> str:
    """Draw each client's label distribution (clients x classes heatmap) and sizes.

    The left panel colours each client's fraction of each class; the right
    panel shows the client sizes. At most ``max_clients`` clients (the first
    ones) are drawn. Uses matplotlib's Agg canvas (no display needed).

    Args:
      partition: a :class:`Partition`.
      labels: ``[N]`` integer labels.
      num_classes: number of classes.
      path: output image path (format from the extension, e.g. ``.png``).
      max_clients: clients drawn.
      title: figure title (default: the heterogeneity summary).

    Returns:
      ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = report(partition, labels, num_classes)
    hist = stats["label_histogram"][:max_clients]
    sizes = hist.sum(axis=1)
    frac = hist / np.maximum(sizes, 1)[:, None]
    rows = hist.shape[0]
    fig = Figure(figsize=(8, max(3.0, min(12.0, 0.08 * rows + 2))))
    FigureCanvasAgg(fig)
    ax, ax_size = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]}, sharey=True)
    im = ax.imshow(frac, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    fig.colorbar(im, ax=ax, label="fraction of client's examples")
    ax_size.barh(np.arange(rows), sizes, height=1.0, color="gray")
    ax_size.set_xlabel("examples")
    if title is None:
        title = (
            f"{stats['num_clients']} clients, mean TV distance {stats['mean_tv_distance']:.2f}, "
            f"mean effective classes {stats['mean_effective_classes']:.1f}"
        )
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    return path
