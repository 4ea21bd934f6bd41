"""Where a report's content comes from: a bundle folder (manifest first), or results still in memory.

Both give the same :class:`Source`: the manifest (as written, or as it would be written), a reader of raw
maps by ``"<method>/<layer>"`` key, the picture the model saw, and figure files by role. Nothing here runs a
model.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from camanim.outputs.bundle import _jsonable, read_manifest, versions
from camanim.outputs.render import draw_task_marks
from camanim.outputs.volume_frames import View, geometry_of, view_image
from camanim.pipelines.explain import describe

logger = logging.getLogger(__name__)

MapReader = Callable[[str], "np.ndarray | None"]

#: Figure roles and where a manifest names their file.
FIGURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "strip": (("animation", "strip", "file"),),
    "fmgcam": (("fmgcam", "figure"),),
    "compare": (("compare", "figure"),),
    "ybroad": (("road", "files", "plot"),),
    "params": (("animation", "params_plot"),),
    "faithfulness": (("faithfulness", "files", "plot"),),
    "agreement": (("faithfulness", "files", "agreement"),),
    "sanity": (("sanity", "files", "heatmap"),),
    "sanity_last": (("sanity", "files", "last_frame"),),
}


@dataclass
class Source:
    """Everything a report is rendered from.

    Attributes:
        manifest: the bundle's manifest (see :mod:`camanim.bundle`, :func:`camanim.explanation.describe`).
        maps: returns the raw map array ``(B, h, w)`` stored under ``"<method>/<layer>"``, or None.
        display: the picture the model saw for the reported sample, ``(H, W, 3)`` uint8.
        figures: per role (``strip``, ``fmgcam``, ``compare``, ``ybroad``, ``params``) the image file's bytes.
        road_rows: ROAD per ``(method, layer name)`` read from ``ybroad.csv`` when the manifest lacks it.
        origin: where the content came from (a folder, or "memory").
        volume: for a volume or clip input, the reported sample's picture on the model's grid
            ``(D, H, W, 3)`` uint8 (``display`` is then its slices); None for a 2-D input.
    """

    manifest: dict
    maps: MapReader
    display: np.ndarray
    figures: dict[str, bytes] = field(default_factory=dict)
    road_rows: dict[tuple[str, str], float] = field(default_factory=dict)
    origin: str = "memory"
    volume: np.ndarray | None = None


def dig(d: Any, *keys: str, default: Any = None) -> Any:
    """``d[k1][k2]...`` or ``default`` when any step is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


def _inside(root: Path, rel: Any) -> Path | None:
    """``root / rel`` when ``rel`` is a plain relative path that stays inside ``root`` and is a file."""
    if not isinstance(rel, str) or not rel:
        return None
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()) or not p.is_file():
        return None
    return p


def _display_from_input(x: np.ndarray, manifest: Mapping[str, Any]) -> np.ndarray:
    """The picture ``(B, H, W, 3)`` uint8 recovered from the input tensor ``(B, C, H, W)``."""
    x = np.asarray(x, np.float32)
    if x.shape[1] == 3:
        mean = np.asarray(dig(manifest, "model", "preprocessing", "mean", default=(0.0,) * 3), np.float32)
        std = np.asarray(dig(manifest, "model", "preprocessing", "std", default=(1.0,) * 3), np.float32)
        pixels = x * std[None, :, None, None] + mean[None, :, None, None]
    else:  # not an RGB input: the channel mean, min-max scaled (as camanim.explanation.prepare_input)
        grey = x.mean(axis=1, keepdims=True)
        lo = grey.min(axis=(2, 3), keepdims=True)
        pixels = np.repeat((grey - lo) / np.maximum(grey.max(axis=(2, 3), keepdims=True) - lo, 1e-12), 3, 1)
    return (np.clip(pixels, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def _read_road_csv(path: Path) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[(row["method"], row["name"])] = float(row["road"])
            except (KeyError, TypeError, ValueError):
                continue
    return out


def sample_of(manifest: Mapping[str, Any]) -> int:
    """The sample the report shows: the animated one, else the first."""
    s = dig(manifest, "animation", "sample", default=0)
    return int(s) if isinstance(s, int) else 0


def from_bundle(folder: str | Path) -> Source:
    """Read a bundle: its manifest, then the files it names (maps, input, figures).

    Raises:
        CamanimError: ``folder`` has no ``manifest.json``.
    """
    root = Path(folder).expanduser().absolute()
    manifest = read_manifest(root)
    sample = sample_of(manifest)

    maps_rel = dig(manifest, "maps", "file", default="maps.npz")
    maps_path = _inside(root, maps_rel)
    cache: dict[str, np.lib.npyio.NpzFile] = {}

    def maps(key: str) -> np.ndarray | None:
        if maps_path is None:
            return None
        if "z" not in cache:
            cache["z"] = np.load(maps_path, allow_pickle=False)
        z = cache["z"]
        return z[key] if key in z.files else None

    volume = None
    p = _inside(root, dig(manifest, "display", "file"))
    if p is not None:
        with np.load(p, allow_pickle=False) as z:
            if "display" in z.files and z["display"].ndim == 5:
                volume = z["display"][min(sample, z["display"].shape[0] - 1)]
    display = None
    pngs = ["input.png"] if sample == 0 else []
    pngs.append(f"input_s{sample}.png")
    for rel in pngs:
        p = _inside(root, rel)
        if p is not None:
            from PIL import Image

            with Image.open(p) as img:
                display = np.asarray(img.convert("RGB"))
            break
    if display is None and volume is not None:
        display = _volume_picture(volume, manifest)
    if display is None and len(dig(manifest, "input", "shape", default=[])) == 4:
        p = _inside(root, dig(manifest, "input", "file", default="input.npy"))
        if p is not None:
            x = np.load(p, allow_pickle=False)
            display = _display_from_input(x, manifest)[min(sample, x.shape[0] - 1)]
    if display is None:
        h, w = dig(manifest, "model", "preprocessing", "size", default=(224, 224))
        display = np.zeros((int(h), int(w), 3), np.uint8)
        logger.warning("%s has no input.png or input.npy: overlays are drawn on black", root)
    regions = _inside(root, dig(manifest, "regions", "file", default="regions.npy"))
    region = np.load(regions, allow_pickle=False)[sample] if regions is not None else None
    display = marked(display, manifest, region, sample)

    figures = {}
    for role, places in FIGURES.items():
        for keys in places:
            p = _inside(root, dig(manifest, *keys))
            if p is not None:
                figures[role] = p.read_bytes()
                break
    road_rows = {}
    table = _inside(root, dig(manifest, "road", "files", "table"))
    if table is not None and not dig(manifest, "road", "results"):
        road_rows = _read_road_csv(table)
    return Source(manifest, maps, display, figures, road_rows, origin=str(root), volume=volume)


def _volume_picture(volume: np.ndarray, manifest: Mapping[str, Any]) -> np.ndarray:
    """The picture of a volume ``(D, H, W, 3)``: its slices through the centre (a clip: its frames)."""
    geo = geometry_of(manifest.get("image") or {}, volume.shape[:3])
    view = View("frames" if geo.video else "slices")
    return view_image(np.zeros(volume.shape[:3], np.float32), volume, geo, view, None, alpha=0.0)


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _memory_manifest(sections: Mapping[str, Any]) -> dict:
    """A manifest as a bundle would record it (NaN as null), for results not written to disk."""

    manifest = {
        "schema_version": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": "(in memory)",
        **sections,
    }
    return json.loads(json.dumps(_jsonable(manifest), allow_nan=False))


def _tensor_reader(maps: Mapping[str, Mapping[str, Any]]) -> MapReader:
    def read(key: str) -> np.ndarray | None:
        method, _, layer = key.partition("/")
        t = maps.get(method, {}).get(layer)
        return None if t is None else t.detach().float().cpu().numpy()

    return read


def marked(
    display: np.ndarray, manifest: Mapping[str, Any], region: np.ndarray | None, sample: int
) -> np.ndarray:
    """The picture with what a task target explains drawn on it: a segmentation region's outline, the
    detections' boxes (from the manifest's ``boxes``); unchanged for a classification."""
    boxes = manifest.get("boxes") or None
    boxes = boxes[min(sample, len(boxes) - 1)] if boxes else None
    if region is None and not boxes:
        return display
    source_hw = tuple(dig(manifest, "input", "shape", default=[0, 0, *display.shape[:2]])[-2:])
    return draw_task_marks(display, region, [tuple(b) for b in boxes] if boxes else None, source_hw=source_hw)


def _ex_display(ex: Any, sample: int) -> np.ndarray:
    if ex.input.dim() == 5:
        return _volume_picture(np.asarray(ex.display[sample]), {"image": ex.image_info})
    region = None if getattr(ex, "regions", None) is None else ex.regions[sample].numpy()
    return marked(
        np.asarray(ex.display[sample]),
        {"boxes": getattr(ex, "boxes", None), "input": {"shape": list(ex.input.shape)}},
        region,
        sample,
    )


def from_animation(anim: Any, *, strip: bool = True) -> Source:
    """An in-memory :class:`~camanim.animation.Animation` as a report source (nothing is written)."""

    ex = anim.explanation
    sections = describe(ex) | {"animation": anim.describe()}
    figures = {"strip": _png_bytes(anim.strip().image)} if strip else {}
    return Source(
        _memory_manifest(sections),
        _tensor_reader(ex.maps),
        _ex_display(ex, anim.sample),
        figures,
        volume=_ex_volume(ex, anim.sample),
    )


def _ex_volume(ex: Any, sample: int) -> np.ndarray | None:
    return np.asarray(ex.display[sample]) if ex.input.dim() == 5 else None


def from_explanation(ex: Any, sample: int = 0) -> Source:
    """An in-memory :class:`~camanim.explanation.Explanation` as a report source."""

    return Source(
        _memory_manifest(describe(ex)),
        _tensor_reader(ex.maps),
        _ex_display(ex, sample),
        volume=_ex_volume(ex, sample),
    )


def finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite number, else None (JSON null)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
