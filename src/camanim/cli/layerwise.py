"""``camanim faithfulness`` (every faithfulness metric of every layer), ``camanim sanity`` (the cascading
model-randomisation check, layer by layer) and ``--by METRIC`` for ``--layers best`` in explain and animate; registered by :func:`add_parser` from
:mod:`camanim.cli`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any

from camanim.cli.checks import default_out
from camanim.cli.options import (
    LAYERS_HELP,
    add_model_options,
    add_output_options,
    add_volume_options,
    int_at_least,
    method_help,
    non_empty,
    percentages,
)
from camanim.cli.tasks import add_task_options, check_scored, resolve_task, task_target
from camanim.compute.methods import parse_methods
from camanim.compute.metrics.deletion import BASELINES, STEPS
from camanim.compute.metrics.faithfulness import METRICS, parse_metrics
from camanim.compute.metrics.imputers import get_imputer
from camanim.compute.metrics.sanity import MEASURES, parse_measures
from camanim.compute.models import load_model
from camanim.errors import CamanimError
from camanim.outputs.bundle import check_output
from camanim.outputs.faithfulness import save_result as save_faithfulness
from camanim.outputs.report import write_report
from camanim.outputs.sanity import save_result as save_sanity
from camanim.pipelines.faithfulness import faithfulness
from camanim.pipelines.sanity import DEFAULT_DEPTHS, sanity

logger = logging.getLogger("camanim")

METRICS_HELP = "comma-separated: " + ", ".join(METRICS) + " or all"


def metric_name(text: str) -> str:
    """One metric name (for ``--by``)."""
    try:
        names = parse_metrics(text)
    except CamanimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"--by takes one metric, got {text!r}")
    return names[0]


def metric_list(text: str) -> str:
    try:
        parse_metrics(text)
    except CamanimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def measure_list(text: str) -> str:
    try:
        parse_measures(text)
    except CamanimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def depths_option(text: str) -> int | None:
    """``all`` (every parameterised module) or a number of depths >= 1."""
    if str(text).strip().lower() == "all":
        return None
    return int_at_least(1)(text)


def add_parser(sub: Any) -> None:
    """Add ``faithfulness`` and ``sanity`` to the ``camanim`` subparsers ``sub``, and ``--by`` to the
    commands that take ``--layers best`` (explain and animate: call after they are added)."""
    for name in ("explain", "animate"):
        if name in sub.choices:
            sub.choices[name].add_argument(
                "--by",
                type=metric_name,
                default=None,
                metavar="METRIC",
                help="with --layers best: the metric that picks the layer (default road; "
                + METRICS_HELP
                + ")",
            )

    p = sub.add_parser(
        "faithfulness",
        help="every faithfulness metric of every layer's map (ROAD, MoRF, LeRF, deletion, insertion, Average "
        "Drop, Increase in Confidence, Average Gain...) and where the metrics agree",
        description="Score the CAM of every layer with several faithfulness metrics from one capture; all "
        "perturbed images are deduplicated and batched across layers and metrics. Writes faithfulness.csv, "
        "faithfulness.json, summary.csv (best layer per metric), curves.npz, faithfulness.png, agreement.png "
        "(and ybROAD's files with road) and report.html.",
    )
    add_model_options(p)
    g = p.add_argument_group("faithfulness")
    g.add_argument(
        "--method", "--methods", dest="methods", type=non_empty("method names"), default="gradcam",
        help=method_help(),
    )  # fmt: skip
    g.add_argument("--metrics", type=metric_list, default="all", help=METRICS_HELP + " (default all)")
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score",
        default="logit",
        choices=["logit", "probability", "sigmoid"],
        help="what the CAM differentiates",
    )
    g.add_argument(
        "--layers", type=non_empty(LAYERS_HELP), default="all", help=LAYERS_HELP + " (default all)"
    )
    g.add_argument(
        "--percentages", type=percentages, default="20,40,60,80", help="ROAD: percent of pixels removed"
    )
    g.add_argument(
        "--steps",
        type=int_at_least(1),
        default=STEPS,
        help=f"deletion/insertion: curve intervals (default {STEPS})",
    )
    g.add_argument(
        "--baseline",
        default="rise",
        choices=list(BASELINES),
        help="deletion/insertion baseline: rise (zero for deletion, blur for insertion, as RISE), blur, zero, "
        "road (ROAD's imputation)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the tie-break and the imputation noise")
    g.add_argument("--batch-size", type=int_at_least(1), default=64, help="perturbed images per forward")
    g.add_argument("--imputer", default="noisy_linear", help="noisy_linear (default) or spsolve")
    g.add_argument("--space", default="pixel", choices=["pixel", "model"], help="ROAD's imputation space")
    add_volume_options(p, drawn=False)
    add_output_options(p)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")
    add_task_options(p)
    p.set_defaults(func=cmd_faithfulness)

    p = sub.add_parser(
        "sanity",
        help="model-randomisation sanity check, layer by layer: randomise a copy from the top down and compare "
        "every layer's map with the original's (heat maps, animation)",
        description="Cascading model-parameter randomisation (Adebayo et al. 2018) on a copy of the model: at "
        "each depth every layer's map from one capture, compared with the original's by Spearman rank "
        "correlation, SSIM and HOG similarity. Writes sanity.csv, sanity.json, sanity_<measure>.png (depth x "
        "layer heat maps), sanity.mp4 (the model destroyed) and report.html.",
    )
    add_model_options(p)
    g = p.add_argument_group("sanity check")
    g.add_argument(
        "--method", "--methods", dest="methods", type=non_empty("method names"), default="gradcam",
        help=method_help(),
    )  # fmt: skip
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score",
        default="logit",
        choices=["logit", "probability", "sigmoid"],
        help="what the CAM differentiates",
    )
    g.add_argument(
        "--layers", type=non_empty(LAYERS_HELP), default="all", help=LAYERS_HELP + " (default all)"
    )
    g.add_argument(
        "--depths",
        type=depths_option,
        default=DEFAULT_DEPTHS,
        metavar="N|all",
        help=f"randomisation depths spread over the parameterised modules (default {DEFAULT_DEPTHS}); all: one "
        "module at a time",
    )
    g.add_argument(
        "--measures",
        type=measure_list,
        default="all",
        help="comma-separated: " + ", ".join(MEASURES) + " or all",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the re-initialisations")
    g.add_argument(
        "--format", dest="fmt", default="mp4", choices=["mp4", "gif", "frames", "none"], help="animation"
    )
    add_output_options(p)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")
    p.set_defaults(func=cmd_sanity)


def _prepare(args: argparse.Namespace) -> None:
    """Checks before any model loads (names, output folder), as :func:`camanim.cli.checks.check` does for
    the other bundle commands."""
    parse_methods(args.methods)
    if getattr(args, "imputer", None):
        get_imputer(args.imputer)
    named = argparse.Namespace(model=args.model, image=getattr(args, "image_name", args.image))
    args.out = check_output(args.out or default_out(named), force=args.force)


def _load(args: argparse.Namespace):
    weights = args.checkpoint or args.weights
    extra = {} if args.output is None else {"output": args.output}
    return load_model(args.model, weights, num_classes=args.num_classes, device=args.device, **extra)


@contextlib.contextmanager
def _progress(label: str, enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress(label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=True) as prog:  # fmt: skip
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _report_into(bundle) -> None:
    try:
        write_report(bundle.path)
    except (CamanimError, ValueError, RuntimeError, KeyError, OSError) as exc:
        logger.warning("could not write report.html (%s); rerun: camanim report %s", exc, bundle.root)
        return
    bundle.file("report.html", "interactive report (camanim report)")


def _layer_spec(text: str):
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def cmd_faithfulness(args: argparse.Namespace) -> int:
    kind = resolve_task(args)
    check_scored(kind, args.metrics)
    _prepare(args)
    lm, target = task_target(args, _load(args), kind)
    target = args.target if target is None else target
    with _progress("faithfulness", not args.quiet and sys.stderr.isatty()) as progress:
        res = faithfulness(
            lm, args.image, methods=args.methods, layers=_layer_spec(args.layers), metrics=args.metrics,
            target=target, percentages=args.percentages, steps=args.steps, baseline=args.baseline,
            seed=args.seed, imputer=get_imputer(args.imputer), imputation_space=args.space,
            batch_size=args.batch_size, score=args.score, input_size=args.input_size, progress=progress,
        )  # fmt: skip
    path = save_faithfulness(
        res, args.out, force=args.force, command=" ".join(sys.argv), finalize=_report_into
    )
    if res.target is None:
        print(f"{res.task['kind']}: {res.target_name}, score = {res.clean_probability:.4g}")
    else:
        print(f"target: {res.target} ({res.target_name}), p = {res.clean_probability:.4f}")
    print(f"{'method':<14} {'metric':<24} {'best':>9} {'final':>9} {'gain':>8}  best layer")
    for m, per in res.series.items():
        for name, s in per.items():
            print(
                f"{m:<14} {name:<24} {s.best:>9.4f} {s.final:>9.4f} {s.gain:>8.4f}  "
                f"{s.best_layer.name} (index {s.best_layer.index})"
            )
    print(
        f"perturbed images: {int(res.stats.get('masks', 0))} asked, {int(res.stats.get('forwards', 0))} "
        f"forwarded ({res.timings['metrics']:.1f} s)"
    )
    print(f"bundle: {path}")
    return 0


def cmd_sanity(args: argparse.Namespace) -> int:
    _prepare(args)
    measures = parse_measures(args.measures)
    lm = _load(args)
    with _progress("sanity", not args.quiet and sys.stderr.isatty()) as progress:
        res = sanity(
            lm, args.image, methods=args.methods, layers=_layer_spec(args.layers), depths=args.depths,
            measures=measures, target=args.target, seed=args.seed, score=args.score, input_size=args.input_size,
            progress=progress,
        )  # fmt: skip
    video = None if args.fmt == "none" else args.fmt
    path = save_sanity(
        res, args.out, force=args.force, command=" ".join(sys.argv), video=video, finalize=_report_into
    )
    print(
        f"target: {res.target} ({res.target_name}); {len(res.modules)} parameterised modules, depths {list(res.depths)}"
    )
    for m, v in res.verdicts().items():
        print(
            f"{m:<14} median Spearman at full randomisation {v['median']:.3f}: "
            f"{'passes' if v['passes'] else 'FAILS'} ({v['layers_changed']} of {v['layers']} layers below "
            f"{v['threshold']})"
        )
    print(f"bundle: {path}")
    return 0


def best_layer_by(
    args: argparse.Namespace, lm: Any, method: str, progress: Any = None, target: Any = None
) -> str:
    """``--layers best --by METRIC``: the best layer of ``method`` by that metric (every layer scored), for
    ``target`` (default ``--target``; a task's target)."""
    res = faithfulness(
        lm, args.image, methods=method, metrics=args.by, target=args.target if target is None else target, score=getattr(args, "score", "logit"),
        keep_nonspatial=getattr(args, "keep_nonspatial", False), input_size=args.input_size, progress=progress,
    )  # fmt: skip
    s = res[method][args.by]
    logger.info(
        "--layers best --by %s: %s (index %d), %s %.4f over %d layers (final layer %.4f)",
        args.by, s.best_layer.name, s.best_layer.index, args.by, s.best, len(s), s.final,
    )  # fmt: skip
    return s.best_layer.name
