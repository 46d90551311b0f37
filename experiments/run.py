"""The fljax trainer: one runner for every experiment config.

Usage:
  python experiments/run.py --config experiments/configs/heart_disease.py [--set a.b=value ...]
                            [--out DIR] [--resume | --overwrite]

A config file defines ``get_config() -> dict``. Each run writes into its output
folder: ``config.json``, ``run_info.json`` (git revision, python/jax/jaxlib
versions, device; a resumed run adds its own under ``resumed``), ``metrics.jsonl``
(one JSON object per round), the last 3 orbax checkpoints, ``summary.json``
(final metrics, privacy spent) and ``curves.png``.

Results are never lost:

- a run takes ``<out>/.lock`` (``flock``) before it writes anything, so a second
  run in the same folder stops at once (exit code 2); the kernel releases the
  lock when a run ends, even by ``kill -9``;
- a folder that holds results (``metrics.jsonl``, ``checkpoints``,
  ``summary.json``, ``repeats``) is neither overwritten nor deleted unless
  ``--overwrite`` is given: without it, or ``--resume``, the run stops (exit 2);
- ``--resume`` stops (exit 2, one line naming each differing key, old -> new)
  when the config differs from the stored ``config.json``, except for the keys
  in ``RESUMABLE``: ``rounds`` (up only, to extend a run), ``eval_every``,
  ``checkpoint_every``, ``baselines`` and ``repeats``. Anything under ``dp`` is
  never accepted: the privacy already spent was accounted with the stored config.

Crash safety: each round's metrics line is written (one write, then fsync)
before that round's checkpoint, and checkpoints are saved atomically. After a
``kill -9`` at any moment, ``--resume`` restores the newest readable checkpoint
whose rounds all have complete metrics lines, drops a torn last line and any
later rows and checkpoints, and recomputes them: metrics and state equal those
of an uninterrupted run bit for bit (round keys are re-derived from the seed).
A damaged latest checkpoint (orbax error, or state not matching the digest
saved with it) is reported in one ``fljax: warning:`` line on stderr and the
previous one is used. ``FLJAX_TEST_CRASH`` is a test hook (see ``CRASH_ENV``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax

from fljax import aggregators, checkpoint, client, evaluation, models, privacy, secagg
from fljax import random as fl_random
from fljax.algorithms import fedavg, fedavgm, fedopt, fedprox, fedsgd, scaffold
from fljax.base import Performance
from fljax.data import ClientStates, FederatedData, partition, sampling
from fljax.data.datasets import cifar10, heart_disease

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config


def load_config(path: str, overrides: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("fljax_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = copy.deepcopy(module.get_config())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        keys = dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise KeyError(f"--set {dotted}: {k!r} is not a section of the config")
            node = node[k]
        if keys[-1] not in node:
            raise KeyError(f"--set {dotted}: unknown key {keys[-1]!r}; known: {sorted(node)}")
        node[keys[-1]] = value
    return config


# ----------------------------------------------------------------------------- data


def build_data(cfg: dict, key: jax.Array) -> dict:
    """Returns train/test populations, an optional central test set and shapes."""
    name = cfg["name"]
    if name == "heart_disease":
        d = heart_disease.load(test_fraction=cfg.get("test_fraction", 0.25), seed=cfg.get("split_seed", 0))
        return {"train": d.train, "test": d.test, "central_test": None, "num_classes": 2}
    if name == "cifar10":
        raw = cifar10.load_raw(cfg.get("data_dir"), source=cfg.get("source", "auto"))
        x_train, y_train = cifar10.normalize(raw["x_train"]), raw["y_train"]
        x_test, y_test = cifar10.normalize(raw["x_test"]), raw["y_test"]
        if cfg.get("max_train_examples"):
            keep = fl_random.host_rng(key, 1).permutation(len(y_train))[: cfg["max_train_examples"]]
            x_train, y_train = x_train[keep], y_train[keep]
        part = cfg.get("partition", "iid")
        n = cfg["num_clients"]
        if part == "iid":
            p = partition.iid(y_train, n, key)
        elif part == "classes_per_client":
            p = partition.classes_per_client(y_train, n, cfg["classes_per_client"], key)
        elif part == "dirichlet":
            p = partition.dirichlet(y_train, n, cfg["alpha"], key)
        else:
            raise ValueError(f"unknown partition {part!r}")
        train = FederatedData.from_partition(x_train, y_train, p.indices, num_classes=10)
        return {
            "train": train,
            "test": None,
            "central_test": (x_test, y_test),
            "num_classes": 10,
            "partition_report": partition.report(p, y_train, 10),
        }
    raise ValueError(f"unknown data set {name!r}")


# ----------------------------------------------------------------------------- model and algorithm


def build_model(cfg: dict, num_classes: int):
    name = cfg["name"]
    if name == "lenet":
        return models.LeNet(num_classes=num_classes)
    if name == "mlp":
        return models.MLP(hidden=tuple(cfg.get("hidden", (200, 200))), num_classes=num_classes)
    if name == "logistic":
        return models.LogisticRegression(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}")


def build_optimizer(cfg: dict) -> optax.GradientTransformation:
    name, lr = cfg.get("optimizer", "sgd"), cfg["learning_rate"]
    if name == "sgd":
        return optax.sgd(lr, momentum=cfg.get("momentum") or None)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"unknown optimizer {name!r}")


def build_dp(config: dict, num_clients: int) -> privacy.DPConfig | None:
    """The run's DPConfig, or None. ``population_size`` and ``cohort_size`` default to the data's."""
    dp = config.get("dp")
    if not dp:
        return None
    kwargs = {k: v for k, v in dp.items() if k != "budget_epsilon"}
    kwargs.setdefault("population_size", num_clients)
    kwargs.setdefault("cohort_size", config.get("cohort", {}).get("size", num_clients))
    return privacy.DPConfig(**kwargs)


def build_aggregator(config: dict, dp_config: privacy.DPConfig | None = None):
    """The round's aggregator. With both ``dp`` and ``secagg``, DP runs over the secure sum (its
    weights are in [0, 1]: keep the secagg ``max_weight`` at 1, the default, for exact weights)."""
    secure = secagg.secure_sum(secagg.SecAggConfig(**config["secagg"])) if config.get("secagg") else None
    if dp_config is not None:
        return privacy.dp(dp_config, sum=secure)  # over the secure sum when secagg is configured
    if secure is not None:
        return aggregators.mean(secure)
    name = config.get("aggregator")
    if name is None:  # the algorithm's own: example-weighted mean (FedAvg family), uniform mean (SCAFFOLD)
        return None
    if name == "weighted_mean":
        return aggregators.weighted_mean()
    if name == "uniform_mean":
        return aggregators.uniform_mean()
    if name == "median":
        return aggregators.median()
    if name == "trimmed_mean":
        return aggregators.trimmed_mean(config.get("trim_fraction", 0.1))
    raise ValueError(f"unknown aggregator {name!r}")


def _scaffold_client(config: dict, model):
    c = config["client"]
    if c.get("optimizer", "sgd") != "sgd" or c.get("momentum"):
        raise ValueError(
            "scaffold: its local steps are plain SGD; set client.optimizer='sgd' and client.momentum=0"
        )
    return scaffold.scaffold_client(
        model,
        c["learning_rate"],
        batch_size=c["batch_size"],
        num_epochs=c["num_epochs"],
        weighting=c.get("weighting", "num_examples"),
        max_steps=c.get("max_steps"),
    )


def build_client_states(config: dict, model, params, num_clients: int) -> ClientStates | None:
    """The population's client states (host memory) for a stateful algorithm, else None."""
    if config["server"].get("algorithm", "fedavg") != "scaffold":
        return None
    return ClientStates(_scaffold_client(config, model).init(params), num_clients)


def build_algorithm(
    config: dict, model, dp_config: privacy.DPConfig | None = None, num_clients: int | None = None
):
    c, s = config["client"], config["server"]
    agg = build_aggregator(config, dp_config)
    perf = Performance(chunk_size=config.get("chunk_size", "auto"))
    name = s.get("algorithm", "fedavg")
    lr = s.get("learning_rate", 1.0)
    if name == "fedsgd":
        update = fedsgd.gradient_client(model, weighting=c.get("weighting", "num_examples"))
        return fedsgd.fedsgd(update, learning_rate=s["learning_rate"], aggregator=agg).with_performance(perf)
    options = dict(
        batch_size=c["batch_size"],
        num_epochs=c["num_epochs"],
        weighting=c.get("weighting", "num_examples"),
        max_steps=c.get("max_steps"),
    )
    opt = build_optimizer(c)
    if name == "fedprox":
        update = fedprox.proximal_client(model, opt, mu=s["mu"], **options)
        algo = fedprox.fedprox(update, server_learning_rate=lr, aggregator=agg)
    elif name == "fedavg":
        algo = fedavg.fedavg(client.local_sgd(model, opt, **options), server_learning_rate=lr, aggregator=agg)
    elif name == "fedavgm":
        algo = fedavgm.fedavgm(
            client.local_sgd(model, opt, **options),
            server_learning_rate=lr,
            server_momentum=s.get("momentum", 0.9),
            aggregator=agg,
        )
    elif name == "scaffold":
        if num_clients is None:
            raise ValueError("scaffold needs the population size (num_clients)")
        algo = scaffold.scaffold(
            _scaffold_client(config, model),
            population_size=num_clients,
            server_learning_rate=lr,
            aggregator=agg,
        )
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        fn = {"fedadam": fedopt.fedadam, "fedyogi": fedopt.fedyogi, "fedadagrad": fedopt.fedadagrad}[name]
        algo = fn(
            client.local_sgd(model, opt, **options),
            server_learning_rate=lr,
            tau=s.get("tau", 1e-3),
            aggregator=agg,
        )
    else:
        raise ValueError(f"unknown algorithm {name!r}")
    return algo.with_performance(perf)


def sample_cohort(cfg: dict, key: jax.Array, num_clients: int):
    mode = cfg.get("sampling", "all")
    if mode == "all":
        return np.arange(num_clients, dtype=np.int32), np.ones(num_clients, bool)
    if mode == "uniform":
        return sampling.uniform(key, num_clients, cfg["size"])
    if mode == "poisson":
        return sampling.poisson(key, num_clients, cfg["q"], cfg.get("max_size"))
    raise ValueError(f"unknown cohort sampling {mode!r}")


# ----------------------------------------------------------------------------- training


def train(
    config: dict,
    train_data: FederatedData,
    model,
    *,
    eval_fn=None,
    out_dir=None,
    resume=False,
    progress=True,
    desc="federated",
):
    """Runs ``config['rounds']`` rounds; returns (final ServerState, list of per-round records).

    With ``out_dir``, each round's record is appended to ``out_dir/metrics.jsonl`` (one write of
    a whole line, then fsync) BEFORE that round's checkpoint is saved, so every checkpoint has
    all its rounds' metrics on disk. ``resume=True`` continues from the newest readable
    checkpoint whose rounds all have complete metrics lines: a torn last line, rows after that
    round and newer checkpoints are dropped and recomputed, which gives the records and state
    of an uninterrupted run bit for bit (round keys are re-derived from the seed). Without
    ``resume``, an ``out_dir`` that already holds metrics or checkpoints raises
    ``FileExistsError``: nothing is ever deleted here.
    """
    from tqdm import tqdm

    run_key = fl_random.run_key(config["seed"])
    shape = train_data.x.shape[1:]
    params = models.init_params(model, shape, fl_random.stream(run_key, "init"))
    dp_config = build_dp(config, train_data.num_clients)
    ledger = None
    if dp_config is not None:
        ledger = privacy.PrivacyLedger(dp_config, budget_epsilon=config["dp"].get("budget_epsilon"))
    algo, update = _compiled_round(config, model, dp_config, train_data.num_clients)
    state = algo.init(params)
    states = build_client_states(config, model, params, train_data.num_clients)  # stateful clients, host
    bundle = lambda: state if states is None else (state, states.tree)  # what a checkpoint holds
    records, start = [], 0
    ckpt_dir = None if out_dir is None else pathlib.Path(out_dir) / "checkpoints"
    metrics_path = None if out_dir is None else pathlib.Path(out_dir) / "metrics.jsonl"
    if out_dir is not None:
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            start, restored, records = _resume(ckpt_dir, metrics_path, bundle(), ledger)
            if states is None:
                state = restored
            else:
                state, tree = restored
                states.load(tree)
        elif _results(pathlib.Path(out_dir), names=("metrics.jsonl", "checkpoints")):
            raise FileExistsError(
                f"{out_dir} holds metrics or checkpoints of an earlier run; pass resume=True"
            )
        else:
            _write_atomic(metrics_path, "")
    # Pad to a multiple of 4 batches so that populations of similar sizes (other
    # splits, other clients) share one compiled round; padding is a no-op.
    multiple = 4 * config["client"].get("batch_size", 1)
    num_examples = -(-int(train_data.sizes.max()) // multiple) * multiple
    rounds, every = config["rounds"], config.get("eval_every", 1)
    ck_every = config.get("checkpoint_every", 0)
    bar = tqdm(range(start, rounds), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    stopped, done, saved = None, start, start

    def save():
        extra = {"round": done, "epsilon": None if ledger is None else ledger.epsilon()}
        with _crash_hook("save", done):
            checkpoint.save(ckpt_dir, done, bundle(), extra)

    for r in bar:
        t0 = time.perf_counter()
        if ledger is not None and not ledger.can_run(1):
            stopped = (
                f"stopped before round {r + 1}: it would spend epsilon {ledger.epsilon(r + 1):.3f} > "
                f"budget {ledger.budget_epsilon} (spent {ledger.epsilon():.3f} after {r} rounds)"
            )
            print(f"fljax: privacy budget reached, {stopped}", flush=True)
            break
        rkey = fl_random.round_key(run_key, r)
        sample_key = fl_random.stream(rkey, "sample")
        if dp_config is not None:  # sample exactly as the accounting assumes
            ids, mask = privacy.sample_cohort(dp_config, sample_key)
        else:
            ids, mask = sample_cohort(config.get("cohort", {}), sample_key, train_data.num_clients)
        cohort = train_data.cohort(
            ids, client_mask=mask, num_examples=num_examples, key=fl_random.stream(run_key, "data")
        )
        if states is not None:
            cohort = states.attach(cohort)
        state, m = update(state, cohort, rkey)
        if states is not None:
            state = states.scatter(cohort, state)
        record = {"round": r + 1, **{k: float(v) for k, v in jax.device_get(m).items()}}
        if ledger is not None:
            record["epsilon"] = ledger.step(1)
        record["round_sec"] = time.perf_counter() - t0
        if eval_fn is not None and ((r + 1) % every == 0 or r + 1 == rounds):
            record.update(eval_fn(state.params))
        records.append(record)
        done = r + 1
        if metrics_path is not None:
            _append_line(metrics_path, json.dumps(record) + "\n", crash=_crash_point("metrics", done))
        if ckpt_dir is not None and ck_every and (done % ck_every == 0 or done == rounds):
            save()
            saved = done
        shown = {
            k: record[k] for k in ("client_train_loss", "test_accuracy", "fed_mean_accuracy") if k in record
        }
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
    if ckpt_dir is not None and ck_every and saved != done:  # stopped by the privacy budget
        save()
    privacy_summary = {"epsilon": float("inf"), "note": "no differential privacy configured"}
    if ledger is not None:
        privacy_summary = ledger.summary() | {"stopped": stopped}
    train.last_privacy = privacy_summary
    return state, records


def _resume(ckpt_dir: pathlib.Path, metrics_path: pathlib.Path, state, ledger):
    """(start round, state, records) to continue a run from; tidies its folder to match.

    The start is the newest readable checkpoint whose rounds all have a complete metrics line;
    an unreadable newer checkpoint is reported in one line on stderr and skipped. Metrics lines
    and checkpoints after the start are removed (they are recomputed identically), so a kill
    at any point in here leaves a folder that resumes the same way.
    """
    rows, dropped = _read_metrics(metrics_path)
    found = checkpoint.restore_latest(
        ckpt_dir, state, max_step=len(rows), on_unreadable=lambda msg: _note(f"warning: {msg}")
    )
    start, extra = 0, {}
    if found is not None:
        start, state, extra = found
    if ledger is not None:
        spent = extra.get("epsilon")
        if spent is not None and not np.isclose(spent, ledger.epsilon(start), rtol=1e-9, atol=0):
            raise ValueError(
                f"checkpoint round {start} recorded epsilon {spent} but this DP config gives "
                f"{ledger.epsilon(start)} after {start} rounds: the DP config changed; start a new run"
            )
        if start:
            ledger.step(start)
    # Rows first: once they end at ``start``, a kill while deleting never makes later
    # checkpoints candidates again.
    _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows[:start]))
    later = checkpoint.delete_after(ckpt_dir, start)
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


def _append_line(path: pathlib.Path, line: str, *, crash: bool = False) -> None:
    """Append ``line`` with one write, then fsync: a kill leaves at most one torn last line."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if crash:  # test hook: the process dies half-way through the line
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once (write a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Test hook, for tests/experiments/test_crash.py only: FLJAX_TEST_CRASH="metrics:3" makes the
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


_ROUNDS: dict = {}


def _compiled_round(config: dict, model, dp_config=None, num_clients: int | None = None):
    """One jitted round per (algorithm settings, model), shared by repeats and baselines."""
    key = json.dumps(
        {k: config.get(k) for k in ("model", "client", "server", "aggregator", "chunk_size", "secagg")}
        | {"dp": repr(dp_config), "num_clients": num_clients},
        sort_keys=True,
        default=str,
    )
    if key not in _ROUNDS:
        algo = build_algorithm(config, model, dp_config, num_clients)
        _ROUNDS[key] = (algo, jax.jit(algo.update))
    return _ROUNDS[key]


def run_info() -> dict:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    import jaxlib

    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
    }


def run_once(config: dict, out: pathlib.Path, *, resume=False, progress=True, verbose=True) -> dict:
    """One federated run (and its baselines) for one seed; writes metrics and checkpoints to ``out``."""
    data_key = fl_random.stream(fl_random.run_key(config["data"].get("seed", config["seed"])), "data")
    data = build_data(config["data"], data_key)
    train_data, test_data, central = data["train"], data["test"], data["central_test"]
    model = build_model(config["model"], data["num_classes"])
    names = list(train_data.client_names or [f"client {i}" for i in range(train_data.num_clients)])
    if verbose:
        print(
            f"fljax: {config['name']}: {train_data.num_clients} clients, {len(train_data.y)} training "
            f"examples, {config['rounds']} rounds -> {out}",
            flush=True,
        )

    def eval_fn(params):
        res = {}
        if central is not None:
            ev = evaluation.evaluate(model, params, *central)
            res.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
        if test_data is not None:
            fe = evaluation.federated_evaluate(model, params, test_data)
            res.update({f"fed_{k}": v for k, v in fe.items() if not k.startswith("per_client_loss")})
        return res

    state, records = train(
        config, train_data, model, eval_fn=eval_fn, out_dir=out, resume=resume, progress=progress
    )
    summary = {
        "name": config["name"],
        "rounds": config["rounds"],
        "final": records[-1] if records else {},
        "privacy": train.last_privacy | {"secure_aggregation": bool(config.get("secagg"))},
    }
    if "partition_report" in data:
        summary["partition"] = data["partition_report"]
    baselines = config.get("baselines", ())
    table = None
    if baselines and test_data is not None:
        table = {
            "client": names,
            "test_sizes": test_data.sizes.tolist(),
            "federated": records[-1]["fed_per_client_accuracy"],
        }
        # Reference baselines are non-private: they show what a hospital gives up or gains.
        alone = config | {"cohort": {"sampling": "all"}, "dp": None, "secagg": None}
        if "local" in baselines:
            table["local"] = []
            for c in range(train_data.num_clients):
                _, recs = train(
                    alone,
                    train_data.subset([c]),
                    model,
                    eval_fn=lambda p, c=c: {
                        "acc": evaluation.federated_evaluate(model, p, test_data.subset([c]))["mean_accuracy"]
                    },
                    progress=progress,
                    desc=f"alone: {names[c]}",
                )
                table["local"].append(recs[-1]["acc"])
        if "nonprivate" in baselines:  # the same federation without DP or secure aggregation
            _, recs = train(
                alone,
                train_data,
                model,
                eval_fn=lambda p: {
                    "per": evaluation.federated_evaluate(model, p, test_data)["per_client_accuracy"]
                },
                progress=progress,
                desc="federated, not private",
            )
            table["nonprivate"] = recs[-1]["per"]
        if "pooled" in baselines:
            pooled = FederatedData.from_clients([train_data.pooled()], num_classes=train_data.num_classes)
            _, recs = train(
                alone,
                pooled,
                model,
                eval_fn=lambda p: {
                    "per": evaluation.federated_evaluate(model, p, test_data)["per_client_accuracy"]
                },
                progress=progress,
                desc="pooled data",
            )
            table["pooled"] = recs[-1]["per"]
    _write_atomic(
        out / "summary.json",
        json.dumps(summary | {"per_client_test_accuracy": table}, indent=1, default=_jsonable),
    )
    return {"summary": summary, "records": records, "table": table}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint (the config must match)",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete the results of an earlier run in --out first"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    out = pathlib.Path(args.out or REPO / "runs" / config["name"])
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, parser)
    try:
        previous = _check_out(out, config, args, parser)
        if args.overwrite:
            _clear(out)
        info = run_info()
        if args.resume and previous is not None:  # keep the first run's facts, add this one's
            info = previous | {"resumed": [*previous.get("resumed", []), info]}
        _write_atomic(out / "config.json", json.dumps(config, indent=1, default=str))
        _write_atomic(out / "run_info.json", json.dumps(info, indent=1))
        return _run_repeats(config, out, args)
    finally:
        os.close(lock)  # releases the lock


# What a run folder holds that must never be lost without --overwrite.
RESULTS = ("metrics.jsonl", "checkpoints", "summary.json", "repeats")
# Everything a run writes, deleted by --overwrite (never the folder itself, which may hold more).
OUTPUTS = (*RESULTS, "config.json", "run_info.json", "curves.png")

# Config keys that --resume lets differ from the stored config.json, and why each is harmless.
# Any other difference is refused, always one under "dp": the privacy already spent was
# accounted with the stored config.
RESUMABLE = {
    "rounds": "may grow to extend a run: the rounds already run are the same (never shrink)",
    "eval_every": "changes what is measured, not what is trained",
    "checkpoint_every": "changes when the state is saved, not what is computed",
    "baselines": "baselines are trained from scratch after the federated run, never resumed",
    "repeats": "each repeat is a run of its own in <out>/repeats/<i>, resumed or started alone",
}


def _results(out: pathlib.Path, names=RESULTS) -> list[str]:
    """The names in ``names`` under ``out`` that hold something (an empty file or folder does not)."""
    found = []
    for name in names:
        p = out / name
        if (p.is_file() and p.stat().st_size) or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _lock(out: pathlib.Path, parser) -> int:
    """Take ``out/.lock`` (``flock``, released by the kernel when the process ends, even on kill -9)."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        parser.exit(2, f"run.py: error: another run (pid {holder}) is writing to {out}; use another --out\n")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_out(out: pathlib.Path, config: dict, args, parser) -> dict | None:
    """Refuse (exit 2) to destroy results or to resume with another config; returns the stored run_info."""
    found = _results(out)
    if found and not (args.resume or args.overwrite):
        parser.exit(
            2,
            f"run.py: error: {out} holds results of an earlier run ({', '.join(found)}); "
            "use --resume to continue it, --overwrite to replace it, or another --out\n",
        )
    if not args.resume:
        return None
    stored = out / "config.json"
    if not stored.exists():
        if found:
            parser.exit(2, f"run.py: error: cannot --resume: {out} has results but no config.json\n")
        return None
    old = json.loads(stored.read_text())
    new = json.loads(json.dumps(config, default=str))  # as config.json stores it (tuples as lists)
    refused = []
    for key, a, b in _config_diff(old, new):
        shrinks = key == "rounds" and not (isinstance(a, int) and isinstance(b, int) and b >= a)
        if key in RESUMABLE and not shrinks:
            continue
        refused.append(f"{key}: {a!r} -> {b!r}")
    if refused:
        parser.exit(
            2,
            f"run.py: error: --resume with a config that differs from {stored}: {'; '.join(refused)} "
            f"(only {', '.join(RESUMABLE)} may change, rounds only up; use another --out for a new run)\n",
        )
    info = out / "run_info.json"
    return json.loads(info.read_text()) if info.exists() else None


def _config_diff(old, new, prefix=""):
    """``(dotted key, old, new)`` for each difference between two configs; a missing key is None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
    elif old != new:
        yield prefix[:-1], old, new


def _clear(out: pathlib.Path) -> None:
    """--overwrite: delete what an earlier run wrote in ``out`` (and only that)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run_repeats(config: dict, out: pathlib.Path, args) -> dict:
    t_start = time.perf_counter()
    progress = not args.no_progress
    repeats = int(config.get("repeats", 1))
    tables, summary = [], None
    for i in range(repeats):
        cfg = copy.deepcopy(config)
        cfg["seed"] = config["seed"] + i
        if "split_seed" in cfg["data"]:
            cfg["data"]["split_seed"] = config["data"]["split_seed"] + i
        run_out = out if i == 0 else out / "repeats" / str(i)
        run_out.mkdir(parents=True, exist_ok=True)
        if repeats > 1:
            print(f"repeat {i + 1}/{repeats} (seed {cfg['seed']})", flush=True)
        result = run_once(cfg, run_out, resume=args.resume, progress=progress, verbose=(i == 0))
        if summary is None:
            summary, records = result["summary"], result["records"]
        if result["table"] is not None:
            tables.append(result["table"])
    table = None
    if tables:
        table = {"client": tables[0]["client"], "test_sizes": tables[0]["test_sizes"]}
        for col in COLUMNS:
            if col in tables[0]:
                vals = np.array([t[col] for t in tables])
                table[col] = vals.mean(axis=0).tolist()
                table[f"{col}_std"] = vals.std(axis=0).tolist()
                table[f"{col}_weighted_all"] = [
                    float(np.dot(t["test_sizes"], t[col]) / np.sum(t["test_sizes"])) for t in tables
                ]
        table["repeats"] = repeats
        summary["per_client_test_accuracy"] = table
        print_table(table)
    summary["wall_sec"] = time.perf_counter() - t_start
    _write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=_jsonable))
    plot(records, table, out / "curves.png", config["name"])
    final = records[-1]
    shown = {
        k: round(final[k], 4)
        for k in ("test_accuracy", "fed_mean_accuracy", "fed_weighted_accuracy")
        if k in final
    }
    print(f"done in {summary['wall_sec']:.1f}s: {shown}; metrics, summary and plot in {out}", flush=True)
    return summary


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


COLUMNS = ("local", "nonprivate", "federated", "pooled")
HEADS = {"local": "alone", "nonprivate": "fed., no DP", "federated": "federated", "pooled": "pooled data"}


def print_table(table: dict) -> None:
    cols = [c for c in COLUMNS if c in table]
    heads = HEADS
    n = table["repeats"]
    print(f"\nHeld-out accuracy per client, mean +- sd over {n} random splits and seeds:")
    print(f"  {'client':<16}{'test n':>7}" + "".join(f"{heads[c]:>16}" for c in cols))
    for i, name in enumerate(table["client"]):
        print(
            f"  {name:<16}{int(table['test_sizes'][i]):>7}"
            + "".join(f"{table[c][i]:>9.3f} +-{table[c + '_std'][i]:.3f}" for c in cols)
        )
    print(
        f"  {'all (weighted)':<16}{int(np.sum(table['test_sizes'])):>7}"
        + "".join(
            f"{np.mean(table[c + '_weighted_all']):>9.3f} +-{np.std(table[c + '_weighted_all']):.3f}"
            for c in cols
        )
        + "\n",
        flush=True,
    )


def plot(records: list[dict], table: dict | None, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if table else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r["client_train_loss"] for r in records], label="client train loss", color="tab:gray")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for k, lab in (
        ("test_accuracy", "central test accuracy"),
        ("fed_mean_accuracy", "mean client test accuracy"),
    ):
        pts = [(r["round"], r[k]) for r in records if k in r]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker=".", label=lab)
    ax2.set_ylabel("accuracy")
    ax2.legend(loc="lower right")
    ax.set_title(title)
    if table:
        ax = axes[0, 1]
        cols = [c for c in COLUMNS if c in table]
        x = np.arange(len(table["client"]))
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar(x + j * width, table[c], width, yerr=table.get(f"{c}_std"), capsize=3, label=HEADS[c])
        ax.set_xticks(x + width * (len(cols) - 1) / 2, table["client"], rotation=15)
        ax.set_ylabel(f"held-out accuracy (mean +- sd, {table.get('repeats', 1)} splits)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
