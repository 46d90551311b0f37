"""FEMNIST writers with user-level DP: is a population of 105 writers enough for private FL?

Commands:
  python experiments/run.py --config femnist_private
  python experiments/dp_mechanisms.py --config femnist_private --results experiments/results/dp_mechanisms_femnist

Setting: the 105 writers of the shared FEMNIST subset that have training data (one client per
writer, the unit of privacy), LeNet, each writer joining each round independently with
probability 0.2 (Poisson sampling, expected cohort 21), 1 local epoch of SGD (learning rate
0.1, batch 10), uniform client weights, DP-FedAvg (each update clipped to L2 norm 0.5, Gaussian noise of std
z * 0.5 on the sum, divided by the expected cohort 21, server learning rate 1), 50
rounds, evaluated on the test split (writers the federation never trained on).
``experiments/dp_mechanisms.py`` calibrates z (and the other mechanisms' noise) to epsilon 1, 4
and 8 at delta 1e-5. Noise from the seed (dp.reproducible=True): a reproducible simulation, not a
private run.

Hardware and runtime: 2 CPU cores shared with other jobs, jax 0.10.2: 120-265 s per run.
Measured result (experiments/results/dp_mechanisms_femnist.md), test accuracy after 50 rounds:
no DP 0.551; DP-FedAvg at epsilon 8 (z = 1.23) 0.220, at epsilon 4 (z = 1.95) and 1 (z = 5.98)
0.048, the majority class: with 21 writers a round the noise on the mean update (std z * 0.5 / 21
per coordinate, over 62,006 coordinates) is several times the clipped signal's norm. User-level
DP at these epsilons needs thousands of writers per round; the other mechanisms of
dp_mechanisms.py were not run on this population.
"""

from fljax.experiment import DP, FEMNIST, Client, Cohort, Config, Model, Server


def get_config() -> Config:
    return Config(
        name="femnist_private",
        seed=0,
        data=FEMNIST(),
        model=Model(name="lenet"),
        client=Client(learning_rate=0.1, batch_size=10, num_epochs=1, weighting="uniform"),
        server=Server(algorithm="fedavg", learning_rate=1.0),
        cohort=Cohort(sampling="poisson", q=0.2),
        dp=DP(clip_norm=0.5, noise_multiplier=1.0, sampling="poisson", delta=1e-5, reproducible=True),
        rounds=50,
        eval_every=10,
        checkpoint_every=50,
    )
