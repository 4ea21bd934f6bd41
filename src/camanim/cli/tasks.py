"""The ``--task`` options: what a command explains when it is not one class of a classifier."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camanim.compute.capture import frozen_eval
from camanim.compute.images import load_image
from camanim.compute.metrics.faithfulness import PROBABILITY_ONLY
from camanim.compute.models import LoadedModel, torchvision_task
from camanim.compute.targets import resolve_class
from camanim.compute.tasks import (
    BoxScoreTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
    StackedTarget,
)
from camanim.errors import OptionError
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import prepare_input

TASKS = ("auto", "classification", "segmentation", "detection", "embedding", "multilabel", "regression")


def add_task_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task (what --target means)")
    g.add_argument(
        "--task",
        default="auto",
        choices=TASKS,
        help="auto (default: torchvision segmentation and detection models by name, else classification); "
        "segmentation: --target CLASS[,CLASS...] over --region; detection: --box and --target LABEL, or "
        "--top-n; embedding: cosine similarity to --reference; multilabel: --target LABEL[,LABEL...] "
        "(sigmoid); regression: --target INDEX of the output",
    )
    g.add_argument(
        "--each",
        action="store_true",
        help="multilabel, detection, segmentation: one target per label, box or class (one shared forward "
        "pass, one backward pass each; explain keeps one map per target, animate writes one bundle per "
        "target in OUT/target_<k>) instead of one summed score",
    )
    g.add_argument("--region", default=None, metavar="MASK.png|x1,y1,x2,y2", help="segmentation: the region")
    g.add_argument("--box", default=None, metavar="x1,y1,x2,y2[;...]", help="detection: the boxes to explain")
    g.add_argument(
        "--top-n", type=int, default=1, metavar="N", help="detection: the N most confident (default 1)"
    )
    g.add_argument(
        "--iou", type=float, default=0.5, help="detection: least IoU of a matching box (default 0.5)"
    )
    g.add_argument("--reference", default=None, metavar="IMAGE|FILE.npy", help="embedding: the reference")
    g.add_argument(
        "--embedding-layer", default=None, metavar="NAME", help="embedding: a layer's pooled output"
    )


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise OptionError(f"{what} takes x1,y1,x2,y2 in pixels, got {text!r}") from None
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise OptionError(f"{what} takes x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2, got {text!r}")
    return values


def resolve_task(args: argparse.Namespace) -> str:
    """The task of a command (``--task``, or from the model's name), checked before any model is loaded."""
    task = getattr(args, "task", "auto")
    model = str(getattr(args, "model", None) or str(getattr(args, "models", "")).split(",")[0])
    if task == "auto":
        bare = model.split(":", 1)[-1]
        task = torchvision_task(bare) if not model.startswith("timm:") else "classification"
    given = {
        "--region": args.region,
        "--box": args.box,
        "--reference": args.reference,
        "--embedding-layer": args.embedding_layer,
    }
    allowed = {
        "segmentation": {"--region"},
        "detection": {"--box"},
        "embedding": {"--reference", "--embedding-layer"},
    }
    wrong = [opt for opt, v in given.items() if v is not None and opt not in allowed.get(task, set())]
    if wrong:
        raise OptionError(f"{', '.join(wrong)} do not apply to the task {task!r} (see --task)")
    if task == "segmentation" and args.region and "," in args.region:
        _numbers(args.region, "--region")
    elif task == "segmentation" and args.region and not Path(args.region).is_file():
        raise OptionError(f"--region {args.region!r} is neither a mask image nor x1,y1,x2,y2")
    if task == "detection" and args.box and getattr(args, "command", None) == "study":
        raise OptionError(
            "--box names boxes of one image; a study explains each image's most confident detections: use "
            "--top-n N"
        )
    if task == "detection" and args.box:
        for part in args.box.split(";"):
            _numbers(part, "--box")
    if task == "detection" and not (0 < args.iou < 1 and args.top_n >= 1):
        raise OptionError("--iou must be in (0, 1) and --top-n at least 1")
    if task == "embedding" and args.reference is None:
        raise OptionError(
            "the embedding task explains the similarity to a reference: give --reference IMAGE or FILE.npy"
        )
    if task == "embedding" and not Path(args.reference).exists() and not args.reference.isidentifier():
        raise OptionError(f"--reference {args.reference!r} does not exist")
    if task in ("detection", "segmentation", "embedding", "regression") and getattr(args, "top_k", None):
        raise OptionError(f"--top-k ranks a classifier's classes; it does not apply to the task {task!r}")
    if getattr(args, "each", False):
        if task not in ("multilabel", "detection", "segmentation"):
            raise OptionError(f"--each makes one target per label, box or class; not of the task {task!r}")
        if getattr(args, "command", None) not in ("explain", "animate", "run"):
            raise OptionError("--each (several targets) goes with explain and animate")
        best = str(getattr(args, "layers", "all")).strip().lower() == "best"
        if getattr(args, "road", False) or best:
            raise OptionError("--road and --layers best score one target; --each makes several")
    return task


def check_scored(task: str, metrics: str | None) -> None:
    """Refuse, before any model loads, faithfulness metrics not defined for ``task``'s score: Average Drop
    and Average Gain divide by a probability (``Y``, ``1 - Y``), which only a classifier's softmax is;
    ``all`` leaves them out for the other tasks. ROAD and the other metrics score any target."""
    if task == "classification" or not metrics:
        return
    asked = [m.strip().lower().replace("-", "_") for m in str(metrics).split(",")]
    bad = [m for m in asked if m in PROBABILITY_ONLY]
    if bad:
        raise OptionError(
            f"{', '.join(bad)} divide by the target's probability (Y, 1 - Y), which a {task} score is not; "
            "use road, morf, lerf, deletion, insertion or the other confidence metrics"
        )


def check_fusion_task(args: argparse.Namespace, task: str) -> None:
    """Refuse, before any model loads, a ``camanim fmgcam`` task with nothing to fuse: FM-G-CAM fuses the maps
    of ``K >= 2`` targets (labels, classes, detections, regression outputs), never one score."""
    if getattr(args, "multilabel", False) and task not in ("classification", "multilabel"):
        raise OptionError(
            f"--multilabel ranks a classifier's classes by sigmoid; it does not apply to {task!r}"
        )
    if task == "classification":
        return
    if task == "embedding":
        raise OptionError(
            "fmgcam fuses the maps of several targets; an embedding similarity is one score (the cosine to "
            "one reference): use explain or animate --task embedding"
        )
    count = None if args.target is None else len([t for t in str(args.target).split(",") if t.strip()])
    if task == "regression" and not all(t.strip().lstrip("-").isdigit() for t in str(args.target).split(",")):
        raise OptionError(f"--target of a regression takes output indices (0,1,...), got {args.target!r}")
    if task == "regression" and (count or 0) < 2:
        raise OptionError(
            "fmgcam fuses the maps of several targets; one regression output is one score: give several "
            "outputs (--target 0,1,...) or use explain or animate --task regression"
        )
    if task == "segmentation" and (count or 0) < 2:
        raise OptionError(
            "fmgcam fuses the maps of several targets: give two or more classes (--target CLASS,CLASS,...)"
        )
    if task == "multilabel" and ((count is not None and count < 2) or getattr(args, "top_k", None) == 1):
        raise OptionError(
            "fmgcam fuses the maps of several targets: give two or more labels (--target A,B or --top-k K)"
        )
    if task == "detection":
        boxes = len(args.box.split(";")) if args.box else args.top_n
        if boxes < 2:
            raise OptionError(
                "fmgcam fuses the maps of several targets: give --top-n N (N >= 2) or two or more --box"
            )


def fusion_target(args: argparse.Namespace, lm: LoadedModel, task: str) -> Any:
    """The ``K`` targets ``camanim fmgcam`` fuses for ``task`` (one target per label, class, detection or
    regression output: one forward pass, one backward pass each); None for classification (the top-K
    classes)."""
    if task == "classification":
        return None
    names = lm.labels or lm.class_names
    if task == "multilabel" and args.target is None:
        return MultiLabelTarget(top_k=getattr(args, "top_k", None) or 3, names=names)
    if task == "regression":
        return StackedTarget([RegressionTarget(int(t)) for t in str(args.target).split(",") if t.strip()])
    args.each = True
    _, target = task_target(args, lm, task)
    return target


def task_target(args: argparse.Namespace, lm: LoadedModel, task: str) -> tuple[LoadedModel, Any]:
    """The model (an embedding layer tapped) and the target ``explain`` takes for ``task``; None for
    classification (``--target`` and ``--score`` as they are)."""
    names = lm.labels or ()
    if task == "classification":
        return lm, None
    each = bool(getattr(args, "each", False))
    if task == "segmentation":
        if args.target is None:
            raise OptionError("the segmentation task explains a class: give --target CLASS (index or name)")
        given = [t.strip() for t in str(args.target).split(",")]
        categories = [resolve_class(t, names) if names else int(t) for t in given]
        region = None
        if args.region and "," in args.region:
            region = _numbers(args.region, "--region")
        elif args.region:
            region = np.asarray(Image.open(args.region).convert("L")) > 127
        score = "probability" if args.score == "probability" else "logit"
        category = categories[0] if len(categories) == 1 else categories
        return lm, SegmentationTarget(category, region, score=score, each=each)
    if task == "detection":
        boxes = None if not args.box else [_numbers(b, "--box") for b in args.box.split(";")]
        labels = None
        if args.target is not None:
            label = resolve_class(args.target, names) if names else int(args.target)
            labels = [label] * (len(boxes) if boxes else 1)
            if boxes is None:
                raise OptionError("--target LABEL of a detection goes with --box: the box of that label")
        return lm, BoxScoreTarget(
            boxes, labels, iou_threshold=args.iou, top_n=args.top_n, names=names, each=each
        )
    if task == "multilabel":
        if args.target is None:
            raise OptionError("the multilabel task explains labels: give --target LABEL[,LABEL...]")
        labels = [resolve_class(t.strip(), names or lm.class_names) for t in str(args.target).split(",")]
        return lm, MultiLabelTarget(labels, names or lm.class_names, each=each)
    if task == "regression":
        return lm, RegressionTarget(None if args.target is None else int(args.target))
    tapped = (
        lm.with_output(None, "vector", tap=args.embedding_layer)
        if args.embedding_layer
        else lm.with_output(None, "vector")
    )
    return tapped, SimilarityTarget(_reference(args, tapped), Path(str(args.reference)).name)


def each_target(anim: Animation, out: Path) -> list[tuple[Animation, Path]]:
    """The animation of each target and the bundle it goes to: for ``K`` targets of a task (``--each``), the
    animation of row ``k`` (same methods, layers and settings, its own ranges) into ``out/target_<k>``; else
    the animation itself into ``out``."""
    ex = anim.explanation
    if anim.fusion is not None or ex.task.get("kind", "classification") == "classification":
        return [(anim, out)]
    rows = int(ex.input.shape[0])
    if rows == 1:
        return [(anim, out)]
    return [
        (
            anim
            if k == anim.sample
            else Animation.from_explanation(
                ex,
                methods=anim.methods,
                norm=anim.norms,
                layout=anim.layouts,
                cmap=anim.cmap,
                size=anim.size,
                sample=k,
                alpha=anim.alpha,
                fps=anim.fps,
                style=anim.style,
                request=anim.request,
            ),  # fmt: skip
            Path(out) / f"target_{k}",
        )
        for k in range(rows)
    ]


def _reference(args: argparse.Namespace, lm: LoadedModel) -> torch.Tensor:
    path = Path(str(args.reference))
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float().flatten()
    x, _, _ = prepare_input(load_image(args.reference), lm, getattr(args, "input_size", None))
    with frozen_eval(lm.model), torch.no_grad():
        return lm.model(x.to(lm.device)).flatten(1)[0].float().cpu()
