"""Targets: callables from the model output ``(B, K)`` to one score per sample ``(B,)``.

The gradient-based methods differentiate the summed scores; since samples do not interact in eval mode,
each sample's gradients are those of its own score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from camanim.errors import ClassNotFoundError, TargetError


class Target(Protocol):
    """Anything that maps the model output ``(B, K)`` to scores ``(B,)``."""

    def __call__(self, output: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ClassLogit:
    """The logit of one class per sample (grad-cam's ``ClassifierOutputTarget``).

    Attributes:
        classes: one class index per sample (``len == B``), or a single index for every sample.
    """

    classes: tuple[int, ...]

    def __call__(self, output: Tensor) -> Tensor:
        idx = torch.as_tensor(self.classes, device=output.device).expand(output.shape[0])
        return output.gather(1, idx[:, None])[:, 0]


@dataclass(frozen=True)
class ClassProbability(ClassLogit):
    """The softmax probability of one class per sample (grad-cam's ``ClassifierOutputSoftmaxTarget``)."""

    def __call__(self, output: Tensor) -> Tensor:
        return super().__call__(output.softmax(dim=1))


@dataclass(frozen=True)
class ClassSigmoid(ClassLogit):
    """The sigmoid score of one class per sample, for multi-label heads."""

    def __call__(self, output: Tensor) -> Tensor:
        return super().__call__(output.sigmoid())


TARGET_KINDS = {"logit": ClassLogit, "probability": ClassProbability, "sigmoid": ClassSigmoid}


def resolve_class(spec: int | str, class_names: Sequence[str]) -> int:
    """Turn a class index or name (``"tiger cat"``, case-insensitive) into an index.

    Raises:
        ClassNotFoundError: an unknown name (lists close names).
        TargetError: an index out of range.
    """
    n = len(class_names)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        idx = int(spec)
        if not 0 <= idx < n:
            raise TargetError(f"class index {idx} is out of range: the model has {n} classes (0..{n - 1})")
        return idx
    lowered = [c.lower() for c in class_names]
    key = spec.strip().lower()
    if key in lowered:
        return lowered.index(key)
    raise ClassNotFoundError(spec, class_names)
