"""Privacy-utility study: DP-FedAvg on MNIST, accuracy versus epsilon (swept with --set).

Commands (each run writes runs/<name>/; the last line gathers the table):
  for z in 0 0.5 1 2 4; do
    python experiments/run.py --config dp_mnist --set dp.noise_multiplier=$z --set name=dp_mnist_z$z
  done
  python experiments/run.py --config dp_mnist --set dp=None --set name=dp_mnist_nonprivate
  python experiments/summarize.py runs/dp_mnist_* --out experiments/results/dp_mnist

Setting: MNIST (the offline copy found through FLJAX_DATA_DIR or ../shared/data/mnist) split
IID into 1,000 clients of exactly 60 training examples. Each round every client joins
independently with probability 0.1 (Poisson sampling, expected cohort 100, padded to a fixed
capacity), runs 1 local epoch of SGD (learning rate 0.1, batch 20) on a 784-100-10 MLP, and
sends its delta. The server runs DP-FedAvg (``fljax.privacy.dp``): each update clipped to L2
norm 0.3 (about the median update norm at the start) with uniform client weights, Gaussian
noise of std z * 0.3 added once to the sum, divided by the fixed expected cohort size 100,
then applied with server SGD with momentum 0.9 (DP-FedAvgM, McMahan et al. 2018). 100 rounds.
``--set dp=None`` is the non-private run with the same sampling (no clipping, no noise, the
same server optimizer). Epsilon: RDP accountant at delta = 1/1000 = 1/population, add/remove
one client, unit of privacy = one client. z = 0 clips but adds no noise (not private).

Hardware and runtime: 2 CPU cores shared with other jobs, jax 0.10.2: 44-98 s per run of 100
rounds (evaluation, checkpoints and accounting included), 432 s for the 6 runs.
Measured result (experiments/results/dp_mnist.md), test accuracy after 100 rounds, epsilon
at delta = 1e-5 (the default, min(1e-5, N**-1.1); RDP as accounted, PLD in the table):
non-private 0.9548, z=0 (clip only) 0.9541, z=0.5 (eps 36.97) 0.9435, z=1 (eps 7.90) 0.9167,
z=2 (eps 2.58) 0.8572, z=4 (eps 1.08) 0.7920. Noise from the seed (dp.reproducible=True): a
reproducible simulation, not a private run.
"""

from fljax.experiment import DP, Client, Cohort, Config, Images, Model, Server


def get_config() -> Config:
    return Config(
        name="dp_mnist",
        seed=0,
        data=Images(name="mnist", num_clients=1000, partition="iid", examples_per_client=60),
        model=Model(name="mlp", hidden=(100,)),
        client=Client(learning_rate=0.1, batch_size=20, num_epochs=1, weighting="uniform"),
        server=Server(algorithm="fedavgm", learning_rate=1.0, momentum=0.9),
        cohort=Cohort(sampling="poisson", q=0.1),
        dp=DP(clip_norm=0.3, noise_multiplier=1.0, cohort_size=100, sampling="poisson", reproducible=True),
        rounds=100,
        eval_every=10,
        checkpoint_every=50,
    )
