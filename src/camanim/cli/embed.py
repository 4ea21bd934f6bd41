"""The ``camanim embed`` subcommand (registered by :func:`add_parser` from :mod:`camanim.cli`).

Every option, the images, their labels and the output folder are checked here before any model is loaded:
a missing folder, a folder without class sub-folders, a single class, fewer images than ``k + 1``, a
projection whose package is not installed or an unusable ``--out`` cost no computation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from camanim.cli.options import LAYERS_HELP, add_model_options, add_output_options, int_at_least, non_empty
from camanim.compute.models import load_model, parse_input_size
from camanim.compute.projections import PROJECTIONS, check_projection
from camanim.compute.separability import check_labels
from camanim.errors import OptionError
from camanim.outputs.bundle import check_output
from camanim.outputs.embed import run_embed
from camanim.pipelines.imageset import DIGITS, EmbedError, ImageSet, open_images

logger = logging.getLogger("camanim")

DESCRIPTION = (
    "Watch a dataset's classes separate layer by layer: one forward pass per batch pools every layer's output "
    "to a vector per image (no backward pass), then per layer a 2-D projection aligned to the previous layer, "
    "class separability (leave-one-out k-NN, cross-validated linear probe, silhouette) and linear CKA between "
    "every pair of layers. Writes embeddings.npz, projections.npz, separability.csv, separability.png, cka.png, "
    "embed.mp4 and report.html into one bundle. --images digits (the default) embeds scikit-learn's 1,797 "
    "labelled 8x8 digits, offline."
)


def max_dim(text: str) -> int | None:
    """``--max-dim``: a whole number >= 2, or ``none`` (store full vectors only)."""
    if str(text).strip().lower() in ("none", "full", "0"):
        return None
    return int_at_least(2)(text)


max_dim.__name__ = "integer >= 2 or none"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``embed`` subcommand to the ``camanim`` subparsers ``sub``."""
    p = sub.add_parser(
        "embed",
        help="layer-wise embeddings of a dataset: separability over depth, CKA heatmap, scatter video",
        description=DESCRIPTION,
    )
    g = p.add_argument_group("images and labels")
    g.add_argument(
        "--images",
        type=non_empty("a folder, a CSV list or digits"),
        default=DIGITS,
        metavar="DIR|LIST.csv|digits",
        help="a folder of images (recursive; labels from its class sub-folders), a CSV with a path column and "
        "an optional label column, or digits (default: scikit-learn's 1,797 8x8 digits, labels 0-9)",
    )
    g.add_argument(
        "--labels",
        default=None,
        metavar="subfolders|none|FILE.csv",
        help="subfolders (each image's folder is its class), none (no separability), or a CSV of path,label "
        "(default: the digits' classes, the list's label column, or the sub-folders when every image has one)",
    )
    g.add_argument(
        "--limit",
        type=int_at_least(4),
        default=None,
        metavar="N",
        help="embed a seeded random sample of N images",
    )
    add_model_options(p, image=False)
    g = p.add_argument_group("embedding")
    g.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="all",
        help="all (default: every layer with a map or a vector), last, N (the last N), indices, names or globs",
    )
    g.add_argument(
        "--projection",
        default="pca",
        choices=list(PROJECTIONS),
        help="2-D projection per layer: pca (default, fast), umap (pip install 'camanim[embed]'; compiles on first use, then about a second per layer per thousand images) or tsne (slower)",
    )
    g.add_argument(
        "--batch-size",
        type=int_at_least(4),
        default=64,
        help="images per forward pass, also CKA's minibatch (default 64)",
    )
    g.add_argument(
        "--max-dim",
        type=max_dim,
        default=256,
        metavar="K|none",
        help="reduce longer pooled vectors to K dims by a seeded random projection before storing (default "
        "256); none stores them as they are",
    )
    g.add_argument(
        "--keep-full", action="store_true", help="also store the full pooled vectors (embeddings_full.npz)"
    )
    g.add_argument(
        "--tokens",
        default="concat",
        choices=["concat", "average", "patches"],
        help="token layers (ViT): class token and patch mean concatenated (default), averaged, or patches only",
    )
    g.add_argument(
        "--k", type=int_at_least(1), default=5, help="neighbours of the leave-one-out k-NN (default 5)"
    )
    g.add_argument(
        "--folds",
        type=int_at_least(2),
        default=5,
        help="folds of the cross-validated linear probe (default 5)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the batch order, the random projection and the folds"
    )
    g.add_argument("--no-video", dest="video", action="store_false", help="skip embed.mp4")
    add_output_options(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its finished batches"
    )
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    p.set_defaults(func=cmd_embed)
    return p


def default_out(args: argparse.Namespace) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    source = Path(str(args.images).rstrip("/")).stem or "images"
    base = Path("camanim-out") / f"{stamp}-{args.model.replace(':', '-')}-embed-{source}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_inputs(args: argparse.Namespace) -> ImageSet:
    """Everything ``camanim embed`` checks before a model loads; returns the images with their labels.

    Raises:
        CamanimError: a missing projection package, an unusable ``--out``, no images, labels that are
            missing (unless ``--labels none``) or cannot be scored.
    """
    args.projection = check_projection(args.projection)
    if parse_input_size(args.input_size) == "native":
        raise OptionError(
            "--input-size native: a batch is one tensor, so its images share one size; give N or HxW"
        )
    args.out = check_output(args.out or default_out(args), force=args.force, resume=args.resume)
    images = open_images(args.images, args.labels, limit=args.limit, seed=args.seed)
    if images.labels is None:
        if str(args.labels or "").strip().lower() != "none":
            raise EmbedError(
                f"no labels for {images.source!r}: put each image in a sub-folder named after its class, give "
                "--labels FILE.csv (path,label), or --labels none to embed without separability"
            )
    else:
        check_labels(images.labels, k=args.k, folds=args.folds)
    return images


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as prog:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield update


def cmd_embed(args: argparse.Namespace) -> int:
    """Run ``camanim embed``."""
    images = check_inputs(args)
    weights = args.checkpoint or args.weights
    extra = {} if args.output is None else {"output": args.output}
    lm = load_model(args.model, weights, num_classes=args.num_classes, device=args.device, **extra)
    layers = str(args.layers).strip()
    with _progress_bar(not args.quiet and sys.stderr.isatty()) as progress:
        emb, path = run_embed(
            lm,
            images,
            args.out,
            force=args.force,
            resume=args.resume,
            video=args.video,
            command=" ".join(sys.argv),
            progress=progress,
            layers=int(layers) if layers.isdigit() else layers,
            projection=args.projection,
            batch_size=args.batch_size,
            keep_full=args.keep_full,
            max_dim=args.max_dim,
            seed=args.seed,
            k=args.k,
            folds=args.folds,
            tokens=args.tokens,
            input_size=args.input_size,
        )
    t = emb.timings
    print(
        f"embedded {len(emb)} images at {len(emb.chosen)} layers in {t['total']:.1f} s "
        f"({emb.settings['forwards']} forward passes, {t['forward']:.1f} s)"
    )
    if emb.separability is not None:
        knn = emb.curve("knn")
        b, e = emb.best("knn"), emb.emergence("knn")
        print(
            f"k-NN accuracy: first layer {knn[0]:.3f}, best {knn[b]:.3f} at {emb.chosen[b].name} "
            f"(layer {b + 1}), final {knn[-1]:.3f}; 90% of the rise at {emb.chosen[e].name} (layer {e + 1})"
        )
    print(f"bundle: {path}")
    return 0
