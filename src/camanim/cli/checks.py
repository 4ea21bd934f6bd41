"""What the ``camanim`` command checks before any model is loaded or any folder staged."""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from camanim.cli.tasks import check_fusion_task, resolve_task
from camanim.compute.devices import resolve_device
from camanim.compute.fusion import check_base
from camanim.compute.images import load_image
from camanim.compute.methods import parse_methods
from camanim.compute.metrics.imputers import get_imputer
from camanim.compute.volumes import is_volume_source, load_volume
from camanim.errors import OptionError
from camanim.outputs.animation import parse_formats
from camanim.outputs.bundle import check_output, read_manifest
from camanim.outputs.compare import read_road_source
from camanim.outputs.report import check_report_path
from camanim.outputs.study.store import check_study_folder, is_study_dir
from camanim.pipelines.animate import check_animation_options, fused_options


def check(args: argparse.Namespace) -> None:
    """Check every option that needs no model, before any model is loaded or any folder staged.

    Names (methods, layouts, formats, colour maps, imputers) go through the library's own parsers, the
    device must exist here, the output folder must be usable (:func:`camanim.bundle.check_output`), and
    the image is read now (``args.image`` becomes the loaded image), so a typo costs no computation.
    """

    command = args.command
    if command == "study":
        check_study_folder(args.out)
    if getattr(args, "device", None) is not None:
        args.device = str(resolve_device(args.device))
    if getattr(args, "top_k", None) is not None and getattr(args, "target", None) is not None:
        raise OptionError(
            "--top-k explains the K most probable classes and --target one class you name: give one of them"
        )
    if getattr(args, "by", None) and not is_best(args):
        raise OptionError("--by METRIC picks the layer for --layers best: give both, or neither")
    if command in ("animate", "run"):
        fmgcam = {k: getattr(args, k, None) for k in ("top_k", "base", "activation")}
        fused = fused_options(args.methods, target=args.target, **fmgcam)
        if fused is None:
            parse_methods(args.methods)
        elif getattr(args, "road", False) or is_best(args):
            raise OptionError("--road and --layers best score one class's map (ROAD); fmgcam fuses K classes")
        check_animation_options(
            norm=getattr(args, "norm", "local,global"),
            layout=getattr(args, "layout", "side-by-side"),
            cmap=getattr(args, "cmap", "jet"),
        )
        parse_formats(getattr(args, "formats", "mp4"))
    elif command in ("explain", "road", "compare", "study"):
        parse_methods(args.methods)
    if command == "fmgcam":
        check_base(args.base)
    if command in ("road", "study"):
        get_imputer(args.imputer)
    if command == "compare" and args.road is not None:
        args.road = read_road_source(args.road)
    if command == "report":
        if not is_study_dir(args.dir):
            read_manifest(args.dir)
        if args.out is not None:
            check_report_path(Path(args.out))
    if hasattr(args, "task"):
        args.task_kind = resolve_task(args)
    if command == "fmgcam":
        check_fusion_task(args, args.task_kind)
    if command in BUNDLE_COMMANDS:
        args.out = check_output(
            args.out or default_out(args),
            force=getattr(args, "force", False),
            resume=getattr(args, "resume", False),
        )
    if hasattr(args, "image"):
        args.image_name = str(args.image)
        args.image = _load_input(args)


def _load_input(args: argparse.Namespace):
    """The image, or the volume or clip (NIfTI, DICOM folder, .npy, video) with its window, read now.

    Raises:
        OptionError: ``--window``, ``--view`` or ``--slice-at`` given for a 2-D picture.
    """
    if is_volume_source(args.image):
        return load_volume(args.image, window=getattr(args, "window", None))
    given = [f"--{k.replace('_', '-')}" for k in ("window", "view", "slice_at") if getattr(args, k, None)]
    if given:
        raise OptionError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to volumes and videos (NIfTI, a DICOM folder, .npy, a video file); "
            f"{args.image_name!r} is a picture"
        )
    return load_image(args.image)


BUNDLE_COMMANDS = ("run", "explain", "animate", "fmgcam", "compare", "road")


def is_best(args: argparse.Namespace) -> bool:
    return str(getattr(args, "layers", "all")).strip().lower() == "best"


def default_out(args: argparse.Namespace) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("camanim-out") / f"{stamp}-{args.model.replace(':', '-')}-{Path(str(args.image)).stem}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out
