"""Gathers finished runs into one table, one JSON file and one plot (e.g. a privacy sweep).

Usage::

  python experiments/summarize.py RUN_DIR [RUN_DIR ...] --out PREFIX

Reads each run folder the trainer wrote (``config.json``, ``summary.json``, ``metrics.jsonl``,
``run_info.json``) and writes:

- ``PREFIX.json`` (strict JSON, see :mod:`fljax.experiment.outputs`: an infinite epsilon is
  ``null`` with ``"epsilon_nonfinite": "inf"``): for each run its name, the config keys that
  differ between the runs, the final test accuracy (and mean client accuracy when measured),
  epsilon as the run accounted it (``summary.json``, RDP) and the PLD epsilon recomputed with
  :func:`fljax.privacy.epsilon` for the same ``DPConfig`` and rounds, wall seconds, the command
  that reproduces it and the evaluation curve;
- ``PREFIX.md``: one row per run (non-private first, then by noise multiplier), the settings
  the runs share, hardware, jax version, total seconds and the commands;
- ``PREFIX.png``: test accuracy against epsilon for the private runs, a horizontal line for
  each run without a finite epsilon (non-private, or clipped without noise), and test accuracy
  against rounds for every run.

Each run is labelled by the config keys in which it differs from the others (``name``
excepted), e.g. ``dp.noise_multiplier=2.0`` or ``dp=None``. The commands shown are those that
reproduce the runs into ``runs/<name>`` (the ``--out``, ``--no-progress``, ``--resume`` and
``--overwrite`` of the recorded command line dropped). A folder without ``summary.json`` (an
unfinished run) is an error naming it: exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import sys

from fljax import privacy
from fljax.experiment import config as cfg
from fljax.experiment import outputs

DROPPED_FLAGS = ("--no-progress", "--resume", "--overwrite")  # do not change what a run computes
ABSENT = "<absent>"  # a key one run's config does not have (another data type, a None section)


class RunError(ValueError):
    """A folder that is not a finished run; one line, exit code 2."""


# ----------------------------------------------------------------------------- reading a run


def _restore_tree(value):
    """:func:`outputs.restore` at every level of nested dicts and lists."""
    if isinstance(value, dict):
        return {k: _restore_tree(v) for k, v in outputs.restore(value).items()}
    if isinstance(value, list):
        return [_restore_tree(v) for v in value]
    return value


def _read_json(path: pathlib.Path, folder: pathlib.Path):
    try:
        return _restore_tree(json.loads(path.read_text()))
    except ValueError as e:
        raise RunError(f"{folder}: {path.name} is not valid JSON ({e})") from None


def load_run(folder: str | os.PathLike) -> dict:
    """One finished run: its config (typed and as stored), summary, metrics rows and run facts."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise RunError(f"{folder}: no such run folder")
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        if not (folder / name).is_file():
            unfinished = (
                " (an unfinished run? only a finished run writes it)" if name == "summary.json" else ""
            )
            raise RunError(f"{folder}: no {name}{unfinished}")
    stored = _read_json(folder / "config.json", folder)
    try:
        config = cfg.from_dict(cfg.Config, stored)
    except cfg.ConfigError as e:
        raise RunError(f"{folder}: config.json is not a config of this fljax ({e})") from None
    rows = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(outputs.restore(json.loads(line)))
        except ValueError:
            break  # a torn last line
    info = folder / "run_info.json"
    return {
        "folder": folder,
        "stored": stored,
        "config": config,
        "summary": _read_json(folder / "summary.json", folder),
        "metrics": rows,
        "info": _read_json(info, folder) if info.is_file() else {},
    }


# ----------------------------------------------------------------------------- differing keys


def _differences(values: list, key: str = "") -> list[dict]:
    """For each run, ``{dotted key: value}`` of the config keys in which the runs differ.

    Sections are compared key by key; where some runs have a section and others a plain value
    (``dp=None``), the plain values label their runs and the sections are compared among
    themselves (``dp.noise_multiplier=2.0``).
    """
    out: list[dict] = [{} for _ in values]
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        for k in keys:
            sub = [v.get(k, ABSENT) for v in values]
            for d, diff in zip(out, _differences(sub, f"{key}{k}."), strict=True):
                d.update(diff)
        return out
    if all(v == values[0] for v in values):
        return out
    name = key[:-1]
    sections = [i for i, v in enumerate(values) if isinstance(v, dict)]
    for i, v in enumerate(values):
        if i not in sections:
            out[i][name] = v
    inner = _differences([values[i] for i in sections], key)
    for i, diff in zip(sections, inner, strict=True):
        out[i].update(diff or {name: values[i]})
    return out


def _shared(values: list[dict], key: str = "") -> dict:
    """``{dotted key: value}`` of the leaves every run that has them agrees on."""
    out = {}
    sections = [v for v in values if isinstance(v, dict)]
    for k in dict.fromkeys(k for v in sections for k in v):
        sub = [v[k] for v in sections if k in v]
        if any(isinstance(v, dict) for v in sub):
            out.update(_shared(sub, f"{key}{k}."))
        elif all(v == sub[0] for v in sub):
            out[f"{key}{k}"] = sub[0]
    return out


def _value_text(v) -> str:
    if isinstance(v, dict):
        return "{...}"
    if isinstance(v, list):
        return "(" + ", ".join(map(_value_text, v)) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def _label(diff: dict) -> str:
    return ", ".join(f"{k}={_value_text(v)}" for k, v in diff.items())


def _non_default(config, key: str = "") -> dict:
    """``{dotted key: value}`` of the fields of a typed config that differ from their type's
    defaults (a section's ``name`` always shown: it says which type the section is)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_non_default(v, f"{key}{f.name}."))
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.name == "name" or default is dataclasses.MISSING or v != default:
            out[f"{key}{f.name}"] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------- one row per run


def _command(info: dict) -> str | None:
    """The command that reproduces a run into ``runs/<name>`` (None: not run by run.py)."""
    argv = list(info.get("argv") or [])
    if not argv or pathlib.Path(argv[0]).name != "run.py":
        return None
    args, rest = [], argv[1:]
    while rest:
        a = rest.pop(0)
        if a == "--out":
            rest = rest[1:]
        elif not (a in DROPPED_FLAGS or a.startswith("--out=")):
            args.append(a)
    return shlex.join(["python", "experiments/run.py", *args])


def _population(config: cfg.Config, privacy_spent: dict) -> int:
    population = cfg.population_size(config)  # Images: data.num_clients
    return population if population is not None else int(privacy_spent["population_size"])


def _epsilons(run: dict) -> dict:
    """RDP epsilon as the run accounted it, PLD epsilon recomputed for the same DPConfig."""
    config, spent = run["config"], run["summary"].get("privacy", {})
    if config.dp is None:
        return {"epsilon": math.inf, "epsilon_pld": math.inf, "delta": None, "noise_multiplier": None}
    dp = cfg.dp_config(config, _population(config, spent))
    rounds = int(spent.get("rounds", config.rounds))
    rdp = privacy.epsilon(dp, rounds, accountant="rdp")
    if spent.get("accountant", "rdp") == "rdp":  # report what the run accounted, once checked
        recorded = spent.get("epsilon")
        if not (isinstance(recorded, float) and math.isclose(recorded, rdp, rel_tol=1e-6)):
            raise RunError(
                f"{run['folder']}: summary.json records epsilon {recorded} but config.json's DP "
                f"config gives {rdp} after {rounds} rounds: the files do not belong together"
            )
        rdp = recorded
    try:
        pld = privacy.epsilon(dp, rounds, accountant="pld")
    except ValueError:  # fixed-size sampling: dp_accounting has no PLD for it
        pld = None
    return {
        "epsilon": rdp,
        "epsilon_pld": pld,
        "delta": dp.target_delta,
        "noise_multiplier": dp.noise_multiplier,
    }


CURVE_KEYS = ("test_accuracy", "fed_mean_accuracy", "client_train_loss_weighted_mean", "epsilon")


def _row(run: dict, diff: dict) -> dict:
    summary, final = run["summary"], run["summary"].get("final", {})
    evals = [r for r in run["metrics"] if "test_accuracy" in r or "fed_mean_accuracy" in r]
    row = {
        "name": run["config"].name,
        "label": _label(diff) or run["config"].name,
        "differs": diff,
        **_epsilons(run),
        "rounds": len(run["metrics"]),
        "final_test_accuracy": final.get("test_accuracy"),
    }
    if "fed_mean_accuracy" in final:
        row["final_fed_mean_accuracy"] = final["fed_mean_accuracy"]
    row |= {
        "wall_sec": summary.get("wall_sec"),
        "command": _command(run["info"]),
        "git_sha": run["info"].get("git_sha"),
        "git_dirty": run["info"].get("git_dirty"),
        "privacy": summary.get("privacy", {}),
        "curve": [{"round": r["round"], **{k: r[k] for k in CURVE_KEYS if k in r}} for r in evals],
    }
    return row


def _order(row: dict):
    z = row["noise_multiplier"]
    return (z is not None, z if z is not None else 0.0, row["name"])


# ----------------------------------------------------------------------------- writing


def summarize(folders: list, prefix: str | os.PathLike, *, command: str | None = None) -> dict:
    """Reads the run ``folders`` and writes ``prefix.{json,md,png}``; returns what the JSON holds."""
    runs = [load_run(f) for f in folders]
    names = [r["config"].name for r in runs]
    if len(set(map(str, (r["folder"].resolve() for r in runs)))) != len(runs):
        raise RunError(f"a run folder is given twice: {', '.join(map(str, folders))}")
    stored = [{k: v for k, v in r["stored"].items() if k != "name"} for r in runs]
    rows = sorted((_row(r, d) for r, d in zip(runs, _differences(stored), strict=True)), key=_order)
    infos = [r["info"] for r in runs]
    commands = [row["command"] for row in rows]
    if all(commands):  # every run reproducible into runs/<name>: show those folders
        shown = [f"runs/{row['name']}" for row in rows]
    else:
        shown = [str(f) for f in folders]
    summarize_command = command or shlex.join(
        ["python", "experiments/summarize.py", *shown, "--out", str(prefix)]
    )
    shared = _shared(stored)
    non_default = set().union(*(_non_default(r["config"]) for r in runs))
    payload = {
        "runs": rows,
        "differing_keys": list(dict.fromkeys(k for row in rows for k in row["differs"])),
        "shared_config": {k: v for k, v in shared.items() if k in non_default},
        "cpu_count": _same(infos, "cpu_count", os.cpu_count()),
        "backend": _same(infos, "backend", None),
        "device": _same(infos, "device", None),
        "platform": _same(infos, "platform", None),
        "jax": _same(infos, "jax", None),
        "jaxlib": _same(infos, "jaxlib", None),
        "git_sha": _same(infos, "git_sha", None),
        "total_wall_sec": sum(row["wall_sec"] or 0.0 for row in rows),
        "commands": [c for c in commands if c] + [summarize_command],
    }
    if len(set(names)) != len(names):
        payload["note"] = "several runs share a name: tell them apart by their differing keys"
    prefix = pathlib.Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_atomic(prefix.with_name(prefix.name + ".json"), outputs.dumps(payload, indent=1) + "\n")
    outputs.write_atomic(prefix.with_name(prefix.name + ".md"), markdown(payload, prefix.name))
    plot(payload, prefix.with_name(prefix.name + ".png"), prefix.name)
    return payload


def _same(infos: list[dict], key: str, default):
    """The run facts' ``key`` when every run agrees (``a / b`` when they do not)."""
    values = list(dict.fromkeys(str(i[key]) for i in infos if i.get(key) is not None))
    if not values:
        return default
    return infos[0][key] if len(values) == 1 else " / ".join(values)


def _number(x, digits: int) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _revisions(rows: list[dict]) -> str:
    shas = list(dict.fromkeys(str(r["git_sha"])[:10] for r in rows if r["git_sha"]))
    text = " / ".join(shas) or "unknown"
    text += " (runs differ: see each run's git_sha in the JSON)" if len(shas) > 1 else ""
    return text + (" with uncommitted changes" if any(r["git_dirty"] for r in rows) else "")


def markdown(payload: dict, title: str) -> str:
    """The table of :func:`summarize` as markdown."""
    rows = payload["runs"]
    fed = any("final_fed_mean_accuracy" in r for r in rows)
    heads = ["run", "differs", "noise multiplier z", "epsilon (RDP)", "epsilon (PLD)", "test accuracy"]
    heads += ["mean client accuracy"] if fed else []
    lines = [
        f"# {title}: test accuracy against epsilon",
        "",
        "Shared settings (non-default config values): "
        + ", ".join(f"`{k}={_value_text(v)}`" for k, v in payload["shared_config"].items())
        + ".",
        "",
    ]
    private = [r for r in rows if r["noise_multiplier"] is not None]
    if private:
        spent = private[0]["privacy"]
        deltas = sorted({r["delta"] for r in private})
        lines += [
            f"Privacy: unit of privacy one {spent.get('unit_of_privacy', 'client')}, "
            f"{spent.get('neighboring_relation', '?').replace('_', ' ')}, "
            f"delta = {' / '.join(f'{d:.3g}' for d in deltas)}; {spent.get('sampling', '?')} sampling "
            f"q = {spent.get('sampling_probability', float('nan')):g}. Epsilon (RDP) is what the run "
            "accounted (`summary.json`); epsilon (PLD) is recomputed by summarize.py with "
            '`fljax.privacy.epsilon(..., accountant="pld")` for the same DPConfig and rounds. '
            "Noise is drawn from seeded JAX keys: a reproducible simulation. "
            + (
                "A run with z = 0 clips but adds no noise: not private (epsilon = inf)."
                if any(r["noise_multiplier"] == 0 for r in private)
                else ""
            ),
            "",
        ]
    lines += [
        "| " + " | ".join([*heads, "seconds"]) + " |",
        "|" + "---|" * (len(heads) + 1),
    ]
    for r in rows:
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        cells = [
            r["name"],
            f"`{r['label']}`" if r["differs"] else "-",
            z,
            _number(r["epsilon"], 2),
            _number(r["epsilon_pld"], 2),
            _number(r["final_test_accuracy"], 4),
        ]
        cells += [_number(r.get("final_fed_mean_accuracy"), 4)] if fed else []
        cells.append(_number(r["wall_sec"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    backend = f", jax backend {payload['backend']}" if payload["backend"] else ""
    lines += [
        "",
        f"Hardware: {payload['cpu_count']} CPU cores{backend} ({payload['device']}); "
        f"jax {payload['jax']} (jaxlib {payload['jaxlib']}); fljax at git {_revisions(rows)}. "
        f"Total {payload['total_wall_sec']:.0f} s: the runs' wall seconds (`summary.json`), run one "
        "after another.",
        "",
        "Commands:",
        "",
        "```",
        *payload["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(payload: dict, path: pathlib.Path, title: str) -> None:
    """Accuracy against epsilon (private runs; lines for the others) and against rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    finite = [r for r in rows if r["epsilon"] is not None and math.isfinite(r["epsilon"])]
    others = [r for r in rows if r not in finite and r["final_test_accuracy"] is not None]
    for r in others:
        style = "--" if r["noise_multiplier"] is None else ":"
        ax1.axhline(
            r["final_test_accuracy"], linestyle=style, color="gray", label=f"{r['label']} (eps = inf)"
        )
    if finite:
        xs = [r["epsilon"] for r in finite]
        ys = [r["final_test_accuracy"] for r in finite]
        ax1.plot(xs, ys, "o-", label="RDP epsilon (as accounted)")
        pld = [(r["epsilon_pld"], r["final_test_accuracy"]) for r in finite if r["epsilon_pld"] is not None]
        if pld:
            ax1.plot(*zip(*pld, strict=True), "x", color="tab:orange", label="PLD epsilon, same runs")
        for r in finite:
            ax1.annotate(
                f"z={r['noise_multiplier']:g}",
                (r["epsilon"], r["final_test_accuracy"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
            )
        ax1.set_xscale("log")
    deltas = sorted({r["delta"] for r in finite})
    at = f" at delta = {' / '.join(f'{d:.3g}' for d in deltas)}" if deltas else ""
    ax1.set(xlabel=f"epsilon{at}", ylabel="final test accuracy", title=f"{title}: accuracy vs epsilon")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    for r in rows:
        points = [(p["round"], p["test_accuracy"]) for p in r["curve"] if "test_accuracy" in p]
        if points:
            ax2.plot(*zip(*points, strict=True), ".-", label=r["label"])
    ax2.set(xlabel="round", ylabel="test accuracy", title="test accuracy vs round")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """The command line; returns what ``PREFIX.json`` holds."""
    parser = argparse.ArgumentParser(
        prog="summarize.py",
        description=__doc__.split("\n\n")[0],
        epilog="Writes PREFIX.json, PREFIX.md and PREFIX.png.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by run.py")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="e.g. experiments/results/dp_mnist")
    args = parser.parse_args(argv)
    try:
        payload = summarize(args.runs, args.out)
    except RunError as e:
        print(f"summarize.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"{len(payload['runs'])} runs -> {args.out}.json, .md, .png", flush=True)
    return payload


if __name__ == "__main__":
    main()
