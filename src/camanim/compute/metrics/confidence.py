"""Confidence metrics of saliency maps: Average Drop, Increase in Confidence (Chattopadhay et al.,
Grad-CAM++, WACV 2018), Average Gain (Zhang et al., Opti-CAM, 2023) and grad-cam's confidence change; a pure
function and a stateful metric on the machinery shared with ROAD (:mod:`camanim.compute.metrics.engine`).

Definitions (recorded in bundles' manifests as :data:`DEFINITION`):

* **Explanation map** ``E``: the map (ReLU'd, upsampled to the input size) min-max scaled to [0, 1]; a
  constant map (all zero, say) highlights nothing and gives ``E = 0``. The masked image is ``E * x`` on the
  model input, as torchcam's ``ClassificationMetric`` and grad-cam's ``CamMultImageConfidenceChange`` do.
* ``Y``: the target's softmax probability on the image; ``O``: on ``E * x``. One forward per distinct ``E``.
* **Average Drop** = ``max(0, Y - O) / Y`` (lower is better): torchcam's ``avg_drop`` (which divides by
  ``Y + 1e-7``); papers print it x 100.
* **Increase in Confidence** = ``1[O > Y]`` (higher is better): torchcam's ``conf_increase`` and grad-cam's
  ``IncreaseInConfidence``.
* **Average Gain** = ``max(0, O - Y) / (1 - Y)`` (higher is better; Opti-CAM's companion of Average Drop; no
  library we know implements it: checked against a direct computation).
* **Confidence change** = ``O - Y`` (higher is better): grad-cam's ``CamMultImageConfidenceChange`` with a
  softmax target; **drop in confidence** = ``max(0, Y - O)`` (lower is better): grad-cam's
  ``DropInConfidence``.

Example:
    >>> import torch
    >>> from camanim.compute.metrics.confidence import confidence_scores
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    >>> s = confidence_scores(model, torch.rand(3, 32, 32), torch.rand(2, 32, 32), target_class=1)
    >>> s.average_drop.shape
    (2,)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from camanim.compute.metrics.engine import (
    MapsLike,
    MetricError,
    Perturbation,
    PerturbationContext,
    ProgressCallback,
    Target,
    _as_image,
    _as_maps,
    _device,
    _forward_copy,
    as_target,
    multiply,
    score_units,
    split_batch,
)

__all__ = [
    "DEFINITION",
    "Confidence",
    "ConfidenceScores",
    "confidence_scores",
    "explanation_map",
]

DEFINITION: dict[str, str] = {
    "metric": "Average Drop and Increase in Confidence (Chattopadhay et al., Grad-CAM++, WACV 2018), Average "
    "Gain (Zhang et al., Opti-CAM, 2023), grad-cam's confidence change and drop in confidence",
    "explanation_map": "E = the map (ReLU'd, upsampled) min-max scaled to [0, 1] (a constant map gives E = 0); "
    "the masked image is E * x on the model input, as torchcam and grad-cam",
    "average_drop": "max(0, Y - O) / Y, Y and O the target's softmax probability on x and on E * x; lower is "
    "better (torchcam's avg_drop)",
    "increase_in_confidence": "1[O > Y], higher is better (torchcam's conf_increase, grad-cam's "
    "IncreaseInConfidence)",
    "average_gain": "max(0, O - Y) / (1 - Y), higher is better",
    "confidence_change": "O - Y, higher is better (grad-cam's CamMultImageConfidenceChange, softmax target)",
    "drop_in_confidence": "max(0, Y - O), lower is better (grad-cam's DropInConfidence)",
}


def explanation_map(saliency: Tensor) -> Tensor:
    """``E``: ``saliency`` ``(H, W)`` min-max scaled to [0, 1], float32; zeros for a constant map."""
    m = torch.nan_to_num(saliency.detach().float().cpu(), nan=0.0)
    lo, hi = m.min(), m.max()
    if not bool(hi > lo):
        return torch.zeros_like(m)
    return ((m - lo) / (hi - lo)).contiguous()


def confidence_units(maps: Sequence[Tensor]) -> Iterator[list[Perturbation | None]]:
    """Per map, its one masked image ``E * x``."""
    for m in maps:
        yield [multiply(explanation_map(m))]


@dataclass(frozen=True)
class ConfidenceScores:
    """The target's probability on ``x`` and on each map's ``E * x``, and the metrics derived from them.

    Attributes:
        keys: one key per map.
        clean_probability: ``Y`` (per map ``(L,)`` when averaged over images by :class:`Confidence`).
        masked_probability: ``(L,)`` ``O``.
        target: the target class (``None`` when averaged over images with different targets).
        images: number of images averaged; the metrics are then means over images of per-image values.
        stats: counts and seconds of the computation.
    """

    keys: tuple[Any, ...]
    clean_probability: float
    masked_probability: np.ndarray = field(repr=False)
    target: int | None = None
    images: int = 1
    sums: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    stats: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def _metric(self, name: str) -> np.ndarray:
        if self.sums is not None:
            return self.sums[name] / self.images
        return per_image_metrics(self.clean_probability, self.masked_probability)[name]

    @property
    def average_drop(self) -> np.ndarray:
        """``(L,)`` ``max(0, Y - O) / Y`` (lower is better)."""
        return self._metric("average_drop")

    @property
    def increase_in_confidence(self) -> np.ndarray:
        """``(L,)`` ``1[O > Y]`` (higher is better)."""
        return self._metric("increase_in_confidence")

    @property
    def average_gain(self) -> np.ndarray:
        """``(L,)`` ``max(0, O - Y) / (1 - Y)`` (higher is better)."""
        return self._metric("average_gain")

    @property
    def confidence_change(self) -> np.ndarray:
        """``(L,)`` ``O - Y`` (higher is better)."""
        return self._metric("confidence_change")

    @property
    def drop_in_confidence(self) -> np.ndarray:
        """``(L,)`` ``max(0, Y - O)`` (lower is better)."""
        return self._metric("drop_in_confidence")

    def __len__(self) -> int:
        return len(self.keys)


METRIC_NAMES = (
    "average_drop",
    "increase_in_confidence",
    "average_gain",
    "confidence_change",
    "drop_in_confidence",
)


def per_image_metrics(y: float, o: np.ndarray) -> dict[str, np.ndarray]:
    """The confidence metrics of one image from ``Y`` and ``(L,)`` ``O``."""
    o = np.asarray(o, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "average_drop": np.maximum(y - o, 0.0) / y,
            "increase_in_confidence": (o > y).astype(np.float64),
            "average_gain": np.maximum(o - y, 0.0) / (1.0 - y),
            "confidence_change": o - y,
            "drop_in_confidence": np.maximum(y - o, 0.0),
        }


def confidence_scores(
    model: nn.Module,
    x: Tensor,
    maps: MapsLike,
    target_class: Target,
    *,
    batch_size: int = 64,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> ConfidenceScores:
    """The confidence metrics of each map of one image (definitions in the module docstring).

    Args:
        model: a classifier returning ``(B, K)`` logits (run in eval and inference mode; flags restored).
        x: the model input, ``(C, H, W)`` or ``(1, C, H, W)``.
        maps: one map ``(H, W)``, a stack ``(L, H, W)``, a sequence or a mapping key -> ``(H, W)``.
        target_class: the class whose softmax probability is scored, or a target callable (its score; see
            :func:`camanim.compute.metrics.road.road_scores`; Average Drop and Average Gain assume a
            probability in [0, 1]).
        batch_size: masked images per forward.
        clean_probability: ``Y`` when known.
        progress: called with ``(maps done, maps total)``.
        optimize: forwards on a private optimised copy of the model.

    Returns:
        A :class:`ConfidenceScores`.
    """
    img = _as_image(x)
    tgt = as_target(target_class)
    net, cl = _forward_copy(model, optimize, img[None], tgt)
    return _confidence_scores(net, cl, img, maps, tgt, batch_size, clean_probability, progress)


def _confidence_scores(
    net: nn.Module,
    cl: bool,
    img: Tensor,
    maps: MapsLike,
    target: Target,
    batch_size: int,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
) -> ConfidenceScores:
    keys, stack = _as_maps(maps, tuple(img.shape[1:]))
    ctx = PerturbationContext(img.to(_device(net)))
    probs, clean, stats = score_units(
        net, ctx, confidence_units(stack), target, n_units=len(stack), batch_size=batch_size,
        clean_probability=clean_probability, progress=progress, channels_last=cl,
    )  # fmt: skip
    o = np.array([p[0] for p in probs], dtype=np.float64)
    return ConfidenceScores(keys, clean, o, target if isinstance(target, int) else None, 1, None, stats)


class Confidence:
    """The confidence metrics as a stateful metric: :meth:`update` with batches, :meth:`compute` the means
    over every image seen (Average Drop = mean of per-image drops, as the papers and torchcam average).

    Args:
        model: the classifier.
        batch_size, optimize: as in :func:`confidence_scores`.
    """

    higher_is_better = {
        "average_drop": False,
        "increase_in_confidence": True,
        "average_gain": True,
        "confidence_change": True,
        "drop_in_confidence": False,
    }
    is_differentiable = False

    def __init__(self, model: nn.Module, *, batch_size: int = 64, optimize: bool | None = None) -> None:
        self.model, self.optimize, self.batch_size = model, optimize, int(batch_size)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._keys: tuple[Any, ...] | None = None
        self._sums: dict[str, np.ndarray] = {}
        self._o = None
        self._clean = 0.0
        self._targets: set[int] = set()
        self._count = 0

    def update(self, images: Tensor, maps: MapsLike, targets: int | Sequence[int] | Tensor) -> None:
        """Score a batch (shapes as :meth:`camanim.compute.metrics.road.ROAD.update`)."""
        items = split_batch(images, maps, targets)
        net, cl = _forward_copy(self.model, self.optimize, _as_image(items[0][0])[None])
        for img, m, tgt in items:
            s = _confidence_scores(net, cl, _as_image(img), m, tgt, self.batch_size)
            if self._keys is None:
                self._keys = s.keys
                self._o = np.zeros_like(s.masked_probability)
                self._sums = {k: np.zeros_like(s.masked_probability) for k in METRIC_NAMES}
            elif s.keys != self._keys:
                raise MetricError(f"maps keyed {s.keys} after earlier updates keyed {self._keys}")
            for k, v in per_image_metrics(s.clean_probability, s.masked_probability).items():
                self._sums[k] = self._sums[k] + v
            self._o = self._o + s.masked_probability
            self._clean += s.clean_probability
            self._targets.add(tgt)
            self._count += 1

    def compute(self) -> ConfidenceScores:
        """Means over every image seen.

        Raises:
            MetricError: nothing was seen since construction or :meth:`reset`.
        """
        if self._keys is None:
            raise MetricError("Confidence.compute() before any update")
        n = self._count
        target = next(iter(self._targets)) if len(self._targets) == 1 else None
        return ConfidenceScores(self._keys, self._clean / n, self._o / n, target, n, dict(self._sums))
