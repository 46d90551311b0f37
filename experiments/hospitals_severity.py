"""Should each hospital federate to predict heart-disease severity? Alone vs federated vs pooled.

Command (writes experiments/results/hospitals_severity.{md,json}):
  python experiments/hospitals_severity.py [--out EMPTY_FOLDER] [--set key=value ...]

Runs ``experiments/configs/hospitals_severity.py`` (the 4 hospitals, 5-level ``num`` target)
once per repeat, exactly as ``python experiments/run.py --config hospitals_severity`` does
(``trainer.repeat_config``: seeds and splits ``0 .. repeats - 1``), keeps each repeat's
per-hospital table (accuracy and balanced accuracy of each hospital's held-out patients under
its own model, the federated model and the pooled model), and reports per hospital the mean
+- sd over repeats and the paired difference federated - alone (same split and seed). Verdict
per hospital and metric: "helps" when the mean paired difference is positive and federating
wins in at least 4 of 5 repeats, "hurts" when it is negative and loses in at least 4 of 5,
"no clear difference" otherwise. Also writes each site's class counts (whole file, and the
train/held-out split of repeat 0).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from fljax import experiment
from fljax.data.datasets import heart_disease
from fljax.experiment import outputs, trainer

HERE = pathlib.Path(__file__).resolve().parent
COLUMNS = ("local", "federated", "pooled")
NOTES = "## Reading"  # the .md's text from this heading on is kept when the tables are rewritten


def _class_counts(config) -> dict:
    """Patients per level at each site: in the file, and in repeat 0's train and held-out parts."""
    frame = heart_disease.read_csv(config.data.path)
    counts = {
        heart_disease.SITE_NAMES[s]: np.bincount(
            frame.loc[frame["site"] == s, "target"].to_numpy(np.int64), minlength=5
        ).tolist()
        for s in heart_disease.SITES
    }
    d = heart_disease.load(
        test_fraction=config.data.test_fraction, seed=config.data.split_seed, target="severity"
    )
    split = {
        name: {
            "train": np.bincount(d.train.client(c)[1], minlength=5).tolist(),
            "test": np.bincount(d.test.client(c)[1], minlength=5).tolist(),
        }
        for c, name in enumerate(d.train.client_names)
    }
    return {"file": counts, "split_seed_0": split}


def _verdict(diffs: np.ndarray) -> str:
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    need = len(diffs) - 1 if len(diffs) > 2 else len(diffs)
    if diffs.mean() > 0 and wins >= need:
        return "helps"
    if diffs.mean() < 0 and losses >= need:
        return "hurts"
    return "no clear difference"


def _summarise(tables: list[dict]) -> dict:
    """Per hospital and metric: values per repeat, mean, sd, paired differences and verdicts."""
    names = tables[0]["client"]
    out = {}
    for metric in ("accuracy", "balanced_accuracy"):

        def values(col, metric=metric):  # [repeats, hospitals]
            rows = [t[col] if metric == "accuracy" else t["metrics"][metric][col] for t in tables]
            return np.array(rows, np.float64)

        per = {}
        for c, name in enumerate(names):
            entry = {col: values(col)[:, c].tolist() for col in COLUMNS}
            for col in COLUMNS:
                entry[f"{col}_mean"] = float(np.mean(entry[col]))
                entry[f"{col}_sd"] = float(np.std(entry[col]))
            for col in ("federated", "pooled"):
                d = values(col)[:, c] - values("local")[:, c]
                entry[f"{col}_minus_alone"] = d.tolist()
                entry[f"{col}_minus_alone_mean"] = float(d.mean())
                entry[f"{col}_minus_alone_sd"] = float(d.std())
                entry[f"{col}_wins"] = int((d > 0).sum())
                entry[f"{col}_verdict"] = _verdict(d)
            per[name] = entry
        out[metric] = per
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=None, help="an empty folder for the runs (default: a new temporary one)"
    )
    parser.add_argument("--results", default=str(HERE / "results" / "hospitals_severity"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    path = HERE / "configs" / "hospitals_severity.py"
    config = experiment.load_config(path, args.set)
    t0 = time.perf_counter()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="hospitals_severity_"))
    tables = []
    for i in range(config.repeats):
        (out / str(i)).mkdir(parents=True, exist_ok=True)
        result = trainer.run_once(
            trainer.repeat_config(config, i), out / str(i), progress=False, verbose=False
        )
        tables.append(result["table"])
        print(f"repeat {i + 1}/{config.repeats} done", flush=True)
    seconds = time.perf_counter() - t0
    result = {
        "config": experiment.config.to_dict(config),
        "overrides": args.set,
        "class_counts": _class_counts(config),
        "test_sizes": {"split_seed_0": dict(zip(tables[0]["client"], tables[0]["test_sizes"], strict=True))},
        "per_hospital": _summarise(tables),
        "tables": tables,
        "seconds": seconds,
        "run": {"jax": jax.__version__, "cpus": os.cpu_count()},
    }
    results = pathlib.Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(outputs.dumps(result, indent=1) + "\n")
    text = _markdown(result, args.set)
    md = results.with_suffix(".md")
    notes = md.read_text().partition(NOTES) if md.exists() else ("", "", "")
    if notes[1]:  # the hand-written reading of the tables is kept
        text += "\n" + notes[1] + notes[2]
    md.write_text(text)
    print(text)
    return result


def _markdown(result: dict, overrides: list[str]) -> str:
    config = result["config"]
    repeats = config["repeats"]
    cmd = "python experiments/hospitals_severity.py" + "".join(f" --set {s}" for s in overrides)
    lines = [
        "# Hospitals, second medical case: 5-level heart-disease severity, alone vs federated vs pooled",
        "",
        "Config: `experiments/configs/hospitals_severity.py` (the 4 UCI hospitals, target `num` 0-4,"
        f" MLP {config['model']['hidden']}, FedAvg over all 4 hospitals each round, {config['rounds']} rounds of"
        f" 1 local epoch; alone: the same {config['rounds']} epochs on the hospital's own data; pooled: one"
        f" model on all training patients). {repeats} repeats (split and seed 0-{repeats - 1}); each hospital"
        " scored on its own held-out quarter.",
        "",
        f"Command: `nice -n 10 {cmd}` (the same runs as `python experiments/run.py --config"
        f" hospitals_severity`). Hardware: 2-core CPU shared with other jobs, jax {result['run']['jax']}."
        f" Runtime: {result['seconds']:.0f} s.",
        "",
        "## Class counts per site (patients per severity level 0 / 1 / 2 / 3 / 4)",
        "",
        "| site | whole file | train (split 0) | held out (split 0) | share healthy (level 0) |",
        "|---|---|---|---|---:|",
    ]
    counts = result["class_counts"]
    for name, row in counts["file"].items():
        split = counts["split_seed_0"][name]
        fmt = lambda v: " / ".join(map(str, v))
        lines.append(
            f"| {name} | {fmt(row)} | {fmt(split['train'])} | {fmt(split['test'])} | {row[0] / sum(row):.0%} |"
        )
    for metric, title in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")):
        lines += [
            "",
            f"## {title} per hospital (mean +- sd over {repeats} repeats)",
            "",
            "| hospital | alone | federated | pooled | federated - alone (paired) | wins | federating |"
            " pooled - alone |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for name, e in result["per_hospital"][metric].items():
            cells = [f"{e[f'{c}_mean']:.3f} +- {e[f'{c}_sd']:.3f}" for c in COLUMNS]
            lines.append(
                f"| {name} | {' | '.join(cells)} | {e['federated_minus_alone_mean']:+.3f} +-"
                f" {e['federated_minus_alone_sd']:.3f} | {e['federated_wins']}/{repeats} |"
                f" {e['federated_verdict']} | {e['pooled_minus_alone_mean']:+.3f} |"
            )
    lines += [
        "",
        'Verdict rule: "helps" when the mean paired difference (federated - alone, same split and'
        f' seed) is positive and federating wins in at least {repeats - 1} of {repeats} repeats; "hurts"'
        ' symmetrically; otherwise "no clear difference". Balanced accuracy: mean recall over the'
        " levels present in that hospital's held-out patients (Hungary: levels 0 and 1 only).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
