"""Personalization on the main job (UCI Heart Disease, 4 hospitals): fine-tuning vs Ditto.

Usage::

  python experiments/personalization_study.py [--out experiments/results/personalization]

For each of the main job's 5 splits and seeds (``experiments/configs/heart_disease.py``,
``repeat_config``), trains with that config's client settings and 30 rounds:

- FedAvg, then each hospital fine-tunes the final model on its own training data for
  ``E`` epochs (:func:`fljax.personalization.fine_tune`), for each ``E`` in ``FINE_TUNE_EPOCHS``
  (``E = 0`` is the federated model itself);
- Ditto (:mod:`fljax.algorithms.ditto`) for each ``lambda`` in ``DITTO_LAMBDAS``: the personal
  models after the last round;

and scores each hospital's own model on its own held-out patients
(:func:`fljax.personalization.personalized_evaluate`), next to each hospital trained alone as
the main job's ``alone`` column does. Writes ``PREFIX.json``
and ``PREFIX.md`` (mean +- sd over the splits of each hospital's accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import jax
import numpy as np

from fljax import evaluation, models, personalization
from fljax import random as fl_random
from fljax.algorithms import ditto
from fljax.data import ClientStates
from fljax.experiment import data as data_lib
from fljax.experiment import trainer

HERE = pathlib.Path(__file__).resolve().parent
FINE_TUNE_EPOCHS = (0, 1, 2, 3, 5, 10)
DITTO_LAMBDAS = (0.1, 1.0)


def _config():
    spec = importlib.util.spec_from_file_location("heart", HERE / "configs" / "heart_disease.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _ditto(config, data, model, lam):
    c = config.client
    update = ditto.ditto_client(
        model,
        trainer.build_optimizer(c),
        lam=lam,
        batch_size=c.batch_size,
        num_epochs=c.num_epochs,
        weighting=c.weighting,
    )
    algo = ditto.ditto(update, server_learning_rate=config.server.learning_rate)
    step = jax.jit(algo.update)
    run_key = fl_random.run_key(config.seed)
    train = data.train
    params = models.init_params(model, train.x.shape[1:], fl_random.stream(run_key, "init"))
    states = ClientStates(update.init(params), train.num_clients)
    state = algo.init(params)
    multiple = 4 * c.batch_size
    num_examples = -(-int(train.sizes.max()) // multiple) * multiple
    for r in range(config.rounds):
        cohort = states.attach(train.cohort(np.arange(train.num_clients), num_examples=num_examples))
        state, _ = step(state, cohort, fl_random.round_key(run_key, r))
        state = states.scatter(cohort, state)
    return personalization.personalized_evaluate(model, states.tree, data.test)["per_client_accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "personalization"))
    args = parser.parse_args(argv)
    base = _config()
    t0 = time.perf_counter()
    columns: dict[str, list[list[float]]] = {}
    names, sizes = None, None
    for i in range(base.repeats):
        config = trainer.repeat_config(base, i)
        data = data_lib.load(config.data, fl_random.stream(fl_random.run_key(config.seed), "data"))
        model = trainer.build_model(config.model, data.num_classes)
        names = list(data.train.client_names)
        sizes = data.test.sizes.tolist()
        plain = dataclasses.replace(config, baselines=())
        alone = []
        for c in range(data.train.num_clients):  # as the main job's "alone" column
            own = trainer.train(plain, data.train.subset([c]), model, progress=False).state.params
            alone.append(
                evaluation.federated_evaluate(model, own, data.test.subset([c]))["per_client_accuracy"][0]
            )
        columns.setdefault("alone", []).append(alone)
        trained = trainer.train(plain, data.train, model, progress=False)
        for e in FINE_TUNE_EPOCHS:
            ft = dataclasses.replace(config, fine_tune=dataclasses.replace(config.fine_tune, num_epochs=e))
            col = "federated" if e == 0 else f"fine-tuned {e} ep."
            columns.setdefault(col, []).append(trainer._personalized(ft, data, model, trained.state.params))
        for lam in DITTO_LAMBDAS:
            columns.setdefault(f"Ditto lambda={lam}", []).append(_ditto(config, data, model, lam))
        print(f"split {i + 1}/{base.repeats} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    result = {
        "command": "python experiments/personalization_study.py",
        "config": "experiments/configs/heart_disease.py",
        "repeats": base.repeats,
        "clients": names,
        "test_sizes": sizes,
        "seconds": seconds,
        "jax": jax.__version__,
        "columns": {
            k: {
                "mean": np.mean(v, axis=0).tolist(),
                "std": np.std(v, axis=0).tolist(),
                "weighted_all_mean": float(np.mean(np.asarray(v) @ np.asarray(sizes) / np.sum(sizes))),
                "per_split": v,
            }
            for k, v in columns.items()
        },
    }
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Personalization on the main job (UCI Heart Disease, 4 hospitals)",
        "",
        f"Command: `{result['command']}` ({seconds:.0f} s, {jax.default_backend()}, jax {jax.__version__}).",
        f"Held-out accuracy of each hospital's own model, mean +- sd over {base.repeats} splits and seeds",
        "(the main job's; `alone` is the bar to reach). Fine-tuning: each hospital trains",
        "the final FedAvg model for E epochs on its own training data, the client optimizer and batch",
        "size of the config. Ditto: personal models after 30 rounds, 1 personal epoch per round.",
        "",
        "| model | "
        + " | ".join(f"{n} (n={s})" for n, s in zip(names, sizes, strict=True))
        + " | all (weighted) |",
        "|---" * (len(names) + 2) + "|",
    ]
    for k, v in result["columns"].items():
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in zip(v["mean"], v["std"], strict=True)]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {v['weighted_all_mean']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
