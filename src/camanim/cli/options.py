"""Options shared by the subcommands, and the converters that check each value as it is parsed.

Every converter raises ``argparse.ArgumentTypeError`` with what was wrong and what is accepted; the
:class:`Parser` prints it as one ``camanim: error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from camanim.compute.methods import list_methods, method_class
from camanim.compute.methods.base import pass_summary
from camanim.compute.metrics.road import RoadError, check_percentages
from camanim.compute.models import parse_input_size
from camanim.compute.volumes import WINDOW_PRESETS, parse_window
from camanim.errors import CamanimError, OptionError
from camanim.outputs.volume_frames import parse_point, parse_view


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other camanim error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"camanim: error: {message} (see: {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    convert.__name__ = f"integer >= {low}"
    return convert


def int_between(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int_at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def percentages(text: str) -> tuple[float, ...]:
    """``"20,40,60,80"``: percent of pixels removed, each in (0, 100]."""

    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
        return check_percentages(values)
    except (ValueError, RoadError):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated percentages in (0, 100], e.g. 20,40,60,80; got {text!r}"
        ) from None


def non_empty(what: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if not str(text).replace(",", "").strip():
            raise argparse.ArgumentTypeError(f"is empty: give {what}")
        return str(text)

    return convert


LAYERS_HELP = "all, last, first,middle,last, N (the last N), indices, names or globs"


def add_model_options(p: argparse.ArgumentParser, *, image: bool = True) -> None:
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
    g.add_argument(
        "--num-classes",
        type=int_at_least(1),
        default=None,
        help="head size for random or checkpoint weights",
    )
    g.add_argument(
        "--output",
        default=None,
        metavar="KEY|INDEX",
        help="for models returning a dict, tuple or dataclass: the key or index of the class scores "
        "(default: the tensor itself, else 'logits', 'out' or the first tensor)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument(
        "--input-size",
        type=input_size,
        default=None,
        metavar="N|HxW|native",
        help="the model's input size instead of its own (e.g. 600 or 480x640); native: the image's own size, "
        "no resizing (for images where detail matters, such as medical ones)",
    )
    if image:
        g.add_argument(
            "--image",
            default="chelsea",
            help="a file, an http(s) URL or a sample: chelsea, coffee, astronaut, rocket",
        )


def input_size(text: str) -> str:
    """``N``, ``HxW`` or ``native`` (checked by :func:`camanim.compute.models.parse_input_size`)."""
    try:
        parse_input_size(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--target", default=None, help="class index or name (e.g. 'tiger cat'); default the top-1 class"
    )
    g.add_argument(
        "--top-k", type=int_at_least(1), default=None, metavar="K", help="explain each of the top K classes"
    )
    g.add_argument(
        "--score", default="logit", choices=["logit", "probability", "sigmoid"], help="what is differentiated"
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="bundle folder (default: a new folder under ./camanim-out/)",
    )
    g.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")


def method_help() -> str:

    return "comma-separated: " + ", ".join(list_methods()) + " or 'all'"


def methods_epilog() -> str:
    """Every method with its cost class and the passes it needs for N layers (``camanim explain --help``)."""
    lines = ["methods (cost class: passes for N layers):"]
    for name in list_methods():
        cls = method_class(name)
        lines.append(f"  {name:<18} {cls.cost}: {pass_summary(cls)}")
    lines.append("'all' is every one_pass method; the others run when named.")
    return "\n".join(lines)


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--option``."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. kernel=rbf), got {text!r}")
    return key.strip(), value.strip()


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Options of the methods that take them, passed to :func:`camanim.explain` (see each method)."""
    g = p.add_argument_group("method options")
    g.add_argument("--seed", type=int, default=0, help="seed of the methods that draw noise or samples")
    g.add_argument(
        "--samples",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="smoothgradcam++, sscam, iscam: noisy or integrated samples (defaults 4, 35, 10)",
    )
    g.add_argument(
        "--noise",
        type=float,
        default=None,
        metavar="STD",
        help="smoothgradcam++, sscam: standard deviation of the noise (defaults 0.3, 2.0)",
    )
    g.add_argument(
        "--eigen-smooth",
        action="store_true",
        help="each map is the first principal component of the method's weighted activations",
    )
    g.add_argument(
        "--aug-smooth",
        action="store_true",
        help="each map is the mean over grad-cam's six test-time augmentations (flips and scales), one "
        "batched capture",
    )
    g.add_argument(
        "--option",
        dest="method_options",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method option, repeatable: kernel=rbf (kpcacam), concepts=8 (dff), base=hirescam "
        "(sess, refinecam), anchors=NAME (refinecam), num_scales=6 (sess), pool=model (legrad), ...",
    )


def method_kwargs(args: argparse.Namespace) -> dict:
    """``seed``, ``eigen_smooth``, ``aug_smooth`` and ``options`` for :func:`camanim.explain` (and
    :func:`camanim.animate`) from :func:`add_method_options`."""
    options = dict(getattr(args, "method_options", None) or [])
    for key in ("samples", "noise"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return {
        "seed": getattr(args, "seed", 0),
        "eigen_smooth": getattr(args, "eigen_smooth", False),
        "aug_smooth": getattr(args, "aug_smooth", False),
        "options": options,
    }


def _checked(parse: Callable[[str], object], name: str) -> Callable[[str], str]:
    """A converter that runs ``parse`` on the text (its error becomes argparse's) and keeps the text."""

    def convert(text: str) -> str:
        try:
            parse(text)
        except CamanimError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    convert.__name__ = name
    return convert


def add_volume_options(p: argparse.ArgumentParser, drawn: bool = True) -> None:
    """``--window``, ``--view`` and ``--slice-at``: how a volume (NIfTI, DICOM, .npy) or a clip is fed and drawn
    (only ``--window`` for commands that draw no map: ``drawn=False``)."""
    g = p.add_argument_group(
        "volumes and videos (--image scan.nii.gz, a DICOM folder, a .npy array or a video)"
    )
    g.add_argument(
        "--window",
        type=_checked(parse_window, "window"),
        default=None,
        metavar="CENTER,WIDTH|PRESET",
        help="CT intensity window: values clipped to [center - width/2, center + width/2] and scaled to [0, 1] "
        "(default: the volume's min-max); presets: " + ", ".join(WINDOW_PRESETS),
    )
    if not drawn:
        return
    g.add_argument(
        "--view",
        type=_checked(parse_view, "view"),
        default=None,
        metavar="VIEW",
        help="what a frame shows of a volume map: slices (axial, coronal and sagittal through one point; the "
        "default), mip (maximum-intensity projections), axial:N, coronal:N, sagittal:N (one slice), frames "
        "(a clip's frames side by side; the default for videos)",
    )
    g.add_argument(
        "--slice-at",
        type=_checked(parse_point, "slice point"),
        default=None,
        metavar="Z,Y,X",
        help="the point on the model's grid the slices go through (default: the maximum of the final layer's map)",
    )
