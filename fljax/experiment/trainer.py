"""The fljax trainer: one function runs any :class:`~fljax.experiment.config.Config`.

:func:`run` trains the federated model (and, after it, the baselines) for each repeat and writes
into its output folder: ``config.json``, ``run_info.json`` (command line, git revision, versions
of python, jax and every dependency, platform and devices; a resumed run adds its own under
``resumed``), ``metrics.jsonl`` (one strict-JSON object per round), the last 3 orbax
checkpoints, ``summary.json`` (final metrics, privacy spent, per-client table), ``curves.png``
and TensorBoard event files. ``experiments/run.py`` and notebooks call the same function.

Results are never lost:

- a run takes ``<out>/.lock`` (``flock``) before it writes anything, so a second run in the same
  folder stops at once; the kernel releases the lock when a run ends, even by ``kill -9``;
- a folder that holds results (``metrics.jsonl``, ``checkpoints``, ``summary.json``,
  ``repeats``) is neither overwritten nor deleted unless ``overwrite=True``;
- ``resume=True`` refuses (naming each differing key, old -> new) a config that differs from
  the stored ``config.json``, except for the keys in :data:`RESUMABLE`. Anything under ``dp``
  is never accepted: the privacy already spent was accounted with the stored config.

Crash safety: each round's metrics line is written (one write, then fsync) before that round's
checkpoint, and checkpoints are saved atomically by orbax's ``CheckpointManager``. After a
``kill -9`` at any moment, resuming restores the newest readable checkpoint whose rounds all
have complete metrics lines, drops a torn last line and any later rows and checkpoints, and
recomputes them: metrics and state equal those of an uninterrupted run bit for bit (round keys
are re-derived from the seed). A damaged latest checkpoint is reported in one ``fljax:
warning:`` line on stderr and the previous one is used.

Several processes (``jax.distributed``, :func:`multi_process`): every process runs the same
rounds over a mesh of every device of every process and gathers only its own clients; only
process 0 writes files; private runs share process 0's secret key; the processes' models are
compared (a digest) before each checkpoint and at the end (``docs/distributed.md``).

Errors: a bad config or value raises :class:`~fljax.experiment.config.ConfigError` before
anything is trained; a folder that cannot be used raises :class:`RunFolderError`. The command
line prints either as one line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import signal
import sys
import time

import jax
import numpy as np
import optax

from fljax import (
    aggregators,
    checkpoint,
    client,
    distributed,
    evaluation,
    models,
    personalization,
    privacy,
    secagg,
    simulation,
)
from fljax import random as fl_random
from fljax.algorithms import (
    fedavg,
    fedavgm,
    feddyn,
    fednova,
    fedopt,
    fedprox,
    fedsgd,
    mimelite,
    qffl,
    scaffold,
)
from fljax.base import Performance
from fljax.data import ClientStates, FederatedData, bucketing, sampling
from fljax.experiment import config as cfg
from fljax.experiment import data as data_lib
from fljax.experiment import outputs
from fljax.experiment.config import Config
from fljax.leakage import audit as audit_lib


class RunFolderError(ValueError):
    """An output folder that cannot be used as asked (results without ``overwrite``/``resume``,
    another run holding it, or a changed config on resume). One line; exit code 2."""


# ----------------------------------------------------------------------------- model and algorithm


def build_model(model: cfg.Model, num_classes: int):
    """The flax module a :class:`~fljax.experiment.config.Model` names."""
    name = model.name
    if name == "lenet":
        return models.LeNet(num_classes=num_classes)
    if name == "mlp":
        return models.MLP(hidden=model.hidden, num_classes=num_classes)
    if name == "logistic":
        return models.LogisticRegression(num_classes=num_classes)
    if name == "mcmahan_cnn":
        return models.McMahanCNN(num_classes=num_classes)
    if name == "emnist_cnn":
        return models.EMNISTCNN(num_classes=num_classes)
    if name == "char_lstm":
        return models.CharLSTM(vocab_size=num_classes, embed_dim=model.embed_dim, lstm_sizes=model.lstm_sizes)
    raise cfg.bad("model.name", name, "expected one of the reference models")


def build_optimizer(c: cfg.Client) -> optax.GradientTransformation:
    """The clients' local optimizer."""
    if c.optimizer == "adam":
        return optax.adam(c.learning_rate)
    return optax.sgd(c.learning_rate, momentum=c.momentum or None)


def build_aggregator(config: Config, dp_config=None, audit=None, remote=None):
    """The round's aggregator, or None for the algorithm's own (example-weighted mean for the
    FedAvg family, uniform mean for SCAFFOLD). With both ``dp`` and ``secagg``, DP runs over the
    secure sum (its weights are in [0, 1]: keep the secagg ``max_weight`` at 1, the default).
    The secure sum is :func:`fljax.secagg.secure_sum` (masking simulated in jit) or, with
    ``secagg_protocol``, :func:`fljax.secagg.protocol_sum` (the real protocol on the host, the
    same sum bit for bit).
    ``audit``: ``(AuditConfig, key)``: the privacy mechanism with the audit's canary clients.
    ``remote``: a deployment's clients (:class:`fljax.deploy.server.RemoteClients`), whose
    ``secure_sum(secagg_config)`` replaces the secure sum (computed over the network)."""
    agg = _aggregator(config, dp_config, remote)
    if audit is not None:
        agg = audit_lib.with_canaries(agg, *audit)
    return agg


def _aggregator(config: Config, dp_config=None, remote=None):
    if isinstance(dp_config, privacy.DistributedDPConfig):  # its own masked modular sum
        return privacy.distributed_dp(dp_config, masking=config.secagg or privacy.distributed.DEFAULT_MASKING)
    secure = None
    if config.secagg is not None:
        sum_ = secagg.protocol_sum if config.secagg_protocol else secagg.secure_sum
        secure = (sum_ if remote is None else remote.secure_sum)(config.secagg)
    if isinstance(dp_config, privacy.MFConfig):
        return privacy.dp_ftrl(dp_config, sum=secure)
    if dp_config is not None:
        return privacy.dp(dp_config, sum=secure)
    if secure is not None:
        return aggregators.mean(secure)
    return {
        None: lambda: None,
        "weighted_mean": aggregators.weighted_mean,
        "uniform_mean": aggregators.uniform_mean,
        "median": aggregators.median,
        "trimmed_mean": lambda: aggregators.trimmed_mean(config.trim_fraction),
    }[config.aggregator]()


def _local_options(c: cfg.Client) -> dict:
    return dict(
        batch_size=c.batch_size, num_epochs=c.num_epochs, weighting=c.weighting, max_steps=c.max_steps
    )


def _scaffold_client(config: Config, model):
    return scaffold.scaffold_client(model, config.client.learning_rate, **_local_options(config.client))


def _feddyn_client(config: Config, model):
    return feddyn.feddyn_client(
        model, build_optimizer(config.client), alpha=config.server.alpha, **_local_options(config.client)
    )


def build_client_states(config: Config, model, params, num_clients: int) -> ClientStates | None:
    """The population's client states (host memory) for a stateful algorithm, else None."""
    stateful = {"scaffold": _scaffold_client, "feddyn": _feddyn_client}.get(config.server.algorithm)
    if stateful is None:
        return None
    return ClientStates(stateful(config, model).init(params), num_clients)


def round_devices(devices) -> int:
    """How many devices a round spreads its clients over for the config value ``devices``.

    ``"auto"``: every device of jax's default backend, on CPU at most one per core
    (``os.cpu_count()``; :func:`fljax.experiment.cli.main` starts jax with one CPU device per
    core, measured 1.3-1.4x faster than one device on the LeNet round, docs/performance.md).

    Raises:
      ConfigError: more devices asked for than jax sees.
    """
    available = jax.device_count()
    if multi_process():
        if devices not in ("auto", available):
            raise cfg.bad(
                "devices",
                devices,
                f"a run over {jax.process_count()} processes spreads its clients over every device of "
                f"every process ({available}); use 'auto'",
            )
        return available
    if devices == "auto":
        cores = os.cpu_count() or 1
        return min(available, cores) if jax.default_backend() == "cpu" else available
    if devices > available:
        raise cfg.bad(
            "devices",
            devices,
            f"jax sees {available} {jax.default_backend()} device(s); on CPU start jax with more "
            "(jax.config.update('jax_num_cpu_devices', n) before first use, or the command line, "
            "which gives one per core)",
        )
    return int(devices)


def device_mesh(config: Config):
    """The clients mesh of a round (None: one device), see :func:`round_devices`; over several
    processes, every device of every process (:func:`fljax.distributed.client_mesh`)."""
    n = round_devices(config.devices)
    if multi_process():
        return distributed.client_mesh()
    return None if n == 1 else simulation.client_mesh(jax.devices()[:n])


def multi_process() -> bool:
    """Whether this run is one of several processes of a ``jax.distributed`` job
    (``experiments/run.py --processes N`` on one machine, or ``--distributed`` under a cluster's
    launcher): each round is then sharded over every device of every process, each process
    gathers only its own clients' data, and only process 0 writes files
    (``docs/distributed.md``)."""
    return jax.process_count() > 1


def _sync(name: str) -> None:
    """A barrier across the job's processes (nothing with one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fljax:{name}")


def _same_everywhere(state) -> None:
    """Raise unless every process holds the same ``state`` bit for bit (checked before each
    checkpoint and at the end of a multi-process run: the same cohorts, keys and noise)."""
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(checkpoint.digest(distributed.to_host(state))), np.uint8)
    multihost_utils.assert_equal(digest, "fljax: the processes of this run hold different models")


def pad_slots(ids: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` padded with masked ``-1`` slots to a multiple of ``multiple`` (devices).

    Masked slots train nothing and weigh 0, so padding changes no result (tested)."""
    extra = -len(ids) % multiple
    if not extra:
        return ids, mask
    ids = np.concatenate([np.asarray(ids, np.int32), np.full(extra, -1, np.int32)])
    return ids, np.concatenate([np.asarray(mask, bool), np.zeros(extra, bool)])


def build_algorithm(config: Config, model, dp_config=None, num_clients: int = 0, audit=None, remote=None):
    """The :class:`~fljax.base.FederatedAlgorithm` of the config's client and server sections.

    ``remote``: a deployment's clients (:class:`fljax.deploy.server.RemoteClients`):
    ``remote.client(update)`` stands in for each stateless client update (run on the nodes),
    ``remote.secure_sum`` for the secure sum; the server side is this same algorithm."""
    c, s = config.client, config.server
    agg = build_aggregator(config, dp_config, audit, remote)
    wrap = (lambda u: u) if remote is None else remote.client
    perf = Performance(chunk_size=config.chunk_size, mesh=device_mesh(config))
    name, lr = s.algorithm, s.learning_rate
    if name == "fedsgd":
        update = wrap(fedsgd.gradient_client(model, weighting=c.weighting))
        return fedsgd.fedsgd(update, learning_rate=lr, aggregator=agg).with_performance(perf)
    opt, options = build_optimizer(c), _local_options(c)
    local = lambda: wrap(client.local_sgd(model, opt, **options))
    if name == "fedprox":
        update = wrap(fedprox.proximal_client(model, opt, mu=s.mu, **options))
        algo = fedprox.fedprox(update, server_learning_rate=lr, aggregator=agg)
    elif name == "fedavg":
        algo = fedavg.fedavg(local(), server_learning_rate=lr, aggregator=agg)
    elif name == "fedavgm":
        algo = fedavgm.fedavgm(local(), server_learning_rate=lr, server_momentum=s.momentum, aggregator=agg)
    elif name == "fednova":
        update = wrap(fednova.fednova_client(model, c.learning_rate, momentum=c.momentum or 0.0, **options))
        algo = fednova.fednova(update, server_learning_rate=lr, aggregator=agg)
    elif name == "qffl":
        update = wrap(
            qffl.qffl_client(
                model,
                c.learning_rate,
                q=s.q,
                batch_size=c.batch_size,
                num_epochs=c.num_epochs,
                max_steps=c.max_steps,
            )
        )
        algo = qffl.qffl(update, aggregator=agg)
    elif name == "feddyn":
        algo = feddyn.feddyn(_feddyn_client(config, model), population_size=num_clients, aggregator=agg)
    elif name == "mimelite":
        algo = mimelite.mimelite(
            mimelite.mimelite_client(model, opt, **options), server_learning_rate=lr, aggregator=agg
        )
    elif name == "scaffold":
        algo = scaffold.scaffold(
            _scaffold_client(config, model),
            population_size=num_clients,
            server_learning_rate=lr,
            aggregator=agg,
        )
    else:
        fn = {"fedadam": fedopt.fedadam, "fedyogi": fedopt.fedyogi, "fedadagrad": fedopt.fedadagrad}[name]
        algo = fn(local(), server_learning_rate=lr, tau=s.tau, aggregator=agg)
    return algo.with_performance(perf)


def sample_cohort(cohort: cfg.Cohort, key: jax.Array, num_clients: int):
    """``(client ids, mask)`` of one round (without DP; DP samples as its accounting assumes)."""
    if cohort.sampling == "uniform":
        return sampling.uniform(key, num_clients, cohort.size)
    if cohort.sampling == "poisson":
        return sampling.poisson(key, num_clients, cohort.q, cohort.max_size)
    return np.arange(num_clients, dtype=np.int32), np.ones(num_clients, bool)


BUCKET_ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedsgd", "fedadam", "fedyogi", "fedadagrad")
"""The algorithms whose round takes size buckets (:func:`fljax.simulation.averaging_algorithm`)."""
NUM_BUCKETS = 4
"""Bucket lengths the trainer plans for a heavy-tailed population."""
BUCKET_CHUNK = 8
"""Clients per chunk in a bucketed round under ``chunk_size="auto"``."""


@dataclasses.dataclass(frozen=True)
class CohortLayout:
    """How :func:`train` pads a round's sampled clients (changes no result, tested).

    Attributes:
      capacities: Poisson-sampled cohorts: the capacity ladder
        (:func:`fljax.data.sampling.poisson_capacities`) each draw is padded to, instead of one
        Chernoff capacity; the same clients, at most ``len(capacities)`` round shapes.
      plan: heavy-tailed populations (:func:`fljax.data.bucketing.heavy_tailed`): size buckets,
        each bucket's client count padded to a rung of ``bucket_capacities``
        (:func:`fljax.data.bucketing.gather`), at most
        ``bucketing.max_shapes(plan, bucket_capacities)`` compiled client shapes.
      bucket_capacities: see ``plan``.
    """

    capacities: tuple[int, ...] | None = None
    plan: bucketing.Plan | None = None
    bucket_capacities: tuple[int, ...] | None = None

    def cohort(
        self, data: FederatedData, ids, mask, num_examples: int, devices: int, key: jax.Array, mesh=None
    ):
        """The round's cohort: a :class:`~fljax.base.Cohort`, or a tuple of size buckets. Over
        several processes (``mesh`` from :func:`device_mesh`), the global cohort of which this
        process gathered only its own slots (:func:`fljax.distributed.gather_cohort`)."""
        if self.plan is not None:
            caps = self.bucket_capacities
            return tuple(bucketing.gather(data, ids, mask, self.plan, capacities=caps, key=key))
        if self.capacities is not None:
            ids, mask = sampling.to_capacity(ids, mask, self.capacities)
        ids, mask = pad_slots(ids, mask, devices)
        if multi_process():
            return distributed.gather_cohort(
                data, ids, mesh=mesh, client_mask=mask, num_examples=num_examples, key=key
            )
        return data.cohort(ids, client_mask=mask, num_examples=num_examples, key=key)


BUCKET_MIN_CLIENTS = 32
"""``cohort_layout="auto"`` puts a heavy-tailed population in size buckets only when a round
expects at least this many clients (4 bucket lengths of :data:`BUCKET_CHUNK`): with fewer, most of
each bucket's chunk would be padding, and every bucket shape compiles once. No shipped config
reaches it (the heavy-tailed ones, adult, banks_credit and the Shakespeare configs, have cohorts
of 5 and 10), so their published results are those of the one padded shape."""


def round_clients(config: Config, dp_config, num_clients: int) -> float:
    """The expected number of clients in a round: the (DP or plain) Poisson rate times the
    population, the uniform cohort size, or every client."""
    if isinstance(dp_config, privacy.DPConfig):
        return float(dp_config.cohort_size)
    if config.cohort.sampling == "poisson":
        return config.cohort.q * num_clients
    if config.cohort.sampling == "uniform":
        return float(config.cohort.size)
    return float(num_clients)


def cohort_layout(config: Config, dp_config, data: FederatedData, *, stateful: bool) -> CohortLayout:
    """The :class:`CohortLayout` of a run. Capacity ladders and buckets are used where the round's
    result does not depend on its slot count: no DP, or central DP (:class:`~fljax.privacy.DPConfig`),
    and no simulated secure-aggregation dropouts (whose draws are per slot). Buckets also need an
    algorithm of :data:`BUCKET_ALGORITHMS`, a weighted or uniform mean (or DP), stateless clients,
    the masking simulation (not the host protocol) and a heavy-tailed population.

    ``config.cohort_layout``:

    - ``"auto"`` (the default): no capacity ladder. A Poisson draw keeps the one Chernoff shape,
      and the round does not compute its chunks of padding slots
      (:attr:`fljax.base.Performance.skip_padding`): measured, femnist_private's DP round
      computes 20.25 slots a round instead of 59 and costs 0.38x the CPU time, bit for bit the
      same result, where the ladder's 4 shapes cost 0.45x and 4 compilations
      (``experiments/results/bench_padding.md``). Size buckets for a heavy-tailed population
      whose rounds expect at least :data:`BUCKET_MIN_CLIENTS` clients (:func:`round_clients`).
    - ``"compact"``: the ladder (:func:`fljax.data.sampling.poisson_capacities`) and buckets
      at any cohort size; each new shape compiles once.
    - ``"padded"``: one shape, no buckets.
    """
    if config.cohort_layout == "padded":
        return CohortLayout()
    if not (dp_config is None or isinstance(dp_config, privacy.DPConfig)):
        return CohortLayout()
    if config.secagg is not None and config.secagg.dropout_rate > 0:
        return CohortLayout()
    n, c = data.num_clients, config.client
    capacities = None
    if config.cohort_layout == "auto":
        if round_clients(config, dp_config, n) < BUCKET_MIN_CLIENTS:
            return CohortLayout()
    elif isinstance(dp_config, privacy.DPConfig):
        if dp_config.sampling == "poisson":
            capacities = sampling.poisson_capacities(n, dp_config.cohort_size / n)
    elif config.cohort.sampling == "poisson":
        capacities = sampling.poisson_capacities(n, config.cohort.q, config.cohort.max_size)
    bucketed = (
        config.server.algorithm in BUCKET_ALGORITHMS
        and not multi_process()  # a multi-process round takes one cohort
        and not stateful
        and config.aggregator in (None, "weighted_mean", "uniform_mean")
        and not config.secagg_protocol
        and bucketing.heavy_tailed(data.sizes, c.batch_size, c.max_steps)
    )
    devices = round_devices(config.devices)
    chunk = BUCKET_CHUNK if config.chunk_size == "auto" else config.chunk_size
    if not bucketed or (chunk is not None and chunk % devices):  # buckets of whole chunks per device
        return CohortLayout(capacities=capacities)
    plan = bucketing.plan(data.sizes, c.batch_size, num_buckets=NUM_BUCKETS)
    caps = bucketing.count_capacities(n, chunk_size=chunk, multiple=devices)
    return CohortLayout(capacities=capacities, plan=plan, bucket_capacities=caps)


def bucketed_round(config: Config, algo):
    """``algo.update`` for size buckets, NOT jitted as a whole: each bucket is one jitted call,
    so the compiled shapes are bounded (:func:`fljax.data.bucketing.max_shapes`); chunks of
    :data:`BUCKET_CHUNK` clients under ``chunk_size="auto"``. Cached with the round."""
    chunk = BUCKET_CHUNK if config.chunk_size == "auto" else config.chunk_size
    key = ("buckets", id(algo), chunk)
    if key not in _ROUNDS:
        _ROUNDS[key] = algo.with_performance(Performance(chunk_size=chunk, mesh=device_mesh(config))).update
    return _ROUNDS[key]


_ROUNDS: dict = {}


def _compiled_round(config: Config, model, dp_config=None, num_clients: int = 0, audit=None, remote=None):
    """One jitted round per (algorithm settings, model), shared by repeats and baselines."""
    if remote is not None:  # a deployment: its own clients, never cached
        algo = build_algorithm(config, model, dp_config, num_clients, audit, remote)
        return algo, jax.jit(algo.update)
    canaries = None if audit is None else (audit[0], jax.random.key_data(audit[1]).tobytes())
    key = (
        canaries,
        config.model,
        config.client,
        config.server,
        config.aggregator,
        config.trim_fraction,
        config.chunk_size,
        round_devices(config.devices),
        config.secagg,
        config.secagg_protocol,
        dp_config,
        num_clients,
        repr(model),
    )
    if key not in _ROUNDS:
        algo = build_algorithm(config, model, dp_config, num_clients, audit)
        if multi_process():  # global mesh; state and key replicated, outputs replicated
            step = distributed.jit_round(algo, device_mesh(config), Performance(chunk_size=config.chunk_size))
        else:
            step = jax.jit(algo.update)
        _ROUNDS[key] = (algo, step)
    return _ROUNDS[key]


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Trained:
    """What :func:`train` returns: the final server state, each round's record, the privacy spent
    and, with ``config.stop_at_accuracy``, the round that reached it (None: not reached)."""

    state: object
    records: list[dict]
    privacy: dict
    reached_round: int | None = None


ACCURACY_KEYS = ("test_accuracy", "fed_weighted_accuracy")
"""The record keys ``stop_at_accuracy`` compares, in order: the central test accuracy, else the
accuracy over all clients' held-out examples."""


def reached(record: dict, target: float | None) -> bool:
    """Whether an evaluated round's ``record`` reaches accuracy ``target`` (False for None or a
    round without evaluation).

    Examples:
      >>> reached({"round": 3, "test_accuracy": 0.991}, 0.99)
      True
      >>> reached({"round": 4}, 0.99), reached({"test_accuracy": 0.5}, None)
      (False, False)
    """
    if target is None:
        return False
    value = next((record[k] for k in ACCURACY_KEYS if k in record), None)
    return value is not None and value >= target


def train(
    config: Config,
    train_data: FederatedData,
    model,
    *,
    eval_fn=None,
    out_dir=None,
    resume=False,
    progress=True,
    desc="federated",
    remote=None,
) -> Trained:
    """Runs ``config.rounds`` rounds of federated training on ``train_data``.

    With ``out_dir``, each round's record is appended to ``out_dir/metrics.jsonl`` (one write of
    a whole line, then fsync) BEFORE that round's checkpoint is saved, so every checkpoint has
    all its rounds' metrics on disk. ``resume=True`` continues from the newest readable
    checkpoint whose rounds all have complete metrics lines: a torn last line, rows after that
    round and newer checkpoints are dropped and recomputed, which gives the records and state
    of an uninterrupted run bit for bit. Without ``resume``, an ``out_dir`` that already holds
    metrics or checkpoints raises ``FileExistsError``: nothing is ever deleted here.
    """
    run_key = fl_random.run_key(config.seed)
    params = models.init_params(model, train_data.x.shape[1:], fl_random.stream(run_key, "init"))
    # The DP mechanism's config (central DP, or distributed DP sized to the model) and its ledger.
    section = cfg.privacy_section(config)
    dp_config = cfg.dp_config(config, train_data.num_clients)
    if config.distributed_dp is not None:
        dp_config = cfg.distributed_dp_config(config, train_data.num_clients, dim=models.num_params(params))
    if config.dp_ftrl is not None:
        dp_config = cfg.dp_ftrl_config(config, train_data.num_clients)
        schedule = privacy.matrix_factorization.cohort_schedule(dp_config, fl_random.stream(run_key, "data"))
    ledger = None
    if isinstance(dp_config, privacy.DistributedDPConfig):
        ledger = privacy.distributed.ledger(dp_config, budget_epsilon=section.budget_epsilon)
    elif isinstance(dp_config, privacy.MFConfig):
        ledger = privacy.matrix_factorization.ledger(dp_config, budget_epsilon=section.budget_epsilon)
    elif dp_config is not None:
        ledger = privacy.PrivacyLedger(dp_config, budget_epsilon=section.budget_epsilon)
    # Under DP the round keys (cohort sampling, noise) come from a secret key unless the config
    # asks for a reproducible simulation: anyone with a public seed could regenerate the noise.
    secret = dp_config is not None and not section.reproducible
    # Over several processes, process 0's: all must sample the same cohorts and add the same noise.
    loop_key = distributed.broadcast_key(fl_random.secret_key()) if secret else None
    audit = _audit(config, dp_config, run_key)
    algo, update = _compiled_round(config, model, dp_config, train_data.num_clients, audit, remote)
    devices = round_devices(config.devices)
    state = algo.init(params)
    states = build_client_states(config, model, params, train_data.num_clients)  # stateful clients, host
    multi, writes = multi_process(), distributed.is_writer()
    if multi and states is not None:
        raise cfg.bad(
            "server.algorithm",
            config.server.algorithm,
            "its clients keep state between rounds, which a run over several processes does not "
            "support yet; run it in one process (one device per core)",
        )
    if multi and config.secagg_protocol:
        raise cfg.bad(
            "secagg_protocol", True, "the host protocol runs in one process; use the masking simulation"
        )
    mesh = device_mesh(config) if multi else None
    to_host = distributed.to_host if multi else jax.device_get
    layout = cohort_layout(config, dp_config, train_data, stateful=states is not None)
    if layout.plan is not None:  # heavy-tailed: size buckets, one jitted call per bucket
        update = bucketed_round(config, algo)
    bundle = lambda: state if states is None else (state, states.tree)  # what a checkpoint holds
    records, start = [], 0
    ckpt_dir = None if out_dir is None else pathlib.Path(out_dir) / "checkpoints"
    metrics_path = None if out_dir is None else pathlib.Path(out_dir) / "metrics.jsonl"
    if out_dir is not None:
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            start, restored, records = _resume(
                ckpt_dir, metrics_path, bundle(), ledger, secret=secret, writes=writes
            )
            if states is None:
                state = restored
            else:
                state, tree = restored
                states.load(tree)
        elif _results(pathlib.Path(out_dir), names=("metrics.jsonl", "checkpoints")):
            raise FileExistsError(
                f"{out_dir} holds metrics or checkpoints of an earlier run; pass resume=True"
            )
        elif writes:
            outputs.write_atomic(metrics_path, "")
    # Pad to a multiple of 4 batches so that populations of similar sizes (other
    # splits, other clients) share one compiled round; padding is a no-op.
    multiple = 4 * config.client.batch_size
    num_examples = -(-int(train_data.sizes.max()) // multiple) * multiple
    rounds, every, ck_every = config.rounds, config.eval_every, config.checkpoint_every
    bar = outputs.Progress(
        rounds, start, desc=desc, enabled=progress and writes, every_line=out_dir is not None
    )
    writer = outputs.tensorboard_writer(out_dir, start) if writes else None
    stopped, done, saved = None, start, start
    target = config.stop_at_accuracy
    reached_round = next((r["round"] for r in records if reached(r, target)), None)  # a resumed run

    def save():
        extra = {"round": done, "epsilon": None if ledger is None else ledger.epsilon()}
        if ledger is not None:
            extra["dp_rounds_accounted"] = ledger.rounds
        if multi:
            _same_everywhere(state)
        with _crash_hook("save", done):
            checkpoint.save(ckpt_dir, done, bundle(), extra)

    for r in range(start, rounds):
        if reached_round is not None:
            break
        t0 = time.perf_counter()
        if ledger is not None and not ledger.can_run(1):
            stopped = (
                f"stopped before round {r + 1}: it would spend epsilon {ledger.epsilon(ledger.rounds + 1):.3f} > "
                f"budget {ledger.budget_epsilon} (spent {ledger.epsilon():.3f} after {r} rounds)"
            )
            print(f"fljax: privacy budget reached, {stopped}", flush=True)
            break
        rkey = fl_random.round_key(run_key, r) if loop_key is None else jax.random.fold_in(loop_key, r)
        sample_key = fl_random.stream(rkey, "sample")
        if isinstance(dp_config, privacy.MFConfig):  # the cyclic schedule the accounting assumes
            ids, mask = schedule[r], np.ones(dp_config.cohort_size, bool)
        elif isinstance(dp_config, privacy.DPConfig):  # sample exactly as the accounting assumes
            ids, mask = privacy.sample_cohort(dp_config, sample_key, num_clients=train_data.num_clients)
        elif dp_config is not None and dp_config.amplification and dp_config.sampling_probability < 1:
            q = dp_config.sampling_probability  # distributed DP accounts Poisson sampling at this rate
            ids, mask = sampling.poisson(sample_key, train_data.num_clients, q)
        else:
            ids, mask = sample_cohort(config.cohort, sample_key, train_data.num_clients)
        cohort = layout.cohort(
            train_data, ids, mask, num_examples, devices, key=fl_random.stream(run_key, "data"), mesh=mesh
        )
        if states is not None:
            cohort = states.attach(cohort)
        state, m = update(state, cohort, rkey)
        if states is not None:
            state = states.scatter(cohort, state)
        record = {"round": r + 1, **{k: float(v) for k, v in to_host(m).items()}}
        if ledger is not None:
            record = _released(record, section)
            record["epsilon"] = ledger.step(1)
        record["round_sec"] = time.perf_counter() - t0
        if eval_fn is not None and ((r + 1) % every == 0 or r + 1 == rounds):
            record.update(eval_fn(to_host(state.params) if multi else state.params))
        records.append(record)
        done = r + 1
        if reached(record, target):
            reached_round = done
        if metrics_path is not None and writes:
            outputs.append_line(
                metrics_path, outputs.dumps(record) + "\n", crash=_crash_point("metrics", done)
            )
        outputs.tensorboard_scalars(writer, record)
        if ckpt_dir is not None and ck_every and (done % ck_every == 0 or done == rounds):
            save()
            saved = done
        bar.update(record)
    bar.close()
    if writer is not None:
        writer.close()
    if ckpt_dir is not None and ck_every and saved != done:  # stopped by the budget or the target
        save()
    if multi:
        state = to_host(state)
        _same_everywhere(state)
    spent = {"epsilon": float("inf"), "note": "no differential privacy configured"}
    if ledger is not None:
        spent = ledger.summary() | {"stopped": stopped} | _privacy_labels(section, records)
        spent["private"] = not section.reproducible
    if audit is not None:  # canaries scored from what the server released: theta_0 - theta_T
        observed = jax.tree.map(lambda a, b: a - b, params, state.params)
        result = audit_lib.run_audit(
            observed, *audit, delta=dp_config.target_delta, accountant_epsilon=ledger.epsilon()
        )
        spent["audit"] = result.report()
        if not result.passed:
            spent["private"] = False
            print(
                f"fljax: privacy audit FAILED: empirical epsilon >= {result.epsilon_lower_bound:.3f} "
                f"exceeds the accountant's {ledger.epsilon():.3f}; this run is not private",
                flush=True,
            )
    return Trained(state, records, spent, reached_round)


def _audit(config: Config, dp_config, run_key: jax.Array):
    """``(AuditConfig, key)`` of an audited run (None without ``config.audit``): canaries sampled
    at the real clients' Poisson rate, of a norm far above the clip norm, weighted as a full client."""
    if config.audit is None:
        return None
    weight = 1.0
    if isinstance(dp_config, privacy.DPConfig):
        q = dp_config.cohort_size / dp_config.population_size
        if dp_config.weighting == "capped":
            weight = float(dp_config.max_weight)
    else:
        q = dp_config.sampling_probability
    audit_config = audit_lib.AuditConfig(
        num_canaries=config.audit.num_canaries,
        participation=min(1.0, q),
        canary_norm=1e3 * dp_config.clip_norm,
        canary_weight=weight,
        significance=config.audit.significance,
    )
    return audit_config, fl_random.stream(run_key, "audit")


def _resume(
    ckpt_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    state,
    ledger,
    *,
    secret: bool = False,
    writes: bool = True,
):
    """(start round, state, records) to continue a run from; tidies its folder to match.

    The start is the newest readable checkpoint whose rounds all have a complete metrics line;
    an unreadable newer checkpoint is reported in one line on stderr and skipped. Metrics lines
    and checkpoints after the start are removed (they are recomputed identically), so a kill
    at any point in here leaves a folder that resumes the same way.

    With secret noise (``secret``), the rounds recomputed here were already run once with
    another noise draw whose outputs may have been seen (their metrics lines): the ledger
    counts them again, so epsilon never under-reports what was released.

    Over several processes every process reads and restores; after all have read, only the
    writer (``writes``) rewrites the metrics, and orbax deletes the later checkpoints once.
    """
    rows, dropped = _read_metrics(metrics_path)
    found = checkpoint.restore_latest(
        ckpt_dir, state, max_step=len(rows), on_unreadable=lambda msg: _note(f"warning: {msg}")
    )
    start, extra = 0, {}
    if found is not None:
        start, state, extra = found
    if ledger is not None:
        spent, accounted = extra.get("epsilon"), int(extra.get("dp_rounds_accounted", start))
        if spent is not None and not np.isclose(spent, ledger.epsilon(accounted), rtol=1e-9, atol=0):
            raise RunFolderError(
                f"checkpoint round {start} recorded epsilon {spent} but this DP config gives "
                f"{ledger.epsilon(accounted)} after {accounted} rounds: the DP config changed; start a new run"
            )
        rerun = (len(rows) - start + dropped) if secret else 0  # released once with other noise
        ledger.rounds = accounted + rerun
        if rerun:
            _note(
                f"secret noise: the {rerun} recomputed round(s) are accounted again (epsilon {ledger.epsilon():.4g})"
            )
    _sync("resume-read")
    # Rows first: once they end at ``start``, a kill while deleting never makes later
    # checkpoints candidates again.
    if writes:
        outputs.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows[:start]))
    _sync("resume-rows")
    later = checkpoint.delete_after(ckpt_dir, start)  # every process: orbax's manager is collective
    if not writes:
        return start, state, rows[:start]
    if start or rows or later or dropped:
        redo = sorted({*range(start + 1, len(rows) + 1), *later})
        _note(
            f"resuming after round {start}"
            + (f"; recomputing rounds {_ranges(redo)}" if redo else "")
            + (
                f"; dropped {dropped} torn or unreadable metrics line(s) after round {len(rows)}"
                if dropped
                else ""
            )
        )
    return start, state, rows[:start]


# Round metrics that may be released under DP: functions of the noised aggregate or of public
# settings. Every other round statistic (client counts, clipped counts, total weight, the
# clients' training loss) is exact and data-dependent: withheld unless the config asks for it.
DP_RELEASED = (
    "round",
    "delta_norm",
    "dp_clip_norm",
    "dp_noise_std",
    "dp_sensitivity",
    "dp_simulated_noise_cohort",
    "dp_unclipped_fraction",
    "aborted",  # a secure sum's abort: set by dropouts (the protocol), not by the data
    "round_sec",
)


def _released(record: dict, dp) -> dict:
    """A DP round's record as released: the private metrics, and the exact ones only when
    ``dp.release_unnoised_metrics`` (renamed ``unnoised_<name>``), plus the noise's source."""
    out = {k: v for k, v in record.items() if k in DP_RELEASED}
    if dp.release_unnoised_metrics:
        out |= {f"unnoised_{k}": v for k, v in record.items() if k not in DP_RELEASED}
    out["dp_noise_from_seed"] = dp.reproducible
    return out


def _privacy_labels(dp, records: list[dict]) -> dict:
    """What a DP run's outputs are: the noise's source and which statistics are not private."""
    withheld = sorted({k for r in records for k in r if k.startswith("unnoised_")})
    return {
        "noise": (
            "reproducible simulation: cohort sampling and noise derived from the public seed; NOT private"
            if dp.reproducible
            else "secret: cohort sampling and noise from a key drawn from the operating system's CSPRNG, "
            "never stored"
        ),
        "unnoised_metrics_released": withheld,
        "withheld": "exact round statistics (client and clipped counts, total weight, client training loss)"
        if not dp.release_unnoised_metrics
        else None,
        "evaluation": "test_* and fed_* metrics are computed on held-out data, without noise",
    }


def _read_metrics(path: pathlib.Path) -> tuple[list[dict], int]:
    """The complete leading rows of ``metrics.jsonl`` (rounds 1, 2, ...) and how many lines follow
    them: a torn or unreadable line ends the rows."""
    if not path.exists():
        return [], 0
    pieces = path.read_bytes().split(b"\n")
    complete, last = pieces[:-1], pieces[-1]  # a last piece without "\n" is torn
    rows = []
    for line in complete:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("round") != len(rows) + 1:
            break
        rows.append(row)
    return rows, len(complete) - len(rows) + bool(last)


def _ranges(values: list[int]) -> str:
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def _note(message: str) -> None:
    print(f"fljax: {message}", file=sys.stderr, flush=True)


# Test hook, for tests/experiment/test_crash.py only: FLJAX_TEST_CRASH="metrics:3" makes the
# trainer kill itself with SIGKILL half-way through writing round 3's metrics line, and
# FLJAX_TEST_CRASH="save:4" inside round 4's checkpoint save (all data written to orbax's
# temporary folder, before it is committed). Unset, it does nothing.
CRASH_ENV = "FLJAX_TEST_CRASH"


def _crash_point(where: str, round_: int) -> bool:
    return os.environ.get(CRASH_ENV) == f"{where}:{round_}"


@contextlib.contextmanager
def _crash_hook(where: str, round_: int):
    if not _crash_point(where, round_):
        yield
        return
    from orbax.checkpoint.path import atomicity

    def finalize(self):
        os.kill(os.getpid(), signal.SIGKILL)

    original = atomicity.AtomicRenameTemporaryPath.finalize
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    try:
        yield
    finally:
        atomicity.AtomicRenameTemporaryPath.finalize = original
    raise RuntimeError(f"{CRASH_ENV}={where}:{round_} did not kill the process (orbax changed?)")


# ----------------------------------------------------------------------------- one run, repeats


def _eval_fn(config: Config, model, prepared: data_lib.Prepared):
    metrics = config.metrics

    def eval_fn(params):
        res = {}
        if prepared.central_test is not None:
            ev = evaluation.evaluate(model, params, *prepared.central_test, metrics=metrics)
            res.update({f"test_{k}": v for k, v in ev.items()})
        if prepared.test is not None:
            fe = evaluation.federated_evaluate(model, params, prepared.test, metrics=metrics)
            res.update({f"fed_{k}": v for k, v in fe.items() if not k.startswith("per_client_loss")})
        return res

    return eval_fn


def run_once(
    config: Config,
    out: pathlib.Path,
    *,
    resume=False,
    progress=True,
    verbose=True,
    data: data_lib.Prepared | None = None,
) -> dict:
    """One federated run (and its baselines) for one seed; writes metrics and checkpoints to ``out``."""
    if data is None:
        seed = config.data.seed if getattr(config.data, "seed", None) is not None else config.seed
        data = data_lib.load(config.data, fl_random.stream(fl_random.run_key(seed), "data"))
    cfg.validate(config, data.train.num_clients)
    train_data = data.train
    model = build_model(config.model, data.num_classes)
    names = list(train_data.client_names or [f"client {i}" for i in range(train_data.num_clients)])
    if verbose and distributed.is_writer():
        print(
            f"fljax: {config.name}: {train_data.num_clients} clients, {len(train_data.y)} training "
            f"examples, {config.rounds} rounds -> {out}",
            flush=True,
        )
    eval_fn = _eval_fn(config, model, data)
    trained = train(config, train_data, model, eval_fn=eval_fn, out_dir=out, resume=resume, progress=progress)
    records = trained.records
    summary = {
        "name": config.name,
        "rounds": config.rounds,
        "final": records[-1] if records else {},
        **_target(config, trained),
        "privacy": trained.privacy
        | {
            "secure_aggregation": config.secagg is not None or config.distributed_dp is not None,
            "secure_aggregation_protocol": config.secagg is not None and config.secagg_protocol,
        },
    }
    if data.report is not None:
        summary["partition"] = data.report
    if data.standardization is not None:  # unit: one record, not the training's client (not added)
        summary["standardization_privacy"] = data.standardization
    table = None
    if config.baselines:
        table = _baselines(config, data, model, names, records, progress, trained.state.params)
    if distributed.is_writer():
        outputs.write_atomic(
            out / "summary.json", outputs.dumps(summary | {"per_client_test_accuracy": table}, indent=1)
        )
    return {"summary": summary, "records": records, "table": table}


def _target(config: Config, trained: Trained) -> dict:
    """``summary.json``'s ``stop_at_accuracy`` entry: the target, the first evaluated round that
    reached it (None: not reached in the rounds run) and the rounds run."""
    if config.stop_at_accuracy is None:
        return {}
    return {
        "stop_at_accuracy": {
            "target": config.stop_at_accuracy,
            "reached_round": trained.reached_round,
            "rounds_run": len(trained.records),
        }
    }


def _without_privacy(config: Config, population: int) -> Config:
    """The same federation without DP or secure aggregation, its cohorts sampled as the DP run's
    (Poisson with ``q = cohort_size / population``, or uniform of ``cohort_size``)."""
    cohort = config.cohort
    dp = cfg.dp_config(config, population)
    if dp is not None and dp.sampling == "poisson":
        q = dp.cohort_size / dp.population_size
        cohort = cfg.Cohort() if q >= 1 else cfg.Cohort(sampling="poisson", q=q, max_size=None)
    elif dp is not None:
        cohort = cfg.Cohort(sampling="uniform", size=dp.cohort_size)
    if config.dp_ftrl is not None:  # the same cohort size, without the schedule
        size = cfg.dp_ftrl_config(config, population).cohort_size
        cohort = cfg.Cohort() if size >= population else cfg.Cohort(sampling="uniform", size=size)
    if config.distributed_dp is not None and config.cohort.sampling == "all":
        section = config.distributed_dp  # distributed DP samples Poisson at cohort_size / population
        size = section.cohort_size or population
        cohort = cfg.Cohort() if size >= population else cfg.Cohort(sampling="poisson", q=size / population)
    return _plain(config, cohort)


def _plain(config: Config, cohort: cfg.Cohort) -> Config:
    """``config`` with ``cohort`` and no DP, no secure aggregation and no audit."""
    return dataclasses.replace(
        config,
        cohort=cohort,
        dp=None,
        distributed_dp=None,
        dp_ftrl=None,
        secagg=None,
        secagg_protocol=False,
        audit=None,
    )


def _baselines(config: Config, data: data_lib.Prepared, model, names, records, progress, params) -> dict:
    """Each client's held-out accuracy (central test accuracy without per-client test data)
    under the federated model (final ``params``) and under each baseline. Baselines are
    non-private: they show what a client gives up or gains by federating. With
    ``config.metrics``, ``table["metrics"][m][column]`` holds each client's value of the scalar
    metric ``m`` (e.g. ``"auc"``) in the same layout, for every column but ``"personalized"``."""
    train_data, test_data = data.train, data.test
    alone = _plain(config, cfg.Cohort())

    scalar = [m for m in config.metrics if m != "per_class_recall"]

    def scores(params, population_test) -> dict[str, list[float]]:
        """``{"accuracy": [per client], m: [per client] for each scalar metric}``."""
        if population_test is not None:
            res = evaluation.federated_evaluate(model, params, population_test, metrics=config.metrics)
            return {m: res[f"per_client_{m}"] for m in ("accuracy", *scalar)}
        res = evaluation.evaluate(model, params, *data.central_test, metrics=config.metrics)
        return {m: [res[m]] for m in ("accuracy", *scalar)}

    final = records[-1]
    metrics = {m: {} for m in scalar}
    if test_data is not None:
        table = {"client": names, "test_sizes": test_data.sizes.tolist()}
        table["federated"] = final["fed_per_client_accuracy"]
        for m in scalar:
            metrics[m]["federated"] = final[f"fed_per_client_{m}"]
    else:  # a central test set: one row, "all clients"
        table = {"client": ["central test"], "test_sizes": [len(data.central_test[1])]}
        table["federated"] = [final["test_accuracy"]]
        for m in scalar:
            metrics[m]["federated"] = [final[f"test_{m}"]]
    if "personalized" in config.baselines:
        table["personalized"] = _personalized(config, data, model, params)
    if "local" in config.baselines:
        local = {m: [] for m in ("accuracy", *scalar)}
        for c in range(train_data.num_clients):
            test_c = test_data.subset([c]) if test_data is not None else None
            trained = train(
                alone,
                train_data.subset([c]),
                model,
                eval_fn=lambda p, t=test_c: {"scores": scores(p, t)},
                progress=progress,
                desc=f"alone: {names[c]}",
            )
            for m, values in trained.records[-1]["scores"].items():
                local[m].append(values[0])
        if test_data is None:  # one number: the mean over clients of each one's own model
            local = {m: [float(np.mean(v))] for m, v in local.items()}
        table["local"] = local.pop("accuracy")
        for m, values in local.items():
            metrics[m]["local"] = values
    others = {  # the same federation without DP or secure aggregation; everyone's data in one place
        "nonprivate": (lambda: train_data, "federated, not private"),
        "pooled": (
            lambda: FederatedData.from_clients([train_data.pooled()], num_classes=train_data.num_classes),
            "pooled data",
        ),
    }
    for col, (population, desc) in others.items():
        if col in config.baselines:
            trained = train(
                alone if col == "pooled" else _without_privacy(config, train_data.num_clients),
                population(),
                model,
                eval_fn=lambda p: {"scores": scores(p, test_data)},
                progress=progress,
                desc=desc,
            )
            per = dict(trained.records[-1]["scores"])
            table[col] = per.pop("accuracy")
            for m, values in per.items():
                metrics[m][col] = values
    if metrics:
        table["metrics"] = metrics
    return table


_FINE_TUNE: dict = {}


def _personalized(config: Config, data: data_lib.Prepared, model, params) -> list[float]:
    """Each client's held-out accuracy after fine-tuning the federated ``params`` on its own
    training data (``config.fine_tune``); one number, their mean over clients, with a central
    test set."""
    c, ft = config.client, config.fine_tune
    cache_key = (repr(model), c, ft)
    if cache_key not in _FINE_TUNE:
        optimizer = build_optimizer(dataclasses.replace(c, learning_rate=ft.learning_rate or c.learning_rate))
        options = dict(batch_size=c.batch_size, num_epochs=ft.num_epochs, max_steps=c.max_steps)
        _FINE_TUNE[cache_key] = jax.jit(
            lambda p, cohort, k: personalization.fine_tune(model, optimizer, p, cohort, k, **options)
        )
    train_data = data.train
    multiple = 4 * c.batch_size  # as train(): similar populations share one compiled program
    num_examples = -(-int(train_data.sizes.max()) // multiple) * multiple
    cohort = train_data.cohort(np.arange(train_data.num_clients), num_examples=num_examples)
    key = fl_random.stream(fl_random.run_key(config.seed), "eval")
    personal = _FINE_TUNE[cache_key](params, cohort, key)
    if data.test is not None:
        return personalization.personalized_evaluate(model, personal, data.test)["per_client_accuracy"]
    accs = [
        evaluation.evaluate(model, jax.tree.map(lambda a, i=i: a[i], personal), *data.central_test)[
            "accuracy"
        ]
        for i in range(train_data.num_clients)
    ]
    return [float(np.mean(accs))]


# What a run folder holds that must never be lost without overwrite.
RESULTS = ("metrics.jsonl", "checkpoints", "summary.json", "repeats")
# Everything a run writes, deleted by overwrite (never the folder itself, which may hold more).
OUTPUTS = (*RESULTS, "config.json", "run_info.json", "curves.png", "tensorboard")

# Config keys that a resumed run may change, and why each is harmless. Any other difference is
# refused, always one under "dp": the privacy already spent was accounted with the stored config.
RESUMABLE = {
    "rounds": "may grow to extend a run: the rounds already run are the same (never shrink)",
    "eval_every": "changes what is measured, not what is trained",
    "checkpoint_every": "changes when the state is saved, not what is computed",
    "baselines": "baselines are trained from scratch after the federated run, never resumed",
    "fine_tune": "the personalized baseline runs after the federated run, never resumed",
    "fine_tune.num_epochs": "the personalized baseline runs after the federated run, never resumed",
    "fine_tune.learning_rate": "the personalized baseline runs after the federated run, never resumed",
    "repeats": "each repeat is a run of its own in <out>/repeats/<i>, resumed or started alone",
    "metrics": "changes what is measured, not what is trained",
}
"""Config keys a resumed run may change (key -> why it is harmless); any other difference,
always one under ``dp``, is refused."""


def run(
    config: Config,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    data: data_lib.Prepared | None = None,
) -> dict:
    """Run an experiment (all its repeats and baselines) into folder ``out``; returns the summary.

    Args:
      config: the experiment.
      out: output folder (created). It must not hold results unless ``resume`` or ``overwrite``.
      resume: continue the run in ``out`` from its newest readable checkpoint (the config must
        match the stored one except for :data:`RESUMABLE` keys).
      overwrite: delete what an earlier run wrote in ``out`` first.
      progress: a tqdm bar on a terminal, plain lines otherwise; False: quiet.
      data: a prepared population to use instead of loading ``config.data`` (e.g. a user's own
        :class:`~fljax.data.FederatedData` wrapped in :class:`~fljax.experiment.data.Prepared`).

    Raises:
      ConfigError: a bad config (before anything is loaded or trained).
      RunFolderError: ``out`` holds results, is in use, or holds a run with another config.
    """
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other")
    cfg.validate(config)
    if config.deploy is not None:  # a local Flower deployment: the same training, over the network
        from fljax.deploy import local

        return local.run(config, out)
    if multi_process() and config.baselines:
        raise cfg.bad(
            "baselines",
            config.baselines,
            "expected () in a run over several processes (the baselines train in one process: run "
            "them separately)",
        )
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writes = distributed.is_writer()  # over several processes only process 0 writes files
    lock = _lock(out) if writes else None
    try:
        previous = _check_out(out, config, resume=resume, overwrite=overwrite)
        _sync("checked")  # every process has looked at the folder before process 0 changes it
        if overwrite and writes:
            _clear(out)
        info = outputs.run_info() | {
            "round_devices": round_devices(config.devices),
            "processes": jax.process_count(),
        }
        if resume and previous is not None:  # keep the first run's facts, add this one's
            info = previous | {"resumed": [*previous.get("resumed", []), info]}
        if writes:
            outputs.write_atomic(out / "config.json", outputs.dumps(cfg.to_dict(config), indent=1))
            outputs.write_atomic(out / "run_info.json", outputs.dumps(info, indent=1))
        _sync("prepared")
        return _run_repeats(config, out, resume=resume, progress=progress, data=data)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _results(out: pathlib.Path, names=RESULTS) -> list[str]:
    """The names in ``names`` under ``out`` that hold something (an empty file or folder does not)."""
    found = []
    for name in names:
        p = out / name
        if (p.is_file() and p.stat().st_size) or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _lock(out: pathlib.Path) -> int:
    """Take ``out/.lock`` (``flock``, released by the kernel when the process ends, even on kill -9)."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderError(f"another run (pid {holder}) is writing to {out}; use another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_out(out: pathlib.Path, config: Config, *, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to destroy results or to resume with another config; returns the stored run_info."""
    found = _results(out)
    if found and not (resume or overwrite):
        raise RunFolderError(
            f"{out} holds results of an earlier run ({', '.join(found)}); "
            "use --resume to continue it, --overwrite to replace it, or another --out"
        )
    if not resume:
        return None
    stored = out / "config.json"
    if not stored.exists():
        if found:
            raise RunFolderError(f"cannot --resume: {out} has results but no config.json")
        return None
    old = json.loads(stored.read_text())
    new = json.loads(outputs.dumps(cfg.to_dict(config)))  # as config.json stores it
    refused = []
    for key, a, b in _config_diff(old, new):
        if a is _MISSING and b == _default(config, key):
            continue  # a field added since that run, at its default: what the run did
        a, b = (None if v is _MISSING else v for v in (a, b))
        shrinks = key == "rounds" and not (isinstance(a, int) and isinstance(b, int) and b >= a)
        shrinks = shrinks or (key == "rounds" and config.dp_ftrl is not None)  # its noise spans the rounds
        if key in RESUMABLE and not shrinks:
            continue
        refused.append(f"{key}: {a!r} -> {b!r}")
    if refused:
        raise RunFolderError(
            f"--resume with a config that differs from {stored}: {'; '.join(refused)} "
            f"(only {', '.join(RESUMABLE)} may change, rounds only up; use another --out for a new run)"
        )
    info = out / "run_info.json"
    return json.loads(info.read_text()) if info.exists() else None


_MISSING = object()


def _config_diff(old, new, prefix=""):
    """``(dotted key, old, new)`` for each difference between two configs; a key absent from
    one side is :data:`_MISSING` there."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _config_diff(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.")
    elif old != new:
        yield prefix[:-1], old, new


def _default(config: Config, key: str):
    """The default of field ``key`` (dotted) of ``config``'s section, as config.json stores it
    (:data:`_MISSING` if the field has no default)."""
    *parents, name = key.split(".")
    section = config
    for p in parents:
        section = getattr(section, p, None)
    fields = {f.name: f for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else {}
    if name not in fields or fields[name].default is dataclasses.MISSING:
        return _MISSING
    return json.loads(outputs.dumps(fields[name].default))


def _clear(out: pathlib.Path) -> None:
    """overwrite: delete what an earlier run wrote in ``out`` (and only that)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def repeat_config(config: Config, i: int) -> Config:
    """Repeat ``i`` of an experiment: seeds (the run's and the data split's) advanced by ``i``."""
    data = config.data
    if hasattr(data, "split_seed"):
        data = dataclasses.replace(data, split_seed=data.split_seed + i)
    if getattr(data, "seed", None) is not None:
        data = dataclasses.replace(data, seed=data.seed + i)
    return dataclasses.replace(config, seed=config.seed + i, data=data)


def _run_repeats(config: Config, out: pathlib.Path, *, resume: bool, progress: bool, data) -> dict:
    t_start = time.perf_counter()
    tables, summary, runs, records = [], None, [], []
    for i in range(config.repeats):
        run_out = out if i == 0 else out / "repeats" / str(i)
        run_out.mkdir(parents=True, exist_ok=True)
        if config.repeats > 1 and distributed.is_writer():
            print(f"repeat {i + 1}/{config.repeats} (seed {config.seed + i})", flush=True)
        result = run_once(
            repeat_config(config, i), run_out, resume=resume, progress=progress, verbose=(i == 0), data=data
        )
        if summary is None:
            summary, records = result["summary"], result["records"]
        runs.append(result["records"])
        if result["table"] is not None:
            tables.append(result["table"])
    table = None
    if tables:
        table = {"client": tables[0]["client"], "test_sizes": tables[0]["test_sizes"]}
        for col in outputs.COLUMNS:
            if col in tables[0]:
                vals = np.array([t[col] for t in tables], dtype=np.float64)
                table[col] = vals.mean(axis=0).tolist()
                table[f"{col}_std"] = vals.std(axis=0).tolist()
                table[f"{col}_weighted_all"] = [
                    float(np.nansum(np.multiply(t["test_sizes"], t[col])) / np.sum(t["test_sizes"]))
                    for t in tables
                ]
        if "metrics" in tables[0]:  # per-client metric values, mean and sd over the repeats
            table["metrics"] = {
                m: {
                    key: stat(np.array([t["metrics"][m][col] for t in tables], np.float64), axis=0).tolist()
                    for col in cols
                    for key, stat in ((col, np.mean), (f"{col}_std", np.std))
                }
                for m, cols in tables[0]["metrics"].items()
            }
        table["repeats"] = config.repeats
        summary["per_client_test_accuracy"] = table
        outputs.print_table(table)
    summary["wall_sec"] = time.perf_counter() - t_start
    if not distributed.is_writer():
        return summary
    outputs.write_atomic(out / "summary.json", outputs.dumps(summary, indent=1))
    outputs.plot(runs, table, out / "curves.png", config.name)
    final = records[-1] if records else {}
    shown = {
        k: round(final[k], 4)
        for k in ("test_accuracy", "fed_mean_accuracy", "fed_weighted_accuracy")
        if k in final
    }
    print(f"done in {summary['wall_sec']:.1f}s: {shown}; metrics, summary and plot in {out}", flush=True)
    return summary
