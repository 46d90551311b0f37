"""The ``seed_cifar`` round as a plain sequential PyTorch loop (the founding example's way).

Used by ``experiments/bench_round.py`` as the reference measured in the same run. It
needs ``torch`` (a CPU build is enough; it is not a dependency of fljax): without it,
:func:`available` is False and the benchmark prints a ``skipped`` line instead.

One round: every client of the cohort copies the global LeNet, runs one local epoch
over its 500 examples in shuffled minibatches of 32 (SGD lr 0.01, momentum 0.9,
fresh optimizer state), and the server takes the example-weighted average of the
clients' parameters. Data are tensors already in memory (no DataLoader), so the
loop is the fastest form of the founding example's approach.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

try:
    import torch
    from torch import nn
except ImportError:  # optional: the benchmark reports it as skipped
    torch = None


def available() -> bool:
    return torch is not None


def _lenet(image: int = 32):
    side = ((image - 4) // 2 - 4) // 2  # two 5x5 valid convolutions, each followed by a 2x2 pool

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * side * side, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.conv1(x)))
            x = self.pool(torch.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    return LeNet()


def round_seconds(x: np.ndarray, y: np.ndarray, rounds: int, batch_size: int = 32, seed: int = 0):
    """Seconds per round (after one warm-up round) for the cohort ``x[clients, n, H, W, C]``.

    Returns ``(median seconds, [seconds per measured round], threads)``.
    """
    if torch is None:
        raise ImportError("torch is not installed")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xs = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 1, 4, 2, 3))))  # NCHW
    ys = torch.from_numpy(y.astype(np.int64))
    num_clients, n = ys.shape
    model = _lenet(x.shape[2])
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()

    def one_round(global_state):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c in range(num_clients):
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            perm = torch.randperm(n)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(model(xs[c, idx]), ys[c, idx])
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k] += v * n
        return {k: v / (n * num_clients) for k, v in total.items()}

    global_state = one_round(global_state)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        global_state = one_round(global_state)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, threads
