"""A second medical case: the 4 hospitals predict the 5-level severity of heart disease.

Command:
  python experiments/run.py --config hospitals_severity

Same hospitals, features and model family as the main job (``heart_disease``), harder target:
the original ``num`` (0 no disease, 1-4 increasing severity) instead of ``num > 0``, 5 classes
(``data.target="severity"``). The sites differ in the label itself, not only in its frequency
(patients per level 0/1/2/3/4): Cleveland 164/55/36/35/13 (54% healthy), Hungary 188/106/0/0/0
(its file codes only 0 and 1: every diseased Hungarian patient is labelled 1, so its "1" means
"disease" where elsewhere it means "severity 1"), Switzerland 8/48/32/30/5 (7% healthy; 2
healthy patients in a test split), VA Long Beach 51/56/41/42/10 (no majority class). A quarter
of each hospital is held out (stratified by level). A 64-unit MLP, FedAvg with all 4 hospitals
every round, 1 local epoch of SGD with momentum (batch 16), 50 rounds; baselines: each hospital
alone (the same 50 epochs on its own data) and one model on the pooled data; 5 splits and seeds
(``repeats=5``). Per-hospital accuracy and balanced accuracy (the mean recall over the levels
present in that hospital's held-out patients; ``summary.json``
``per_client_test_accuracy.metrics.balanced_accuracy``).

Hardware and runtime: 2 CPU cores shared with other jobs, jax 0.10.2: 59 s for the 5 repeats
(``experiments/hospitals_severity.py`` runs the same repeats and writes the tables, 57 s).
Measured (mean +- sd over 5 splits and seeds; experiments/results/hospitals_severity.md),
accuracy alone / federated / pooled: Cleveland 0.539 / 0.574 / 0.521, Hungary 0.833 / 0.841 /
0.819, Switzerland 0.413 / 0.342 / 0.406, VA Long Beach 0.335 / 0.343 / 0.294; all 229 held-out
patients 0.572 / 0.578 / 0.552. Paired over the 5 repeats, federating helps Cleveland (+0.034
accuracy, 4 of 5 repeats; balanced accuracy +0.015, 4 of 5), makes no clear difference for
Hungary (+0.008, 2 of 5; its 0/1 coding is not damaged by the others' levels 2-4) or VA (+0.008,
2 of 5), and costs Switzerland accuracy (-0.071, 0 of 5) while raising its balanced accuracy
(0.253 -> 0.300, 4 of 5): alone it scores close to always answering its majority level 1
(0.39 accuracy and 0.20 balanced accuracy on split 0's held-out patients); the federated model
spreads its answers over the levels. Pooled training does no better than federating except at
Switzerland (0.406 accuracy, 0.332 balanced accuracy).
"""

from fljax.experiment import Client, Config, HeartDisease, Model, Server


def get_config() -> Config:
    return Config(
        name="hospitals_severity",
        seed=0,
        data=HeartDisease(target="severity", test_fraction=0.25, split_seed=0),
        model=Model(name="mlp", hidden=(64,)),
        client=Client(optimizer="sgd", learning_rate=0.01, momentum=0.9, batch_size=16, num_epochs=1),
        server=Server(algorithm="fedavg", learning_rate=1.0),
        rounds=50,
        eval_every=10,
        checkpoint_every=50,
        baselines=("local", "pooled"),
        metrics=("balanced_accuracy",),
        repeats=5,
    )
