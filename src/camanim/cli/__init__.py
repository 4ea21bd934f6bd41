"""The ``camanim`` command: a thin layer that parses arguments and calls the API.

Run with no arguments, it explains the embedded default (EfficientNet-Lite0 on scikit-image's ``chelsea``)
and writes a bundle.

Every mistake gets one line, ``camanim: error: ...``, and exit code 2, with no traceback unless
``--debug``. Options are checked in two steps before any model is loaded or any folder staged: argparse
converts and range-checks each value (:func:`_int_at_least`, :func:`_percentages`...), then
:func:`camanim.cli.checks.check` tries every name and combination against the library's own parsers and checks the output
location and the image. :func:`camanim.cli.errors.error_line` is the one place where exceptions become messages and exit
codes, so a new command inherits it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from camanim.cli import embed, layerwise, study
from camanim.cli.checks import check
from camanim.cli.commands import (
    cmd_animate,
    cmd_compare,
    cmd_explain,
    cmd_fmgcam,
    cmd_layers,
    cmd_report,
    cmd_road,
    cmd_run,
)
from camanim.cli.errors import error_line
from camanim.cli.options import (
    LAYERS_HELP,
    Parser,
    add_method_options,
    add_model_options,
    add_output_options,
    add_target_options,
    add_volume_options,
    input_size,
    int_at_least,
    int_between,
    method_help,
    methods_epilog,
    non_empty,
    percentages,
)
from camanim.cli.tasks import add_task_options

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``camanim`` command."""
    parser = Parser(
        prog="camanim",
        description="Class activation maps at every layer of an image classifier, from one forward and one backward pass.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="the default job: animate every layer of the default model on the default image, with ybROAD (also run with no command)",
    )
    add_model_options(p)
    add_target_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_run, methods="gradcam", layers="all", overlays=True, road=True)

    p = sub.add_parser("layers", help="list every layer in forward execution order")
    add_model_options(p, image=False)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--size", dest="input_size", type=input_size, default=None, help="same as --input-size")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser(
        "explain",
        help="raw maps and overlays for chosen layers and methods",
        epilog=methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    add_target_options(p)
    p.add_argument(
        "--method",
        "--methods",
        dest="methods",
        type=non_empty("method names"),
        default="gradcam",
        help=method_help(),
    )
    p.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="all",
        help="all, last, first,middle,last, N (last N), indices, names or globs; best: the max-ybROAD layer",
    )
    p.add_argument("--keep-nonspatial", action="store_true", help="include 1x1 layers")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the overlay PNGs")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=32,
        help="per-channel methods (scorecam, ablationcam): inputs per forward",
    )
    p.add_argument(
        "--max-channels",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="per-channel methods: score only the N strongest channels per layer (an approximation)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="scorecam: run its forwards through torch.compile (pays off only once Inductor's cache is warm)",
    )
    add_method_options(p)
    add_volume_options(p)
    add_output_options(p)
    add_task_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "animate",
        help="CAManim: one video frame per layer, local and global normalisation, strip figure, layer table",
        description="Animate the class activation map of every layer in forward order (CAManim), from one "
        "forward and one backward pass. Writes <method>_<layout>.mp4 (or .gif / frames), strip.png, "
        "layers.csv, params.png and the raw maps into one bundle.",
    )
    add_model_options(p)
    g = p.add_argument_group("animation")
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score", default="logit", choices=["logit", "probability", "sigmoid"], help="what is differentiated"
    )
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        type=non_empty("method names"),
        default="gradcam",
        help=method_help() + "; or fmgcam alone: FM-G-CAM, the top-K classes fused, one colour per class",
    )
    g.add_argument(
        "--top-k",
        type=int_at_least(1),
        default=None,
        metavar="K",
        help="fmgcam: number of classes fused (default 3)",
    )
    g.add_argument(
        "--base", default=None, help="fmgcam: base method (default gradcam; hirescam, gradcam++...)"
    )
    g.add_argument(
        "--activation",
        default=None,
        choices=["relu", "elu", "gelu"],
        help="fmgcam: final activation (Eq 6; default relu)",
    )
    g.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="all",
        help="all (default), last, N (last N), indices, names or globs; best: the max-ybROAD layer",
    )
    g.add_argument(
        "--road",
        action="store_true",
        help="score every frame's map with ROAD (ybROAD): shown in captions and as a curve in the progress strip",
    )
    g.add_argument(
        "--norm",
        type=non_empty("local, global or global-all"),
        default="local,global",
        help="normalisations side by side: local, global, global-all (across methods)",
    )
    g.add_argument(
        "--layout",
        type=non_empty("side-by-side, local, global or grid"),
        default="side-by-side",
        help="side-by-side (default: local | global), local, global, grid (methods x norms in one video); comma-separated for several",
    )
    g.add_argument(
        "--format",
        dest="formats",
        type=non_empty("mp4, gif or frames"),
        default="mp4",
        help="mp4 (default, H.264), gif (~25x slower to encode and ~40x larger than mp4), frames (PNG folder); comma-separated",
    )
    g.add_argument(
        "--fps",
        type=int_between(1, 240),
        default=None,
        help="frames per second (default: the video plays in about 10 s)",
    )
    g.add_argument(
        "--size",
        type=int_between(8, 4096),
        default=None,
        metavar="PX",
        help="tile size in pixels (default: the input size)",
    )
    g.add_argument(
        "--cmap", default="jet", help="any matplotlib colour map name (default jet, as in the paper)"
    )
    g.add_argument(
        "--keep-nonspatial", action="store_true", help="ask for 1x1 layers too (skipped by default)"
    )
    add_method_options(p)
    add_volume_options(p)
    add_output_options(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: reuse its raw maps, render only missing videos",
    )
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    add_task_options(p)
    p.set_defaults(func=cmd_animate)
    p = sub.add_parser(
        "fmgcam",
        help="FM-G-CAM: one map for the top-K classes, each in its own colour (Rammuni Silva & Bird 2024)",
    )
    add_model_options(p)
    g = p.add_argument_group("FM-G-CAM")
    g.add_argument(
        "--top-k",
        type=int_at_least(1),
        default=None,
        metavar="K",
        help="number of classes (default 3); --task multilabel: the K labels of highest sigmoid score",
    )
    g.add_argument(
        "--target",
        default=None,
        help="with --task: the targets fused, comma-separated (multilabel labels, segmentation classes, "
        "regression outputs); detection: --top-n N or several --box",
    )
    g.add_argument(
        "--base", default="gradcam", help="base method: gradcam (default), hirescam, gradcam++, ..."
    )
    g.add_argument(
        "--activation", default="relu", choices=["relu", "elu", "gelu"], help="final activation (Eq 6)"
    )
    g.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="last",
        help="last (default), all, first,middle,last, indices, names or globs",
    )
    g.add_argument("--multilabel", action="store_true", help="rank and differentiate sigmoid scores")
    g.add_argument("--no-panels", dest="panels", action="store_false", help="no per-class base-method panels")
    add_output_options(p)
    add_task_options(p)
    p.set_defaults(func=cmd_fmgcam, score="logit")

    p = sub.add_parser("compare", help="methods x layers grid of overlays from one capture (compare.png)")
    add_model_options(p)
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--methods",
        "--method",
        dest="methods",
        type=non_empty("method names"),
        default="gradcam,gradcam++,eigencam,xgradcam",
        help=method_help(),
    )
    g.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="first,middle,last",
        help="among the convolution layers: first,middle,last (default), N, indices, names",
    )
    g.add_argument(
        "--norm", default="local", choices=["local", "global"], help="per tile, or per method across layers"
    )
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--road", default=None, metavar="PATH", help="ROAD results: a bundle or JSON file to show per tile"
    )
    add_output_options(p)
    add_task_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "road",
        help="ybROAD: the ROAD score of every layer's map (which layer best explains the prediction)",
        description="Score the CAM of every layer with ROAD (Remove And Debias; noisy linear imputation in "
        "[0, 1] pixel space, MoRF and LeRF at each p, ROAD = mean_p (LeRF_p - MoRF_p) / 2). Writes "
        "ybroad.csv, ybroad.json, ybroad.png and summary.csv (the CAManim paper's Table 2 columns).",
    )
    add_model_options(p)
    g = p.add_argument_group("ybROAD")
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        type=non_empty("method names"),
        default="gradcam",
        help=method_help(),
    )
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score",
        default="logit",
        choices=["logit", "probability", "sigmoid"],
        help="what the CAM differentiates",
    )
    g.add_argument(
        "--layers",
        type=non_empty(LAYERS_HELP),
        default="all",
        help="all (default), last, N (last N), indices, names or globs",
    )
    g.add_argument(
        "--percentages",
        type=percentages,
        default="20,40,60,80",
        help="percent of pixels removed, comma-separated (default 20,40,60,80)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the tie-break and the imputation noise")
    g.add_argument(
        "--batch-size", type=int_at_least(1), default=64, help="perturbed images per forward (default 64)"
    )
    g.add_argument(
        "--imputer", default="noisy_linear", help="noisy_linear (default, fast) or spsolve (the reference)"
    )
    g.add_argument(
        "--space",
        default="pixel",
        choices=["pixel", "model"],
        help="impute in [0, 1] pixels (default) or the model input",
    )
    g.add_argument(
        "--smooth", type=int_at_least(1), default=5, metavar="N", help="moving-average window of the plot"
    )
    add_volume_options(p, drawn=False)
    add_output_options(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its finished layers"
    )
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    add_task_options(p)
    p.set_defaults(func=cmd_road)

    p = sub.add_parser(
        "report",
        help="render a bundle into one self-contained interactive report.html (no server, no network)",
    )
    p.add_argument("dir", metavar="DIR", help="a bundle folder written by camanim")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write (default DIR/report.html)")
    p.add_argument(
        "--tile", type=int_between(16, 1024), default=None, metavar="PX", help="frame tile size (default 224)"
    )
    p.add_argument(
        "--format", dest="fmt", default="webp", choices=["webp", "jpeg", "png"], help="frame encoding"
    )
    p.add_argument(
        "--quality", type=int_between(1, 100), default=70, help="lossy frame quality, 1-100 (default 70)"
    )
    p.set_defaults(func=cmd_report)

    study.add_parser(sub)
    embed.add_parser(sub)
    layerwise.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``camanim`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)  # the subcommand names
    if not any(a in known or a in ("-h", "--help") for a in argv):
        argv = (
            [a for a in argv if a in ("--debug", "--quiet")]
            + ["run"]
            + [a for a in argv if a not in ("--debug", "--quiet")]
        )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own exit: --help (0) or a message already printed (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        check(args)
        return func(args)
    except BaseException as exc:
        if args.debug and not isinstance(exc, (KeyboardInterrupt, BrokenPipeError)):
            raise
        message, code = error_line(exc)
        if message is not None:
            prefix = "camanim: " if code == 130 else "camanim: error: "
            print(prefix + message, file=sys.stderr)
        return code
