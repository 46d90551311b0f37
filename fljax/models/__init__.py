"""Small reference flax models."""

from fljax.models.zoo import (
    EMNISTCNN,
    MLP,
    CharLSTM,
    LeNet,
    LogisticRegression,
    McMahanCNN,
    init_params,
    num_params,
)

__all__ = [
    "CharLSTM",
    "EMNISTCNN",
    "LeNet",
    "LogisticRegression",
    "MLP",
    "McMahanCNN",
    "init_params",
    "num_params",
]
