"""ROAD (Remove And Debias, Rong et al. 2022) of saliency maps: a pure function and a stateful metric.

Definitions (recorded in bundles' manifests as :data:`DEFINITION`):

* **p** is the fraction of pixels removed, in both orders: MoRF (most relevant first) removes the
  ``k = round(p * H * W)`` most relevant pixels, LeRF (least relevant first) the ``k`` least relevant.
  Default p in {20, 40, 60, 80} %.
* **Ordering**: pixels are ranked by the map (already ReLU'd and upsampled to the input size, e.g.
  :meth:`camanim.explanation.Explanation.upsampled`). Ties are broken by a seeded random key, compared only
  between equal map values (a lexicographic sort on ``(map value, key)``: the limit of a vanishing jitter).
  A flat or mostly zero map therefore still removes exactly ``k`` pixels, and distinct map values are never
  reordered. grad-cam has no tie-break: it thresholds at ``np.percentile`` with ``<``, so on a map that is
  85 % zeros it removes every pixel whatever p is asked, and early layers often give such maps.
* **Imputation**: noisy linear imputation (:mod:`camanim.road.imputers`): each removed pixel becomes the
  weighted mean of its in-bounds 8 neighbours (1/6 direct, 1/12 diagonal), solved jointly, plus Gaussian
  noise (sigma = the imputer's ``noise``, 0.01 by default) on removed pixels. With ``preprocessing`` given it
  runs in [0, 1] pixel space (``denormalize``, impute, ``normalize``; nothing is clipped), as in the ROAD
  paper; without, in the space of the tensor given. Without noise the two agree (the imputation commutes
  with a per-channel affine map); with noise they differ by the noise scale (grad-cam imputes in the
  model-normalised space, where sigma = 0.01 is about 0.0023 in pixel units).
* **Noise** is drawn from a generator seeded by ``(seed, digest of the mask)``: the same mask gives the same
  perturbed image whatever the batching, order or layer, so layers with identical masks share one
  imputation and one forward, and an interrupted run resumes to the same numbers.
* **Score** of one perturbation: the target's score on the perturbed image minus on the original. For a
  class index the score is the softmax probability of the class; for a target callable (a task target of
  :mod:`camanim.compute.tasks` or the user's own) it is the callable's value on the model's output, in its
  own units (a segmentation target's summed logits over its region, a detection's IoU + class score,
  a cosine similarity...): ROAD values then compare the layers and methods of one target, not different
  targets. The clean forward is done once per image, first: a task target that decides what it scores at
  its first forward decides on the original image, and every perturbed image is scored against that same
  decision (:meth:`camanim.compute.tasks.TaskTarget.fixed`).
* **Tasks**: the pixels are ranked by the map over the whole image whatever the target (ROAD's definition):
  a segmentation region or a detection box restricts what is scored, not what is removed, since evidence
  outside the region moves its score too; the imputation is the same. A segmentation region stays the one
  decided on the original image (not re-predicted on the perturbed one, whose shrinking region would lower
  the sum for a reason that is not the map's); a detection is re-matched in the perturbed image by IoU with
  the box explained (grad-cam's ``FasterRCNNBoxScoreTarget``: the best-overlapping detection of the same
  label above the IoU threshold, 0 when there is none).
* **Volumes** ``(1, C, D, H, W)``: voxels are ranked by the map (ReLU'd, trilinearly upsampled to the volume)
  over the whole volume with the same tie-break, ``k = round(p * D * H * W)``, and imputed by
  :class:`~camanim.compute.metrics.imputers3d.NoisyLinearImputer3D` (26 neighbours: 1/6 face, 1/12 edge,
  1/24 corner; a 2-D ``NoisyLinearImputer`` given becomes it with the same noise, other 2-D imputers are
  refused), in the model's input space. Its conjugate gradients stop at a relative residual of 1e-8, so the
  same mask imputed in another batch agrees to that tolerance rather than bit for bit.
* **ROAD** = mean over p of (LeRF_p - MoRF_p) / 2; higher is better. On the symmetric default set this
  equals grad-cam's ``ROADCombined(percentiles=[20, 40, 60, 80])`` (grad-cam's percentile ``q`` *keeps* q %,
  i.e. removes 1 - q, and the set is symmetric). The CAManim paper writes a sum over p, but its Table 2
  values (<= 0.5) match the mean, which we use.

Example:
    >>> import torch
    >>> from camanim.compute.metrics.road import road_scores
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    >>> x = torch.rand(3, 32, 32)
    >>> s = road_scores(model, x, torch.rand(2, 32, 32), target_class=1)
    >>> s.road.shape, s.morf.shape
    ((2,), (2, 4))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.metrics.engine import (  # noqa: F401  (re-exported: ybROAD and benchmarks import them here)
    OPTIMIZE_ATOL,
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
    _mask_digest,
    _noise_generator,
    _probabilities,
    _tie_keys,
    as_target,
    impute,
    removal_order,
    resolve_imputer,
    score_units,
    spatial_size,
    split_batch,
)
from camanim.errors import UnknownNameError

__all__ = [
    "DEFAULT_PERCENTAGES",
    "DEFINITION",
    "ROAD",
    "RoadError",
    "RoadScores",
    "removal_masks",
    "removal_order",
    "road_scores",
]

log = logging.getLogger(__name__)

DEFAULT_PERCENTAGES: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)

#: How the numbers are defined; recorded in bundles' manifests.
DEFINITION: dict[str, str] = {
    "metric": "ROAD, Remove And Debias (Rong et al., ICML 2022)",
    "p": "fraction of pixels removed, k = round(p * H * W), in both orders: MoRF removes the k most "
    "relevant pixels, LeRF the k least relevant",
    "ordering": "pixels ranked by the map after ReLU, bilinearly upsampled to the input size; ties broken by "
    "a seeded random key compared only between equal values (lexicographic), so exactly k pixels are "
    "removed even from a flat map; grad-cam has no tie-break (np.percentile threshold with '<')",
    "imputation": "noisy linear imputation: each removed pixel = weighted mean of its in-bounds 8 neighbours "
    "(1/6 direct, 1/12 diagonal), one joint sparse SPD system per mask, plus N(0, sigma^2) noise on removed "
    "pixels, sigma = the imputer's noise",
    "imputation_space": "pixel: [0, 1] pixels (denormalize, impute, normalize, no clipping) as in the ROAD "
    "paper; model: the normalised model input, as grad-cam does (same result without noise)",
    "noise_seed": "noise drawn from a generator seeded by (seed, digest of the mask): identical masks give "
    "identical perturbed images, shared across layers",
    "score": "the target's score on the perturbed image minus on the original: the softmax probability of a "
    "target class; for a task target its own score (segmentation: the class's summed logit or probability "
    "over the region decided on the original image; detection: IoU + class score of the detection of the "
    "same label best overlapping the explained box in the perturbed image, 0 if none above the IoU "
    "threshold; embedding: cosine similarity to the reference; multi-label: summed sigmoids; regression: the "
    "output); pixels ranked over the whole image for every task",
    "forwards": "clean image once; each unique perturbed image once, in batches, eval mode, inference mode, on "
    "the model's device; on the CPU through a private channels-last copy with Conv-BN folded, checked to "
    "match the model within 1e-4 on the clean image",
    "volumes": "voxels ranked over the whole volume (trilinear upsampling, same tie-break), k = round(p * D * "
    "H * W); imputed by the 26-neighbour 3-D rule (1/6 face, 1/12 edge, 1/24 corner), in the model's input "
    "space, conjugate gradients to a 1e-8 relative residual",
    "road": "mean over p of (LeRF_p - MoRF_p) / 2, higher is better; equals grad-cam's "
    "ROADCombined(percentiles=[20, 40, 60, 80]); the CAManim paper writes a sum over p but its Table 2 "
    "values match the mean",
}


#: Raised for inputs of the wrong shape or values out of range; the error of every perturbation metric.
RoadError = MetricError


@dataclass(frozen=True)
class RoadScores:
    """ROAD of one or more maps of one image (or averaged over images by :class:`ROAD`).

    Attributes:
        keys: one key per map: layer names for a mapping, positions ``0..L-1`` for a stack.
        percentages: p values in percent, ``(P,)``.
        morf: ``(L, P)`` score (probability change) after removing the most relevant p.
        lerf: ``(L, P)`` score after removing the least relevant p.
        removed: ``(P,)`` fraction of pixels actually removed, ``round(p * H * W) / (H * W)``.
        clean_probability: the target's score on the original image (its softmax probability for a class;
            mean over images).
        target: the target class (``None`` when averaged over images with different targets, or for a
            target callable).
        images: number of images averaged.
        stats: counts and seconds of the computation (masks, unique masks, forwards, imputation time...).
    """

    keys: tuple[Any, ...]
    percentages: tuple[float, ...]
    morf: np.ndarray = field(repr=False)
    lerf: np.ndarray = field(repr=False)
    removed: np.ndarray = field(repr=False)
    clean_probability: float = float("nan")
    target: int | None = None
    images: int = 1
    stats: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def road(self) -> np.ndarray:
        """``(L,)`` ROAD per map: mean over p of (LeRF_p - MoRF_p) / 2."""
        return ((self.lerf - self.morf) / 2).mean(axis=1)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key: Any) -> float:
        """ROAD of the map with key ``key``."""
        try:
            i = self.keys.index(key)
        except ValueError:
            raise UnknownNameError("map", str(key), [str(k) for k in self.keys]) from None
        return float(self.road[i])

    def as_dict(self) -> dict[Any, float]:
        """``{key: ROAD}``."""
        return {k: float(v) for k, v in zip(self.keys, self.road, strict=True)}


# --------------------------------------------------------------------------------------------------------
# Orderings and masks.
# --------------------------------------------------------------------------------------------------------


def removal_masks(
    saliency: Tensor | np.ndarray, percentages: Sequence[float] = DEFAULT_PERCENTAGES, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The MoRF and LeRF masks of a map.

    Args:
        saliency: ``(H, W)`` map at input resolution.
        percentages: p values in percent.
        seed: tie-break seed.

    Returns:
        ``(morf, lerf)``, each ``(P, H, W)`` bool, ``True`` = removed; each removes ``round(p * H * W)``
        pixels exactly.
    """
    h, w = saliency.shape[-2:]
    order = removal_order(saliency, seed)
    morf = np.zeros((len(percentages), h * w), dtype=bool)
    lerf = np.zeros_like(morf)
    for i, k in enumerate(_counts(h * w, percentages)):
        if k:
            morf[i, order[-k:]] = True
            lerf[i, order[:k]] = True
    return torch.from_numpy(morf.reshape(-1, h, w)), torch.from_numpy(lerf.reshape(-1, h, w))


def check_percentages(percentages: Sequence[float]) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in percentages)
    except (TypeError, ValueError):
        raise RoadError(f"percentages must be numbers in (0, 100], got {percentages!r}") from None
    if not ps or any(not (0 < p <= 100) or not math.isfinite(p) for p in ps):
        raise RoadError(f"percentages must be numbers in (0, 100], got {percentages!r}")
    return ps


# --------------------------------------------------------------------------------------------------------
# The shared maths.
# --------------------------------------------------------------------------------------------------------


def road_units(maps: Sequence[Tensor], ks: Sequence[int], seed: int) -> Iterator[list[Perturbation | None]]:
    """Per map, its ``2 P`` imputations: MoRF for each count of ``ks``, then LeRF (``None`` for k = 0)."""
    for m in maps:
        order = removal_order(m, seed)
        n_pix = order.size
        unit: list[Perturbation | None] = []
        for from_top in (True, False):
            for k in ks:
                if k == 0:  # nothing removed: the perturbed image is the original
                    unit.append(None)
                    continue
                mask = np.zeros(n_pix, dtype=bool)
                mask[order[-k:] if from_top else order[:k]] = True
                unit.append(impute(mask))
        yield unit


def _road_core(
    model: nn.Module,
    x: Tensor,
    maps: Sequence[Tensor],
    target: Target,
    *,
    percentages: tuple[float, ...],
    imputer: Any,
    preprocessing: Any,
    seed: int,
    batch_size: int,
    clean_probability: float | None,
    on_layers: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None,
    progress: ProgressCallback | None = None,
    channels_last: bool = False,
    overlap: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, dict[str, float]]:
    """MoRF and LeRF scores of every map of one image; the maths behind :func:`road_scores` and :class:`ROAD`.

    Masks are built layer by layer and deduplicated by digest (:func:`camanim.compute.metrics.engine.score_units`);
    each unique mask is imputed once, gets its own seeded noise and is forwarded once, in batches of
    ``batch_size``. ``on_layers(positions, morf, lerf)`` is called as soon as maps are complete
    (``morf``/``lerf`` ``(n, P)`` rows of those positions).

    Returns:
        ``(morf (L, P), lerf (L, P), removed (P,), clean probability, stats)``.
    """
    n_pix = spatial_size(x)
    ks = _counts(n_pix, percentages)
    n_p = len(ks)
    device = _device(model)
    ctx = PerturbationContext(x.to(device), imputer, preprocessing, seed)
    morf = np.full((len(maps), n_p), np.nan)
    lerf = np.full((len(maps), n_p), np.nan)
    clean_box: list[float] = []

    def done(positions: list[int], probs: list[np.ndarray]) -> None:
        for i, p in zip(positions, probs, strict=True):
            diff = p - clean_box[0]
            morf[i], lerf[i] = diff[:n_p], diff[n_p:]
        if on_layers is not None:
            on_layers(positions, morf[positions], lerf[positions])

    t = time.perf_counter()
    if clean_probability is None:
        with frozen_eval(model), torch.inference_mode():
            clean_probability = float(_probabilities(model, x[None].to(device), target, 1, channels_last)[0])
    t_clean = time.perf_counter() - t
    clean_box.append(float(clean_probability))
    _, clean, stats = score_units(
        model, ctx, road_units(maps, ks, seed), target, n_units=len(maps), batch_size=batch_size,
        clean_probability=clean_probability, on_units=done, progress=progress, channels_last=channels_last,
        overlap=overlap,
    )  # fmt: skip
    stats["t_clean"] = t_clean
    removed = np.array([k / n_pix for k in ks])
    return morf, lerf, removed, float(clean), stats


def _default_imputer(imputer: Any, spatial_dims: int = 2) -> Any:
    """The imputer to use for inputs of ``spatial_dims`` spatial axes (:func:`.engine.resolve_imputer`)."""
    return resolve_imputer(imputer, spatial_dims)


def road_scores(
    model: nn.Module,
    x: Tensor,
    maps: MapsLike,
    target_class: Target,
    *,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    imputer: Any = None,
    preprocessing: Any = None,
    seed: int = 0,
    batch_size: int = 64,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> RoadScores:
    """ROAD of each map of one image (definitions in the module docstring).

    The model runs in eval mode under ``torch.inference_mode`` on its own device; its flags are restored.
    On the CPU the perturbed forwards run on a private inference copy of a convolutional model
    (channels-last, Conv-BN folded; about 1.9x faster on ResNet-50), checked against the model on ``x``.

    Args:
        model: a classifier returning ``(B, K)`` logits; with a target callable, any model whose output
            the callable reads (a :class:`~camanim.compute.models.LoadedModel`'s ``model``, whose output
            selector the task chose, gives the callable what it saw when the maps were computed).
        x: the model input, ``(C, H, W)`` or ``(1, C, H, W)``; a volume ``(1, C, D, H, W)``.
        maps: one map ``(H, W)``, a stack ``(L, H, W)``, a sequence of ``(H, W)`` maps, or a mapping from a
            key (a layer name) to ``(H, W)`` (or ``(1, H, W)``); already ReLU'd and upsampled to the input
            size, e.g. ``Explanation.upsampled(method, layer)[0]``. For a volume ``(D, H, W)`` maps.
        target_class: the class whose softmax probability is scored, or a target callable from the model's
            output to one score per image ``(N,)`` (a task target of :mod:`camanim.compute.tasks`; see
            "Score" and "Tasks" in the module docstring).
        percentages: p values in percent, fractions of pixels removed.
        imputer: an imputer of :mod:`camanim.road.imputers` (or its name); default
            ``NoisyLinearImputer()`` (noise 0.01).
        preprocessing: a :class:`~camanim.models.Preprocessing` to impute in [0, 1] pixel space
            (``denormalize`` -> impute -> ``normalize``); ``None`` imputes in the space of ``x``.
        seed: seed of the tie-break and of the noise.
        batch_size: perturbed images per forward (and per imputation call).
        clean_probability: the target's probability on ``x`` when already known (skips one forward).
        progress: called with ``(maps done, maps total)``.
        optimize: run the forwards on an optimised private copy of the model (see above); ``None`` = on the
            CPU for models with a ``Conv2d``.

    Returns:
        A :class:`RoadScores`; ``.road`` holds one ROAD per map.
    """
    ps = check_percentages(percentages)
    img = _as_image(x)
    tgt = as_target(target_class)
    net, cl = _forward_copy(model, optimize, img[None], tgt)
    return _road_scores(
        net, cl, x, maps, tgt, ps, _default_imputer(imputer, img.dim() - 1), preprocessing, seed, batch_size,
        clean_probability, progress,
    )  # fmt: skip


def _road_scores(
    net: nn.Module,
    channels_last: bool,
    x: Tensor,
    maps: MapsLike,
    target_class: Target,
    ps: tuple[float, ...],
    imputer: Any,
    preprocessing: Any,
    seed: int,
    batch_size: int,
    clean_probability: float | None = None,
    progress: ProgressCallback | None = None,
) -> RoadScores:
    img = _as_image(x)
    keys, stack = _as_maps(maps, tuple(img.shape[1:]))
    morf, lerf, removed, clean, stats = _road_core(
        net,
        img,
        stack,
        as_target(target_class),
        percentages=ps,
        imputer=imputer,
        preprocessing=preprocessing,
        seed=seed,
        batch_size=batch_size,
        clean_probability=clean_probability,
        progress=progress,
        channels_last=channels_last,
    )
    tgt = target_class if isinstance(target_class, int) else None
    return RoadScores(keys, ps, morf, lerf, removed, clean, tgt, 1, stats)


class ROAD:
    """ROAD as a stateful metric (torchmetrics style): :meth:`update` with batches, :meth:`compute` the mean.

    Shares :func:`road_scores`' maths. Each image's maps are scored with that image's target; the result
    averages MoRF and LeRF scores (hence ROAD) over every image seen, per map key.

    Args:
        model: the classifier.
        percentages, imputer, preprocessing, seed, batch_size, optimize: as in :func:`road_scores`.

    Example:
        >>> metric = ROAD(model)  # doctest: +SKIP
        >>> metric.update(images, maps, targets)  # images (B, C, H, W), maps (B, H, W)  # doctest: +SKIP
        >>> metric.compute().road  # doctest: +SKIP
    """

    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        model: nn.Module,
        *,
        percentages: Sequence[float] = DEFAULT_PERCENTAGES,
        imputer: Any = None,
        preprocessing: Any = None,
        seed: int = 0,
        batch_size: int = 64,
        optimize: bool | None = None,
    ) -> None:
        self.model = model
        self.optimize = optimize
        self.percentages = check_percentages(percentages)
        self._imputer_arg = imputer
        self.imputer = _default_imputer(imputer)
        self.preprocessing = preprocessing
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._keys: tuple[Any, ...] | None = None
        self._morf: np.ndarray | None = None
        self._lerf: np.ndarray | None = None
        self._removed: np.ndarray | None = None
        self._clean = 0.0
        self._targets: set[int] = set()
        self._count = 0

    def update(
        self,
        images: Tensor,
        maps: MapsLike,
        targets: int | Sequence[int] | Tensor,
    ) -> None:
        """Score a batch.

        Args:
            images: ``(B, C, H, W)`` or one ``(C, H, W)`` image; or volumes ``(B, C, D, H, W)``.
            maps: ``(B, H, W)`` one map per image; ``(B, L, H, W)`` L maps per image; or a mapping from a
                key to ``(B, H, W)`` (volumes: ``(B, D, H, W)``, ``(B, L, D, H, W)``). For a single
                ``(C, H, W)`` image, anything :func:`road_scores` takes.
            targets: one class for all images, or one per image.

        Raises:
            RoadError: shapes that do not fit, or maps with other keys than earlier updates.
        """
        items = split_batch(images, maps, targets)
        first = _as_image(items[0][0])
        imputer = self.imputer if first.dim() == 3 else _default_imputer(self._imputer_arg, 3)
        net, cl = _forward_copy(self.model, self.optimize, first[None])
        for img, m, tgt in items:
            s = _road_scores(
                net, cl, img, m, tgt, self.percentages, imputer, self.preprocessing, self.seed,
                self.batch_size,
            )  # fmt: skip
            if self._keys is None:
                self._keys, self._removed = s.keys, s.removed
                self._morf, self._lerf = np.zeros_like(s.morf), np.zeros_like(s.lerf)
            elif s.keys != self._keys or not np.array_equal(s.removed, self._removed):
                raise RoadError(f"maps keyed {s.keys} after earlier updates keyed {self._keys}")
            self._morf += s.morf
            self._lerf += s.lerf
            self._clean += s.clean_probability
            self._targets.add(tgt)
            self._count += 1

    def compute(self) -> RoadScores:
        """Mean scores over every image seen.

        Raises:
            RoadError: nothing was seen since construction or :meth:`reset`.
        """
        if not self._count or self._keys is None:
            raise RoadError("ROAD.compute() before any update")
        n = self._count
        target = next(iter(self._targets)) if len(self._targets) == 1 else None
        return RoadScores(
            self._keys,
            self.percentages,
            self._morf / n,
            self._lerf / n,
            self._removed,
            self._clean / n,
            target,
            n,
        )
