"""FEMNIST (LEAF subset, one client per writer): FedAvg with the EMNIST CNN of Reddi et al. 2021.

Command:
  python experiments/run.py --config femnist

Setting: the 105 writers of the shared FEMNIST subset that have training data (62 classes:
digits and upper- and lower-case letters), 10 writers sampled uniformly per round, each running
1 local epoch of SGD (learning rate 0.05, batch 20), example-weighted FedAvg, 30 rounds;
evaluated on the subset's test split (central test set).

Hardware and runtime: 2 CPU cores shared with other jobs, jax 0.10.2: 387 s (about 12 s a round).
Measured result (seed 0): test accuracy 0.396 after 30 rounds on the 4,088 test examples
(training loss 1.43, test loss 2.47): far from converged; the test split holds writers the
federation never trained on.
"""

from fljax.experiment import FEMNIST, Client, Cohort, Config, Model, Server


def get_config() -> Config:
    return Config(
        name="femnist",
        data=FEMNIST(),
        model=Model(name="emnist_cnn"),
        client=Client(learning_rate=0.05, batch_size=20, num_epochs=1),
        server=Server(algorithm="fedavg", learning_rate=1.0),
        cohort=Cohort(sampling="uniform", size=10),
        rounds=30,
        eval_every=5,
        checkpoint_every=10,
    )
