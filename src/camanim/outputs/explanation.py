"""An explanation's files: ``input.npy``, ``maps.npz`` (raw maps) and overlay PNGs in a bundle."""

from __future__ import annotations

import os
import re
from pathlib import Path

from camanim.compute.layers import Layer
from camanim.compute.methods import method_class
from camanim.compute.normalize import Range, normalize
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.render import colormap_lut, overlay_batch, save_png
from camanim.outputs.volume_frames import (
    View,
    clamp_point,
    geometry_of,
    normalized,
    parse_point,
    parse_view,
    peak_point,
    upsample_volume,
    view_image,
    view_text,
)
from camanim.pipelines.explain import Explanation, describe

#: A volume's display on the model's grid, ``(B, D, H, W, 3)`` uint8, in a bundle.
DISPLAY_FILE = "display.npz"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def overlay_path(method: str, layer: Layer, sample: int | None = None) -> str:
    """The bundle-relative path of one overlay PNG."""
    suffix = "" if sample is None else f"_s{sample}"
    return f"overlays/{_safe(method)}/{layer.index:03d}_{_safe(layer.name)}{suffix}.png"


def write_explanation(
    ex: Explanation,
    bundle: Bundle,
    *,
    overlays: bool = True,
    cmap: str = "jet",
    view: str | View | None = None,
    slice_at: str | tuple[int, int, int] | None = None,
) -> None:
    """Write ``input.npy``, ``maps.npz`` and overlay PNGs into ``bundle`` and describe them in its manifest.

    Overlays show each map after the method's ReLU, upsampled and scaled by its own min and max (local
    normalisation), over the picture the model saw. For a volume input ``(B, C, D, H, W)`` the maps are stored
    at their native resolution ``(B, d, h, w)`` as well, the picture on the model's grid goes to
    :data:`DISPLAY_FILE`, and each overlay is the ``view`` of the volume (slices through ``slice_at``, by
    default the maximum of the final layer's map; see :mod:`camanim.outputs.volume_frames`), the range taken
    over the whole volume.
    """
    volume = ex.input.dim() == 5
    bundle.save_npy(
        "input.npy",
        ex.input.numpy(),
        "input tensor (B, C, D, H, W) float32" if volume else "input tensor (B, 3, H, W) float32",
    )
    bundle.save_npz(
        "maps.npz",
        {f"{m}/{layer}": t.numpy() for m, per in ex.maps.items() for layer, t in per.items()},
        "raw maps",
    )
    bundle.manifest.update(describe(ex))
    if volume:
        bundle.save_npz(
            DISPLAY_FILE, {"display": ex.display}, "the volume the model saw, (B, D, H, W, 3) uint8"
        )
        bundle.manifest["maps"]["shape"] = (
            "(B, d, h, w) raw at the layer's resolution ((B, h, w) for 2-D layers)"
        )
        bundle.manifest["display"] = {"file": DISPLAY_FILE, "key": "display", "shape": list(ex.display.shape)}
        if overlays:
            _volume_overlays(ex, bundle, cmap, view, slice_at)
        return
    if ex.regions is not None:
        bundle.save_npy("regions.npy", ex.regions.numpy(), "the region a segmentation score is taken over")
        bundle.manifest["regions"] = {"file": "regions.npy", "shape": "(B, H, W) bool, at the output's size"}
    written = []
    if overlays:
        lut = colormap_lut(cmap)
        for m in ex.methods:
            for layer in ex.chosen:
                up = ex.upsampled(m, layer.name)
                for b in range(up.shape[0]):
                    norm = normalize(up[b].numpy())
                    rgb = overlay_batch(ex.display[b], norm[None], lut)[0]
                    rel = overlay_path(m, layer, b if up.shape[0] > 1 else None)
                    save_png(bundle.file(rel, "overlay"), rgb, compress_level=3)
                    written.append(rel)
    bundle.manifest["overlays"] = {
        "colormap": cmap,
        "normalisation": "local (per map min/max after ReLU)",
        "count": len(written),
    }


def save_explanation(
    ex: Explanation,
    out: str | os.PathLike,
    *,
    force: bool = False,
    overlays: bool = True,
    command: str = "",
    view: str | View | None = None,
    slice_at: str | tuple[int, int, int] | None = None,
) -> Path:
    """Write ``ex`` as a bundle at ``out`` (see :mod:`camanim.bundle`); returns the bundle's path. ``view`` and
    ``slice_at`` choose what the overlays of volume maps show (:func:`write_explanation`)."""
    with open_bundle(out, force=force, command=command) as bundle:
        write_explanation(ex, bundle, overlays=overlays, view=view, slice_at=slice_at)
    return bundle.root


def _volume_overlays(
    ex: Explanation,
    bundle: Bundle,
    cmap: str,
    view: str | View | None,
    slice_at: str | tuple[int, int, int] | None,
) -> None:
    """Overlay PNGs of volume maps: each map's view, scaled by its own range over the whole volume."""
    grid = tuple(ex.input.shape[-3:])
    geo = geometry_of(ex.image_info, grid)
    chosen = parse_view(view) or View("frames" if geo.video else "slices")
    lut = colormap_lut(cmap)
    written = []
    first = ex.methods[0]
    relu = {m: method_class(m).relu for m in ex.methods}
    for b in range(ex.input.shape[0]):
        given = parse_point(slice_at)
        point = (
            clamp_point(given, grid)
            if given is not None
            else peak_point(upsample_volume(ex.maps[first][ex.chosen[-1].name][b], grid, relu[first]))
        )
        for m in ex.methods:
            for layer in ex.chosen:
                vol = upsample_volume(ex.maps[m][layer.name][b], grid, relu[m])
                norm = normalized(vol, Range(float(vol.min()), float(vol.max())))
                rgb = view_image(norm, ex.display[b], geo, chosen, point, lut=lut)
                rel = overlay_path(m, layer, b if ex.input.shape[0] > 1 else None)
                save_png(bundle.file(rel, "overlay"), rgb, compress_level=3)
                written.append(rel)
    bundle.manifest["overlays"] = {
        "colormap": cmap,
        "normalisation": "local (per map min/max after ReLU, over the whole volume on the model's grid)",
        "view": str(chosen),
        "view_text": view_text(chosen, point, geo),
        "slice_at": list(point),
        "count": len(written),
    }
