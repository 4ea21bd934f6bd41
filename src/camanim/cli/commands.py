"""The subcommands: each parses nothing and checks nothing (see :mod:`camanim.cli.checks`); it loads the
model, calls the pipeline, writes the bundle and prints a summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from camanim.cli.checks import is_best
from camanim.cli.layerwise import best_layer_by
from camanim.cli.options import method_kwargs
from camanim.cli.tasks import check_scored, each_target, fusion_target, task_target
from camanim.compute.layers import list_layers
from camanim.compute.methods import parse_methods
from camanim.compute.metrics.imputers import get_imputer
from camanim.compute.models import load_model, parse_input_size
from camanim.compute.volumes import LoadedVolume
from camanim.errors import CamanimError, OptionError
from camanim.outputs.animation import animate
from camanim.outputs.bundle import REPORT, open_bundle
from camanim.outputs.compare import check_road_source
from camanim.outputs.explanation import save_explanation, write_explanation
from camanim.outputs.render import FrameStyle
from camanim.outputs.report import write_report
from camanim.outputs.study.figures import write_study_report
from camanim.outputs.study.store import is_study_dir
from camanim.outputs.volume_frames import parse_point
from camanim.outputs.ybroad import save_ybroad, write_ybroad
from camanim.pipelines.compare import compare
from camanim.pipelines.explain import explain
from camanim.pipelines.fmgcam import fmgcam
from camanim.pipelines.ybroad import ybroad

logger = logging.getLogger("camanim")


def _load(args: argparse.Namespace):

    weights = args.checkpoint or args.weights
    extra = {} if args.output is None else {"output": args.output}
    return load_model(args.model, weights, num_classes=args.num_classes, device=args.device, **extra)


def _task(args: argparse.Namespace, lm):
    """The model and the target of a command: ``--target`` itself for a classifier, else the task's target
    (:func:`camanim.cli.tasks.task_target`); ``--road`` and ``--layers best`` score it (ROAD of the target's
    own score), ``--by`` a metric defined for it."""
    kind = getattr(args, "task_kind", "classification")
    if is_best(args):
        check_scored(kind, getattr(args, "by", None))
    lm, target = task_target(args, lm, kind)
    return lm, args.target if target is None else target


def _print_predictions(ex, out: Path | None) -> None:
    if ex.task.get("kind", "classification") != "classification":
        for b in range(ex.input.shape[0]):
            print(f"{ex.task['kind']}: {ex.target_names[b]}, score {float(ex.probabilities[b, 0]):.4g}")
            for x1, y1, x2, y2, label in ex.boxes[b] if ex.boxes else []:
                print(f"  box {label}: ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f})")
        if out is not None:
            print(f"bundle: {out}")
        return
    for b in range(ex.input.shape[0]):
        if ex.input.shape[0] > 1:
            print(f"sample {b}: explained class {ex.targets[b]} ({ex.target_names[b]})")
        print("top-5:")
        for rank, (i, name, p) in enumerate(ex.top(5, b), 1):
            print(f"  {rank}. {i:>5}  {name:<30} p={p:.4f}")
    if out is not None:
        print(f"bundle: {out}")


def _warn_blank(ex) -> None:
    """Say on the console when most maps of a run are blank: the usual sign of random weights."""
    flags = [f for per in ex.flags.values() for f in per.values()]
    blank = sum(1 for f in flags if {"flat", "zero", "nonfinite", "no_gradient"} & set(f))
    if flags and 2 * blank > len(flags):
        logger.warning(
            "%d of %d maps are zero, constant or non-finite: random weights, or layers with no gradient path "
            "to the target? (per-map flags are in manifest.json)",
            blank,
            len(flags),
        )


def _report_into(bundle) -> None:
    """Write ``report.html`` into a staged bundle (a ``finalize`` callback of :func:`open_bundle`).

    A failure to render is logged and the bundle is published without it (the report is derived from the
    bundle and ``camanim report DIR`` rebuilds it); an interruption propagates, so the run can resume.
    """

    try:
        write_report(bundle.path)
    except (CamanimError, ValueError, RuntimeError, KeyError, OSError) as exc:
        logger.warning("could not write report.html (%s); rerun: camanim report %s", exc, bundle.root)
        return
    bundle.file(REPORT, "interactive report (camanim report)")


def _volume_style(args: argparse.Namespace) -> FrameStyle | None:
    """The frame look carrying ``--view`` and ``--slice-at`` (None when neither is given)."""
    view, point = getattr(args, "view", None), parse_point(getattr(args, "slice_at", None))
    return None if view is None and point is None else FrameStyle(view=view, slice_at=point)


def _record_volume(ex, image) -> None:
    """Complete the manifest's ``image`` section of a volume run: its window, spacing, shape, orientation."""
    if not isinstance(image, LoadedVolume):
        return
    described = image.describe()
    for key, value in described.items():
        ex.image_info.setdefault(key, value)
    vol = ex.image_info.setdefault("volume", {})
    vol.setdefault("spacing", described["spacing"])
    vol.setdefault("shape", described["original_shape"])
    for key in ("window", "window_name", "orientation", "kind", "format"):
        vol.setdefault(key, described.get(key, image.info.get(key)))


def cmd_explain(args: argparse.Namespace) -> int:
    lm, target = _task(args, _load(args))
    ex = explain(
        lm,
        args.image,
        methods=args.methods,
        layers=_layers_or_best(args, lm, target),
        target=target,
        top_k=args.top_k,
        score=args.score,
        keep_nonspatial=getattr(args, "keep_nonspatial", False),
        batch_size=getattr(args, "batch_size", 32),
        max_channels=getattr(args, "max_channels", None),
        compile=getattr(args, "compile", False),
        input_size=args.input_size,
        **method_kwargs(args),
    )
    _warn_blank(ex)
    _record_volume(ex, args.image)
    path = save_explanation(
        ex,
        args.out,
        force=args.force,
        overlays=args.overlays,
        command=" ".join(sys.argv),
        view=getattr(args, "view", None),
        slice_at=getattr(args, "slice_at", None),
    )
    logger.info(
        "explained %d layers x %d methods in %.2f s", len(ex.chosen), len(ex.methods), ex.timings["total"]
    )
    _print_predictions(ex, path)
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    fmgcam = {k: getattr(args, k, None) for k in ("top_k", "base", "activation")}
    out = args.out
    resume = getattr(args, "resume", False)
    lm, target = _task(args, _load(args))
    anim = animate(
        lm,
        args.image,
        methods=getattr(args, "methods", "gradcam"),
        target=target,
        layers=_layers_or_best(args, lm, target),
        norm=getattr(args, "norm", "local,global"),
        layout=getattr(args, "layout", "side-by-side"),
        cmap=getattr(args, "cmap", "jet"),
        size=getattr(args, "size", None),
        keep_nonspatial=getattr(args, "keep_nonspatial", False),
        score=args.score,
        fps=getattr(args, "fps", None),
        input_size=args.input_size,
        reuse=out if resume else None,
        style=_volume_style(args),
        **fmgcam,
        **method_kwargs(args),
    )
    _warn_blank(anim.explanation)
    _record_volume(anim.explanation, args.image)
    road_result = None
    if getattr(args, "road", False):
        anim, road_result = _with_road(anim, lm, args, target)
    for one, where in each_target(anim, out):  # K targets of a task (--each): a bundle each
        path = one.save(
            where,
            formats=getattr(args, "formats", "mp4"),
            force=args.force,
            resume=resume,
            progress=not args.quiet and sys.stderr.isatty(),
            command=" ".join(sys.argv),
            also=None if road_result is None else _ybroad_writer(road_result),
            finalize=_report_into,
        )
        logger.info("animated %d layers x %d methods into %s", len(one), len(one.methods), path)
    path = path if where == out else Path(out)
    if anim.fusion is not None:
        _print_fused(anim.fusion, path)
    else:
        _print_predictions(anim.explanation, path)
    return 0


def cmd_fmgcam(args: argparse.Namespace) -> int:
    lm = _load(args)
    target = fusion_target(args, lm, getattr(args, "task_kind", "classification"))
    res = fmgcam(
        lm,
        args.image,
        k=args.top_k or 3,
        base=args.base,
        activation=args.activation,
        layers=_layer_spec(args.layers),
        multilabel=args.multilabel,
        input_size=args.input_size,
        target=target,
    )
    _warn_blank(res.explanation)
    path = res.save(
        args.out, force=args.force, command=" ".join(sys.argv), panels=args.panels, finalize=_report_into
    )
    _print_fused(res, path)
    return 0


def _print_fused(res, path: Path) -> None:
    """The classes of an FM-G-CAM result, most probable first, and the bundle's path."""
    label = res.score_label
    where = ", ".join(res.layers) if len(res.layers) <= 3 else f"{len(res.layers)} layers"
    print(f"FM-G-CAM ({res.base}, {res.activation}) at {where}:")
    for rank, (c, name, p) in enumerate(zip(res.classes, res.names, res.probabilities, strict=True), 1):
        print(f"  {rank}. {c:>5}  {name:<30} {label}={p:.4f}")
    print(f"bundle: {path}")


def cmd_compare(args: argparse.Namespace) -> int:
    lm, target = _task(args, _load(args))
    if args.road is not None and getattr(args, "task_kind", "classification") != "classification":
        raise OptionError(
            f"compare --road checks that the ROAD results were computed for this class; it cannot check a "
            f"{args.task_kind} target: show them with camanim road --task {args.task_kind} instead"
        )
    if args.road is not None:
        target = check_road_source(args.road, lm, args.image, target, input_size=args.input_size)
    cmp = compare(
        lm,
        args.image,
        methods=args.methods,
        layers=_layer_spec(args.layers),
        norm=args.norm,
        road=None if args.road is None else args.road.values,
        target=target,
        input_size=args.input_size,
    )
    _warn_blank(cmp.explanation)
    with open_bundle(args.out, force=args.force, command=" ".join(sys.argv)) as bundle:
        write_explanation(cmp.explanation, bundle, overlays=False)
        cmp.save(bundle.file("compare.png", "methods x layers grid"))
        bundle.manifest["compare"] = {
            "figure": "compare.png",
            "rows": list(cmp.methods),
            "columns": [layer.name for layer in cmp.layers],
            "layer_choice": "among the convolution layers (camanim.pipelines.compare)",
            "norm": cmp.norm,
            "prediction": cmp.prediction,
            "road": {f"{m}/{lay}": v for (m, lay), v in cmp.road.items()},
            "road_source": None if args.road is None else str(args.road.path),
        }
    print(cmp.prediction)
    print(f"bundle: {bundle.root}")
    return 0


def _road_progress(enabled: bool):
    """A rich progress bar as a ``(done, total)`` callback, or ``None``."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        with Progress(
            "ybROAD",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as prog:
            task = prog.add_task("layers", total=None)
            yield lambda done, total: prog.update(task, completed=done, total=total)

    return bar()


def cmd_road(args: argparse.Namespace) -> int:

    lm, target = _task(args, _load(args))
    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res, path = save_ybroad(
            lm,
            args.image,
            args.out,
            force=args.force,
            resume=args.resume,
            command=" ".join(sys.argv),
            smooth=args.smooth,
            methods=args.methods,
            layers=_layer_spec(args.layers),
            target=target,
            score=args.score,
            percentages=args.percentages,
            seed=args.seed,
            imputer=get_imputer(args.imputer),
            imputation_space=args.space,
            batch_size=args.batch_size,
            progress=progress,
            input_size=args.input_size,
        )
    _warn_blank(res.explanation)
    if res.target is None:
        print(f"{res.task['kind']}: {res.target_name}, score = {res.clean_probability:.4g}")
    else:
        print(f"target: {res.target} ({res.target_name}), p = {res.clean_probability:.4f}")
    print(
        f"{'method':<18} {'layers':>6} {'mean ROAD':>10} {'final':>9} {'max':>9} {'max-final':>10}  best layer"
    )
    for m, r in res.results.items():
        print(
            f"{m:<18} {len(r):>6} {r.mean:>10.4f} {r.final:>9.4f} {r.max:>9.4f} {r.difference:>10.4f}  "
            f"{r.best_layer.name} (index {r.best_layer.index})"
        )
    print(f"bundle: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    if is_study_dir(args.dir):
        print(f"report: {write_study_report(args.dir)}")
        return 0

    path = write_report(args.dir, args.out, tile=args.tile, fmt=args.fmt, quality=args.quality)
    print(f"report: {path}")
    return 0


def _layers_or_best(args: argparse.Namespace, lm, target=None):
    """The ``--layers`` selection; ``best`` runs ybROAD for the first method and picks its max layer (or,
    with ``--by METRIC``, the best layer by that faithfulness metric), scoring ``target`` (the class given,
    or a task's target)."""
    text = str(getattr(args, "layers", "all"))
    if not is_best(args):
        return _layer_spec(text)

    method = parse_methods(getattr(args, "methods", "gradcam"))[0]
    if getattr(args, "by", None) not in (None, "road"):  # another faithfulness metric picks the layer
        with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
            return best_layer_by(args, lm, method, progress, target)
    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res = ybroad(
            lm,
            args.image,
            methods=method,
            target=target,
            score=getattr(args, "score", "logit"),
            keep_nonspatial=getattr(args, "keep_nonspatial", False),
            progress=progress,
            input_size=args.input_size,
        )
    r = res[method]
    logger.info(
        "--layers best: %s (index %d), ROAD %.4f: the max ybROAD of %s over %d layers (final layer %.4f)",
        r.best_layer.name,
        r.best_layer.index,
        r.max,
        method,
        len(r),
        r.final,
    )
    return r.best_layer.name


def _with_road(anim, lm, args: argparse.Namespace, target=None):
    """``anim`` with every frame's ROAD (ybROAD of each method, from the animation's own maps; a task's
    ``target`` scores them)."""

    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res = ybroad(lm, explanation=anim.explanation, methods=anim.methods, target=target, progress=progress)
    for m, r in res.results.items():
        logger.info(
            "ybROAD %s: mean %.4f, max %.4f at %s, final %.4f", m, r.mean, r.max, r.best_layer.name, r.final
        )
    road = {m: v for m, v in res.road().items() if m in anim.methods}
    return dataclasses.replace(anim, road=road), res


def _ybroad_writer(res):
    """A bundle writer adding ``ybroad.csv/json/png`` and ``summary.csv`` for ``res``."""

    return lambda bundle: write_ybroad(res, bundle)


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "top_k", None):  # several classes of one image: raw maps and overlays per class
        return cmd_explain(args)
    return cmd_animate(args)


def _layer_spec(text: str):
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def cmd_layers(args: argparse.Namespace) -> int:

    lm = _load(args)
    size = parse_input_size(args.input_size)
    if size == "native":
        raise OptionError("camanim layers lists the layers for an input size: give N or HxW, not native")
    prep = lm.preprocessing
    shape = prep.input_shape(size) if hasattr(prep, "input_shape") else (1, 3, *(size or prep.size))
    layers = list_layers(lm.model, torch.zeros(*shape, device=lm.device))
    if args.json:
        print(json.dumps([layer.to_dict() for layer in layers], indent=1))
        return 0
    print(f"{'idx':>4}  {'name':<40} {'type':<22} {'output shape':<20} {'params':>10}  kind")
    for layer in layers:
        kind = layer.kind + (f" (same as {layer.same_as})" if layer.same_as else "")
        shape = "x".join(str(s) for s in layer.shape) or "-"
        print(f"{layer.index:>4}  {layer.name:<40} {layer.type:<22} {shape:<20} {layer.params:>10,}  {kind}")
    n = sum(1 for layer in layers if layer.is_spatial and layer.same_as is None)
    print(f"{len(layers)} layers; {n} spatial layers are swept by default")
    return 0
