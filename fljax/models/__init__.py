"""Small reference flax models."""

from fljax.models.zoo import MLP, LeNet, LogisticRegression, init_params, num_params

__all__ = ["LeNet", "LogisticRegression", "MLP", "init_params", "num_params"]
