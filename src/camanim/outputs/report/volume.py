"""The report's viewer for volume maps: a layer slider, a plane (axial / coronal / sagittal) and a slice slider.

A volume has too many slices to embed every one as a picture, so the page draws them itself
(``volume.js``) from what this module embeds in the viewer's JSON (``data.volume``):

* the picture the model saw on its grid ``(D, H, W)``: grey as one byte per voxel, a clip's colour frames
  as three, base64;
* every layer's map after the method's ReLU at its native resolution ``(d, h, w)``, quantised to 8 bits
  between its own minimum and maximum (``lo + q / 255 * (hi - lo)``), base64;
* the grid, its spacing in mm (each slice is drawn with its physical aspect), whether anatomical labels
  apply, and the point the slices start at: the animation's (``animation.volume.slice_at``), else the maximum
  of the final layer's map.

The page samples a map at each pixel of a slice trilinearly with ``align_corners=False`` (as the frames'
upsampling), scales it by the frame's range (the animation's local or global range, the same as the video's:
taken over the whole volume) and blends the 256-entry colour table over the picture with the frames'
fixed-point blend. The remaining controls (layer slider, method, normalisation, ybROAD) are the 2-D viewer's.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from camanim.compute.normalize import Range
from camanim.outputs.report.source import Source, dig, finite, sample_of
from camanim.outputs.volume_frames import geometry_of, peak_point, upsample_volume

__all__ = ["is_volume_manifest", "local_ranges", "volume_block"]


def is_volume_manifest(manifest: Mapping[str, Any]) -> bool:
    """Whether the bundle's input is a volume or a clip ``(B, C, D, H, W)``."""
    shape = dig(manifest, "input", "shape")
    return isinstance(shape, list) and len(shape) == 5


def grid_of(manifest: Mapping[str, Any]) -> tuple[int, int, int]:
    """The model's grid ``(D, H, W)`` from the manifest's input shape."""
    return tuple(int(s) for s in manifest["input"]["shape"][-3:])  # type: ignore[return-value]


def local_ranges(maps: Sequence[np.ndarray], grid: Sequence[int], relu: bool) -> list[Range]:
    """Each map's range after ReLU and trilinear upsampling to the grid (over the whole volume)."""
    out = []
    for m in maps:
        v = upsample_volume(m, grid, relu)
        out.append(Range(float(v.min()), float(v.max())))
    return out


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.uint8).tobytes()).decode("ascii")


def _quantised(m: np.ndarray, relu: bool) -> dict[str, Any]:
    """A native map ``(d, h, w)`` (a 2-D map is one slice deep) as 8 bits between its min and max."""
    a = np.asarray(m, np.float32)
    a = a[None] if a.ndim == 2 else a
    if relu:
        a = np.maximum(a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    q = np.zeros(a.shape, np.uint8) if hi <= lo else np.rint((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return {"shape": list(a.shape), "lo": lo, "hi": hi, "data": _b64(q)}


def volume_block(
    src: Source,
    raw: Mapping[str, Sequence[np.ndarray]],
    relu: Mapping[str, bool],
    lut: np.ndarray,
    alpha: float,
) -> dict[str, Any]:
    """``data.volume`` of the report (see the module docstring).

    Args:
        src: the report's source; ``src.volume`` is the picture on the grid ``(D, H, W, 3)`` uint8.
        raw: per method, one native map per frame.
        relu: per method, whether its ReLU applies.
        lut: the ``(256, 3)`` colour table.
        alpha: the weight of the colour.
    """
    m = src.manifest
    grid = grid_of(m)
    geo = geometry_of(m.get("image") or {}, grid)
    display = src.volume
    if display is None or tuple(display.shape[:3]) != grid:
        display = np.zeros((*grid, 3), np.uint8)
    colour = geo.video and not np.array_equal(display[..., 0], display[..., 1])
    pixels = display if colour else display[..., 0]
    point = dig(m, "animation", "volume", "slice_at")
    if not (isinstance(point, list) and len(point) == 3 and all(isinstance(v, int) for v in point)):
        first = next(iter(raw))
        point = list(peak_point(upsample_volume(raw[first][-1], grid, relu[first])))
    view = str(dig(m, "animation", "volume", "view", default="") or "")
    plane = view.split(":")[0] if view.split(":")[0] in ("axial", "coronal", "sagittal") else "axial"
    return {
        "grid": list(grid),
        "spacing": [finite(s) or 1.0 for s in geo.spacing],
        "oriented": geo.oriented,
        "video": geo.video,
        "colour": bool(colour),
        "point": [int(v) for v in point],
        "plane": plane,
        "display": _b64(pixels),
        "maps": {meth: [_quantised(a, relu[meth]) for a in arrays] for meth, arrays in raw.items()},
        "lut": [[int(c) for c in row] for row in lut],
        "alpha": alpha,
    }


def sample_volume(display: np.ndarray | None, manifest: Mapping[str, Any]) -> np.ndarray | None:
    """The reported sample of a ``(B, D, H, W, 3)`` display, or None."""
    if display is None:
        return None
    return display[min(sample_of(manifest), display.shape[0] - 1)]
