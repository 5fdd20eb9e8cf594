"""The ConvNet of seed article 001 (§4), with its placeholders filled in.

Input 1x64x64 -> three blocks of conv 3x3 (pad 1), ReLU, max pool 2 with 32, 64, 128 channels
-> fc 128*8*8 -> 1000, ReLU -> fc 1000 -> 10. `width` scales every layer (1.0 is the article's
network); the distillation job uses a narrower student.
"""

from __future__ import annotations

import torch
import torch.nn as nn

INPUT_SHAPE = (1, 64, 64)  # 64 / 2 / 2 / 2 = 8, the article's 128*8*8 flatten


class SeedConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c1, c2, c3, hidden = (max(1, round(c * width)) for c in (32, 64, 128, 1000))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.pool(self.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)
