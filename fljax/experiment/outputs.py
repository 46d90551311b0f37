"""What a run writes: strict JSON, atomic files, run facts, progress, TensorBoard, curves.

Strict JSON: every file the trainer writes is valid JSON (RFC 8259), written with
``allow_nan=False``. A non-finite float is stored as ``null`` with a sibling key
``"<key>_nonfinite"`` saying what it was: ``"inf"``, ``"-inf"`` or ``"nan"`` for a number; for a
list, a list of the same shape with that string where the value was non-finite and ``null``
elsewhere. :func:`restore` reads such a record back into floats.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time

import jax
import numpy as np


def append_line(path: pathlib.Path, line: str, *, crash: bool = False) -> None:
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


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once (write a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checkout() -> pathlib.Path:
    """The folder holding the ``fljax`` package (a git checkout for an editable install)."""
    return pathlib.Path(__file__).resolve().parents[2]


def run_info() -> dict:
    """Facts of this process: command line, git revision, versions of python, jax and every
    fljax dependency, platform and devices."""
    repo = _checkout()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    import jaxlib

    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {
        "argv": list(sys.argv),  # the command line of this process
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "dependencies": dependency_versions(),  # every requirement of fljax, as installed
        "device": str(devices[0]),
        "backend": jax.default_backend(),
        "devices": {"count": len(devices), "kinds": kinds},
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


COLUMNS = ("local", "nonprivate", "federated", "personalized", "pooled")
HEADS = {
    "local": "alone",
    "nonprivate": "fed., no DP",
    "federated": "federated",
    "personalized": "fed.+personal.",
    "pooled": "pooled data",
}


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


def plot(runs: list[list[dict]], table: dict | None, path: pathlib.Path, title: str) -> None:
    """``curves.png``: each curve is the mean over the repeats (``runs``: each repeat's per-round
    records) with a min-max band, on its own axis: client train loss, then test accuracy on a
    fixed 0-1 axis, then for a DP run epsilon against rounds; then the per-client bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    band = f"mean, band min-max over {n} repeats" if n > 1 else "1 run"
    has_eps = any("epsilon" in restore(r) for records in runs for r in records)
    panels = ["loss", "accuracy", *(["epsilon"] if has_eps else []), *(["table"] if table else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    ax_of = dict(zip(panels, axes[0], strict=True))
    for name in ("loss", "accuracy", "epsilon"):
        if name in ax_of:
            ax_of[name].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

    def draw(ax, key, label, color, marker=None):
        rounds, mean, lo, hi, _ = curve(runs, key)
        if not len(rounds):
            return False
        ax.plot(rounds, mean, color=color, marker=marker, label=label)
        if n > 1:
            ax.fill_between(rounds, lo, hi, color=color, alpha=0.2, linewidth=0)
        return True

    ax = ax_of["loss"]
    draw(ax, "client_train_loss_weighted_mean", "client train loss", "tab:gray")
    ax.set(xlabel="round", ylabel="client train loss", title=f"{title}: training loss ({band})")
    ax = ax_of["accuracy"]
    drawn = [
        draw(ax, "test_accuracy", "central test accuracy", "tab:blue", "."),
        draw(ax, "fed_mean_accuracy", "mean client test accuracy", "tab:orange", "."),
    ]
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=f"test accuracy ({band})")
    if any(drawn):
        ax.legend(loc="lower right")
    if has_eps:
        ax = ax_of["epsilon"]
        draw(ax, "epsilon", "epsilon spent", "tab:red")
        ax.set_ylim(bottom=0)
        ax.set(
            xlabel="round",
            ylabel="epsilon (accounted, seeded noise: a simulation)",
            title="privacy spent",
        )
    if table:
        ax = ax_of["table"]
        cols = [c for c in COLUMNS if c in table]
        x = np.arange(len(table["client"]))
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar(x + j * width, table[c], width, yerr=table.get(f"{c}_std"), capsize=3, label=HEADS[c])
        ax.set_xticks(x + width * (len(cols) - 1) / 2, table["client"], rotation=15)
        ax.set_ylabel(f"held-out accuracy (mean +- sd, {table.get('repeats', 1)} splits)")
        ax.set_ylim(0, 1)
        ax.set_title("final accuracy per client")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NONFINITE = "_nonfinite"


def _nonfinite_kind(x: float) -> str:
    return "nan" if x != x else ("inf" if x > 0 else "-inf")


def strict(obj):
    """``obj`` as plain JSON values, non-finite floats replaced by ``None`` (see ``_strict_dict``)."""
    return _strict_value(obj)[0]


def _strict_value(obj):
    """(JSON value, flags): flags mirror the value where it had non-finite floats, else None."""
    if isinstance(obj, dict):
        return _strict_dict(obj), None
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj, None
    if isinstance(obj, float):
        return (obj, None) if np.isfinite(obj) else (None, _nonfinite_kind(obj))
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "tolist"):
        return _strict_value(obj.tolist())
    if isinstance(obj, list | tuple):
        pairs = [_strict_value(v) for v in obj]
        flags = [f for _, f in pairs]
        return [v for v, _ in pairs], (flags if any(f is not None for f in flags) else None)
    return _jsonable(obj), None


def _strict_dict(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        value, flags = _strict_value(v)
        out[str(k)] = value
        if flags is not None:
            out[f"{k}{NONFINITE}"] = flags
    return out


def dumps(obj, **kwargs) -> str:
    """Strict JSON text of ``obj``: an invalid file (NaN, Infinity) can never be written."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def restore(record: dict) -> dict:
    """Undo ``strict`` on one flat record: ``null`` plus ``<key>_nonfinite`` back to a float.

    A key ending in ``_nonfinite`` is a flag only beside a ``null`` (or list) value of its base
    key: a metric of that name (the aggregators' ``num_nonfinite`` count) is kept as it is.
    """
    out = dict(record)
    for k, v in record.items():
        base = k[: -len(NONFINITE)]
        if not (k.endswith(NONFINITE) and base in record):
            continue
        if isinstance(v, str) and record[base] is None:
            out[base] = float(v)
            del out[k]
        elif isinstance(v, list) and isinstance(record[base], list) and len(v) == len(record[base]):
            out[base] = [float(f) if isinstance(f, str) else x for x, f in zip(record[base], v, strict=True)]
            del out[k]
    return out


def dependency_versions() -> dict:
    """Installed version of every dependency of the ``fljax`` distribution (extras included)."""
    import importlib.metadata as metadata
    import re

    try:
        requires = metadata.requires("fljax") or []
    except metadata.PackageNotFoundError:
        return {}
    versions = {}
    for req in requires:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None  # an optional extra that is not installed
    return versions


class Progress:
    """Progress of one training: tqdm when stderr is a terminal, else plain lines on stderr.

    The plain line, e.g. ``federated: round 10/30: client_train_loss_weighted_mean=0.512 fed_mean_accuracy=0.810
    (1.2 s/round)``, comes every ``max(1, rounds // 10)`` rounds and after the last round of a
    run that writes a folder; a training without a folder (a baseline) prints only its last line.
    """

    SHOWN = ("client_train_loss_weighted_mean", "test_accuracy", "fed_mean_accuracy", "epsilon")

    def __init__(self, rounds: int, start: int, *, desc: str, enabled: bool, every_line: bool):
        self.rounds, self.start, self.desc, self.enabled = rounds, start, desc, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, rounds // 10) if every_line else 0
        self.t0, self.last = time.perf_counter(), None
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=rounds, initial=start, desc=desc, leave=False, dynamic_ncols=True)

    def _shown(self, record: dict) -> dict:
        return {k: record[k] for k in self.SHOWN if isinstance(record.get(k), float | int)}

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        self.last = record
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in self._shown(record).items()})
        elif self.every and record["round"] % self.every == 0 and record["round"] != self.rounds:
            self._line(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.last is not None:
            self._line(self.last)

    def _line(self, record: dict) -> None:
        done = record["round"] - self.start
        rate = (time.perf_counter() - self.t0) / max(done, 1)
        shown = " ".join(f"{k}={v:.3f}" for k, v in self._shown(record).items())
        print(
            f"{self.desc}: round {record['round']}/{self.rounds}: {shown} ({rate:.2g} s/round)",
            file=sys.stderr,
            flush=True,
        )


TENSORBOARD = "tensorboard"  # event files of a run folder, one scalar per metric and round


def tensorboard_writer(out_dir, start: int):
    """A tensorboardX writer for ``out_dir/tensorboard`` (no TensorFlow needed), or None.

    A resumed run gives ``purge_step=start + 1``: TensorBoard then hides the events of rounds
    after ``start`` written before the interruption (they are recomputed). A fresh run first
    removes event files left by an earlier run of the folder.
    """
    if out_dir is None:
        return None
    from tensorboardX import SummaryWriter

    logdir = pathlib.Path(out_dir) / TENSORBOARD
    if not start and logdir.is_dir():
        for p in logdir.glob("events.out.tfevents.*"):
            p.unlink()
    return SummaryWriter(str(logdir), purge_step=start + 1 if start else None)


def tensorboard_scalars(writer, record: dict) -> None:
    """Every finite number of a round record as a scalar at step ``round``; a list ``k`` as
    ``k/<i>``. Non-finite values (the infinite epsilon of a run without noise, a NaN loss) are
    left out: TensorBoard cannot draw them, and metrics.jsonl keeps them with their flag."""
    if writer is None:
        return
    step = int(record["round"])
    for k, v in restore(record).items():
        if k == "round" or isinstance(v, bool):
            continue
        if isinstance(v, int | float) and np.isfinite(v):
            writer.add_scalar(k, float(v), step)
        elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
            for i, x in enumerate(v):
                if np.isfinite(x):
                    writer.add_scalar(f"{k}/{i}", float(x), step)


def curve(runs: list[list[dict]], key: str):
    """(rounds, mean, min, max, n) of ``key`` over the repeats that report it at each round."""
    by_round: dict[int, list[float]] = {}
    for records in runs:
        for r in map(restore, records):
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                by_round.setdefault(int(r["round"]), []).append(float(v))
    rounds = sorted(by_round)
    vals = [np.array(by_round[t]) for t in rounds]
    return (
        np.array(rounds),
        np.array([v.mean() for v in vals]),
        np.array([v.min() for v in vals]),
        np.array([v.max() for v in vals]),
        max((len(v) for v in vals), default=0),
    )
