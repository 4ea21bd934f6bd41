"""``report.html``: one self-contained, interactive page of a bundle, readable anywhere without a server.

The page shows the input and top-5 predictions; a layer-by-layer viewer (slider, play/pause, arrow keys,
method selector, local/global toggle) with the current layer's name, type, native map size, parameters,
raw range and ROAD; the ybROAD curve (click a point to jump to its layer, the best layer highlighted); the
strip figure, FM-G-CAM panel and method comparison when the bundle has them; and the provenance. The
viewer of an FM-G-CAM bundle (an animation, or a ``camanim fmgcam`` result with its ``fmgcam.png``) shows
the top-K classes fused, each in its colour, with the class legend (:mod:`camanim.report.fused`).

It is rendered from the bundle's manifest and the files it names (raw maps, input), never by running a
model: frames are re-rendered from ``maps.npz`` exactly as the animation draws its tiles and embedded as
WebP sprite sheets (:mod:`camanim.report.tiles`). Everything taken from the manifest is HTML-escaped
(jinja2 autoescape), JSON embedded in ``<script>`` blocks has ``<``, ``>`` and ``&`` escaped, and a
Content-Security-Policy allows only the page's own script and style and ``data:`` images: no request
leaves the page.

Example:
    >>> from camanim.report import write_report
    >>> write_report("camanim-out/chelsea")  # doctest: +SKIP
    PosixPath('camanim-out/chelsea/report.html')
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import camanim.outputs.report.tiles as T
from camanim.errors import OutputError
from camanim.outputs.bundle import MANIFEST, REPORT, atomic_write_bytes, read_manifest
from camanim.outputs.report.embed import is_embed_manifest, render_embed, view_from_bundle
from camanim.outputs.report.page import asset as _asset
from camanim.outputs.report.page import csp_hash as _csp_hash
from camanim.outputs.report.page import markup as _markup
from camanim.outputs.report.page import script_json as _script_json
from camanim.outputs.report.sections import figures, provenance
from camanim.outputs.report.source import Source, dig, finite, from_bundle, sample_of
from camanim.outputs.report.viewer import viewer
from camanim.version import __version__

__all__ = [
    "REPORT",
    "Source",
    "render",
    "render_report",
    "write_report",
]

logger = logging.getLogger(__name__)

DEFAULT_QUALITY = 70


def render(src: Source, *, tile: int | None = None, fmt: str = "webp", quality: int = DEFAULT_QUALITY) -> str:
    """The report page of ``src`` as an HTML string.

    Args:
        src: what to show (:func:`camanim.report.source.from_bundle`, ``from_animation``...).
        tile: longest side of a frame tile in pixels (default: the animation's tile size, at most 224).
        fmt: frame encoding, ``"webp"`` (default), ``"jpeg"`` or ``"png"`` (lossless, large).
        quality: lossy quality, 1-100.
    """
    import jinja2

    if fmt not in T.FORMATS:
        raise ValueError(f"frame format must be one of {', '.join(T.FORMATS)}, got {fmt!r}")
    m = src.manifest
    data, sheets, why, stats = viewer(src, tile, fmt, quality)
    sample = sample_of(m)
    targets = m.get("targets") or []
    target = next((t for t in targets if isinstance(t, Mapping) and t.get("sample") == sample), None)
    if target is not None:  # every key the template reads, whatever the manifest holds
        target = {
            "name": str(target.get("name", "?")),
            "class": target.get("class", "?"),
            "probability": finite(target.get("probability")),
            "score": str(target.get("score") or ""),
            "value": finite(target.get("value")),
        }
    top5 = m.get("top5") or []
    top5 = top5[sample] if len(top5) > sample and isinstance(top5[sample], list) else []
    model = dig(m, "model", "name", default="model")
    image = dig(m, "image", "source", default="")
    image_label = Path(str(image).split("?")[0]).stem or str(image) or "image"
    volume = (data or {}).get("volume")
    js, css = _asset("report.js"), _asset("report.css")
    if volume:  # the slice viewer first: report.js hands it the drawing (see camanim.outputs.report.volume)
        js = _asset("volume.js") + "\n" + js
    if "</script" in js.lower() or "</style" in css.lower():  # pragma: no cover - a packaging mistake
        raise RuntimeError("report assets must not contain a closing script or style tag")
    csp = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; "
        "base-uri 'none'; form-action 'none'"
    )
    fusion = data.get("fusion") if data else None
    caption = ""
    if fusion:
        k = len(fusion["classes"])
        caption = (
            f"{len(data['frames'])} layers in forward order; each frame is FM-G-CAM of the top {k} classes "
            f"({fusion['base']} maps fused, {fusion['activation']}), upsampled to the input, each class drawn "
            "in its colour over it."
        )
        target = None  # the K classes are the legend's
    elif data and volume:
        what = "frames of the clip" if volume["video"] else "slices"
        caption = (
            f"{len(data['frames'])} layers in forward order, {len(data['methods'])} method"
            f"{'s' if len(data['methods']) > 1 else ''}; each frame is the layer's map after ReLU, upsampled "
            f"trilinearly to the model's {'x'.join(str(g) for g in volume['grid'])} grid, scaled by a range over "
            f"the whole volume (the video's) and coloured over the {what} ({stats['colormap']}). Choose the "
            "plane and the slice under the picture; Page Up/Down step through the slices."
        )
    elif data:
        caption = (
            f"{len(data['frames'])} layers in forward order, {len(data['methods'])} method"
            f"{'s' if len(data['methods']) > 1 else ''}; each frame is the layer's map after ReLU, upsampled to "
            f"the input and coloured over it ({stats['colormap']})."
        )
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    page = env.from_string(_asset("template.html.j2"))
    return page.render(
        title=f"CAManim report: {model} · {image_label}",
        subtitle=" · ".join(
            s
            for s in (
                f"weights: {dig(m, 'model', 'weights', default='?')}",
                f"target: {target['name']}" if target else "",
                f"targets: top {len(fusion['classes'])} classes fused" if fusion else "",
                str(m.get("created") or ""),
            )
            if s
        ),
        version=__version__,
        csp=csp,
        css=_markup(css),
        js=_markup(js),
        input_uri=T.data_uri(T.encode(src.display, "jpeg", 90), "jpeg"),
        image_caption=_image_caption(image_label, src.display, volume),
        target=target,
        task=m.get("task") if isinstance(m.get("task"), Mapping) else None,
        top5=[
            {
                "class": r.get("class", "?"),
                "name": str(r.get("name", "?")),
                "probability": finite(r.get("probability")),
            }
            for r in top5
            if isinstance(r, Mapping) and finite(r.get("probability")) is not None
        ],
        viewer=data is not None,
        volume=volume,
        viewer_caption=caption,
        no_viewer_reason=why,
        fusion=fusion,
        data_json=_markup(_script_json(data)) if data else "",
        frames_json=_markup(_script_json(sheets)) if sheets else "",
        figures=figures(src),
        provenance=provenance(src, stats),
        origin=src.origin,
    )


def render_report(
    folder: str | os.PathLike[str],
    *,
    tile: int | None = None,
    fmt: str = "webp",
    quality: int = DEFAULT_QUALITY,
) -> str:
    """The report of the bundle at ``folder`` as an HTML string (see :func:`render`); an embedding bundle
    (``camanim embed``) gets its own page (:mod:`camanim.outputs.report.embed`)."""
    if is_embed_manifest(read_manifest(folder)):
        return render_embed(view_from_bundle(folder))
    return render(from_bundle(folder), tile=tile, fmt=fmt, quality=quality)


def write_report(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    tile: int | None = None,
    fmt: str = "webp",
    quality: int = DEFAULT_QUALITY,
) -> Path:
    """Render the bundle at ``folder`` into ``out`` (default ``folder/report.html``), atomically.

    Written into the bundle, the report is added to the manifest's file list. An ``out`` elsewhere may
    replace only an earlier camanim report.

    Raises:
        CamanimError: ``folder`` is not a bundle (no ``manifest.json``).
        OutputError: ``out`` exists and is not a camanim report, or cannot be written.
    """
    t0 = time.perf_counter()
    path = Path(out) if out is not None else Path(folder) / REPORT
    if out is not None:
        check_report_path(path)
    text = render_report(folder, tile=tile, fmt=fmt, quality=quality)
    atomic_write_bytes(path, text.encode("utf-8"))
    if out is None or path.resolve() == (Path(folder) / REPORT).resolve():
        _list_in_manifest(Path(folder))
    logger.debug("report: %s (%.1f MB, %.1f s)", path, path.stat().st_size / 1e6, time.perf_counter() - t0)
    return path


def check_report_path(path: Path) -> None:
    """Refuse to overwrite a file that is not a camanim report, or to write into a missing folder's file.

    Raises:
        OutputError: ``path`` is a folder, or an existing file that camanim did not write.
    """
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder; give a file path for the report, e.g. report.html")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(4096)
        if b'<meta name="generator" content="camanim' not in head:
            raise OutputError(
                f"{str(path)!r} exists and is not a camanim report: nothing was changed; give another path"
            )


def _list_in_manifest(folder: Path) -> None:
    """Add ``report.html`` to the file list of the bundle at ``folder`` (rewritten atomically)."""
    manifest = read_manifest(folder)
    files = manifest.setdefault("files", {})
    if REPORT not in files:
        files[REPORT] = "interactive report (camanim report)"
        atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _image_caption(label: str, display: np.ndarray, volume: Mapping[str, Any] | None) -> str:
    """What the input picture shows: the image as the model saw it, or a volume's (clip's) grid and spacing."""
    if not volume:
        return f"{label}, {display.shape[1]}x{display.shape[0]} as given to the model"
    grid = "x".join(str(g) for g in volume["grid"])
    if volume.get("video"):
        return f"{label}, {grid} (frames x height x width) as given to the model; its frames"
    spacing = " x ".join(f"{s:g}" for s in volume.get("spacing") or ())
    mm = f" of {spacing} mm" if spacing else ""
    return f"{label}, {grid} voxels{mm} as given to the model; slices through the centre"
