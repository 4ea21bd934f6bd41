"""Units of work of a study and the worker-side computation of one unit.

A *unit* is one (image, model, checkpoint, method): one :func:`camanim.road.ybroad` call whose rows are
committed together. Everything a worker needs travels in the :class:`Unit` (plain, picklable data); the
model is built inside the worker from its :class:`ModelSpec` and cached there (:class:`UnitRunner`).

Models are named as for :func:`camanim.models.load_model` (``efficientnet_lite0``, ``resnet50``,
``torchvision:NAME``, ``timm:NAME``) or by an import path ``package.module:factory`` naming a callable
that takes no argument and returns an ``nn.Module`` (ImageNet preprocessing assumed) or a
:class:`~camanim.models.LoadedModel` (its own preprocessing and class names). The factory's module must be
importable by the workers (on a Ray cluster: installed there or on ``PYTHONPATH``).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import importlib
import json
import logging
import os
import re
import socket
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camanim.compute.capture import frozen_eval
from camanim.compute.images import load_image
from camanim.compute.metrics.imputers import get_imputer
from camanim.compute.models import LoadedModel, load_model, load_state_dict_into, wrap_model
from camanim.compute.targets import resolve_class
from camanim.compute.tasks import (
    BoxScoreTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
)
from camanim.compute.volumes import is_volume_source
from camanim.errors import CamanimError
from camanim.pipelines.explain import prepare_input
from camanim.pipelines.ybroad import ybroad

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "target", "class")
_NAMED_SOURCES = ("torchvision", "timm")


class StudyError(CamanimError, ValueError):
    """A study's inputs or settings are invalid (no images, unknown columns, mismatched settings...)."""


# --------------------------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One image of a study.

    Attributes:
        id: its name in the store: the path relative to the folder, or as written in the list.
        path: where a worker reads it (absolute for folders and lists).
        label: the label column of a LIST.csv (a class index or name), ``None`` without one.
    """

    id: str
    path: str
    label: str | None = None


def list_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[ImageItem]:
    """The images of a study.

    Args:
        source: a folder (every image file below it, recursively, sorted by relative path), a CSV file
            with a path column (``path``, ``image``, ``file`` or ``filename``; else the first column;
            relative paths are relative to the CSV's folder) and an optional label column (``label``,
            ``target`` or ``class``: a class index or name), or a sequence of image paths.

    Returns:
        The images, in a stable order.

    Raises:
        StudyError: no image, a missing file, or two entries with the same id.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            files = sorted(
                (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda p: p.relative_to(root).as_posix(),
            )
            items = [ImageItem(p.relative_to(root).as_posix(), str(p.resolve())) for p in files]
        elif root.suffix.lower() == ".csv" and root.is_file():
            items = _read_list(root)
        elif root.is_file():
            items = [ImageItem(str(source), str(root.resolve()))]
        else:
            raise StudyError(f"--images {str(source)!r} is neither a folder, a .csv list nor an image file")
    else:
        items = [ImageItem(str(p), str(Path(p).resolve())) for p in source]
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and not items:
        volumes = sorted(p.name for p in Path(source).rglob("*") if p.is_file() and is_volume_source(p))
        if volumes:
            raise StudyError(
                f"camanim study scores 2-D images; volumes and clips ({volumes[0]}"
                f"{', ...' if len(volumes) > 1 else ''}) are not supported: score each with camanim road"
            )
    if not items:
        raise StudyError(f"no image found in {source!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if volumes := [item.id for item in items if is_volume_source(item.path)]:
        raise StudyError(
            f"camanim study scores 2-D images; volumes and clips ({volumes[0]}"
            f"{', ...' if len(volumes) > 1 else ''}) are not supported: score each with camanim road"
        )
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise StudyError(f"image {item.id!r} is listed twice")
        seen.add(item.id)
        if not Path(item.path).is_file():
            raise StudyError(f"image file {item.path!r} (listed as {item.id!r}) does not exist")
    return items


def _read_list(path: Path) -> list[ImageItem]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if not fields:
            raise StudyError(f"{str(path)!r} is empty; expected a header row with a path column")
        lower = {c.lower(): c for c in fields}
        path_col = next((lower[c] for c in PATH_COLUMNS if c in lower), fields[0])
        label_col = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
        items = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            rel = row.get(path_col, "")
            if not rel:
                continue
            p = Path(rel)
            full = p if p.is_absolute() else path.parent / p
            label = row.get(label_col) if label_col else None
            items.append(ImageItem(rel, str(full.resolve()), label or None))
    return items


# --------------------------------------------------------------------------------------------------------
# Models and checkpoints.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds one model of a study.

    Attributes:
        name: the name recorded in the store: a :func:`~camanim.models.load_model` name or a
            ``module:factory`` import path.
        weights: for named models, ``"default"`` (pretrained) or ``"none"`` (random, seeded); ignored
            by factories. A checkpoint, when the unit has one, replaces it.
        num_classes: head size for random or checkpoint weights of named models.
        factory: a callable used instead of importing ``name`` (Python API; pickled by reference, so it
            must be importable by the workers unless the study runs in one process).
    """

    name: str
    weights: str = "default"
    num_classes: int | None = None
    factory: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def is_factory(self) -> bool:
        """Whether the model comes from a factory rather than :func:`~camanim.models.load_model`."""
        if self.factory is not None:
            return True
        prefix, sep, _ = self.name.partition(":")
        return bool(sep) and prefix not in _NAMED_SOURCES


def parse_models(
    models: str | ModelSpec | Callable[[], Any] | Iterable[str | ModelSpec | Callable[[], Any]],
    *,
    weights: str = "default",
    num_classes: int | None = None,
) -> list[ModelSpec]:
    """Model specs from a comma-separated string, specs, names or factory callables."""
    if isinstance(models, (str, ModelSpec)) or callable(models):
        models = [models]  # type: ignore[list-item]
    out: list[ModelSpec] = []
    for m in models:  # type: ignore[union-attr]
        if isinstance(m, ModelSpec):
            out.append(m)
        elif isinstance(m, str):
            out += [ModelSpec(s.strip(), weights, num_classes) for s in m.split(",") if s.strip()]
        elif callable(m):
            name = f"{getattr(m, '__module__', '?')}:{getattr(m, '__qualname__', repr(m))}"
            out.append(ModelSpec(name, weights, num_classes, factory=m))
        else:
            raise StudyError(f"a model is a name, a 'module:factory' path or a callable, got {m!r}")
    if not out:
        raise StudyError("no model given")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise StudyError(f"a model is listed twice: {names}")
    return out


def import_factory(path: str) -> Callable[[], Any]:
    """Import ``package.module:attr.attr`` and return the callable it names."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise StudyError(f"cannot import the model factory {path!r}: {exc}") from exc
    if not callable(obj):
        raise StudyError(f"the model factory {path!r} is not callable")
    return obj


def expand_checkpoints(pattern: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Checkpoint files from a glob pattern (or a list), in natural order (``epoch_2`` before ``epoch_10``).

    Raises:
        StudyError: the pattern matches no file.
    """
    if isinstance(pattern, (str, os.PathLike)):
        paths = [p for p in glob.glob(os.fspath(pattern), recursive=True) if Path(p).is_file()]
        if not paths:
            raise StudyError(f"--checkpoints {str(pattern)!r} matches no file")
    else:
        paths = [os.fspath(p) for p in pattern]
    return sorted(paths, key=_natural_key)


def _natural_key(text: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def checkpoint_epoch(path: str, position: int) -> int:
    """The last number in the file name (``epoch_012.pt`` -> 12), else its position in the sorted list."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else position


# --------------------------------------------------------------------------------------------------------
# Units and settings.
# --------------------------------------------------------------------------------------------------------


#: The tasks a study scores (what the target of each image is; see :class:`TaskSpec`).
STUDY_TASKS = ("classification", "segmentation", "detection", "embedding", "multilabel", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """What each image's target is, decided per image as the single-image commands decide it.

    Attributes:
        kind: ``"classification"`` (the label column, else the top-1 class), ``"segmentation"`` (the summed
            logit of ``target`` or the image's label over ``region``, by default the pixels the model
            predicts as that class in that image), ``"multilabel"`` (the sigmoid of ``target`` or the label,
            else of the image's top-1 label), ``"regression"`` (output ``target`` or the label, else the one
            output), ``"embedding"`` (cosine similarity to ``reference``'s embedding by each model) or
            ``"detection"`` (the ``top_n`` most confident detections of each image, summed).
        target: the class(es), label(s) or output index for every image, comma-separated; None: each image's
            label column, else the default above.
        region: segmentation: ``"x1,y1,x2,y2"`` or a mask PNG at the output's size (the same for every
            image); None: each image's predicted pixels.
        reference: embedding: an image or a ``.npy`` vector.
        embedding_layer: embedding: the layer whose pooled output is the embedding (None: the output).
        top_n: detection: how many detections.
        iou: detection: the least IoU of a matching box in a perturbed image.
    """

    kind: str = "classification"
    target: str | None = None
    region: str | None = None
    reference: str | None = None
    embedding_layer: str | None = None
    top_n: int = 1
    iou: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in STUDY_TASKS:
            raise StudyError(f"unknown task {self.kind!r}; a study scores one of {', '.join(STUDY_TASKS)}")
        if self.kind == "embedding" and not self.reference:
            raise StudyError("the embedding task scores the similarity to a reference: give a reference")


@dataclass(frozen=True)
class StudySettings:
    """What shapes a study's numbers; the same for every unit (recorded in ``study.json``).

    Attributes:
        layers: layer selection (see :func:`camanim.layers.select_layers`).
        percentages: p values of ROAD, in percent.
        seed: base seed; each image's seed is derived from it (:func:`unit_seed`).
        imputer: imputer name (:data:`camanim.road.IMPUTERS`).
        imputation_space: ``"pixel"`` or ``"model"``.
        score: what the CAM differentiates.
        batch_size: perturbed images per forward.
        keep_nonspatial: include 1x1 layers.
        input_size: the images' input size instead of the model's (``N``, ``"HxW"``, ``"native"``), or None.
        task: what each image's target is (:class:`TaskSpec`; default a class of a classifier).
    """

    layers: Any = "all"
    percentages: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)
    seed: int = 0
    imputer: str = "noisy_linear"
    imputation_space: str = "pixel"
    score: str = "logit"
    batch_size: int = 64
    keep_nonspatial: bool = False
    input_size: str | None = None
    task: TaskSpec = TaskSpec()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a layer list becomes a list)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        d["percentages"] = list(self.percentages)
        return d


def parse_layers(spec: Any) -> Any:
    """A CLI layer selection: ``"3"`` and ``"last-3"`` mean the last 3 layers; anything else is kept."""
    if isinstance(spec, str):
        text = spec.strip()
        m = re.fullmatch(r"(?:last-)?(\d+)", text)
        if m:
            return int(m.group(1))
        return text
    return spec


@dataclass(frozen=True)
class Unit:
    """One (image, model, checkpoint, method) of a study.

    Attributes:
        image: the image.
        model: the model spec.
        method: the CAM method.
        checkpoint: path of the state dict (``""``: the spec's own weights).
        checkpoint_index: position of the checkpoint in the sorted list (``-1`` without).
        epoch: epoch number read from the checkpoint's name (``-1`` without).
    """

    image: ImageItem
    model: ModelSpec
    method: str
    checkpoint: str = ""
    checkpoint_index: int = -1
    epoch: int = -1

    @property
    def key(self) -> str:
        """The unit's identity: ``[image, model, checkpoint, method]`` as JSON."""
        return json.dumps([self.image.id, self.model.name, self.checkpoint, self.method])

    @property
    def uid(self) -> str:
        """A file-name-safe digest of :attr:`key` (the unit's file name in the store)."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:24]


def unit_seed(base: int, unit: Unit) -> int:
    """The seed of a unit: a hash of the base seed and the unit's image.

    Model, checkpoint and method are deliberately left out: every model, checkpoint and method of one image
    then draws the same tie-break keys and the same noise for the same mask (common random numbers), so
    their differences come from the maps alone. Results never depend on the backend or worker count.
    """
    digest = hashlib.sha256(f"{int(base)}|{unit.image.id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_units(
    images: Sequence[ImageItem],
    models: Sequence[ModelSpec],
    methods: Sequence[str],
    checkpoints: Sequence[str] = (),
) -> list[Unit]:
    """Every unit, ordered model, checkpoint, image, method (so a worker keeps reusing one model)."""
    if checkpoints and len(models) != 1:
        raise StudyError(
            f"--checkpoints holds one architecture's state dicts: give exactly one model, not {len(models)}"
        )
    ckpts = [(c, i, checkpoint_epoch(c, i)) for i, c in enumerate(checkpoints)] or [("", -1, -1)]
    return [
        Unit(img, spec, method, c, i, e)
        for spec in models
        for c, i, e in ckpts
        for img in images
        for method in methods
    ]


# --------------------------------------------------------------------------------------------------------
# The computation of one unit (worker side).
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitOutcome:
    """What a worker sends back for one unit: its rows, or its error.

    Attributes:
        uid: the unit's id.
        ok: whether it succeeded.
        layers: one row per scored layer (column name -> value).
        summary: the unit's summary row.
        error: ``"Type: message"`` when it failed; ``traceback`` the formatted traceback.
        seconds: wall time of the unit in the worker (model loading included).
        worker: ``host:pid`` of the worker.
    """

    uid: str
    ok: bool
    layers: list[dict[str, Any]] = field(default_factory=list, repr=False)
    summary: dict[str, Any] = field(default_factory=dict, repr=False)
    error: str = ""
    traceback: str = field(default="", repr=False)
    seconds: float = 0.0
    worker: str = ""


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pcol(kind: str, p: float) -> str:
    return f"{kind}_p{p:g}"


def score_columns(percentages: Sequence[float]) -> list[str]:
    """The per-percentage columns of the layer table: ``morf_p20, ..., lerf_p20, ...``."""
    return [_pcol("morf", p) for p in percentages] + [_pcol("lerf", p) for p in percentages]


def unit_target(unit: Unit, settings: StudySettings, lm: Any) -> tuple[Any, Any, str]:
    """The model, the target and where the target came from (``"label"``, ``"given"`` or the default's
    name) of one unit: a class index (or None: the top-1 class) for a classifier, else a fresh task target
    of :mod:`camanim.compute.tasks` that decides on the unit's image at its first forward (its predicted
    pixels, its top detections, its top label).

    Raises:
        StudyError: a segmentation with neither a target nor a label for the image.
    """
    spec = settings.task
    given = spec.target if spec.target is not None else unit.image.label
    source = "given" if spec.target is not None else "label" if unit.image.label is not None else ""
    parts = [] if given is None else [t.strip() for t in str(given).split(",") if t.strip()]
    if spec.kind == "classification":
        target = None if unit.image.label is None else resolve_class(unit.image.label, lm.class_names)
        return lm, target, source or "top1"
    if spec.kind == "segmentation":
        if not parts:
            raise StudyError(
                f"the segmentation task explains a class: give the target class, or a label for {unit.image.id!r}"
            )
        classes = [resolve_class(t, lm.class_names) for t in parts]
        score = "probability" if settings.score == "probability" else "logit"
        category = classes[0] if len(classes) == 1 else classes
        return lm, SegmentationTarget(category, _region(spec.region), score=score), source
    if spec.kind == "multilabel":
        if not parts:
            return lm, MultiLabelTarget(top_k=1, names=lm.class_names), "top1"
        labels = [resolve_class(t, lm.class_names) for t in parts]
        return lm, MultiLabelTarget(labels, lm.class_names), source
    if spec.kind == "regression":
        return lm, RegressionTarget(int(parts[0]) if parts else None), source or "output"
    if spec.kind == "detection":
        names = lm.labels or ()
        return lm, BoxScoreTarget(iou_threshold=spec.iou, top_n=spec.top_n, names=names), "top detections"
    tapped = lm.with_output(None, "vector", tap=spec.embedding_layer)
    name = Path(str(spec.reference)).name
    return (
        tapped,
        SimilarityTarget(_reference(spec.reference, tapped, settings.input_size), name),
        "reference",
    )


def _region(region: str | None) -> Any:
    """A segmentation region from its text: ``"x1,y1,x2,y2"`` (a box) or a mask PNG; None as it is."""
    if region is None:
        return None
    if "," in region:
        return [float(v) for v in region.split(",")]
    return np.asarray(Image.open(region).convert("L")) > 127


def _reference(reference: Any, lm: Any, input_size: Any) -> torch.Tensor:
    """The reference embedding ``(D,)``: a ``.npy`` vector, or the model's embedding of an image."""
    path = Path(str(reference))
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float().flatten()
    x, _, _ = prepare_input(load_image(str(reference)), lm, input_size)
    with frozen_eval(lm.model), torch.no_grad():
        return lm.model(x.to(lm.device)).flatten(1)[0].float().cpu()


def compute_unit(
    unit: Unit, settings: StudySettings, lm: Any, device: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ybROAD for one unit and turn it into rows.

    Args:
        unit: the unit.
        settings: the study's settings.
        lm: the unit's :class:`~camanim.models.LoadedModel` (with the unit's checkpoint loaded).
        device: where to run.

    Returns:
        ``(layer rows, summary row)``.
    """

    lm, target, source = unit_target(unit, settings, lm)
    seed = unit_seed(settings.seed, unit)
    res = ybroad(
        lm,
        unit.image.path,
        methods=unit.method,
        layers=settings.layers,
        target=target,
        percentages=settings.percentages,
        seed=seed,
        imputer=get_imputer(settings.imputer),
        imputation_space=settings.imputation_space,
        batch_size=settings.batch_size,
        score=settings.score,
        keep_nonspatial=settings.keep_nonspatial,
        input_size=settings.input_size,
        device=device,
    )
    ex = res.explanation
    r = res[unit.method]
    kind = res.task.get("kind", "classification")
    if kind == "classification":
        probs = ex.probabilities[0]
        top1: int | None = int(probs.argmax())
        top1_name = ex.class_names[top1] if top1 < len(ex.class_names) else str(top1)
        top1_probability: float | None = float(probs[top1])
    else:  # a task target: its score is the target's own, there is no class ranking
        top1 = top1_name = top1_probability = None
    base = {
        "unit": unit.uid,
        "image": unit.image.id,
        "model": unit.model.name,
        "checkpoint": unit.checkpoint,
        "checkpoint_index": unit.checkpoint_index,
        "epoch": unit.epoch,
        "method": unit.method,
        "seed": seed,
        "label": unit.image.label,
        "target": res.target,
        "target_name": res.target_name,
        "target_source": source,
        "target_probability": float(res.clean_probability),
        "top1": top1,
        "top1_name": top1_name,
        "top1_probability": top1_probability,
        "task": kind,
        "target_score": float(res.clean_probability),
    }
    rows = []
    for pos, layer in enumerate(r.layers):
        raw = ex.maps[unit.method][layer.name][0].numpy().astype(np.float64)
        h, w = layer.map_size or (1, 1)
        row = dict(base)
        row.update(
            position=pos,
            layer_index=layer.index,
            layer_name=layer.name,
            layer_type=layer.type,
            layer_kind=layer.kind,
            layer_shape="x".join(str(s) for s in layer.shape),
            map_h=int(h),
            map_w=int(w),
            is_best=pos == r.best_position,
            is_final=pos == r.final_position,
            road=float(r.road[pos]),
            raw_min=float(raw.min()),
            raw_max=float(raw.max()),
            raw_mean=float(raw.mean()),
            raw_std=float(raw.std()),
            raw_positive=float((raw > 0).mean()),
            flags=",".join(ex.flags[unit.method].get(layer.name, ())),
        )
        for j, p in enumerate(r.percentages):
            row[_pcol("morf", p)] = float(r.morf[pos, j])
            row[_pcol("lerf", p)] = float(r.lerf[pos, j])
        rows.append(row)
    summary = dict(base)
    summary.update(
        layers=len(r),
        mean_layerwise_road=r.mean,
        max_ybroad=r.max,
        best_position=r.best_position,
        best_layer_index=r.best_layer.index,
        best_layer_name=r.best_layer.name,
        final_position=r.final_position,
        final_layer_index=r.final_layer.index,
        final_layer_name=r.final_layer.name,
        final_layer_road=r.final,
        difference=r.difference,
    )
    return rows, summary


def build_model(spec: ModelSpec, checkpoint: str = "", device: Any = "cpu", seed: int = 0) -> Any:
    """Build a spec's :class:`~camanim.models.LoadedModel`, with ``checkpoint`` loaded when given.

    A factory runs under ``torch.manual_seed(seed)`` (restored afterwards) so random initialisations are the
    same in every worker.
    """
    import torch

    if not spec.is_factory:
        return load_model(
            spec.name, checkpoint or spec.weights, num_classes=spec.num_classes, device=device, seed=seed
        )
    fn = spec.factory or import_factory(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        obj = fn()
    if isinstance(obj, LoadedModel):
        lm = dataclasses.replace(obj, name=spec.name)
    elif isinstance(obj, torch.nn.Module):
        lm = wrap_model(obj, name=spec.name)
    else:
        raise StudyError(f"the factory {spec.name!r} returned {type(obj).__name__}, not an nn.Module")
    if checkpoint:
        load_state_dict_into(lm.model, checkpoint)
        lm = dataclasses.replace(lm, weights=f"checkpoint {checkpoint}")
    lm.model.eval().to(device)
    return lm


class UnitRunner:
    """Runs units in one worker, keeping the last ``cache_size`` models loaded.

    Args:
        settings: the study's settings.
        device: where to run (``None``: CPU).
        threads: torch intra-op threads of this worker (``None``: leave as is).
        cache_size: models (model, checkpoint pairs) kept loaded.
    """

    def __init__(
        self,
        settings: StudySettings,
        device: str | None = None,
        threads: int | None = None,
        cache_size: int = 2,
    ) -> None:
        self.settings = settings
        self.device = device or "cpu"
        self.cache_size = max(1, int(cache_size))
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.loads = 0
        if threads:
            import torch

            torch.set_num_threads(int(threads))

    def model(self, unit: Unit) -> Any:
        """The unit's model, loaded once per worker and kept (least recently used evicted first)."""
        key = (unit.model.name, unit.checkpoint)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        lm = build_model(unit.model, unit.checkpoint, self.device, self.settings.seed)
        self.loads += 1
        self._models[key] = lm
        while len(self._models) > self.cache_size:
            self._models.popitem(last=False)
        return lm

    def __call__(self, unit: Unit) -> UnitOutcome:
        """Compute one unit; an exception becomes a failed outcome (never raised)."""
        t0 = time.perf_counter()
        try:
            rows, summary = compute_unit(unit, self.settings, self.model(unit), self.device)
        except Exception as exc:  # any failure of one unit is recorded, not fatal to the study
            log.debug("unit %s failed", unit.key, exc_info=True)
            return UnitOutcome(
                unit.uid,
                False,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                seconds=time.perf_counter() - t0,
                worker=worker_name(),
            )
        return UnitOutcome(
            unit.uid, True, rows, summary, seconds=time.perf_counter() - t0, worker=worker_name()
        )
