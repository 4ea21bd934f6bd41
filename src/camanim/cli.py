"""The ``camanim`` command: a thin layer that parses arguments and calls the API.

Run with no arguments, it explains the embedded default (EfficientNet-Lite0 on scikit-image's ``chelsea``)
and writes a bundle. Errors about what the user typed exit with code 2 and a one-line message (the
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from camanim.errors import CamanimError

logger = logging.getLogger("camanim")


def _common(p: argparse.ArgumentParser, *, image: bool = True) -> None:
    g = p.add_argument_group("model and image")
    g.add_argument(
        "--model",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (default, offline), a torchvision name, torchvision:NAME or timm:NAME",
    )
    g.add_argument(
        "--weights",
        default="default",
        help="default (pretrained; downloads for torchvision/timm), none (random) or PATH to a state dict",
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="a state dict for the named architecture (same as --weights PATH)",
    )
    g.add_argument("--num-classes", type=int, default=None, help="head size for random or checkpoint weights")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    if image:
        g.add_argument(
            "--image",
            default="chelsea",
            help="a file, an http(s) URL or a sample: chelsea, coffee, astronaut, rocket",
        )


def _targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--target", default=None, help="class index or name (e.g. 'tiger cat'); default the top-1 class"
    )
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="explain each of the top K classes")
    g.add_argument(
        "--score", default="logit", choices=["logit", "probability", "sigmoid"], help="what is differentiated"
    )


def _output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="bundle folder (default: a new folder under ./camanim-out/)",
    )
    g.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")


def _method_help() -> str:
    from camanim.methods import list_methods

    return "comma-separated: " + ", ".join(list_methods()) + " or 'all'"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``camanim`` command."""
    parser = argparse.ArgumentParser(
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
    _common(p)
    _targets(p)
    _output(p)
    p.set_defaults(func=cmd_run, methods="gradcam", layers="all", overlays=True, road=True)

    p = sub.add_parser("layers", help="list every layer in forward execution order")
    _common(p, image=False)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--size", type=int, default=None, help="input size in pixels (default: the model's)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("explain", help="raw maps and overlays for chosen layers and methods")
    _common(p)
    _targets(p)
    p.add_argument("--method", "--methods", dest="methods", default="gradcam", help=_method_help())
    p.add_argument(
        "--layers",
        default="all",
        help="all, last, first,middle,last, N (last N), indices, names or globs; best: the max-ybROAD layer",
    )
    p.add_argument("--keep-nonspatial", action="store_true", help="include 1x1 layers")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the overlay PNGs")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="per-channel methods (scorecam, ablationcam): inputs per forward",
    )
    p.add_argument(
        "--max-channels",
        type=int,
        default=None,
        metavar="N",
        help="per-channel methods: score only the N strongest channels per layer (an approximation)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="scorecam: run its forwards through torch.compile (pays off only once Inductor's cache is warm)",
    )
    _output(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "animate",
        help="CAManim: one video frame per layer, local and global normalisation, strip figure, layer table",
        description="Animate the class activation map of every layer in forward order (CAManim), from one "
        "forward and one backward pass. Writes <method>_<layout>.mp4 (or .gif / frames), strip.png, "
        "layers.csv, params.png and the raw maps into one bundle.",
    )
    _common(p)
    g = p.add_argument_group("animation")
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score", default="logit", choices=["logit", "probability", "sigmoid"], help="what is differentiated"
    )
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        default="gradcam",
        help=_method_help() + "; or fmgcam alone: FM-G-CAM, the top-K classes fused, one colour per class",
    )
    g.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="fmgcam: number of classes fused (default 3)"
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
        default="local,global",
        help="normalisations side by side: local, global, global-all (across methods)",
    )
    g.add_argument(
        "--layout",
        default="side-by-side",
        help="side-by-side (default: local | global), local, global, grid (methods x norms in one video); comma-separated for several",
    )
    g.add_argument(
        "--format",
        dest="formats",
        default="mp4",
        help="mp4 (default, H.264), gif (~25x slower to encode and ~40x larger than mp4), frames (PNG folder); comma-separated",
    )
    g.add_argument(
        "--fps", type=int, default=None, help="frames per second (default: the video plays in about 10 s)"
    )
    g.add_argument(
        "--size", type=int, default=None, metavar="PX", help="tile size in pixels (default: the input size)"
    )
    g.add_argument(
        "--cmap", default="jet", help="any matplotlib colour map name (default jet, as in the paper)"
    )
    g.add_argument(
        "--keep-nonspatial", action="store_true", help="ask for 1x1 layers too (skipped by default)"
    )
    _output(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: reuse its raw maps, render only missing videos",
    )
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    p.set_defaults(func=cmd_animate)
    p = sub.add_parser(
        "fmgcam",
        help="FM-G-CAM: one map for the top-K classes, each in its own colour (Rammuni Silva & Bird 2024)",
    )
    _common(p)
    g = p.add_argument_group("FM-G-CAM")
    g.add_argument("--top-k", type=int, default=3, metavar="K", help="number of classes (default 3)")
    g.add_argument(
        "--base", default="gradcam", help="base method: gradcam (default), hirescam, gradcam++, ..."
    )
    g.add_argument(
        "--activation", default="relu", choices=["relu", "elu", "gelu"], help="final activation (Eq 6)"
    )
    g.add_argument(
        "--layers", default="last", help="last (default), all, first,middle,last, indices, names or globs"
    )
    g.add_argument("--multilabel", action="store_true", help="rank and differentiate sigmoid scores")
    g.add_argument("--no-panels", dest="panels", action="store_false", help="no per-class base-method panels")
    _output(p)
    p.set_defaults(func=cmd_fmgcam)

    p = sub.add_parser("compare", help="methods x layers grid of overlays from one capture (compare.png)")
    _common(p)
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--methods",
        "--method",
        dest="methods",
        default="gradcam,gradcam++,eigencam,xgradcam",
        help=_method_help(),
    )
    g.add_argument(
        "--layers",
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
    _output(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "road",
        help="ybROAD: the ROAD score of every layer's map (which layer best explains the prediction)",
        description="Score the CAM of every layer with ROAD (Remove And Debias; noisy linear imputation in "
        "[0, 1] pixel space, MoRF and LeRF at each p, ROAD = mean_p (LeRF_p - MoRF_p) / 2). Writes "
        "ybroad.csv, ybroad.json, ybroad.png and summary.csv (the CAManim paper's Table 2 columns).",
    )
    _common(p)
    g = p.add_argument_group("ybROAD")
    g.add_argument("--method", "--methods", dest="methods", default="gradcam", help=_method_help())
    g.add_argument("--target", default=None, help="class index or name; default the top-1 class")
    g.add_argument(
        "--score",
        default="logit",
        choices=["logit", "probability", "sigmoid"],
        help="what the CAM differentiates",
    )
    g.add_argument("--layers", default="all", help="all (default), last, N (last N), indices, names or globs")
    g.add_argument(
        "--percentages",
        default="20,40,60,80",
        help="percent of pixels removed, comma-separated (default 20,40,60,80)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the tie-break and the imputation noise")
    g.add_argument("--batch-size", type=int, default=64, help="perturbed images per forward (default 64)")
    g.add_argument(
        "--imputer", default="noisy_linear", help="noisy_linear (default, fast) or spsolve (the reference)"
    )
    g.add_argument(
        "--space",
        default="pixel",
        choices=["pixel", "model"],
        help="impute in [0, 1] pixels (default) or the model input",
    )
    g.add_argument("--smooth", type=int, default=5, metavar="N", help="moving-average window of the plot")
    _output(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its finished layers"
    )
    p.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar, only errors"
    )
    p.set_defaults(func=cmd_road)

    p = sub.add_parser(
        "report",
        help="render a bundle into one self-contained interactive report.html (no server, no network)",
    )
    p.add_argument("dir", metavar="DIR", help="a bundle folder written by camanim")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write (default DIR/report.html)")
    p.add_argument("--tile", type=int, default=None, metavar="PX", help="frame tile size (default 224)")
    p.add_argument(
        "--format", dest="fmt", default="webp", choices=["webp", "jpeg", "png"], help="frame encoding"
    )
    p.add_argument("--quality", type=int, default=70, help="lossy frame quality, 1-100 (default 70)")
    p.set_defaults(func=cmd_report)

    from camanim.study.cli import add_parser as add_study_parser  # light: no pyarrow, Ray or torch

    add_study_parser(sub)
    return parser


def _load(args: argparse.Namespace):
    from camanim.models import load_model

    weights = args.checkpoint or args.weights
    return load_model(args.model, weights, num_classes=args.num_classes, device=args.device)


def _default_out(args: argparse.Namespace) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("camanim-out") / f"{stamp}-{args.model.replace(':', '-')}-{Path(str(args.image)).stem}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _print_predictions(ex, out: Path | None) -> None:
    for b in range(ex.input.shape[0]):
        if ex.input.shape[0] > 1:
            print(f"sample {b}: explained class {ex.targets[b]} ({ex.target_names[b]})")
        print("top-5:")
        for rank, (i, name, p) in enumerate(ex.top(5, b), 1):
            print(f"  {rank}. {i:>5}  {name:<30} p={p:.4f}")
    if out is not None:
        print(f"bundle: {out}")


def cmd_explain(args: argparse.Namespace) -> int:
    from camanim.explanation import explain, save_explanation

    lm = _load(args)
    ex = explain(
        lm,
        args.image,
        methods=args.methods,
        layers=_layers_or_best(args, lm),
        target=args.target,
        top_k=args.top_k,
        score=args.score,
        keep_nonspatial=getattr(args, "keep_nonspatial", False),
        batch_size=getattr(args, "batch_size", 32),
        max_channels=getattr(args, "max_channels", None),
        compile=getattr(args, "compile", False),
    )
    out = Path(args.out) if args.out else _default_out(args)
    path = save_explanation(ex, out, force=args.force, overlays=args.overlays, command=" ".join(sys.argv))
    logger.info(
        "explained %d layers x %d methods in %.2f s", len(ex.chosen), len(ex.methods), ex.timings["total"]
    )
    _print_predictions(ex, path)
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from camanim.animation import animate
    from camanim.errors import BundleExistsError
    from camanim.fused_frames import fused_options
    from camanim.methods.fused import FusionError

    # FM-G-CAM options are checked before the model loads: a wrong combination fails at once (exit code 2)
    fmgcam = {k: getattr(args, k, None) for k in ("top_k", "base", "activation")}
    fused = fused_options(getattr(args, "methods", "gradcam"), target=args.target, **fmgcam)
    best = str(getattr(args, "layers", "all")).strip().lower() == "best"
    if fused is not None and (getattr(args, "road", False) or best):
        raise FusionError("--road and --layers best score one class's map (ROAD); fmgcam fuses K classes")
    out = Path(args.out) if args.out else _default_out(args)
    resume = getattr(args, "resume", False)
    if out.is_dir() and any(out.iterdir()) and not (args.force or resume):  # fail before the model runs
        raise BundleExistsError(
            f"output folder {str(out)!r} exists and is not empty; pass --force to replace it or --resume to continue it"
        )
    lm = _load(args)
    anim = animate(
        lm,
        args.image,
        methods=getattr(args, "methods", "gradcam"),
        target=args.target,
        layers=_layers_or_best(args, lm),
        norm=getattr(args, "norm", "local,global"),
        layout=getattr(args, "layout", "side-by-side"),
        cmap=getattr(args, "cmap", "jet"),
        size=getattr(args, "size", None),
        keep_nonspatial=getattr(args, "keep_nonspatial", False),
        score=args.score,
        fps=getattr(args, "fps", None),
        reuse=out if resume else None,
        **fmgcam,
    )
    road_result = None
    if getattr(args, "road", False):
        anim, road_result = _with_road(anim, lm, args)
    path = anim.save(
        out,
        formats=getattr(args, "formats", "mp4"),
        force=args.force,
        resume=resume,
        progress=not args.quiet and sys.stderr.isatty(),
        command=" ".join(sys.argv),
        also=None if road_result is None else _ybroad_writer(road_result),
    )
    logger.info("animated %d layers x %d methods into %s", len(anim), len(anim.methods), path)
    _write_report(path)
    if anim.fusion is not None:
        _print_fused(anim.fusion, path)
    else:
        _print_predictions(anim.explanation, path)
    return 0


def cmd_fmgcam(args: argparse.Namespace) -> int:
    from camanim.methods.fused import fmgcam

    out = Path(args.out) if args.out else _default_out(args)
    res = fmgcam(
        _load(args),
        args.image,
        k=args.top_k,
        base=args.base,
        activation=args.activation,
        layers=_layer_spec(args.layers),
        multilabel=args.multilabel,
    )
    path = res.save(out, force=args.force, command=" ".join(sys.argv), panels=args.panels)
    _write_report(path)
    _print_fused(res, path)
    return 0


def _print_fused(res, path: Path) -> None:
    """The classes of an FM-G-CAM result, most probable first, and the bundle's path."""
    label = "sigmoid" if res.multilabel else "p"
    where = ", ".join(res.layers) if len(res.layers) <= 3 else f"{len(res.layers)} layers"
    print(f"FM-G-CAM ({res.base}, {res.activation}) at {where}:")
    for rank, (c, name, p) in enumerate(zip(res.classes, res.names, res.probabilities, strict=True), 1):
        print(f"  {rank}. {c:>5}  {name:<30} {label}={p:.4f}")
    print(f"bundle: {path}")


def cmd_compare(args: argparse.Namespace) -> int:
    from camanim.bundle import open_bundle
    from camanim.comparison import compare, load_road
    from camanim.explanation import write_explanation

    out = Path(args.out) if args.out else _default_out(args)
    road = load_road(args.road) if args.road else None
    cmp = compare(
        _load(args),
        args.image,
        methods=args.methods,
        layers=_layer_spec(args.layers),
        norm=args.norm,
        road=road,
        target=args.target,
    )
    with open_bundle(out, force=args.force, command=" ".join(sys.argv)) as bundle:
        write_explanation(cmp.explanation, bundle, overlays=False)
        cmp.save(bundle.file("compare.png", "methods x layers grid"))
        bundle.manifest["compare"] = {
            "figure": "compare.png",
            "rows": list(cmp.methods),
            "columns": [layer.name for layer in cmp.layers],
            "layer_choice": "among the convolution layers (camanim.comparison)",
            "norm": cmp.norm,
            "prediction": cmp.prediction,
            "road": {f"{m}/{lay}": v for (m, lay), v in cmp.road.items()},
        }
    print(cmp.prediction)
    print(f"bundle: {bundle.root}")
    return 0


def _percentages(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        from camanim.road import RoadError

        raise RoadError(f"--percentages takes comma-separated numbers, got {text!r}") from None


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
    from camanim.errors import BundleExistsError
    from camanim.road import get_imputer, save_ybroad

    out = Path(args.out) if args.out else _default_out(args)
    if out.is_dir() and any(out.iterdir()) and not (args.force or args.resume):  # fail before the model runs
        raise BundleExistsError(
            f"output folder {str(out)!r} exists and is not empty; pass --force to replace it or --resume to continue it"
        )
    percentages = _percentages(args.percentages)
    lm = _load(args)
    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res, path = save_ybroad(
            lm,
            args.image,
            out,
            force=args.force,
            resume=args.resume,
            command=" ".join(sys.argv),
            smooth=args.smooth,
            methods=args.methods,
            layers=_layer_spec(args.layers),
            target=args.target,
            score=args.score,
            percentages=percentages,
            seed=args.seed,
            imputer=get_imputer(args.imputer),
            imputation_space=args.space,
            batch_size=args.batch_size,
            progress=progress,
        )
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
    from camanim.study import is_study_dir, write_study_report

    if is_study_dir(args.dir):
        print(f"report: {write_study_report(args.dir)}")
        return 0
    from camanim.report import write_report

    path = write_report(args.dir, args.out, tile=args.tile, fmt=args.fmt, quality=args.quality)
    print(f"report: {path}")
    return 0


def _write_report(bundle: Path) -> None:
    """Write ``bundle/report.html``; a failure is logged, never fatal: the bundle itself is complete."""
    from camanim.report import write_report

    try:
        write_report(bundle)
    except Exception as exc:  # the report is derived from the bundle and can be rebuilt with `camanim report`
        logger.warning("could not write report.html (%s); rerun: camanim report %s", exc, bundle)


def _layers_or_best(args: argparse.Namespace, lm):
    """The ``--layers`` selection; ``best`` runs ybROAD for the first method and picks its max layer."""
    text = str(getattr(args, "layers", "all"))
    if text.strip().lower() != "best":
        return _layer_spec(text)
    from camanim.methods import parse_methods
    from camanim.road import ybroad

    method = parse_methods(getattr(args, "methods", "gradcam"))[0]
    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res = ybroad(
            lm,
            args.image,
            methods=method,
            target=args.target,
            score=getattr(args, "score", "logit"),
            keep_nonspatial=getattr(args, "keep_nonspatial", False),
            progress=progress,
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


def _with_road(anim, lm, args: argparse.Namespace):
    """``anim`` with every frame's ROAD (ybROAD of each method, from the animation's own maps)."""
    import dataclasses

    from camanim.road import ybroad

    with _road_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res = ybroad(lm, explanation=anim.explanation, methods=anim.methods, progress=progress)
    for m, r in res.results.items():
        logger.info(
            "ybROAD %s: mean %.4f, max %.4f at %s, final %.4f", m, r.mean, r.max, r.best_layer.name, r.final
        )
    road = {m: v for m, v in res.road().items() if m in anim.methods}
    return dataclasses.replace(anim, road=road), res


def _ybroad_writer(res):
    """A bundle writer adding ``ybroad.csv/json/png`` and ``summary.csv`` for ``res``."""
    from camanim.road import write_ybroad

    return lambda bundle: write_ybroad(res, bundle)


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "top_k", None):  # several classes of one image: raw maps and overlays per class
        return cmd_explain(args)
    return cmd_animate(args)


def _layer_spec(text: str):
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from camanim.layers import list_layers

    lm = _load(args)
    h, w = (args.size, args.size) if args.size else lm.preprocessing.size
    layers = list_layers(lm.model, torch.zeros(1, 3, h, w, device=lm.device))
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except CamanimError as exc:
        if args.debug:
            raise
        print(f"camanim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camanim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
