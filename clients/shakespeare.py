"""A character model for Shakespeare next-character prediction (one client per role).

Usage::

    data = partition_dataset(load_dataset("shakespeare"), "natural", 100, seed=0)
    run_simulation(lambda: make_app(data, lr=0.5), FedAvg(), num_clients=100, rounds=5)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from fedlearn import model_builder
from fedlearn.apps.torch_app import ClientDataSource, TorchClientApp

VOCAB = 96


@model_builder  # the registry names it; `fedlearn serve` may call it
class CharGRU(nn.Module):
    """Embedding -> GRU -> linear over the vocabulary, predicting the next character."""

    def __init__(self, vocab: int = VOCAB, embed: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out[:, -1])


def make_app(data: ClientDataSource, *, hidden: int = 64, **params: Any) -> TorchClientApp:
    """A ClientApp training :class:`CharGRU` on each role's lines (params: epochs, lr, ...)."""
    return TorchClientApp(partial(CharGRU, hidden=hidden), data, **params)
