"""A small 3-D CNN, synthetic volumes whose class 1 carries a bright blob at a known place, and the CNN
trained on them in a few seconds: shared by the volume tests."""

from __future__ import annotations

import torch
from torch import nn

Blob = tuple[slice, slice, slice]


class Small3DCNN(nn.Module):
    """Three 3-D conv blocks, global average pooling and a linear head; no in-place operation."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1),
            nn.BatchNorm3d(16),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def blob_volumes(
    n: int, seed: int, size: tuple[int, int, int], blob: Blob
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noise volumes ``(n, 1, D, H, W)`` (std 0.5) with labels alternating 0, 1; class 1 gets +1.5 over
    the ``(z, y, x)`` voxels of ``blob``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *size, generator=gen) * 0.5
    y = torch.arange(n) % 2
    x[y == 1, 0, blob[0], blob[1], blob[2]] += 1.5
    return x, y


def trained_blob_cnn(
    size: tuple[int, int, int], blob: Blob, steps: int, n_test: int
) -> tuple[Small3DCNN, torch.Tensor, torch.Tensor, float]:
    """A :class:`Small3DCNN` trained with Adam (lr 3e-3, ``steps`` full-batch steps) on 32 blob volumes;
    returns ``(model in eval mode, test volumes, test labels, test accuracy)``."""
    torch.manual_seed(0)
    model = Small3DCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = blob_volumes(32, 0, size, blob)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = blob_volumes(n_test, 1, size, blob)
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return model, xt, yt, accuracy
