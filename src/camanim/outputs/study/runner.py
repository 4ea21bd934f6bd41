"""The driver of a study: plan the units, skip finished ones, dispatch, commit, retry, export."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camanim.compute.methods import parse_methods
from camanim.compute.metrics.road import DEFAULT_PERCENTAGES, check_percentages
from camanim.compute.models import parse_input_size
from camanim.outputs.study.figures import write_study_report
from camanim.outputs.study.store import StudyStore, pyarrow_modules
from camanim.pipelines.study.executors import make_executor
from camanim.pipelines.study.units import (
    ImageItem,
    ModelSpec,
    StudyError,
    StudySettings,
    TaskSpec,
    expand_checkpoints,
    list_images,
    make_units,
    parse_layers,
    parse_models,
)

log = logging.getLogger(__name__)

#: ``progress(done, failed, total)``: units committed and failed in this run, out of the units to run.
StudyProgressCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class StudyResult:
    """What one :func:`run_study` call did.

    Attributes:
        root: the study folder.
        units: units of the study (finished before or now, or failed).
        skipped: units already in the store when the run started.
        done: units committed by this run.
        failed: units that failed every attempt in this run: ``{uid: error}``.
        seconds: wall time of the run.
        executor: the backend, in words.
        restarts: workers restarted after dying.
        unit_seconds: per unit committed in this run, its wall time in the worker.
    """

    root: Path
    units: int
    skipped: int
    done: int
    failed: dict[str, str]
    seconds: float
    executor: str
    restarts: int = 0
    unit_seconds: tuple[float, ...] = field(default=(), repr=False)

    @property
    def complete(self) -> bool:
        """Whether every unit of the study is in the store."""
        return self.skipped + self.done == self.units

    @property
    def units_per_minute(self) -> float:
        """Units committed per minute of this run's wall time."""
        return 60.0 * self.done / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Study:
    """A study read back from its folder (:func:`load_study`).

    Attributes:
        root: the folder.
        config: ``study.json``.
        layers: the layer table (``pyarrow.Table``): one row per image, model, checkpoint, method, layer.
        summary: the summary table (``pyarrow.Table``): one row per image, model, checkpoint, method.
        failures: failed units (see :meth:`StudyStore.failures`).
    """

    root: Path
    config: dict[str, Any] = field(repr=False)
    layers: Any = field(repr=False)
    summary: Any = field(repr=False)
    failures: dict[str, Any] = field(repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        """The study's settings."""
        return dict(self.config.get("settings", {}))


def load_study(root: str | os.PathLike[str]) -> Study:
    """Read a study folder back.

    Raises:
        StudyError: ``root`` holds no study.
    """
    store = StudyStore(Path(root))
    config = store.read_config()
    if config is None:
        raise StudyError(f"{str(root)!r} holds no study (no study.json)")
    return Study(store.root, config, store.read_layers(), store.read_summary(), dict(store.failures()))


def _task_spec(
    kind: str,
    target: str | None,
    region: str | None,
    reference: str | None,
    layer: str | None,
    top_n: int,
    iou: float,
) -> TaskSpec:
    """A :class:`TaskSpec` with its files made absolute (workers may run elsewhere)."""

    def absolute(path: str | None) -> str | None:
        if path is None or "," in path or not Path(path).exists():
            return path
        return str(Path(path).resolve())

    return TaskSpec(
        kind=kind,
        target=None if target is None else str(target),
        region=absolute(region),
        reference=absolute(reference),
        embedding_layer=layer,
        top_n=int(top_n),
        iou=float(iou),
    )


def run_study(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sequence[ImageItem],
    out: str | os.PathLike[str],
    *,
    models: str | ModelSpec | Callable[[], Any] | Sequence[str | ModelSpec | Callable[[], Any]] = (
        "efficientnet_lite0"
    ),
    methods: str | Sequence[str] = "gradcam",
    layers: Any = "all",
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    checkpoints: str | Sequence[str] | None = None,
    weights: str = "default",
    num_classes: int | None = None,
    seed: int = 0,
    imputer: str = "noisy_linear",
    imputation_space: str = "pixel",
    score: str = "logit",
    batch_size: int = 64,
    keep_nonspatial: bool = False,
    input_size: str | None = None,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    retries: int = 1,
    figures: bool = True,
    progress: StudyProgressCallback | None = None,
    task: str | TaskSpec = "classification",
    target: str | None = None,
    region: str | None = None,
    reference: str | None = None,
    embedding_layer: str | None = None,
    top_n: int = 1,
    iou: float = 0.5,
) -> StudyResult:
    """Run (or resume) a ybROAD study over images x models x checkpoints x methods into ``out``.

    Each unit (image, model, checkpoint, method) runs :func:`camanim.road.ybroad` on its image and its rows
    are committed atomically to the Parquet store in ``out`` as soon as it finishes. Re-running the same
    call skips committed units; a unit that fails is retried ``retries`` times, then recorded in
    ``failures.json`` (a later run tries it again). Numbers do not depend on the backend or worker count:
    every image has its own seed (:func:`camanim.study.units.unit_seed`) and every worker runs torch with
    ``threads`` threads.

    Args:
        images: a folder, a CSV list (path and optional label column), or a sequence of paths.
        out: the study folder.
        models: names (``"efficientnet_lite0,resnet50"``), ``module:factory`` import paths, specs or
            factory callables (see :mod:`camanim.study.units`).
        methods: CAM methods (``"gradcam,hirescam"`` or a list).
        layers: layer selection (``"all"``, ``N`` or ``"last-N"``, names, globs...).
        percentages: ROAD's p values in percent.
        checkpoints: a glob (``"runs/epoch_*.pt"``) or list of state dicts of the single model, run in
            natural order: epoch-wise ybROAD.
        weights: weights of named models (``"default"`` pretrained, ``"none"`` random).
        num_classes: head size of named models with random or checkpoint weights.
        seed: base seed.
        imputer: ROAD imputer name.
        imputation_space: ``"pixel"`` or ``"model"``.
        score: what the CAM differentiates.
        batch_size: perturbed images per forward.
        input_size: the images' input size instead of the model's (``N``, ``"HxW"``, ``"native"``).
        keep_nonspatial: include 1x1 layers.
        backend: ``"local"`` or ``"ray"``.
        workers: local worker processes (default 1: in this process) or Ray actors (default: one per
            GPU, else per CPU of the cluster).
        address: the Ray cluster to join (default: start a local instance).
        device: where workers run models (default CPU; Ray actors on a GPU cluster use ``cuda``).
        threads: torch threads per worker (default 1; more units in parallel scale better than more threads
            per unit, and equal thread counts make results bit-identical whatever the backend and worker
            count: different counts change float32 sums in the last bits, about 1e-9 in ROAD).
        retries: extra attempts of a failing unit in this run.
        figures: render ``figures/*.png`` and ``study.html`` at the end.
        progress: called as ``progress(done, failed, total)`` after each unit.
        task: what each image's target is: ``"classification"`` (default), ``"segmentation"``,
            ``"multilabel"``, ``"regression"``, ``"embedding"`` or ``"detection"``, decided per image as the
            single-image commands decide it (see :class:`~camanim.pipelines.study.units.TaskSpec`), or a
            ``TaskSpec``. ROAD scores the target's own score (its region, its detections as decided on the
            original image). Recorded in ``study.json``: a resumed study must keep it.
        target: the class(es), label(s) or output index of every image (comma-separated); default each
            image's label column, else the task's default (the top-1 class or label, the one output).
        region: segmentation: ``"x1,y1,x2,y2"`` or a mask PNG for every image (default: the predicted pixels).
        reference: embedding: an image or ``.npy`` vector; ``embedding_layer`` the layer pooled (default
            the output).
        top_n, iou: detection: how many of each image's most confident detections, and the least IoU of a
            match in a perturbed image.

    Returns:
        A :class:`StudyResult`.

    Raises:
        StudyError: bad inputs, or ``out`` holds a study with other settings.
        MissingExtraError: pyarrow (or Ray for ``backend="ray"``) is not installed.
    """

    t0 = time.perf_counter()
    pyarrow_modules()
    spec = (
        task
        if isinstance(task, TaskSpec)
        else _task_spec(task, target, region, reference, embedding_layer, top_n, iou)
    )
    settings = StudySettings(
        layers=parse_layers(layers),
        percentages=check_percentages(percentages),
        seed=int(seed),
        imputer=imputer,
        imputation_space=imputation_space,
        score=score,
        batch_size=int(batch_size),
        keep_nonspatial=bool(keep_nonspatial),
        input_size=None if parse_input_size(input_size) is None else str(input_size),
        task=spec,
    )
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, ImageItem) for i in images):
        items = list(images)
    else:
        items = list_images(images)  # type: ignore[arg-type]
    specs = parse_models(models, weights=weights, num_classes=num_classes)
    names = list(parse_methods(methods))
    ckpts = expand_checkpoints(checkpoints) if checkpoints else []
    units = make_units(items, specs, names, ckpts)
    if spec.kind == "segmentation" and spec.target is None:
        unlabelled = [i.id for i in items if i.label is None]
        if unlabelled:
            raise StudyError(
                f"the segmentation task explains a class: give the target class or label every image "
                f"({unlabelled[0]!r} has no label)"
            )

    store = StudyStore(Path(out))
    store.create()
    inputs = {
        "images": str(images) if isinstance(images, (str, os.PathLike)) else f"{len(items)} paths",
        "image_count": len(items),
        "labelled": sum(1 for i in items if i.label is not None),
        "models": [s.name for s in specs],
        "weights": weights,
        "methods": names,
        "checkpoints": ckpts,
        "units": len(units),
    }
    store.write_config(settings, inputs)
    finished = store.done()
    todo = deque(u for u in units if u.uid not in finished)
    skipped = len(units) - len(todo)
    if skipped:
        log.info("resuming: %d of %d units already in %s", skipped, len(units), store.root)
    total = len(todo)
    attempts: Counter[str] = Counter()
    failed: dict[str, str] = {}
    seconds: list[float] = []
    done = 0
    executor = None
    describe = "nothing to run"
    restarts = 0
    try:
        if todo:
            executor = make_executor(
                backend, settings, workers=workers, address=address, device=device, threads=threads
            )
            describe = executor.describe
            log.info("study: %d units to run (%s)", total, describe)
            if progress is not None:
                progress(0, 0, total)
            inflight = 0
            while todo or inflight:
                while todo and inflight < executor.capacity:
                    executor.submit(todo.popleft())
                    inflight += 1
                unit, outcome = executor.next_done()
                inflight -= 1
                attempts[unit.uid] += 1
                if outcome.ok:
                    store.commit(unit, outcome, settings, attempts[unit.uid])
                    seconds.append(outcome.seconds)
                    done += 1
                elif attempts[unit.uid] <= retries:
                    log.warning("unit %s failed (%s); retrying", unit.key, outcome.error)
                    todo.append(unit)
                else:
                    log.error("unit %s failed: %s", unit.key, outcome.error)
                    store.record_failure(unit, outcome, attempts[unit.uid])
                    failed[unit.uid] = outcome.error
                if progress is not None and (outcome.ok or unit.uid in failed):
                    progress(done, len(failed), total)
            restarts = getattr(executor, "restarts", 0)
    finally:
        if executor is not None:
            executor.close()
    store.export_csv()
    elapsed = time.perf_counter() - t0
    store.update_config(
        last_run={
            "executor": describe,
            "units_run": total,
            "committed": done,
            "failed": len(failed),
            "seconds": round(elapsed, 3),
        }
    )
    if figures:
        write_study_report(store.root)
    return StudyResult(
        root=store.root,
        units=len(units),
        skipped=skipped,
        done=done,
        failed=failed,
        seconds=elapsed,
        executor=describe,
        restarts=restarts,
        unit_seconds=tuple(seconds),
    )
