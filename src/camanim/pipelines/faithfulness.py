"""Faithfulness of every layer's map by several metrics: a "yb" curve per metric (ybROAD generalised).

One :func:`camanim.pipelines.explain.explain` call gives every chosen layer's map for every method; each map
(ReLU'd, upsampled to the input size) is scored with every metric asked for
(:mod:`camanim.compute.metrics.faithfulness`: ROAD and its MoRF and LeRF curves, deletion and insertion AUC,
Average Drop, Increase in Confidence, Average Gain, grad-cam's confidence change and drop). All methods',
layers' and metrics' perturbed images go through one deduplicated, batched pass: an image two layers or two
metrics share is made and forwarded once.

Per method and metric the result holds the series over layers (a :class:`LayerSeries`): its best layer (by
the metric's direction, the first in forward order on ties), the final spatial layer's value and how much
better the best is. :meth:`FaithfulnessResult.agreement` says where the metrics agree: the Spearman rank
correlation between the metrics' layer rankings (each oriented so that higher is better).

The target may be a class or a task target of :mod:`camanim.compute.tasks`: the metrics then score the
target's own score (see :mod:`camanim.compute.metrics.faithfulness`); Average Drop and Average Gain, defined
for a probability only, are left out of ``"all"`` and refused when asked by name.

Example:
    >>> from camanim.pipelines.faithfulness import faithfulness
    >>> res = faithfulness("efficientnet_lite0", "chelsea", metrics="road,deletion,insertion")  # doctest: +SKIP
    >>> res["gradcam"]["insertion"].best_layer.name  # doctest: +SKIP
    >>> res.agreement("gradcam")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import Layer, LayerSpec, final_spatial_position
from camanim.compute.metrics import confidence as conf
from camanim.compute.metrics import deletion as dele
from camanim.compute.metrics import road as rd
from camanim.compute.metrics.engine import ProgressCallback, _device, _forward_copy, _probabilities
from camanim.compute.metrics.faithfulness import (
    METRICS,
    PROBABILITY_ONLY,
    Settings,
    faithfulness_core,
    parse_metrics,
)
from camanim.compute.models import DEFAULT_MODEL, InputSize
from camanim.errors import UnknownNameError
from camanim.pipelines.explain import as_loaded, explain
from camanim.pipelines.ybroad import SPACES, YbRoad, YbRoadResult, _check_clean, _image_label, scored_target

__all__ = [
    "FaithfulnessResult",
    "LayerSeries",
    "best_layer_by",
    "faithfulness",
]

log = logging.getLogger(__name__)


def _first_best(values: np.ndarray, higher_is_better: bool) -> int:
    v = np.where(np.isfinite(values), values, -np.inf if higher_is_better else np.inf)
    return int(np.argmax(v) if higher_is_better else np.argmin(v))


@dataclass(frozen=True)
class LayerSeries:
    """One metric of one method over the scored layers, in forward order.

    Attributes:
        method: the CAM method.
        metric: the metric's name (:data:`camanim.compute.metrics.faithfulness.METRICS`).
        layers: the scored layers, in forward order.
        values: ``(L,)`` the metric of each layer's map.
        higher_is_better: the metric's direction.
    """

    method: str
    metric: str
    layers: tuple[Layer, ...] = field(repr=False)
    values: np.ndarray = field(repr=False)
    higher_is_better: bool = True

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def mean(self) -> float:
        """Mean over layers."""
        return float(np.nanmean(self.values)) if len(self) else float("nan")

    @property
    def best_position(self) -> int:
        """Position of the best layer (the first in forward order on ties)."""
        return _first_best(self.values, self.higher_is_better)

    @property
    def best_layer(self) -> Layer:
        """The layer whose map scores best."""
        return self.layers[self.best_position]

    @property
    def best(self) -> float:
        """The best value."""
        return float(self.values[self.best_position])

    @property
    def final_position(self) -> int:
        """Position of the final spatial layer among the scored layers."""
        return final_spatial_position(self.layers)

    @property
    def final_layer(self) -> Layer:
        """The final spatial layer scored."""
        return self.layers[self.final_position]

    @property
    def final(self) -> float:
        """The final spatial layer's value."""
        return float(self.values[self.final_position])

    @property
    def gain(self) -> float:
        """How much better the best layer is than the final one (>= 0, in the metric's units)."""
        return self.best - self.final if self.higher_is_better else self.final - self.best

    @property
    def oriented(self) -> np.ndarray:
        """``(L,)`` the values signed so that higher is better."""
        return self.values if self.higher_is_better else -self.values

    def summary(self) -> dict[str, Any]:
        """The reported numbers, JSON-ready."""
        b, f = self.best_layer, self.final_layer
        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "layers": len(self),
            "mean": self.mean,
            "best": self.best,
            "best_layer": {"position": self.best_position, "index": b.index, "name": b.name},
            "final": self.final,
            "final_layer": {"position": self.final_position, "index": f.index, "name": f.name},
            "gain": self.gain,
        }


def rank_agreement(series: Mapping[str, LayerSeries]) -> tuple[tuple[str, ...], np.ndarray]:
    """Spearman rank correlation between metrics' layer rankings (each oriented higher = better).

    Returns:
        ``(metric names, (M, M) matrix)``; NaN where a series is constant.
    """
    names = tuple(series)
    m = len(names)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            a, b = series[names[i]].oriented, series[names[j]].oriented
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
                r = float("nan")
            else:
                r = float(sps.spearmanr(a[ok], b[ok])[0])
            out[i, j] = out[j, i] = r
    for i in range(m):
        if np.ptp(series[names[i]].oriented) == 0:
            out[i, i] = float("nan")
    return names, out


@dataclass(frozen=True)
class FaithfulnessResult:
    """Several faithfulness metrics of every layer's map, for one image and one or more methods.

    Its files (``save``) are attached by :mod:`camanim.outputs` (:mod:`camanim.outputs.faithfulness`).

    Attributes:
        explanation: the :class:`~camanim.pipelines.explain.Explanation` whose maps were scored.
        metrics: the metric names, in the order asked.
        series: ``series[method][metric]``: a :class:`LayerSeries`.
        scores: per method, the :class:`~camanim.compute.metrics.faithfulness.FaithfulnessScores` (raw
            curves: ROAD's MoRF/LeRF, the deletion and insertion curves, ``Y`` and ``O``).
        target: the explained and scored class (None for a task target); ``target_name`` its name.
        clean_probability: the target's score on the image (a class's softmax probability).
        settings: percentages, steps, baseline, seed, imputer and imputation space.
        stats: perturbations asked, unique, forwarded; seconds.
        timings: seconds per stage.
    """

    explanation: Any = field(repr=False)
    metrics: tuple[str, ...]
    series: Mapping[str, Mapping[str, LayerSeries]] = field(repr=False)
    scores: Mapping[str, Any] = field(repr=False)
    target: int | None
    target_name: str
    clean_probability: float
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    def __getitem__(self, method: str) -> Mapping[str, LayerSeries]:
        if method not in self.series:
            raise UnknownNameError("method", method, list(self.series))
        return self.series[method]

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names, in the order asked."""
        return tuple(self.series)

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.explanation.model_name

    @property
    def image_name(self) -> str:
        """A short name of the image."""
        return _image_label(self.explanation.image_info)

    @property
    def task(self) -> dict[str, Any]:
        """What was explained and scored (the explanation's ``task``)."""
        return dict(getattr(self.explanation, "task", None) or {"kind": "classification"})

    def best_layer(self, method: str, by: str = "road") -> Layer:
        """The best layer of ``method`` by the metric ``by``."""
        series = self[method]
        if by not in series:
            raise UnknownNameError("faithfulness metric", by, list(series))
        return series[by].best_layer

    def agreement(self, method: str) -> tuple[tuple[str, ...], np.ndarray]:
        """Where the metrics agree for ``method``: Spearman correlation of their layer rankings
        (:func:`rank_agreement`)."""
        return rank_agreement(self[method])

    def ybroad(self) -> YbRoadResult:
        """The ROAD part as a :class:`~camanim.pipelines.ybroad.YbRoadResult` (needs a ROAD metric asked)."""
        results = {}
        for m, s in self.scores.items():
            if s.road is None:
                raise UnknownNameError("faithfulness metric", "road", list(self.metrics))
            r = s.road
            results[m] = YbRoad(m, tuple(self.explanation.chosen), r.percentages, r.morf, r.lerf, r.removed)
        st = self.settings
        return YbRoadResult(
            explanation=self.explanation,
            results=results,
            target=self.target,
            target_name=self.target_name,
            clean_probability=self.clean_probability,
            percentages=tuple(st["percentages"]),
            seed=int(st["seed"]),
            imputer=str(st["imputer"]),
            imputation_space=str(st["imputation_space"]),
            stats=dict(self.stats),
            timings=dict(self.timings),
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per method: the best layer, its value and the final layer's value per metric (and the
        CAManim paper's Table 2 columns when ROAD was scored)."""
        rows = []
        for m, per in self.series.items():
            any_series = next(iter(per.values()))
            row: dict[str, Any] = {
                "model": self.model_name,
                "image": self.image_name,
                "target": self.target_name,
                "method": m,
                "layers": len(any_series),
                "final_layer": any_series.final_layer.name,
            }
            if "road" in per:
                r = per["road"]
                row.update(
                    mean_layerwise_road=r.mean, final_layer_road=r.final, max_ybroad=r.best,
                    difference=r.gain,
                )  # fmt: skip
            for name, s in per.items():
                row[f"best_{name}"] = s.best_layer.name
                row[f"best_{name}_index"] = s.best_layer.index
                row[f"best_{name}_value"] = s.best
                row[f"final_{name}"] = s.final
            row["task"] = self.task.get("kind", "classification")
            row["target_score"] = self.clean_probability
            rows.append(row)
        return rows

    def describe(self) -> dict[str, Any]:
        """The summary written as ``faithfulness.json`` and in the manifest."""
        definitions = {
            "metrics": {
                n: {"higher_is_better": METRICS[n].higher_is_better, "reference": METRICS[n].reference}
                for n in self.metrics
            },
            "road": dict(rd.DEFINITION),
            "deletion": dict(dele.DEFINITION),
            "confidence": dict(conf.DEFINITION),
        }
        out: dict[str, Any] = {
            "definition": definitions,
            "model": self.model_name,
            "weights": self.explanation.weights,
            "image": self.image_name,
            "target": {"class": self.target, "name": self.target_name},
            "task": self.task,
            "clean_probability": self.clean_probability,
            "target_score": self.clean_probability,
            "settings": dict(self.settings),
            "metrics": list(self.metrics),
            "methods": {m: {n: s.summary() for n, s in per.items()} for m, per in self.series.items()},
            "agreement": {},
            "stats": dict(self.stats),
            "timings": dict(self.timings),
        }
        for m in self.methods:
            names, mat = self.agreement(m)
            out["agreement"][m] = {"metrics": list(names), "spearman": mat.tolist()}
        return out


def faithfulness(
    model: Any = None,
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = "gradcam",
    layers: LayerSpec = "all",
    metrics: str | Sequence[str] = "all",
    target: Any = None,
    percentages: Sequence[float] = rd.DEFAULT_PERCENTAGES,
    steps: int = dele.STEPS,
    baseline: str = "rise",
    seed: int = 0,
    imputer: Any = None,
    imputation_space: str = "pixel",
    batch_size: int = 64,
    score: str = "logit",
    keep_nonspatial: bool = False,
    device: str | torch.device | None = None,
    input_size: InputSize = None,
    explanation: Any = None,
    progress: ProgressCallback | None = None,
    optimize: bool | None = None,
) -> FaithfulnessResult:
    """Score every chosen layer's map of every method with every faithfulness metric asked for.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name (default: the
            embedded default model). With ``explanation`` it only runs the perturbed forwards.
        image: one image source or a preprocessed ``(1, 3, H, W)`` tensor.
        methods: method names or a list.
        layers: layer selection; default every spatial layer.
        metrics: metric names (``"road,deletion,insertion"``) or ``"all"`` (see
            :data:`camanim.compute.metrics.faithfulness.METRICS`).
        target: the class explained and scored; default the top-1 class. Or a task target (any callable
            :func:`camanim.explain` takes): its score is scored; with ``explanation``, the target its maps
            were computed for.
        percentages: ROAD's p values in percent.
        steps: intervals of the deletion and insertion curves (default 20, torchcam's).
        baseline: deletion/insertion baseline: ``"rise"`` (default), ``"blur"``, ``"zero"`` or ``"road"``.
        seed: seed of the tie-break, the noise and seeded methods.
        imputer: ROAD's imputer (or its name); default ``NoisyLinearImputer()``.
        imputation_space: ``"pixel"`` (default) or ``"model"``, as :func:`camanim.pipelines.ybroad.ybroad`.
        batch_size: perturbed images per forward.
        score: what the CAM differentiates; the metrics always score the softmax probability.
        keep_nonspatial: include 1x1 layers.
        device: where to run the model.
        input_size: the input size instead of the model's.
        explanation: an :class:`~camanim.pipelines.explain.Explanation` already computed (its maps are
            scored, no capture is run).
        progress: called with ``(maps done, maps total)`` over all methods and layers.
        optimize: perturbed forwards on an optimised private copy of the model.

    Returns:
        A :class:`FaithfulnessResult`.

    Raises:
        MetricError: a batch of several images, bad percentages, steps, baseline or imputation space;
            Average Drop or Average Gain asked for a task target; a detection whose box is not found.
        UnknownNameError: an unknown metric.
    """
    t0 = time.perf_counter()
    names = parse_metrics(metrics)
    every = any(
        str(n).strip().lower() == "all" for n in (metrics.split(",") if isinstance(metrics, str) else metrics)
    )
    task_given = callable(target) and not isinstance(target, (str, int))
    if task_given or (explanation is not None and explanation.task.get("kind") != "classification"):
        names = _task_metrics(names, every)
    ps = rd.check_percentages(percentages)
    dele.curve_counts(1, steps)
    dele.check_baseline(baseline)
    if imputation_space not in SPACES:
        raise rd.RoadError(f"imputation_space must be one of {SPACES}, got {imputation_space!r}")
    rd._default_imputer(imputer)  # an unknown name fails before the capture
    if explanation is None:
        lm = as_loaded(model if model is not None else DEFAULT_MODEL, device)
        ex = explain(
            lm, image, methods=methods, layers=layers, target=target, score=score,
            keep_nonspatial=keep_nonspatial, device=device, seed=seed, input_size=input_size,
        )  # fmt: skip
    else:
        if model is None:
            raise rd.RoadError(
                "faithfulness(explanation=...) needs the model whose maps these are (model=...)"
            )
        ex = explanation
        lm = as_loaded(model, device)
    timings = {"explain": time.perf_counter() - t0}
    if ex.input.shape[0] != 1:
        raise rd.RoadError(
            f"faithfulness scores one image; the explanation holds a batch of {ex.input.shape[0]}"
        )
    x = ex.input[0]  # (C, H, W), or a volume (C, D, H, W)
    imp = rd._default_imputer(imputer, x.dim() - 1)
    space = imputation_space
    if space == "pixel" and x.dim() == 4:  # a volume or clip: its preprocessing is per image
        log.info("a volume (C, D, H, W) is imputed in the model's input space")
        space = "model"
    if space == "pixel" and x.shape[0] != 3:
        log.warning("the input has %d channels, not RGB: imputing in the model's input space", x.shape[0])
        space = "model"
    prep = ex.preprocessing if space == "pixel" else None
    lm, tgt = scored_target(ex, lm, target)
    chosen = tuple(ex.chosen)
    methods_ = tuple(ex.methods)

    t = time.perf_counter()
    keys, maps = [], []
    for m in methods_:
        for layer in chosen:
            keys.append((m, layer.name))
            maps.append(ex.upsampled(m, layer.name)[0].contiguous().float())
    timings["upsample"] = time.perf_counter() - t

    t = time.perf_counter()
    twin, cl = _forward_copy(lm.model, optimize, x[None], tgt)
    settings = Settings(ps, int(steps), baseline, imp, prep, int(seed))
    clean = None
    if not isinstance(tgt, int):  # the clean forward first: a task target decides on the original
        with frozen_eval(twin), torch.inference_mode():
            clean = float(_probabilities(twin, x[None].to(_device(twin)), tgt, 1, cl)[0])
        _check_clean(str(ex.task.get("kind")), clean)
    scores = faithfulness_core(
        twin, cl, x, tuple(keys), maps, tgt, names, settings, batch_size=batch_size, progress=progress,
        clean_probability=clean,
    )  # fmt: skip
    del twin
    timings["metrics"] = time.perf_counter() - t

    n_l = len(chosen)
    series: dict[str, dict[str, LayerSeries]] = {}
    per_method: dict[str, Any] = {}
    for i, m in enumerate(methods_):
        sl = slice(i * n_l, (i + 1) * n_l)
        series[m] = {
            n: LayerSeries(
                m, n, chosen, np.asarray(scores.values[n][sl], np.float64), METRICS[n].higher_is_better
            )
            for n in names
        }
        per_method[m] = _slice_scores(scores, sl, tuple(layer.name for layer in chosen))
    timings["total"] = time.perf_counter() - t0
    log.info(
        "faithfulness: %d layers x %d methods x %d metrics, %d unique of %d perturbed images forwarded, in %.1f s",
        n_l, len(methods_), len(names), int(scores.stats.get("forwards", 0)), int(scores.stats.get("masks", 0)),
        timings["total"],
    )  # fmt: skip
    return FaithfulnessResult(
        explanation=ex,
        metrics=names,
        series=series,
        scores=per_method,
        target=tgt if isinstance(tgt, int) else None,
        target_name=ex.target_names[0],
        clean_probability=float(scores.clean_probability),
        settings={
            "percentages": list(ps),
            "steps": int(steps),
            "baseline": baseline,
            "seed": int(seed),
            "imputer": repr(imp),
            "imputation_space": space,
        },
        stats=dict(scores.stats),
        timings=timings,
    )


def _task_metrics(names: tuple[str, ...], every: bool) -> tuple[str, ...]:
    """The metrics of a task target: ``"all"`` leaves out those defined for a probability only.

    Raises:
        MetricError: one of those asked by name.
    """
    if every:
        return tuple(n for n in names if n not in PROBABILITY_ONLY)
    bad = [n for n in names if n in PROBABILITY_ONLY]
    if bad:
        raise rd.RoadError(
            f"{', '.join(bad)} divide by the target's probability (Y, 1 - Y): defined for a class's softmax, "
            "not for a task target's score; use road, morf, lerf, deletion, insertion or the other "
            "confidence metrics"
        )
    return names


def _slice_scores(s: Any, sl: slice, keys: tuple[str, ...]) -> Any:
    """One method's rows of a :class:`FaithfulnessScores`, keyed by layer name."""
    road = deletion = confidence = None
    if s.road is not None:
        road = dataclasses.replace(s.road, keys=keys, morf=s.road.morf[sl], lerf=s.road.lerf[sl])
    if s.deletion is not None:
        deletion = dataclasses.replace(
            s.deletion, keys=keys, deletion=s.deletion.deletion[sl], insertion=s.deletion.insertion[sl]
        )
    if s.confidence is not None:
        confidence = dataclasses.replace(
            s.confidence, keys=keys, masked_probability=s.confidence.masked_probability[sl]
        )
    return dataclasses.replace(
        s, keys=keys, values={k: v[sl] for k, v in s.values.items()}, road=road, deletion=deletion,
        confidence=confidence,
    )  # fmt: skip


def best_layer_by(
    model: Any = None,
    image: Any = "chelsea",
    *,
    method: str = "gradcam",
    by: str = "road",
    target: Any = None,
    layers: LayerSpec = "all",
    **kwargs: Any,
) -> Layer:
    """The best layer of ``method`` by the metric ``by`` (runs :func:`faithfulness` with that metric only)."""
    name = parse_metrics(by)
    if len(name) != 1:
        raise UnknownNameError("faithfulness metric", str(by), list(METRICS))
    res = faithfulness(model, image, methods=method, layers=layers, target=target, metrics=name, **kwargs)
    return res.best_layer(res.methods[0], name[0])
