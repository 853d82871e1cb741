"""The two small tasks the interference tests score (task B right-padded), shared by their test modules."""

from __future__ import annotations

import torch

from tests import builders


def task_a() -> torch.Tensor:
    return builders.random_tokens(3, 10, seed=11)


def task_b() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = builders.random_tokens(2, 8, seed=12)
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0  # right padding
    return tokens, mask
