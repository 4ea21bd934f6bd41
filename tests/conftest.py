"""Shared tiny models for the tests; nothing here downloads.

``localisation_model`` trains a small CNN in the session on synthetic images whose class is decided by a
shape placed at a random position, so a correct CAM must point at that shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import camanim.outputs  # noqa: F401  (attaches the results' save, render and display methods)

SIZE = 48
SHAPE = 12


def _draw(
    kind: int, rng: np.random.Generator, size: int = SIZE
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One noisy grey image (3, size, size) with a bright shape: 0 = filled square, 1 = hollow ring.

    Returns the image and the shape's box ``(top, left, bottom, right)`` (exclusive ends).
    """
    img = rng.normal(0.0, 0.15, (size, size)).astype(np.float32)
    top, left = rng.integers(0, size - SHAPE, 2)
    patch = np.ones((SHAPE, SHAPE), np.float32)
    if kind == 1:
        patch[3:-3, 3:-3] = 0.0
    img[top : top + SHAPE, left : left + SHAPE] += patch
    return np.repeat(img[None], 3, axis=0), (int(top), int(left), int(top + SHAPE), int(left + SHAPE))


def synthetic_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """``n`` images ``(n, 3, SIZE, SIZE)``, labels ``(n,)`` and shape boxes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    imgs, boxes = zip(*(_draw(int(k), rng) for k in labels), strict=True)
    return torch.from_numpy(np.stack(imgs)), torch.from_numpy(labels).long(), list(boxes)


class TinyCNN(nn.Module):
    """Three conv blocks, global average pooling and a linear head; the last conv map is 12 x 12."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@dataclasses.dataclass
class Trained:
    model: nn.Module
    accuracy: float


class CountingCNN(TinyCNN):
    """A TinyCNN (5 classes) that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__(classes=5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.fixture(scope="session")
def localisation_model() -> Trained:
    """A TinyCNN trained on synthetic shapes (about 5 s on 2 CPU cores)."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y, _ = synthetic_batch(2000, seed=1)
    model.train()
    for _epoch in range(5):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt, _ = synthetic_batch(300, seed=2)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    for p in model.parameters():
        p.grad = None
    return Trained(model, acc)


@pytest.fixture
def tiny_model() -> nn.Module:
    """An untrained TinyCNN (seeded)."""
    torch.manual_seed(0)
    return TinyCNN(classes=5).eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (EfficientNet-Lite0 with ImageNet weights, offline)."""
    from camanim.compute.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def resnet18():
    """torchvision ResNet-18 with random (seeded) weights."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def no_hooks(model: nn.Module) -> bool:
    """Whether no module of ``model`` holds a forward, pre-forward or backward hook."""
    return all(
        not m._forward_hooks
        and not m._forward_pre_hooks
        and not m._backward_hooks
        and not m._backward_pre_hooks
        for m in model.modules()
    )
