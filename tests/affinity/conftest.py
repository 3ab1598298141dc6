"""Helpers shared by the affinity tests: a miniature backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyBackbone(nn.Module):
    """The Backbone contract in miniature: a stem and three blocks of nn.Sequential."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
            nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(8, 5, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7)),
        ])
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d):  # non-trivial running statistics
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)


@pytest.fixture
def tiny_backbone():
    """The :class:`TinyBackbone` class: ``tiny_backbone(seed)`` builds one."""
    return TinyBackbone
