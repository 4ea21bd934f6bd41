"""Deletion and insertion (Petsiuk et al., RISE, BMVC 2018) of saliency maps: a pure function and a stateful
metric, on the perturbation machinery shared with ROAD (:mod:`camanim.compute.metrics.engine`).

Definitions (recorded in bundles' manifests as :data:`DEFINITION`):

* **Ordering**: pixels ranked by the map (ReLU'd, upsampled to the input size), ties broken by ROAD's seeded
  key (:func:`~camanim.compute.metrics.engine.removal_order`).
* **Steps**: the curves are sampled at ``k_i = round(i / S * H * W)`` pixels, ``i = 0..S`` (``S = steps``,
  default 20). torchcam's ``DeletionInsertionMetric(steps=S)`` uses multiples of ``ceil(H * W / S)``: the
  same counts whenever ``S`` divides ``H * W`` (RISE itself steps 224 * 8 pixels at 224 x 224: S = 28).
* **Deletion**: the ``k_i`` most relevant pixels replaced by the baseline; **insertion**: the baseline with
  the ``k_i`` most relevant pixels put back from the image. The score at each point is the target's
  softmax probability (absolute, not a difference).
* **AUC**: trapezoidal area under each curve over the fractions ``k_i / (H * W)`` (torchcam's
  ``torch.trapezoid``; RISE's own sum over uniform steps is the same rule). Deletion: lower is better;
  insertion: higher is better.
* **Baselines** (:data:`BASELINES`): ``"rise"`` (default) as RISE's evaluation code: deletion to the model
  input's zero (the normalisation's mean colour) and insertion from a blurred copy (its ``gkern(11, 5)``
  Gaussian, sigma 1.1 px, zero padding, on the model input); ``"blur"`` and ``"zero"`` use one of those for
  both curves; ``"road"`` removes pixels with ROAD's noisy linear imputation (the same imputer, space and
  seeded noise as ROAD: the deletion masks at 20/40/60/80 % are ROAD's MoRF masks and share their images).
* **Shared images**: the all-baseline image ends every deletion curve and starts every insertion curve; it is
  forwarded once per baseline, like every perturbed image that recurs between maps.

Example:
    >>> import torch
    >>> from camanim.compute.metrics.deletion import deletion_scores
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    >>> s = deletion_scores(model, torch.rand(3, 32, 32), torch.rand(2, 32, 32), target_class=1, steps=4)
    >>> s.deletion_auc.shape, s.deletion.shape
    ((2,), (2, 5))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    impute,
    removal_order,
    replace,
    resolve_imputer,
    score_units,
    spatial_size,
    split_batch,
)

__all__ = [
    "BASELINES",
    "DEFINITION",
    "STEPS",
    "DeletionInsertion",
    "DeletionScores",
    "curve_counts",
    "deletion_scores",
]

#: Default number of intervals of each curve (torchcam's default).
STEPS = 20

#: Baselines: what a deleted pixel becomes, for (deletion, insertion).
BASELINES: dict[str, tuple[str, str]] = {
    "rise": ("zero", "blur"),
    "blur": ("blur", "blur"),
    "zero": ("zero", "zero"),
    "road": ("road", "road"),
}

DEFINITION: dict[str, str] = {
    "metric": "deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018)",
    "steps": "curves sampled at k_i = round(i / S * H * W) pixels, i = 0..S; torchcam's "
    "DeletionInsertionMetric(steps=S) when S divides H * W",
    "ordering": "pixels ranked by the map (ReLU'd, upsampled), ties broken by ROAD's seeded key",
    "deletion": "the k_i most relevant pixels replaced by the baseline; softmax probability of the target; "
    "AUC (trapezoid over k_i / (H * W)), lower is better",
    "insertion": "the baseline with the k_i most relevant pixels restored; AUC, higher is better",
    "baselines": "rise: deletion to the model input's zero, insertion from RISE's blur (gkern(11, 5), sigma "
    "1.1 px, zero padding, model input); blur / zero: that one for both; road: ROAD's noisy linear "
    "imputation (same imputer, space and seeded noise as ROAD)",
}


def curve_counts(n: int, steps: int) -> list[int]:
    """Pixels perturbed at each point of a curve: ``round(i / steps * n)``, ``i = 0..steps``."""
    if steps < 1:
        raise MetricError(f"steps must be at least 1, got {steps}")
    return [int(round(i * n / steps)) for i in range(steps + 1)]


def check_baseline(baseline: str) -> tuple[str, str]:
    """The (deletion, insertion) substrates of ``baseline``.

    Raises:
        MetricError: an unknown name.
    """
    if baseline not in BASELINES:
        raise MetricError(f"unknown deletion baseline {baseline!r}; expected one of {', '.join(BASELINES)}")
    return BASELINES[baseline]


def _perturbation(mask: np.ndarray, substrate: str) -> Perturbation:
    return impute(mask) if substrate == "road" else replace(mask, substrate)


def deletion_units(
    maps: Sequence[Tensor], counts: Sequence[int], seed: int, baseline: str
) -> Iterator[list[Perturbation | None]]:
    """Per map, its deletion then insertion curve's perturbations (``None`` = the original image)."""
    sub_del, sub_ins = check_baseline(baseline)
    for m in maps:
        order = removal_order(m, seed)
        n = order.size
        unit: list[Perturbation | None] = []
        for k in counts:  # deletion: the k most relevant pixels go
            if k == 0:
                unit.append(None)
                continue
            mask = np.zeros(n, dtype=bool)
            mask[order[n - k :]] = True
            unit.append(_perturbation(mask, sub_del))
        for k in counts:  # insertion: all but the k most relevant pixels are baseline
            if k == n:
                unit.append(None)
                continue
            mask = np.zeros(n, dtype=bool)
            mask[order[: n - k]] = True
            unit.append(_perturbation(mask, sub_ins))
        yield unit


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    f = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    return f(y, x, axis=-1)


@dataclass(frozen=True)
class DeletionScores:
    """Deletion and insertion curves of one or more maps of one image (or averaged by :class:`DeletionInsertion`).

    Attributes:
        keys: one key per map (layer names for a mapping, positions for a stack).
        fractions: ``(S + 1,)`` fraction of pixels perturbed at each point.
        deletion: ``(L, S + 1)`` target probability with the most relevant fraction deleted.
        insertion: ``(L, S + 1)`` target probability with the most relevant fraction inserted.
        baseline: the baseline name (:data:`BASELINES`).
        clean_probability: the target's probability on the original (mean over images).
        target: the target class (``None`` when averaged over images with different targets).
        images: number of images averaged.
        stats: counts and seconds of the computation.
    """

    keys: tuple[Any, ...]
    fractions: np.ndarray = field(repr=False)
    deletion: np.ndarray = field(repr=False)
    insertion: np.ndarray = field(repr=False)
    baseline: str = "rise"
    clean_probability: float = float("nan")
    target: int | None = None
    images: int = 1
    stats: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def deletion_auc(self) -> np.ndarray:
        """``(L,)`` area under the deletion curve (lower is better)."""
        return _trapezoid(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> np.ndarray:
        """``(L,)`` area under the insertion curve (higher is better)."""
        return _trapezoid(self.insertion, self.fractions)

    def __len__(self) -> int:
        return len(self.keys)


def _default_imputer(imputer: Any, spatial_dims: int = 2) -> Any:
    return resolve_imputer(imputer, spatial_dims)


def deletion_scores(
    model: nn.Module,
    x: Tensor,
    maps: MapsLike,
    target_class: Target,
    *,
    steps: int = STEPS,
    baseline: str = "rise",
    imputer: Any = None,
    preprocessing: Any = None,
    seed: int = 0,
    batch_size: int = 64,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> DeletionScores:
    """Deletion and insertion curves and AUCs of each map of one image (definitions in the module docstring).

    Args:
        model: a classifier returning ``(B, K)`` logits (run in eval and inference mode; flags restored).
        x: the model input, ``(C, H, W)`` or ``(1, C, H, W)``.
        maps: one map ``(H, W)``, a stack ``(L, H, W)``, a sequence or a mapping key -> ``(H, W)``, at the
            input size.
        target_class: the class whose softmax probability is scored, or a target callable (its score; see
            :func:`camanim.compute.metrics.road.road_scores`).
        steps: intervals of each curve.
        baseline: ``"rise"`` (default), ``"blur"``, ``"zero"`` or ``"road"`` (see :data:`BASELINES`).
        imputer: the imputer of the ``"road"`` baseline (default ``NoisyLinearImputer()``).
        preprocessing: impute in [0, 1] pixel space through it (``"road"`` baseline only).
        seed: tie-break (and imputation noise) seed.
        batch_size: perturbed images per forward.
        clean_probability: the target's probability on ``x`` when known.
        progress: called with ``(maps done, maps total)``.
        optimize: forwards on a private optimised copy of the model (see
            :func:`camanim.compute.metrics.road.road_scores`).

    Returns:
        A :class:`DeletionScores`.
    """
    check_baseline(baseline)
    img = _as_image(x)
    tgt = as_target(target_class)
    net, cl = _forward_copy(model, optimize, img[None], tgt)
    return _deletion_scores(
        net, cl, img, maps, tgt, steps, baseline, _default_imputer(imputer, img.dim() - 1), preprocessing,
        seed, batch_size, clean_probability, progress,
    )  # fmt: skip


def _deletion_scores(
    net: nn.Module,
    cl: bool,
    img: Tensor,
    maps: MapsLike,
    target: Target,
    steps: int,
    baseline: str,
    imputer: Any,
    preprocessing: Any,
    seed: int,
    batch_size: int,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
) -> DeletionScores:
    keys, stack = _as_maps(maps, tuple(img.shape[1:]))
    n = spatial_size(img)
    counts = curve_counts(n, steps)
    ctx = PerturbationContext(img.to(_device(net)), imputer, preprocessing, seed)
    probs, clean, stats = score_units(
        net, ctx, deletion_units(stack, counts, seed, baseline), target, n_units=len(stack),
        batch_size=batch_size, clean_probability=clean_probability, progress=progress, channels_last=cl,
    )  # fmt: skip
    s = len(counts)
    curves = np.stack(probs) if probs else np.zeros((0, 2 * s))
    fractions = np.array(counts, dtype=np.float64) / n
    tgt = target if isinstance(target, int) else None
    return DeletionScores(keys, fractions, curves[:, :s], curves[:, s:], baseline, clean, tgt, 1, stats)


class DeletionInsertion:
    """Deletion and insertion as a stateful metric: :meth:`update` with batches, :meth:`compute` the mean
    curves (hence AUCs) over every image seen, per map key. Shares :func:`deletion_scores`' maths.

    Args:
        model: the classifier.
        steps, baseline, imputer, preprocessing, seed, batch_size, optimize: as in :func:`deletion_scores`.
    """

    higher_is_better = {"deletion": False, "insertion": True}
    is_differentiable = False

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = STEPS,
        baseline: str = "rise",
        imputer: Any = None,
        preprocessing: Any = None,
        seed: int = 0,
        batch_size: int = 64,
        optimize: bool | None = None,
    ) -> None:
        check_baseline(baseline)
        curve_counts(1, steps)
        self.model, self.optimize = model, optimize
        self.steps, self.baseline = int(steps), baseline
        self.imputer, self.preprocessing = _default_imputer(imputer), preprocessing
        self._imputer_arg = imputer
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._sum: DeletionScores | None = None
        self._targets: set[int] = set()
        self._count = 0
        self._clean = 0.0

    def update(self, images: Tensor, maps: MapsLike, targets: int | Sequence[int] | Tensor) -> None:
        """Score a batch (shapes as :meth:`camanim.compute.metrics.road.ROAD.update`)."""
        items = split_batch(images, maps, targets)
        first = _as_image(items[0][0])
        imputer = self.imputer if first.dim() == 3 else _default_imputer(self._imputer_arg, 3)
        net, cl = _forward_copy(self.model, self.optimize, first[None])
        for img, m, tgt in items:
            s = _deletion_scores(
                net, cl, _as_image(img), m, tgt, self.steps, self.baseline, imputer, self.preprocessing,
                self.seed, self.batch_size,
            )  # fmt: skip
            if self._sum is None:
                self._sum = s
            elif s.keys != self._sum.keys or not np.array_equal(s.fractions, self._sum.fractions):
                raise MetricError(f"maps keyed {s.keys} after earlier updates keyed {self._sum.keys}")
            else:
                self._sum = DeletionScores(
                    s.keys, s.fractions, self._sum.deletion + s.deletion, self._sum.insertion + s.insertion,
                    s.baseline,
                )  # fmt: skip
            self._clean += s.clean_probability
            self._targets.add(tgt)
            self._count += 1

    def compute(self) -> DeletionScores:
        """Mean curves over every image seen.

        Raises:
            MetricError: nothing was seen since construction or :meth:`reset`.
        """
        if self._sum is None:
            raise MetricError("DeletionInsertion.compute() before any update")
        n = self._count
        s = self._sum
        target = next(iter(self._targets)) if len(self._targets) == 1 else None
        return DeletionScores(
            s.keys, s.fractions, s.deletion / n, s.insertion / n, s.baseline, self._clean / n, target, n
        )
