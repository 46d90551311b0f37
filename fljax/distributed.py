"""Multi-process, multi-host rounds on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program; the cohort's ``[clients]`` axis is sharded
over every device of every process and each process gathers only ITS clients'
data. The round is the algorithm's own ``update`` with ``Performance(mesh=...)``
over the global mesh: clients train in :func:`fljax.simulation.shard_clients`
and the aggregator's sums become cross-process all-reduces (gloo on CPU). DP
adds its noise once to the replicated sum from the same key everywhere; the
secure sum's modular arithmetic is exact whatever the order. Results equal the
single-process round on as many devices up to float reassociation (secure
aggregation: bit for bit). Metrics are written by :func:`is_writer` only;
:func:`fljax.checkpoint.save` is called in EVERY process (orbax synchronises
them and writes the replicated state once). Launch and examples:
``docs/distributed.md``.

In every process::

    distributed.initialize()                     # before any other JAX call
    mesh = distributed.client_mesh()
    step = distributed.jit_round(algo, mesh)
    state = algo.init(params)                    # same seed in every process
    for r in range(rounds):
        key = random.round_key(run_key, r)
        ids, mask = sampling.uniform(random.stream(key, "sample"), data.num_clients, cohort_size)
        cohort = distributed.gather_cohort(data, ids, mesh=mesh, client_mask=mask)
        state, metrics = step(state, cohort, key)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from fljax.base import Cohort, FederatedAlgorithm, Performance, PyTree

Mesh = jax.sharding.Mesh


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    cpu_collectives: str | None = "gloo",
    **kwargs,
) -> bool:
    """Start JAX's multi-controller runtime in this process (call before any other JAX work).

    Each argument left ``None`` is read from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (set by :func:`launch_local`);
    any still unset is detected by ``jax.distributed.initialize`` from the
    cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU). With one
    process nothing is started and the call only configures the CPU devices.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: number of processes in the job.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_count: CPU devices this process exposes (``jax_num_cpu_devices``;
        e.g. one per core it may use); ``None`` keeps JAX's default.
      cpu_collectives: ``"gloo"`` (TCP, works everywhere), ``"mpi"`` or
        ``None``: how CPU devices of different processes exchange data.
      **kwargs: passed to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).

    Returns:
      True when the multi-process runtime was started, False for one process.

    Raises:
      ValueError: an argument is out of range, or nothing is set and no cluster is detected.

    Examples:
      >>> from fljax import distributed
      >>> distributed.initialize(num_processes=1)  # one process: nothing to start
      False
    """
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = (
        int(env["JAX_NUM_PROCESSES"])
        if num_processes is None and "JAX_NUM_PROCESSES" in env
        else num_processes
    )
    process_id = int(env["JAX_PROCESS_ID"]) if process_id is None and "JAX_PROCESS_ID" in env else process_id
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id}")
    if num_processes == 1:
        return False
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except ValueError as e:
        raise ValueError(
            f"{e}: pass coordinator_address, num_processes and process_id (or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or start the "
            "processes under a cluster JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU)"
        ) from e
    return True


def is_writer() -> bool:
    """True in the one process that writes metrics and files (process 0)."""
    return jax.process_index() == 0


def client_mesh(axis: str = "clients") -> Mesh:
    """A one-axis mesh over every device of every process, grouped by process.

    Devices are ordered by ``(process_index, id)``, so each process owns one
    contiguous block of cohort slots (:func:`process_clients`).
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis,))


def _clients_sharding(mesh: Mesh, axis: str) -> jax.sharding.NamedSharding:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def process_clients(cohort_size: int, mesh: Mesh, axis: str = "clients") -> slice:
    """The cohort slots this process owns: those of its devices along ``axis``.

    Args:
      cohort_size: slots in the (padded) cohort; a multiple of the mesh's ``axis`` size.
      mesh: the global mesh (:func:`client_mesh`).
      axis: the clients axis.

    Returns:
      ``slice(start, stop)`` of the cohort's slots.

    Raises:
      ValueError: the cohort does not divide over the devices, or this
        process's slots are not contiguous (order the mesh's devices by process).

    Examples:
      >>> import jax
      >>> from fljax import distributed
      >>> mesh = distributed.client_mesh()
      >>> own = distributed.process_clients(4 * jax.device_count(), mesh)
      >>> (own.start, own.stop) == (0, 4 * jax.device_count())  # one process: every slot
      True
    """
    devices = mesh.shape.get(axis)
    if devices is None:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    if cohort_size <= 0 or cohort_size % devices:
        raise ValueError(
            f"a cohort of {cohort_size} slots does not divide over {devices} devices (mesh axis "
            f"{axis!r}): pad client_ids with -1 to a multiple of {devices}"
        )
    indices = _clients_sharding(mesh, axis).addressable_devices_indices_map((cohort_size,))
    blocks = sorted({(i[0].start or 0, i[0].stop) for i in indices.values()})
    for (_, stop), (start, _) in zip(blocks, blocks[1:], strict=False):
        if start != stop:
            raise ValueError(
                f"this process's cohort slots {blocks} are not contiguous: order the mesh's devices "
                "by process (distributed.client_mesh())"
            )
    return slice(blocks[0][0], blocks[-1][1])


def global_cohort(local: Cohort, cohort_size: int, mesh: Mesh, axis: str = "clients") -> Cohort:
    """The global cohort of ``cohort_size`` slots, sharded over ``mesh``'s ``axis``, from
    each process's ``local`` block (its :func:`process_clients` slots, host numpy), with
    ``jax.make_array_from_process_local_data``."""
    own = process_clients(cohort_size, mesh, axis)
    sharding = _clients_sharding(mesh, axis)
    for leaf in jax.tree.leaves(local):
        if np.shape(leaf)[:1] != (own.stop - own.start,):
            raise ValueError(
                f"this process owns slots {own.start}:{own.stop} of {cohort_size}; its local cohort "
                f"leaves must start with [{own.stop - own.start}], got shape {np.shape(leaf)}"
            )
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (cohort_size,) + np.shape(a)[1:]
        ),
        local,
    )


def gather_cohort(
    data,
    client_ids: Sequence[int] | np.ndarray,
    *,
    mesh: Mesh,
    client_mask: np.ndarray | None = None,
    axis: str = "clients",
    **cohort_kwargs,
) -> Cohort:
    """Gather this process's clients of the round and assemble the global cohort.

    Every process passes the SAME ``client_ids`` (sampled from the same round
    key); each gathers only the slots :func:`process_clients` gives it, with
    ``data.cohort`` (e.g. :meth:`fljax.data.FederatedData.cohort`: any object
    with that method, such as a population loaded per host), so no process
    reads another's clients.

    Args:
      data: the population (``data.cohort(ids, client_mask=..., **cohort_kwargs)``).
      client_ids: ``[cohort]`` population indices, ``-1`` for padding slots.
      mesh: the global mesh (:func:`client_mesh`).
      client_mask: optional ``[cohort]`` bool.
      axis: the clients axis.
      **cohort_kwargs: e.g. ``num_examples`` (give it when processes hold
        different parts of the population, so every block has the same shape)
        and ``key``.

    Returns:
      The global :class:`~fljax.base.Cohort`, sharded over the clients axis.

    Examples:
      >>> import jax, numpy as np
      >>> from fljax import distributed
      >>> from fljax.data import FederatedData
      >>> data = FederatedData.from_clients([(np.ones((n, 2), np.float32), np.zeros(n, np.int32)) for n in (1, 2, 3)])
      >>> mesh = distributed.client_mesh()
      >>> ids = np.full(mesh.size, -1)
      >>> ids[:3] = [2, 0, 1]
      >>> cohort = distributed.gather_cohort(data, ids, mesh=mesh)
      >>> cohort.data.x.shape[1:], cohort.client_ids.sharding.spec == jax.sharding.PartitionSpec("clients")
      ((3, 2), True)
    """
    ids = np.asarray(client_ids)
    if ids.ndim != 1:
        raise ValueError(f"client_ids must be 1-D, got shape {ids.shape}")
    own = process_clients(ids.shape[0], mesh, axis)
    mask = None if client_mask is None else np.asarray(client_mask, bool)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"client_mask must be {ids.shape}, got {mask.shape}")
    local = data.cohort(ids[own], client_mask=None if mask is None else mask[own], **cohort_kwargs)
    return global_cohort(local, ids.shape[0], mesh, axis)


def _replicated(mesh: Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf as a global array replicated on every device of ``mesh``.

    Each process must pass the same values (e.g. the model initialised from the
    same seed, the round key from the same run key): not checked. Typed keys
    are supported; leaves that already are replicated over ``mesh`` are kept.
    """
    sharding = _replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

    return jax.tree.map(put, tree)


def broadcast_key(key: jax.Array) -> jax.Array:
    """Process 0's ``key`` in every process (one process: ``key`` itself).

    For keys that must be the same everywhere but cannot come from a shared seed: the secret key
    of a private run (:func:`fljax.random.secret_key`), which each process would otherwise draw
    differently, so that the processes would sample different cohorts and add different noise
    to what must be one replicated sum. Typed ``threefry2x32`` keys or raw ``uint32[2]`` data.
    """
    if jax.process_count() == 1:
        return key
    from jax.experimental import multihost_utils

    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data), data.dtype)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of a round's outputs (replicated, or sharded: then gathered from every process)."""

    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def jit_round(algo: FederatedAlgorithm, mesh: Mesh, performance: Performance | None = None):
    """The algorithm's own round, jitted over the global mesh: ``step(state, cohort, key)``.

    ``algo.with_performance(replace(performance, mesh=mesh))``: each device
    trains its clients (:func:`fljax.simulation.shard_clients`) and the
    aggregator's sums over the clients axis run across processes. ``state`` and
    ``key`` are replicated on first use (:func:`replicate`); the new state and
    the metrics come back replicated on every process. ``cohort`` must be global
    (:func:`gather_cohort`). One :class:`~fljax.base.Cohort` per round (not size
    buckets).

    Args:
      algo: any :class:`~fljax.base.FederatedAlgorithm` built on the averaging round.
      mesh: the global mesh (:func:`client_mesh`), with a ``"clients"`` axis.
      performance: the round's other settings (default ``Performance()``).

    Returns:
      ``step(state, cohort, key) -> (state, metrics)``.

    Examples:
      >>> import jax, numpy as np, optax
      >>> from fljax import client, distributed, models
      >>> from fljax.algorithms import fedavg
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> data = FederatedData.from_clients(
      ...     [(rng.normal(size=(4, 3)).astype(np.float32), np.zeros(4, np.int32)) for _ in range(8)]
      ... )
      >>> model = models.LogisticRegression()
      >>> algo = fedavg.fedavg(client.local_sgd(model, optax.sgd(0.1), batch_size=4))
      >>> mesh = distributed.client_mesh()
      >>> step = distributed.jit_round(algo, mesh)
      >>> ids = np.arange(8)  # 8 slots: a multiple of the devices
      >>> cohort = distributed.gather_cohort(data, ids, mesh=mesh)
      >>> state, metrics = step(algo.init(models.init_params(model, (3,), jax.random.key(0))), cohort, jax.random.key(1))
      >>> int(distributed.to_host(state.round)), float(distributed.to_host(metrics["total_weight"]))
      (1, 32.0)
    """
    perf = dataclasses.replace(performance if performance is not None else Performance(), mesh=mesh)
    sharded = algo.with_performance(perf)
    compiled = jax.jit(sharded.update, out_shardings=_replicated(mesh))
    clients = _clients_sharding(mesh, "clients")

    def step(state, cohort: Cohort, key: jax.Array):
        for leaf in jax.tree.leaves(cohort):
            if not (isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(clients, leaf.ndim)):
                raise ValueError(
                    "the cohort must be global and sharded over the mesh's clients axis: build it "
                    "with distributed.gather_cohort(data, client_ids, mesh=mesh)"
                )
        return compiled(replicate(state, mesh), cohort, replicate(key, mesh))

    return step


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    local_device_count: int = 1,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``python argv...`` as ``num_processes`` processes of one job on this machine.

    A stand-in for ``srun`` / ``mpirun``: each process gets ``JAX_COORDINATOR_ADDRESS``
    (a free local port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (read by
    :func:`initialize`), ``JAX_PLATFORMS=cpu`` and ``JAX_NUM_CPU_DEVICES=local_device_count``,
    plus ``env``. When one fails, or after ``timeout`` seconds, the others are killed (they
    would wait forever at the next collective). Returns one ``CompletedProcess`` per
    process (text ``stdout``, ``stderr``), in process order; a killed one has code ``-9``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # a free port for the coordinator
        port = sock.getsockname()[1]
    base = dict(os.environ) | dict(env or {})
    base.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(local_device_count),
    )
    cmd = [sys.executable, *map(str, argv)]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [
            (pathlib.Path(tmp) / f"{i}.out", pathlib.Path(tmp) / f"{i}.err") for i in range(num_processes)
        ]
        procs = []
        for i, (out, err) in enumerate(logs):
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(
                    subprocess.Popen(cmd, env=base | {"JAX_PROCESS_ID": str(i)}, stdout=fo, stderr=fe)
                )
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or (deadline is not None and time.monotonic() > deadline):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        return [
            subprocess.CompletedProcess(cmd, p.wait(), out.read_text(), err.read_text())
            for p, (out, err) in zip(procs, logs, strict=True)
        ]
