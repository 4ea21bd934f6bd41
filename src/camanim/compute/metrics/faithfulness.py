"""Every faithfulness metric of a map by name, and all of them for many maps of one image in one pass.

Metrics (:data:`METRICS`; ``higher_is_better`` says which way is better):

======================== ========== =====================================================================
name                     better     definition
======================== ========== =====================================================================
``road``                 higher     ROAD = mean_p (LeRF_p - MoRF_p) / 2 (:mod:`.road`)
``morf``                 lower      ROAD's MoRF curve on its own: mean_p of the probability change after
                                    imputing the most relevant p (grad-cam's ``ROADMostRelevantFirstAverage``)
``lerf``                 higher     ROAD's LeRF curve on its own (grad-cam's ``ROADLeastRelevantFirstAverage``)
``deletion``             lower      deletion AUC (RISE; :mod:`.deletion`)
``insertion``            higher     insertion AUC (RISE)
``average_drop``         lower      Grad-CAM++'s Average Drop (:mod:`.confidence`; torchcam's ``avg_drop``)
``increase_in_confidence`` higher   Grad-CAM++'s Increase in Confidence (torchcam, grad-cam)
``average_gain``         higher     Average Gain (Opti-CAM)
``confidence_change``    higher     grad-cam's ``CamMultImageConfidenceChange``: O - Y
``drop_in_confidence``   lower      grad-cam's ``DropInConfidence``: max(0, Y - O)
======================== ========== =====================================================================

:func:`faithfulness_scores` runs the families asked for (ROAD, deletion/insertion, confidence) over one
shared :func:`~camanim.compute.metrics.engine.score_units` pass: each map's perturbations of every family
form one unit, so the images two families share (deletion with the ``"road"`` baseline and ROAD's MoRF
masks, every curve's all-baseline end) are made and forwarded once.

The target is a class (its softmax probability is scored) or a target callable of
:mod:`camanim.compute.tasks` (its own score; see the "Score" and "Tasks" definitions of
:mod:`~camanim.compute.metrics.road`). ROAD, MoRF, LeRF, deletion, insertion, Increase in Confidence,
confidence change and drop in confidence are defined for any score; Average Drop and Average Gain divide by
``Y`` and ``1 - Y`` and are defined for a probability only (:data:`PROBABILITY_ONLY`).

Example:
    >>> import torch
    >>> from camanim.compute.metrics.faithfulness import faithfulness_scores
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    >>> s = faithfulness_scores(model, torch.rand(3, 32, 32), torch.rand(2, 32, 32), 1, steps=4)
    >>> sorted(s.values)[:3], s.values["deletion"].shape
    (['average_drop', 'average_gain', 'confidence_change'], (2,))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from camanim.compute.metrics import confidence as conf
from camanim.compute.metrics import deletion as dele
from camanim.compute.metrics import road as rd
from camanim.compute.metrics.engine import (
    MapsLike,
    MetricError,
    Perturbation,
    PerturbationContext,
    ProgressCallback,
    Target,
    _as_image,
    _as_maps,
    _counts,
    _device,
    _forward_copy,
    as_target,
    score_units,
    spatial_size,
)
from camanim.errors import UnknownNameError

__all__ = [
    "FAMILIES",
    "METRICS",
    "PROBABILITY_ONLY",
    "FaithfulnessScores",
    "MetricInfo",
    "faithfulness_scores",
    "parse_metrics",
]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is.

    Attributes:
        name: its name.
        family: ``"road"``, ``"deletion"`` or ``"confidence"`` (the perturbations it needs).
        higher_is_better: which way is better.
        label: a short label for plots.
        reference: the paper and the implementation matched.
    """

    name: str
    family: str
    higher_is_better: bool
    label: str
    reference: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("road", "road", True, "ROAD", "Rong et al. 2022; grad-cam ROADCombined"),
        MetricInfo("morf", "road", False, "ROAD MoRF", "grad-cam ROADMostRelevantFirstAverage"),
        MetricInfo("lerf", "road", True, "ROAD LeRF", "grad-cam ROADLeastRelevantFirstAverage"),
        MetricInfo("deletion", "deletion", False, "deletion AUC", "Petsiuk et al. 2018; torchcam"),
        MetricInfo("insertion", "deletion", True, "insertion AUC", "Petsiuk et al. 2018; torchcam"),
        MetricInfo("average_drop", "confidence", False, "Average Drop", "Grad-CAM++; torchcam avg_drop"),
        MetricInfo(
            "increase_in_confidence",
            "confidence",
            True,
            "Increase in Confidence",
            "Grad-CAM++; torchcam conf_increase, grad-cam IncreaseInConfidence",
        ),  # fmt: skip
        MetricInfo("average_gain", "confidence", True, "Average Gain", "Zhang et al. 2023 (Opti-CAM)"),
        MetricInfo(
            "confidence_change",
            "confidence",
            True,
            "confidence change",
            "grad-cam CamMultImageConfidenceChange",
        ),  # fmt: skip
        MetricInfo(
            "drop_in_confidence", "confidence", False, "drop in confidence", "grad-cam DropInConfidence"
        ),
    )
}

#: Families in the order their perturbations are asked for.
FAMILIES = ("road", "deletion", "confidence")

#: Metrics whose definition needs the score to be a probability in [0, 1] (they divide by ``Y`` or
#: ``1 - Y``): a class's softmax, not a task target's score.
PROBABILITY_ONLY = ("average_drop", "average_gain")


def parse_metrics(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"road,deletion"``, ``"all"`` or a list to metric names (order kept, duplicates dropped).

    Raises:
        UnknownNameError: a name not in :data:`METRICS`.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower().replace("-", "_")
        if not name:
            continue
        names = list(METRICS) if name == "all" else [name]
        for n in names:
            if n not in METRICS:
                raise UnknownNameError("faithfulness metric", n, list(METRICS) + ["all"])
            if n not in out:
                out.append(n)
    if not out:
        raise MetricError("no faithfulness metric given")
    return tuple(out)


@dataclass(frozen=True)
class FaithfulnessScores:
    """Faithfulness metrics of many maps of one image.

    Attributes:
        keys: one key per map.
        metrics: the metric names asked for.
        values: per metric, ``(L,)`` one value per map.
        road: ROAD's MoRF/LeRF scores when a ROAD metric was asked (:class:`~.road.RoadScores`).
        deletion: the curves when deletion or insertion was asked (:class:`~.deletion.DeletionScores`).
        confidence: ``Y`` and ``O`` when a confidence metric was asked (:class:`~.confidence.ConfidenceScores`).
        clean_probability: the target's score on the image (a class's softmax probability).
        target: the target class (None for a target callable).
        stats: counts (perturbations asked, unique, forwards) and seconds.
    """

    keys: tuple[Any, ...]
    metrics: tuple[str, ...]
    values: dict[str, np.ndarray] = field(repr=False)
    road: Any = field(default=None, repr=False)
    deletion: Any = field(default=None, repr=False)
    confidence: Any = field(default=None, repr=False)
    clean_probability: float = float("nan")
    target: int | None = None
    stats: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Settings:
    """How the families perturb (see :func:`faithfulness_scores`)."""

    percentages: tuple[float, ...] = rd.DEFAULT_PERCENTAGES
    steps: int = dele.STEPS
    baseline: str = "rise"
    imputer: Any = None
    preprocessing: Any = None
    seed: int = 0


def _units(
    maps: Sequence[Tensor], families: Sequence[str], n_pix: int, s: Settings
) -> tuple[Iterator[list[Perturbation | None]], dict[str, slice]]:
    """One unit per map: the families' perturbations concatenated, and where each family's part is."""
    sizes = {
        "road": 2 * len(s.percentages),
        "deletion": 2 * (s.steps + 1),
        "confidence": 1,
    }
    parts, at = {}, 0
    for f in families:
        parts[f] = slice(at, at + sizes[f])
        at += sizes[f]
    ks = _counts(n_pix, s.percentages)
    counts = dele.curve_counts(n_pix, s.steps)

    def gen() -> Iterator[list[Perturbation | None]]:
        for m in maps:
            unit: list[Perturbation | None] = []
            for f in families:
                if f == "road":
                    unit += next(rd.road_units([m], ks, s.seed))
                elif f == "deletion":
                    unit += next(dele.deletion_units([m], counts, s.seed, s.baseline))
                else:
                    unit += next(conf.confidence_units([m]))
            yield unit

    return gen(), parts


def faithfulness_core(
    net: nn.Module,
    channels_last: bool,
    img: Tensor,
    keys: tuple[Any, ...],
    maps: Sequence[Tensor],
    target: Target,
    metrics: Sequence[str],
    settings: Settings,
    *,
    batch_size: int = 64,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
    on_maps: Callable[[list[int]], None] | None = None,
) -> FaithfulnessScores:
    """:func:`faithfulness_scores` on a module already prepared (:func:`~.engine._forward_copy`) and maps
    already checked; ``on_maps(positions)`` is called as maps complete."""
    families = [f for f in FAMILIES if any(METRICS[m].family == f for m in metrics)]
    cls = target if isinstance(target, int) else None
    if cls is None and (bad := [m for m in metrics if m in PROBABILITY_ONLY]):
        raise MetricError(
            f"{', '.join(bad)} divide by the target's probability (Y, 1 - Y): defined for a class's softmax, "
            "not for a task target's score"
        )
    n_pix = spatial_size(img)
    if "deletion" in families:
        dele.check_baseline(settings.baseline)
    needs_imputer = "road" in families or dele.BASELINES.get(settings.baseline, ("",))[0] == "road"
    imputer = rd._default_imputer(settings.imputer, img.dim() - 1) if needs_imputer else None
    ctx = PerturbationContext(img.to(_device(net)), imputer, settings.preprocessing, settings.seed)
    units, parts = _units(maps, families, n_pix, settings)

    def done(positions: list[int], _probs: list[np.ndarray]) -> None:
        if on_maps is not None:
            on_maps(positions)

    probs, clean, stats = score_units(
        net, ctx, units, target, n_units=len(maps), batch_size=batch_size,
        clean_probability=clean_probability, on_units=done, progress=progress, channels_last=channels_last,
    )  # fmt: skip
    table = np.stack(probs) if probs else np.zeros((0, max((p.stop for p in parts.values()), default=0)))
    values: dict[str, np.ndarray] = {}
    road = deletion = confidence = None
    if "road" in parts:
        diff = table[:, parts["road"]] - clean
        n_p = len(settings.percentages)
        removed = np.array([k / n_pix for k in _counts(n_pix, settings.percentages)])
        road = rd.RoadScores(keys, settings.percentages, diff[:, :n_p], diff[:, n_p:], removed, clean, cls)
        values["road"], values["morf"], values["lerf"] = road.road, road.morf.mean(1), road.lerf.mean(1)
    if "deletion" in parts:
        curves = table[:, parts["deletion"]]
        s1 = settings.steps + 1
        fractions = np.array(dele.curve_counts(n_pix, settings.steps), dtype=np.float64) / n_pix
        deletion = dele.DeletionScores(
            keys, fractions, curves[:, :s1], curves[:, s1:], settings.baseline, clean, cls
        )
        values["deletion"], values["insertion"] = deletion.deletion_auc, deletion.insertion_auc
    if "confidence" in parts:
        confidence = conf.ConfidenceScores(keys, clean, table[:, parts["confidence"]][:, 0], cls)
        values.update(conf.per_image_metrics(clean, confidence.masked_probability))
    return FaithfulnessScores(
        keys,
        tuple(metrics),
        {m: values[m] for m in metrics},
        road,
        deletion,
        confidence,
        clean,
        cls,
        stats,
    )


def faithfulness_scores(
    model: nn.Module,
    x: Tensor,
    maps: MapsLike,
    target_class: Target,
    *,
    metrics: str | Sequence[str] = "all",
    percentages: Sequence[float] = rd.DEFAULT_PERCENTAGES,
    steps: int = dele.STEPS,
    baseline: str = "rise",
    imputer: Any = None,
    preprocessing: Any = None,
    seed: int = 0,
    batch_size: int = 64,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> FaithfulnessScores:
    """Several faithfulness metrics of each map of one image, from one deduplicated, batched pass.

    Args:
        model: a classifier returning ``(B, K)`` logits (run in eval and inference mode; flags restored).
        x: the model input, ``(C, H, W)`` or ``(1, C, H, W)``.
        maps: one map ``(H, W)``, a stack ``(L, H, W)``, a sequence or a mapping key -> ``(H, W)``, ReLU'd
            and upsampled to the input size.
        target_class: the class scored, or a target callable (see the module docstring).
        metrics: names of :data:`METRICS` or ``"all"``.
        percentages: ROAD's p values in percent.
        steps: intervals of the deletion and insertion curves.
        baseline: the deletion/insertion baseline (:data:`camanim.compute.metrics.deletion.BASELINES`).
        imputer: ROAD's imputer (and the ``"road"`` baseline's); default ``NoisyLinearImputer()``.
        preprocessing: impute in [0, 1] pixel space through it; ``None`` imputes in the space of ``x``.
        seed: tie-break and noise seed.
        batch_size: perturbed images per forward.
        clean_probability: the target's probability on ``x`` when known.
        progress: called with ``(maps done, maps total)``.
        optimize: forwards on a private optimised copy of the model.

    Returns:
        A :class:`FaithfulnessScores`; ``.values[metric]`` holds one value per map.
    """
    names = parse_metrics(metrics)
    ps = rd.check_percentages(percentages)
    dele.curve_counts(1, steps)
    dele.check_baseline(baseline)
    img = _as_image(x)
    keys, stack = _as_maps(maps, tuple(img.shape[1:]))
    tgt = as_target(target_class)
    net, cl = _forward_copy(model, optimize, img[None], tgt)
    settings = Settings(ps, int(steps), baseline, imputer, preprocessing, int(seed))
    return faithfulness_core(
        net, cl, img, keys, stack, tgt, names, settings, batch_size=batch_size,
        clean_probability=clean_probability, progress=progress,
    )  # fmt: skip
