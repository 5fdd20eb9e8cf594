"""The CNN of seed article 000 (§4.1), with its bugs fixed (the missing `F` import).

Input 3x24x24 -> conv 3->64 (3x3, pad 1), ReLU, max pool 2 -> conv 64->128, ReLU, max pool 2
-> fc 128*6*6 -> 1024, ReLU -> fc 1024 -> 10.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (3, 24, 24)  # the article's 128*6*6 flatten implies 24x24 inputs after two 2x pools


class SeedCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 6 * 6, 1024)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = torch.flatten(x, 1)  # the article's view(-1, ...) silently reshapes a wrong input size
        x = F.relu(self.fc1(x))
        return self.fc2(x)
