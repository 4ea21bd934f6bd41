"""The ``camanim study`` subcommand (registered by :func:`add_parser` from :mod:`camanim.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from camanim.cli.options import input_size, int_at_least, non_empty, percentages
from camanim.cli.tasks import add_task_options
from camanim.outputs.study.runner import run_study

DESCRIPTION = (
    "Run ybROAD over images x models x checkpoints x methods and store one row per layer in a Parquet "
    "dataset (STUDY_DIR/layers, STUDY_DIR/summary, summary.csv), with figures and study.html. Each unit "
    "(image, model, checkpoint, method) is committed atomically: re-run the same command to resume. "
    "Exit code 1 when some units failed (listed in STUDY_DIR/failures.json)."
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to the ``camanim`` subparsers ``sub``."""
    p = sub.add_parser(
        "study",
        help="ybROAD over many images, models, methods and checkpoints (local or Ray)",
        description=DESCRIPTION,
    )
    g = p.add_argument_group("inputs")
    g.add_argument(
        "--images",
        required=True,
        metavar="DIR|LIST.csv",
        help="a folder of images (recursive) or a CSV with a path column and an optional label column "
        "(class index or name; the target is then the label, else the top-1 class)",
    )
    g.add_argument(
        "--models",
        "--model",
        dest="models",
        default="efficientnet_lite0",
        help="comma-separated: efficientnet_lite0, torchvision/timm names, or module:factory import paths "
        "(a callable returning an nn.Module or a LoadedModel)",
    )
    g.add_argument("--weights", default="default", help="named models: default (pretrained) or none (random)")
    g.add_argument(
        "--num-classes", type=int_at_least(1), default=None, help="head size for random or checkpoint weights"
    )
    g.add_argument(
        "--checkpoints",
        default=None,
        metavar="GLOB",
        help="state dicts of the single model, e.g. 'runs/epoch_*.pt' (quoted), run in natural order: epoch-wise ybROAD",
    )
    g.add_argument(
        "--methods",
        "--method",
        dest="methods",
        type=non_empty("method names"),
        default="gradcam",
        help="comma-separated CAM methods",
    )
    g = p.add_argument_group("ybROAD")
    g.add_argument(
        "--layers",
        type=non_empty("layers"),
        default="all",
        help="all (default), N or last-N, indices, names or globs",
    )
    g.add_argument(
        "--percentages",
        type=percentages,
        default="20,40,60,80",
        help="percent of pixels removed (default 20,40,60,80)",
    )
    g.add_argument("--seed", type=int, default=0, help="base seed (each image's seed is derived from it)")
    g.add_argument("--imputer", default="noisy_linear", help="noisy_linear (default) or spsolve")
    g.add_argument("--space", default="pixel", choices=["pixel", "model"], help="imputation space")
    g.add_argument(
        "--score",
        default="logit",
        choices=["logit", "probability", "sigmoid"],
        help="what the CAM differentiates",
    )
    g.add_argument("--batch-size", type=int_at_least(1), default=64, help="perturbed images per forward")
    g.add_argument("--keep-nonspatial", action="store_true", help="include 1x1 layers")
    g.add_argument(
        "--input-size",
        type=input_size,
        default=None,
        metavar="N|HxW|native",
        help="the models' input size instead of their own; native: each image's own size",
    )
    g.add_argument(
        "--target",
        default=None,
        help="with --task: the class(es), label(s) or output index of every image (default: each image's "
        "label column, else the top-1 label or the one output; segmentation needs one or the other)",
    )
    g = p.add_argument_group("execution")
    g.add_argument("--backend", default="local", choices=["local", "ray"], help="local (default) or ray")
    g.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="local: worker processes (default 1, in this process; one per core is fastest); "
        "ray: actors (default one per GPU, else per CPU)",
    )
    g.add_argument(
        "--address", default=None, help="ray: the cluster to join (default: start a local instance)"
    )
    g.add_argument(
        "--device", default=None, help="cpu (default) or cuda; Ray actors on a GPU cluster use cuda"
    )
    g.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="torch threads per worker (default 1; use --workers to use more cores)",
    )
    g.add_argument(
        "--retries", type=int_at_least(0), default=1, help="extra attempts of a failing unit (default 1)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="STUDY_DIR", help="the study folder (re-use it to resume)")
    g.add_argument("--no-figures", dest="figures", action="store_false", help="no figures and no study.html")
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    add_task_options(p)
    p.set_defaults(func=cmd_study)
    return p


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        "study",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ) as prog:
        task = prog.add_task("units", total=None, failed=0)
        yield lambda done, failed, total: prog.update(
            task, completed=done + failed, total=total, failed=failed
        )


def cmd_study(args: argparse.Namespace) -> int:
    """Run ``camanim study``; 0 when every unit is in the store, 1 when some failed."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # one ybROAD log line per unit is noise here
        for name in ("camanim.pipelines.ybroad", "camanim.compute.metrics.road"):
            logging.getLogger(name).setLevel(logging.WARNING)

    with _progress_bar(not args.quiet and sys.stderr.isatty()) as progress:
        res = run_study(
            args.images,
            args.out,
            models=args.models,
            methods=args.methods,
            layers=args.layers,
            percentages=args.percentages,
            checkpoints=args.checkpoints,
            weights=args.weights,
            num_classes=args.num_classes,
            seed=args.seed,
            imputer=args.imputer,
            imputation_space=args.space,
            score=args.score,
            batch_size=args.batch_size,
            keep_nonspatial=args.keep_nonspatial,
            input_size=args.input_size,
            backend=args.backend,
            workers=args.workers,
            address=args.address,
            device=args.device,
            threads=args.threads,
            retries=args.retries,
            figures=args.figures,
            progress=progress,
            task=getattr(args, "task_kind", "classification"),
            target=args.target,
            region=args.region,
            reference=args.reference,
            embedding_layer=args.embedding_layer,
            top_n=args.top_n,
            iou=args.iou,
        )
    print(
        f"study: {res.units} units; {res.skipped} already done, {res.done} run now, {len(res.failed)} failed "
        f"({res.executor}, {res.seconds:.1f} s"
        + (f", {res.units_per_minute:.1f} units/min)" if res.done else ")")
    )
    for uid, err in list(res.failed.items())[:10]:
        print(f"  failed {uid}: {err}", file=sys.stderr)
    print(f"study folder: {res.root}")
    return 0 if not res.failed else 1
