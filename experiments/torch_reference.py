"""Benchmark rounds as plain sequential PyTorch loops over clients (the founding example's way).

Used by ``experiments/bench_round.py`` (``seed_cifar``: :func:`round_seconds`) and
``experiments/bench_lstm.py`` (``shakespeare_lstm``: :func:`lstm_round_seconds`) as the
reference measured in the same run. It needs ``torch`` (a CPU build is enough; it is not a
dependency of fljax): without it, :func:`available` is False and the benchmarks print a
``skipped`` line instead.

One round: every client of the cohort copies the global model, runs one local epoch over
its examples in shuffled minibatches (fresh optimizer state), and the server takes the
example-weighted average of the clients' parameters. Data are tensors already on the
device (no DataLoader), so the loop is the fastest form of the founding example's approach.

Device: ``device=None`` takes ``$TORCH_REFERENCE_DEVICE`` when set, else ``"cuda"`` when
PyTorch sees a GPU, else ``"cpu"`` (:func:`resolve_device`); ``experiments/gpu_check.sh``
sets the variable so that both workloads' loops run on the GPU of a GPU machine.
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


DEVICE_ENV = "TORCH_REFERENCE_DEVICE"


def available() -> bool:
    return torch is not None


def resolve_device(device: str | None = None) -> str:
    """``"cpu"`` or ``"cuda"``: ``device``, else ``$TORCH_REFERENCE_DEVICE``, else cuda when available."""
    if device is None:
        device = os.environ.get(DEVICE_ENV) or None
    if device is None:
        device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and (torch is None or not torch.cuda.is_available()):
        raise ValueError("device 'cuda' asked for, but PyTorch sees no GPU")
    return device


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_rounds(one_round, state, rounds: int, device: str):
    """(median seconds, wall seconds per measured round, CPU seconds per measured round) after one
    warm-up round; CPU seconds (this process, all threads) depend less on other processes."""
    state = one_round(state)  # warm-up
    _sync(device)
    times, cpu = [], []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        state = one_round(state)
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), times, cpu


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


def round_seconds(
    x: np.ndarray,
    y: np.ndarray,
    rounds: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = None,
):
    """Seconds per round (after one warm-up round) for the cohort ``x[clients, n, H, W, C]``.

    Returns ``(median seconds, [seconds per measured round], threads)``; ``device`` as in
    :func:`resolve_device`.
    """
    if torch is None:
        raise ImportError("torch is not installed")
    device = resolve_device(device)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xs = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 1, 4, 2, 3)))).to(device)  # NCHW
    ys = torch.from_numpy(y.astype(np.int64)).to(device)
    num_clients, n = ys.shape
    model = _lenet(x.shape[2]).to(device)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()

    def one_round(global_state):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c in range(num_clients):
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            perm = torch.randperm(n, device=device)
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

    sec, times, _ = _timed_rounds(one_round, global_state, rounds, device)
    return sec, times, threads


def _char_lstm(vocab_size: int, embed_dim: int, lstm_sizes):
    """Embedding-LSTM(s)-Linear, the shapes of ``fljax.models.CharLSTM`` (one ``nn.LSTM`` a layer)."""

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim)
            sizes = [embed_dim, *lstm_sizes]
            self.lstms = nn.ModuleList(
                nn.LSTM(n_in, n_out, batch_first=True)
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            )
            self.dense = nn.Linear(sizes[-1], vocab_size)

        def forward(self, x):
            h = self.embed(x)
            for lstm in self.lstms:
                h = lstm(h)[0]
            return self.dense(h)  # [batch, time, vocab]

    return CharLSTM()


def lstm_round_seconds(
    x: np.ndarray,
    y: np.ndarray,
    sizes: np.ndarray,
    rounds: int,
    *,
    batch_size: int = 4,
    learning_rate: float = 1.0,
    vocab_size: int = 90,
    embed_dim: int = 8,
    lstm_sizes=(256, 256),
    threads: int | None = None,
    seed: int = 0,
    device: str | None = None,
):
    """Seconds per ``shakespeare_lstm`` round (after one warm-up round) of a sequential loop.

    Client ``c`` trains on its first ``sizes[c]`` sequences ``x[c, :sizes[c]]`` (tokens
    ``[clients, max_examples, time]``, next-token targets ``y`` of the same shape): one epoch of
    shuffled minibatches of ``batch_size`` (the last one partial), plain SGD, mean cross-entropy
    over every position; the server averages the clients' parameters weighted by ``sizes``.

    Returns:
      ``(median seconds, [seconds per measured round], threads, device, [CPU seconds per round])``.
    """
    if torch is None:
        raise ImportError("torch is not installed")
    device = resolve_device(device)
    sizes = np.asarray(sizes, np.int64)
    if x.shape != y.shape or x.ndim != 3 or sizes.shape != x.shape[:1]:
        raise ValueError(
            f"expected x, y [clients, n, time] and sizes [clients], got {x.shape}, {y.shape}, {sizes.shape}"
        )
    if sizes.min() < 1 or sizes.max() > x.shape[1]:
        raise ValueError(f"sizes must be in [1, {x.shape[1]}], got {sizes.min()}..{sizes.max()}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xs = torch.from_numpy(x.astype(np.int64)).to(device)
    ys = torch.from_numpy(y.astype(np.int64)).to(device)
    model = _char_lstm(vocab_size, embed_dim, tuple(lstm_sizes)).to(device)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    total_weight = float(sizes.sum())

    def one_round(global_state):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c, n in enumerate(sizes.tolist()):
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=learning_rate)
            perm = torch.randperm(n, device=device)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad()
                logits = model(xs[c, idx])
                loss = loss_fn(logits.reshape(-1, vocab_size), ys[c, idx].reshape(-1))
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k] += v * n
        return {k: v / total_weight for k, v in total.items()}

    sec, times, cpu = _timed_rounds(one_round, global_state, rounds, device)
    return sec, times, threads, device, cpu
