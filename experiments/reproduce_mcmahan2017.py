"""McMahan et al. 2017, MNIST: rounds of FedAvg to the target accuracy, beside the paper's tables.

Command (writes experiments/results/mcmahan2017.{md,json,png}):
  python experiments/reproduce_mcmahan2017.py [--cells 2nn-iid-e1-b10 ...] [--rounds CELL=N ...]
      [--out runs/mcmahan2017]

Each cell is ``experiments/configs/mcmahan2017_mnist.py`` with ``--set`` overrides for the model
(2NN: target 97%, CNN: target 99%), the partition (IID or 2 label shards of 300 per client), E
and B; C = 0.1 of K = 100 clients, one fixed learning rate per model (the config's docstring
says why), one seed, evaluated on the 10,000 test images after every round. A run stops at the
first round that reaches the target (``stop_at_accuracy``); otherwise at its cap (:data:`CELLS`,
``--rounds``), and the table says "not reached in N rounds" with the accuracy at N. Rounds to
target is that first round, read from the evaluated curve (``metrics.jsonl``).

``--cells`` runs the named cells in order (default: every cell, in the priority order of
:data:`CELLS`); a finished run of the same config is reused and a run with a smaller cap is
resumed (``rounds`` may grow), so the grid can be run in pieces and the table always covers every
cell that has a run. Cells without a run are listed as not run, with the estimated cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import time

import jax

from fljax import experiment
from fljax.experiment import outputs

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "mcmahan2017_mnist.py"
TARGETS = {"2nn": 0.97, "cnn": 0.99}
MODELS = {"2nn": "mlp", "cnn": "mcmahan_cnn"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (model, partition, E, B) cell of the paper's tables, its published rounds to target
    (None: not checked here) and the round cap of this reproduction."""

    model: str  # "2nn" or "cnn"
    partition: str  # "iid" or "shards"
    epochs: int
    batch: int
    paper: int | None
    cap: int

    @property
    def name(self) -> str:
        return f"{self.model}-{'iid' if self.partition == 'iid' else 'noniid'}-e{self.epochs}-b{self.batch}"


# Priority order. Paper values: the 2NN at E=1, B=10 from Table 1 (C = 0.1 row); the CNN from
# Table 2. The other 2NN cells' values are in the arXiv version's appendix and were not checked
# here. Caps: about 3x the paper's rounds where the 2-core CPU allows it (the 2NN: about 1 s a
# round), else what fits: the CNN at E=5, B=10 took 2-4 minutes a round on the shared 2-core CPU,
# so its IID cell is capped at 10 rounds (half the paper's 20) and the other CNN cells were not run.
CELLS = [
    Cell("2nn", "iid", 1, 10, 87, 300),
    Cell("2nn", "shards", 1, 10, 664, 700),
    Cell("cnn", "iid", 5, 10, 20, 30),
    Cell("cnn", "shards", 5, 10, 229, 20),
    Cell("cnn", "iid", 1, 10, 34, 100),
    Cell("cnn", "shards", 1, 10, 350, 100),
    Cell("cnn", "iid", 5, 50, 29, 90),
    Cell("cnn", "shards", 5, 50, 334, 90),
    Cell("cnn", "iid", 1, 50, 65, 200),
    Cell("cnn", "shards", 1, 50, 600, 200),
    Cell("2nn", "iid", 5, 10, None, 300),
    Cell("2nn", "shards", 5, 10, None, 200),
    Cell("2nn", "iid", 1, 50, None, 300),
    Cell("2nn", "shards", 1, 50, None, 1000),
    Cell("2nn", "iid", 5, 50, None, 300),
    Cell("2nn", "shards", 5, 50, None, 1000),
]
BY_NAME = {c.name: c for c in CELLS}


def overrides(cell: Cell, rounds: int) -> list[str]:
    """The ``--set`` overrides of the config for ``cell`` (also the documented command)."""
    return [
        f"model.name={MODELS[cell.model]}",
        f"data.partition={cell.partition}",
        f"client.num_epochs={cell.epochs}",
        f"client.batch_size={cell.batch}",
        f"stop_at_accuracy={TARGETS[cell.model]}",
        f"rounds={rounds}",
        f"checkpoint_every={5 if cell.model == 'cnn' else 100}",
        f"name=mcmahan2017_{cell.name}",
    ]


def _stored(out: pathlib.Path) -> dict | None:
    try:
        return json.loads((out / "config.json").read_text())
    except FileNotFoundError:
        return None


def _rows(out: pathlib.Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_cell(cell: Cell, rounds: int, out: pathlib.Path) -> None:
    """Runs (or resumes, or reuses) ``cell`` up to ``rounds`` rounds into ``out``; adds the wall
    seconds of this process's part to ``out/wall_seconds.json``."""
    config = experiment.load_config(CONFIG, overrides(cell, rounds))
    stored, rows = _stored(out), _rows(out)
    new = json.loads(outputs.dumps(experiment.config.to_dict(config)))
    same = stored is not None and {k: v for k, v in stored.items() if k != "rounds"} == {
        k: v for k, v in new.items() if k != "rounds"
    }
    reached = any(r.get("test_accuracy", 0.0) >= config.stop_at_accuracy for r in rows)
    if same and (reached or len(rows) >= rounds):  # its metrics are all the table needs
        print(f"{cell.name}: finished run reused ({len(rows)} rounds)", flush=True)
        return
    resume = same and stored["rounds"] <= rounds
    t0 = time.perf_counter()
    experiment.run(config, out, resume=resume, overwrite=not resume, progress=True)
    wall = out / "wall_seconds.json"
    parts = json.loads(wall.read_text()) if (resume and wall.exists()) else []
    wall.write_text(json.dumps([*parts, time.perf_counter() - t0]) + "\n")


def result(cell: Cell, out: pathlib.Path) -> dict:
    """The row of ``cell``: rounds to target from the evaluated curve, accuracy, seconds."""
    row = {"cell": cell.name, **dataclasses.asdict(cell), "target": TARGETS[cell.model]}
    rows = _rows(out)
    if not rows:
        return row | {"run": False}
    curve = [(r["round"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]
    reached = next((r for r, a in curve if a >= row["target"]), None)
    wall = out / "wall_seconds.json"
    return row | {
        "run": True,
        "rounds_run": len(rows),
        "rounds_to_target": reached,
        "accuracy_at_end": curve[-1][1],
        "best_accuracy": max(a for _, a in curve),
        "train_seconds": sum(r["round_sec"] for r in rows),
        "wall_seconds": sum(json.loads(wall.read_text())) if wall.exists() else None,
        "seconds_per_round": sum(r["round_sec"] for r in rows) / len(rows),
        "curve": curve,
        "command": "python experiments/run.py --config mcmahan2017_mnist "
        + " ".join(f"--set {s}" for s in overrides(cell, cell.cap) if not s.startswith("name=")),
    }


def _fljax_cell(r: dict) -> str:
    if not r["run"]:
        return "not run"
    if r["rounds_to_target"] is not None:
        return str(r["rounds_to_target"])
    return f"not reached in {r['rounds_run']} (acc. {r['accuracy_at_end']:.4f})"


def _cost(r: dict, rows: list[dict]) -> str:
    """The estimated seconds a not-run cell would need for its paper's rounds."""
    measured = [x for x in rows if x["run"] and x["model"] == r["model"]]
    if not measured or r["paper"] is None:
        return "not run (CPU budget)"
    per_epoch = min(x["seconds_per_round"] / x["epochs"] for x in measured)  # compute ~ examples
    est = per_epoch * r["epochs"] * r["paper"]
    return f"not run: about {est / 60:.0f} min of training for the paper's {r['paper']} rounds"


def write(results: pathlib.Path, rows: list[dict]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    facts = {
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    results.with_suffix(".json").write_text(outputs.dumps({"rows": rows, "run": facts}, indent=1) + "\n")
    _plot(results.with_suffix(".png"), rows)
    lines = [
        "# McMahan et al. 2017 on MNIST: FedAvg rounds to target accuracy",
        "",
        "K = 100 clients of 600 examples, C = 0.1 (10 clients a round, uniform without replacement),"
        " E local epochs of plain SGD with batch B, example-weighted model averaging. IID, or the"
        " pathological non-IID split (sorted by label, 200 shards of 300, 2 per client). 2NN: 784-200-200-10"
        " MLP, target 97%; CNN: 2 conv + 512 dense, target 99%; test accuracy on the 10,000 MNIST test"
        " images after every round. One client learning rate per model, 0.1 for both, fixed before any"
        " run (the paper tuned it per cell over a grid); one seed (0). Rounds to target: the first round"
        " whose test accuracy reaches the target. Runs stop there (`stop_at_accuracy`) or at their cap.",
        "",
        "| model | partition | E | B | paper rounds | fljax rounds | accuracy reached | wall seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        part = "IID" if r["partition"] == "iid" else "non-IID"
        paper = "-" if r["paper"] is None else str(r["paper"])
        if r["run"]:
            acc = f"{r['best_accuracy']:.4f} (best of {r['rounds_run']} rounds)"
            wall = (
                f"{r['wall_seconds']:.0f}"
                if r["wall_seconds"] is not None
                else f">= {r['train_seconds']:.0f} (training only: the process was stopped by a signal"
                f" after round {r['rounds_run']})"
            )
            wall += f" ({r['seconds_per_round']:.1f} s/round)"
        else:
            acc, wall = "-", _cost(r, rows)
        lines.append(
            f"| {r['model'].upper()} | {part} | {r['epochs']} | {r['batch']} | {paper} | {_fljax_cell(r)} |"
            f" {acc} | {wall} |"
        )
    lines += [
        "",
        "Paper values: 2NN E=1 B=10 from Table 1 (C = 0.1 row), CNN from Table 2; '-': the other 2NN"
        " cells' values (arXiv appendix) were not checked. Wall seconds: the whole process (data"
        " loading, compilation, training, evaluation after every round, checkpoints); s/round: training"
        " only. Curves: `mcmahan2017.png`.",
        "",
        "## Commands",
        "",
        "The grid: `python experiments/reproduce_mcmahan2017.py` (or `--cells NAME ...`, reusing and"
        " resuming finished runs in `runs/mcmahan2017/`). One cell alone:",
        "",
    ]
    lines += [f"- `{r['command']}`" for r in rows if r["run"]]
    lines += [
        "",
        f"Hardware: {facts['cpus']}-core CPU ({facts['processor']}) shared with other jobs, jax"
        f" {facts['jax']}, float32.",
        "",
        "## Differences from the paper",
        "",
        *_differences(rows),
    ]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _differences(rows: list[dict]) -> list[str]:
    """The paragraph on why the numbers differ, with the measured ratios."""
    both = [r for r in rows if r["run"] and r["paper"] is not None and r["rounds_to_target"] is not None]
    ratios = ", ".join(
        f"{r['model'].upper()} {'IID' if r['partition'] == 'iid' else 'non-IID'} E={r['epochs']} B={r['batch']}:"
        f" {r['rounds_to_target']} vs {r['paper']} ({r['rounds_to_target'] / r['paper']:.2f}x)"
        for r in both
    )
    capped = [r for r in rows if r["run"] and r["rounds_to_target"] is None]
    not_run = [r["cell"] for r in rows if not r["run"]]
    text = [
        f"Cells that reached the target, fljax rounds vs the paper's: {ratios or 'none'}."
        " Why the numbers differ: (1) learning rate: the paper optimised the client learning rate"
        " separately for every cell over a grid and reports each cell at its best rate, so each paper"
        " value is a minimum over learning rates; here one rate per model (0.1) was fixed before any"
        " run, never tuned on the test set. That should make fljax slower, not faster; where fljax"
        " needs fewer rounds (the 2NN cells), the gap comes from what is not controlled here (the"
        " initialisation, the input scaling, whether the paper read the crossing off a smoothed or"
        " best-so-far curve) and from single-seed noise, and is not evidence that FedAvg converges"
        " faster here."
        " (2) Randomness: one seed; the shard assignment, the cohorts, the initialisation (flax's"
        " defaults, not the paper's TensorFlow ones) and the batch order differ from the paper's, and"
        " the first round at which a noisy test-accuracy curve crosses the target moves by several"
        " rounds between seeds, most in the non-IID cells whose curves oscillate."
        " (3) Data: the complete MNIST (60,000 / 10,000, lossless copy, pixels scaled to [0, 1]), no"
        " augmentation or other preprocessing; the paper does not state its preprocessing."
        " (4) Hardware and rounds: the CNN costs about 2 TFLOP a round at E=5, B=10 (10 clients x 3,000"
        " examples x about 75 MFLOP); on a 2-core CPU shared with other jobs that is minutes a round,"
        " so CNN cells are capped well below the paper's round counts or not run at all."
    ]
    if capped:
        text.append("")
        text.append(
            "Capped before the target: "
            + "; ".join(
                f"{r['cell']} (cap {r['rounds_run']} rounds, paper {r['paper'] or '-'}: accuracy"
                f" {r['accuracy_at_end']:.4f} at round {r['rounds_run']}, best {r['best_accuracy']:.4f})"
                for r in capped
            )
            + ". Not reached within the cap says nothing about whether the cell reaches the target later."
        )
    if not_run:
        text.append("")
        text.append(
            "Not run (CPU budget of this reproduction, about an hour in all): "
            + ", ".join(not_run)
            + ". `--cells NAME` runs any of them; the table's estimate scales the measured training"
            " seconds per local epoch of the same model (compute grows with the examples seen, E x 600"
            " per client)."
        )
    return text


def _plot(path: pathlib.Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, ("2nn", "cnn"), strict=True):
        for r in rows:
            if r["run"] and r["model"] == model:
                rounds, acc = zip(*r["curve"], strict=True)
                iid = r["partition"] == "iid"
                ax.plot(
                    rounds,
                    acc,
                    linestyle="-" if iid else ":",
                    label=f"{'IID' if iid else 'non-IID'} E={r['epochs']} B={r['batch']}",
                )
        target = TARGETS[model]
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set(
            xlabel="round",
            ylabel="test accuracy",
            ylim=(target - 0.07, 1.0),
            title=f"MNIST {model.upper()}, FedAvg, C=0.1",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="*", default=[c.name for c in CELLS], choices=list(BY_NAME))
    parser.add_argument("--rounds", action="append", default=[], metavar="CELL=N", help="another cap")
    parser.add_argument("--out", default=str(HERE.parent / "runs" / "mcmahan2017"))
    parser.add_argument("--results", default=str(HERE / "results" / "mcmahan2017"))
    args = parser.parse_args(argv)
    caps = {c.name: c.cap for c in CELLS}
    for item in args.rounds:
        name, value = item.split("=")
        if name not in caps:
            raise SystemExit(f"--rounds {item}: unknown cell {name!r}; cells: {', '.join(caps)}")
        caps[name] = int(value)
    out = pathlib.Path(args.out)
    for name in args.cells:
        run_cell(BY_NAME[name], caps[name], out / name)
    rows = [result(dataclasses.replace(c, cap=caps[c.name]), out / c.name) for c in CELLS]
    write(pathlib.Path(args.results), rows)
    return rows


if __name__ == "__main__":
    main()
