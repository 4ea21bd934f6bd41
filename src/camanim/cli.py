"""The ``camanim`` command: a thin layer that parses arguments and calls the API.

Run with no arguments, it explains the embedded default (EfficientNet-Lite0 on scikit-image's ``chelsea``)
and writes a bundle. Errors about what the user typed exit with code 2 and a one-line message (the
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
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
        help="the default job: explain the default model on the default image (also run with no command)",
    )
    _common(p)
    _targets(p)
    _output(p)
    p.set_defaults(func=cmd_run, methods="gradcam", layers="all", overlays=True)

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
        "--layers", default="all", help="all, last, first,middle,last, N (last N), indices, names or globs"
    )
    p.add_argument("--keep-nonspatial", action="store_true", help="include 1x1 layers")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the overlay PNGs")
    _output(p)
    p.set_defaults(func=cmd_explain)
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
        layers=_layer_spec(args.layers),
        target=args.target,
        top_k=args.top_k,
        score=args.score,
        keep_nonspatial=getattr(args, "keep_nonspatial", False),
    )
    out = Path(args.out) if args.out else _default_out(args)
    path = save_explanation(ex, out, force=args.force, overlays=args.overlays, command=" ".join(sys.argv))
    logger.info(
        "explained %d layers x %d methods in %.2f s", len(ex.chosen), len(ex.methods), ex.timings["total"]
    )
    _print_predictions(ex, path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return cmd_explain(args)


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
