"""The main job: should a hospital join the federation? UCI Heart Disease, 4 hospitals.

Command:
  python experiments/run.py --config experiments/configs/heart_disease.py

Trains a small MLP with FedAvg across Cleveland, Hungary, Switzerland and VA
Long Beach (data shipped inside fljax, CC BY 4.0), then the same model on each
hospital alone and on the pooled data, and prints each hospital's held-out
accuracy under the three. Runtime: about a minute on 2 CPU cores.
Expected: the federated model is close to the pooled one and beats training
alone for the small hospitals (see README for a measured table).
"""


def get_config() -> dict:
    return {
        "name": "heart_disease",
        "seed": 0,
        "data": {"name": "heart_disease", "test_fraction": 0.25, "split_seed": 0},
        "model": {"name": "mlp", "hidden": (32,)},
        "client": {
            "optimizer": "sgd",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "batch_size": 16,
            "num_epochs": 1,
            "weighting": "num_examples",
        },
        "server": {"algorithm": "fedavg", "learning_rate": 1.0},
        "cohort": {"sampling": "all"},
        "rounds": 30,
        "eval_every": 5,
        "checkpoint_every": 10,
        "dp": None,  # e.g. {"clip_norm": 1.0, "noise_multiplier": 1.0, "budget_epsilon": 8.0}
        "secagg": None,  # e.g. {"clip_range": 1.0, "frac_bits": 16}
        "baselines": ("local", "pooled"),
        "repeats": 5,
    }
