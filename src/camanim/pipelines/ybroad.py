"""ybROAD (CAManim, Kaczmarek et al. 2024): the ROAD of every layer's map, in forward order.

One :func:`camanim.explanation.explain` call gives every chosen layer's map for every method; each map
(ReLU'd, upsampled to the input size) is scored with ROAD (:mod:`camanim.compute.metrics.road`, whose docstring
holds the definitions). All methods' and layers' perturbations go through one deduplicated, batched
pipeline: identical masks (layers with alike maps) are imputed and forwarded once.

Per method the result reports the series, its mean ("mean layer-wise ROAD"), its maximum ("ybROAD") and
the arg-max layer (the layer whose map best explains the prediction), the final spatial layer's ROAD (the
usual choice of layer) and max - final (Table 2 of the paper).

The target may be a class or any task target of :mod:`camanim.compute.tasks` (a segmentation region, a
detection box, an embedding similarity, multi-label or regression outputs): ROAD then scores the target's
own score of the perturbed image minus the original's (the "Score" and "Tasks" definitions of
:mod:`camanim.compute.metrics.road`), through the same output selector as the maps' capture. A moving average (the paper suggests one)
is drawn in the plot only, never used for the reported numbers.

A volume or clip ``(1, C, D, H, W)`` is scored the same way in 3-D: voxels ranked by the trilinearly
upsampled map, imputed with the 26-neighbour imputer (the "Volumes" definition of
:mod:`camanim.compute.metrics.road`).

Example:
    >>> from camanim import ybroad
    >>> res = ybroad("efficientnet_lite0", "chelsea", methods="gradcam")  # doctest: +SKIP
    >>> res["gradcam"].best_layer.name, res["gradcam"].max, res["gradcam"].final  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import Layer, LayerSpec, final_spatial_position
from camanim.compute.metrics.road import (
    DEFAULT_PERCENTAGES,
    DEFINITION,
    ProgressCallback,
    RoadError,
    Target,
    _default_imputer,
    _device,
    _forward_copy,
    _probabilities,
    _road_core,
    check_percentages,
    spatial_size,
)
from camanim.compute.models import DEFAULT_MODEL, InputSize, LoadedModel
from camanim.errors import UnknownNameError
from camanim.pipelines.explain import Explanation, as_loaded, explain

__all__ = [
    "SMOOTH_WINDOW",
    "Checkpoint",
    "YbRoad",
    "YbRoadResult",
    "best_layer",
    "scored_target",
    "smooth_series",
    "ybroad",
]

log = logging.getLogger(__name__)

#: Default moving-average window of the plot's smoothed curve (layers).
SMOOTH_WINDOW = 5
SPACES = ("pixel", "model")


def smooth_series(values: Sequence[float] | np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends (no padding). NaNs are ignored.

    Args:
        values: ``(L,)`` series.
        window: number of layers averaged (odd values centre exactly); ``<= 1`` returns a copy.

    Returns:
        ``(L,)`` float64.
    """
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    half_lo, half_hi = (window - 1) // 2, window // 2
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(v.size)
    lo, hi = np.maximum(idx - half_lo, 0), np.minimum(idx + half_hi + 1, v.size)
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[hi] - csum[lo]) / np.maximum(cnt, 1), np.nan)


@dataclass(frozen=True)
class YbRoad:
    """ybROAD of one method: ROAD of every kept layer in forward order.

    Attributes:
        method: the CAM method.
        layers: the scored layers, in forward order.
        percentages: p values in percent, ``(P,)``.
        morf: ``(L, P)`` MoRF scores (probability change after removing the most relevant p).
        lerf: ``(L, P)`` LeRF scores.
        removed: ``(P,)`` fraction of pixels actually removed.
    """

    method: str
    layers: tuple[Layer, ...] = field(repr=False)
    percentages: tuple[float, ...]
    morf: np.ndarray = field(repr=False)
    lerf: np.ndarray = field(repr=False)
    removed: np.ndarray = field(repr=False)

    @property
    def road(self) -> np.ndarray:
        """``(L,)`` ROAD per layer: mean over p of (LeRF_p - MoRF_p) / 2."""
        return ((self.lerf - self.morf) / 2).mean(axis=1)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def mean(self) -> float:
        """Mean layer-wise ROAD."""
        return float(np.mean(self.road))

    @property
    def max(self) -> float:
        """Max ybROAD: the largest layer ROAD."""
        return float(np.max(self.road))

    @property
    def best_position(self) -> int:
        """Position (in :attr:`layers`) of the first layer reaching :attr:`max`."""
        return int(np.argmax(self.road))

    @property
    def best_layer(self) -> Layer:
        """The layer whose map scores the highest ROAD."""
        return self.layers[self.best_position]

    @property
    def final_position(self) -> int:
        """Position of the final spatial layer among the scored layers (the usual single-layer choice)."""
        return final_spatial_position(self.layers)

    @property
    def final_layer(self) -> Layer:
        """The final spatial layer scored."""
        return self.layers[self.final_position]

    @property
    def final(self) -> float:
        """ROAD of the final spatial layer."""
        return float(self.road[self.final_position])

    @property
    def difference(self) -> float:
        """Max ybROAD minus the final layer's ROAD (Table 2's last column); >= 0."""
        return self.max - self.final

    def smoothed(self, window: int = SMOOTH_WINDOW) -> np.ndarray:
        """The series after a centred moving average (for plots only)."""
        return smooth_series(self.road, window)

    def summary(self) -> dict[str, Any]:
        """The reported numbers, JSON-ready."""
        best, final = self.best_layer, self.final_layer
        return {
            "layers": len(self),
            "mean_layerwise_road": self.mean,
            "max_ybroad": self.max,
            "best_layer": {"position": self.best_position, "index": best.index, "name": best.name},
            "final_layer": {
                "position": self.final_position,
                "index": final.index,
                "name": final.name,
                "road": self.final,
            },
            "difference": self.difference,
        }

    def as_dict(self) -> dict[str, float]:
        """``{layer name: ROAD}`` in forward order."""
        return {layer.name: float(v) for layer, v in zip(self.layers, self.road, strict=True)}


@dataclass(frozen=True)
class YbRoadResult:
    """ybROAD of one image for one or more methods, from one capture.

    Its files (``save``) and notebook display are attached by :mod:`camanim.outputs`
    (:mod:`camanim.outputs.ybroad`).

    Attributes:
        explanation: the :class:`~camanim.explanation.Explanation` whose maps were scored.
        results: per method, its :class:`YbRoad`.
        target: the explained and scored class (None for a task target); ``target_name`` its name (a task
            target's label).
        clean_probability: the target's score on the original image (a class's softmax probability; a task
            target's own score).
        percentages: p values in percent.
        seed: tie-break and noise seed.
        imputer: description of the imputer (its ``repr``).
        imputation_space: ``"pixel"`` or ``"model"``.
        resumed: number of (method, layer) scores taken from an interrupted run's checkpoint.
        stats: mask counts (total, unique, forwards) of this run.
        timings: seconds per stage.
    """

    explanation: Any = field(repr=False)
    results: Mapping[str, YbRoad]
    target: int | None
    target_name: str
    clean_probability: float
    percentages: tuple[float, ...]
    seed: int
    imputer: str
    imputation_space: str
    resumed: int = 0
    stats: dict[str, float] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def task(self) -> dict[str, Any]:
        """What was explained and scored (the explanation's ``task``: ``{"kind": "classification", ...}``
        or a task target's description)."""
        return dict(getattr(self.explanation, "task", None) or {"kind": "classification"})

    def __getitem__(self, method: str) -> YbRoad:
        if method not in self.results:
            raise UnknownNameError("method", method, list(self.results))
        return self.results[method]

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names, in the order asked."""
        return tuple(self.results)

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.explanation.model_name

    @property
    def image_name(self) -> str:
        """A short name of the image (file stem or sample name)."""
        return _image_label(self.explanation.image_info)

    def road(self) -> dict[str, tuple[float, ...]]:
        """Per method, the ROAD of every layer in forward order (for ``animate(road=...)``)."""
        return {m: tuple(float(v) for v in r.road) for m, r in self.results.items()}

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per method with Table 2's columns (plus the best and final layer names)."""
        rows = []
        for m, r in self.results.items():
            rows.append(
                {
                    "model": self.model_name,
                    "image": self.image_name,
                    "target": self.target_name,
                    "method": m,
                    "mean_layerwise_road": r.mean,
                    "final_layer_road": r.final,
                    "max_ybroad": r.max,
                    "difference": r.difference,
                    "best_layer": r.best_layer.name,
                    "best_index": r.best_layer.index,
                    "final_layer": r.final_layer.name,
                    "layers": len(r),
                    "task": self.task.get("kind", "classification"),
                    "target_score": self.clean_probability,
                }
            )
        return rows

    def describe(self) -> dict[str, Any]:
        """The summary written as ``ybroad.json`` and in the manifest."""
        return {
            "definition": dict(DEFINITION),
            "model": self.model_name,
            "weights": self.explanation.weights,
            "image": self.image_name,
            "target": {"class": self.target, "name": self.target_name},
            "task": self.task,
            "clean_probability": self.clean_probability,
            "target_score": self.clean_probability,
            "percentages": list(self.percentages),
            "seed": self.seed,
            "imputer": self.imputer,
            "imputation_space": self.imputation_space,
            "methods": {m: r.summary() for m, r in self.results.items()},
            "stats": dict(self.stats),
            "timings": dict(self.timings),
        }


# --------------------------------------------------------------------------------------------------------
# Computation.
# --------------------------------------------------------------------------------------------------------


def _image_label(info: Mapping[str, Any]) -> str:
    src = str(info.get("source", "")) if isinstance(info, Mapping) else ""
    if not src:
        return "batch" if isinstance(info, Mapping) and "images" in info else "image"
    return Path(src.split("?")[0]).stem or src


def _digest_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


class Checkpoint(Protocol):
    """Where :func:`ybroad` keeps finished layers as they complete, so an interrupted run can resume
    (:class:`camanim.outputs.ybroad.JsonCheckpoint` keeps them in a bundle's staging folder)."""

    def load(self) -> Mapping[str, Any]:
        """The state saved last, or an empty mapping."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` (JSON-ready: floats round-trip exactly)."""
        ...


def scored_target(ex: Explanation, lm: LoadedModel, target: Any = None) -> tuple[LoadedModel, Target]:
    """The model to run the perturbed forwards with and what they score, for the maps of ``ex``.

    For a classification the target is the explained class (its softmax probability is scored) and the
    model is ``lm``. For a task the target is the task target the maps were computed for (``target``;
    the same object, already decided on the original image, or decided by the metrics' first, clean
    forward), and the model reads the output the way the capture did (the target's output selector and
    ``expect``, the embedding layer tapped).

    Raises:
        RoadError: a task explanation without its target callable.
    """
    kind = (getattr(ex, "task", None) or {}).get("kind", "classification")
    if kind == "classification":
        return lm, int(ex.targets[0])
    if not callable(target) or isinstance(target, (str, int)):
        raise RoadError(
            f"the maps explain a {kind} target: give the same target callable (target=...) to score them"
        )
    if hasattr(target, "expect"):
        lm = lm.with_output(getattr(target, "output", None), target.expect, getattr(lm.model, "tap", None))
    return lm, target


def _check_clean(kind: str, clean: float) -> None:
    """Refuse a detection whose clean score is 0: no detection matches the box explained, so every
    perturbed score is 0 too and every map would score 0."""
    if kind == "detection" and not clean > 0:
        raise RoadError(
            "the detector finds no detection matching the explained box in the original image (score 0): every "
            "perturbed image scores 0 too, so ROAD is not defined; give a box and label the detector finds"
        )


def ybroad(
    model: Any = None,
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = "gradcam",
    layers: LayerSpec = "all",
    target: Any = None,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    seed: int = 0,
    imputer: Any = None,
    imputation_space: str = "pixel",
    batch_size: int = 64,
    score: str = "logit",
    keep_nonspatial: bool = False,
    device: str | torch.device | None = None,
    input_size: InputSize = None,
    explanation: Any = None,
    checkpoint: Checkpoint | None = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> YbRoadResult:
    """Score every chosen layer's map of every method with ROAD.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name (default: the
            embedded default model). With ``explanation`` it only runs the perturbed forwards and must be
            the explanation's model.
        image: one image source or a preprocessed ``(1, 3, H, W)`` tensor (see :func:`camanim.explain`).
        methods: method names (``"gradcam,hirescam"``) or a list.
        layers: layer selection (see :func:`camanim.layers.select_layers`); default every spatial layer.
        target: the class explained and scored; default the top-1 class. Or a task target of
            :mod:`camanim.compute.tasks` (or any callable :func:`camanim.explain` takes): its score is
            scored (see :mod:`camanim.compute.metrics.road`); with ``explanation``, the target its maps
            were computed for.
        percentages: p values in percent (fractions of pixels removed).
        seed: seed of the tie-break, the noise and seeded methods.
        imputer: an imputer of :mod:`camanim.road.imputers` or its name; default ``NoisyLinearImputer()``.
        imputation_space: ``"pixel"`` (default: [0, 1] pixels, as the ROAD paper) or ``"model"`` (the
            normalised input, as grad-cam).
        batch_size: perturbed images per forward.
        score: what the CAM differentiates (``"logit"``, ``"probability"``, ``"sigmoid"``); for a class,
            ROAD always scores the softmax probability.
        keep_nonspatial: include 1x1 layers.
        device: where to run the model.
        input_size: the input size instead of the model's: ``N``, ``(H, W)``, ``"HxW"`` or ``"native"`` (see
            :func:`camanim.pipelines.explain.prepare_input`).
        explanation: an :class:`~camanim.explanation.Explanation` already computed (its maps are scored,
            no capture is run).
        checkpoint: a JSON file where finished layers are kept as they complete and read back from, so an
            interrupted run continues (rows are reused only for the same image, target, settings and map).
        progress: called with ``(maps done, maps total)`` over all methods and layers.
        optimize: perturbed forwards on an optimised private copy of the model (channels-last, Conv-BN
            folded; see :func:`~camanim.road.road_scores`); ``None`` = on the CPU for convolutional models.

    Returns:
        A :class:`YbRoadResult`.

    Raises:
        RoadError: a batch of several images, an unknown imputation space, bad percentages, a task
            explanation without its target, or a detection whose box the detector does not find.
    """
    t0 = time.perf_counter()
    ps = check_percentages(percentages)
    if imputation_space not in SPACES:
        raise RoadError(f"imputation_space must be one of {SPACES}, got {imputation_space!r}")
    _default_imputer(imputer)  # an unknown name fails before the capture
    if explanation is None:
        lm = as_loaded(model if model is not None else DEFAULT_MODEL, device)
        ex = explain(
            lm, image, methods=methods, layers=layers, target=target, score=score,
            keep_nonspatial=keep_nonspatial, device=device, seed=seed, input_size=input_size,
        )  # fmt: skip
    else:
        if model is None:
            raise RoadError("ybroad(explanation=...) needs the model whose maps these are (model=...)")
        ex = explanation
        lm = as_loaded(model, device)
    lm, tgt = scored_target(ex, lm, target)
    kind = str((getattr(ex, "task", None) or {}).get("kind", "classification"))
    net: nn.Module = lm.model
    timings = {"explain": time.perf_counter() - t0}
    if ex.input.shape[0] != 1:
        raise RoadError(f"ybROAD scores one image; the explanation holds a batch of {ex.input.shape[0]}")
    x = ex.input[0]  # (C, H, W), or a volume (C, D, H, W): voxels ranked, imputed in 3-D
    imp = _default_imputer(imputer, x.dim() - 1)
    space = imputation_space
    if space == "pixel" and x.dim() == 4:  # a volume or clip: its preprocessing is per image
        log.info("a volume (C, D, H, W) is imputed in the model's input space")
        space = "model"
    if space == "pixel" and x.shape[0] != 3:
        log.warning("the input has %d channels, not RGB: imputing in the model's input space", x.shape[0])
        space = "model"
    prep = ex.preprocessing if space == "pixel" else None
    chosen = tuple(ex.chosen)
    names = tuple(ex.methods)
    fingerprint = {
        "model": ex.model_name,
        "weights": ex.weights,
        "input": _digest_array(x.numpy()),
        "target": tgt if isinstance(tgt, int) else dict(ex.task),
        "percentages": list(ps),
        "seed": int(seed),
        "imputer": repr(imp),
        "imputation_space": space,
    }
    saved = dict(checkpoint.load()) if checkpoint is not None else {}
    if saved and saved.get("fingerprint") != fingerprint:
        log.warning("the interrupted run scored another image, target or setting: starting over")
        saved = {}
    rows: dict[str, Any] = dict(saved.get("rows", {}))
    saved_clean = saved.get("clean")

    t = time.perf_counter()
    jobs: list[tuple[str, str, str]] = []  # (method, layer name, map digest) still to score
    maps: list[torch.Tensor] = []
    resumed = 0
    for m in names:
        for layer in chosen:
            up = ex.upsampled(m, layer.name)[0].contiguous()
            d = _digest_array(up.numpy())
            key = f"{m}/{layer.name}"
            if key in rows and rows[key].get("map") == d:
                resumed += 1
                continue
            rows.pop(key, None)
            jobs.append((m, layer.name, d))
            maps.append(up)
    timings["upsample"] = time.perf_counter() - t
    total = len(names) * len(chosen)
    if resumed:
        log.info("resuming: %d of %d layer scores kept from the interrupted run", resumed, total)
    if progress is not None:
        progress(resumed, total)

    def on_layers(positions: list[int], morf: np.ndarray, lerf: np.ndarray) -> None:
        for i, mo, le in zip(positions, morf, lerf, strict=True):
            m, name, d = jobs[i]
            rows[f"{m}/{name}"] = {"map": d, "morf": mo.tolist(), "lerf": le.tolist()}
        if checkpoint is not None:
            checkpoint.save({"fingerprint": fingerprint, "clean": clean, "rows": rows})

    def on_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(resumed + done, total)

    t = time.perf_counter()
    clean = None
    stats: dict[str, float] = {}
    if maps:
        twin, cl = _forward_copy(net, optimize, x[None], tgt)
        clean = saved_clean
        if clean is None or not isinstance(tgt, int):  # once per image (a task target decides on it)
            with frozen_eval(twin), torch.inference_mode():
                clean = float(_probabilities(twin, x[None].to(_device(twin)), tgt, 1, cl)[0])
        _check_clean(kind, clean)
        _, _, _, clean, stats = _road_core(
            twin,
            x,
            maps,
            tgt,
            percentages=ps,
            imputer=imp,
            preprocessing=prep,
            seed=seed,
            batch_size=batch_size,
            clean_probability=clean,
            on_layers=on_layers,
            progress=on_progress,
            channels_last=cl,
        )
        del twin
    else:
        clean = (
            saved_clean
            if saved_clean is not None
            else float(ex.probabilities[0, tgt if isinstance(tgt, int) else 0])
        )
    timings["road"] = time.perf_counter() - t
    n_pix = spatial_size(x)
    removed = np.array([round(p / 100.0 * n_pix) / n_pix for p in ps])
    results = {}
    for m in names:
        morf = np.array([rows[f"{m}/{layer.name}"]["morf"] for layer in chosen], dtype=np.float64)
        lerf = np.array([rows[f"{m}/{layer.name}"]["lerf"] for layer in chosen], dtype=np.float64)
        results[m] = YbRoad(
            m, chosen, ps, morf.reshape(len(chosen), len(ps)), lerf.reshape(len(chosen), len(ps)), removed
        )
    timings["total"] = time.perf_counter() - t0
    log.info(
        "ybROAD: %d layers x %d methods, %d unique of %d masks forwarded, in %.1f s",
        len(chosen),
        len(names),
        int(stats.get("forwards", 0)),
        int(stats.get("masks", 0)),
        timings["total"],
    )
    return YbRoadResult(
        explanation=ex,
        results=results,
        target=tgt if isinstance(tgt, int) else None,
        target_name=ex.target_names[0],
        clean_probability=float(clean),
        percentages=ps,
        seed=int(seed),
        imputer=repr(imp),
        imputation_space=space,
        resumed=resumed,
        stats=stats,
        timings=timings,
    )


def best_layer(
    model: Any = None,
    image: Any = "chelsea",
    *,
    method: str = "gradcam",
    target: int | str | None = None,
    layers: LayerSpec = "all",
    **kwargs: Any,
) -> Layer:
    """The layer of maximum ROAD for ``method`` (runs :func:`ybroad` over ``layers``)."""
    res = ybroad(model, image, methods=method, layers=layers, target=target, **kwargs)
    return res[res.methods[0]].best_layer


# --------------------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------------------
