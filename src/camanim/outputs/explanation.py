"""An explanation's files: ``input.npy``, ``maps.npz`` (raw maps) and overlay PNGs in a bundle."""

from __future__ import annotations

import os
import re
from pathlib import Path

from camanim.compute.layers import Layer
from camanim.compute.normalize import normalize
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.render import colormap_lut, overlay_batch, save_png
from camanim.pipelines.explain import Explanation, describe


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def overlay_path(method: str, layer: Layer, sample: int | None = None) -> str:
    """The bundle-relative path of one overlay PNG."""
    suffix = "" if sample is None else f"_s{sample}"
    return f"overlays/{_safe(method)}/{layer.index:03d}_{_safe(layer.name)}{suffix}.png"


def write_explanation(ex: Explanation, bundle: Bundle, *, overlays: bool = True, cmap: str = "jet") -> None:
    """Write ``input.npy``, ``maps.npz`` and overlay PNGs into ``bundle`` and describe them in its manifest.

    Overlays show each map after the method's ReLU, upsampled and scaled by its own min and max (local
    normalisation), over the picture the model saw.
    """
    bundle.save_npy("input.npy", ex.input.numpy(), "input tensor (B, 3, H, W) float32")
    bundle.save_npz(
        "maps.npz",
        {f"{m}/{layer}": t.numpy() for m, per in ex.maps.items() for layer, t in per.items()},
        "raw maps",
    )
    bundle.manifest.update(describe(ex))
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
    ex: Explanation, out: str | os.PathLike, *, force: bool = False, overlays: bool = True, command: str = ""
) -> Path:
    """Write ``ex`` as a bundle at ``out`` (see :mod:`camanim.bundle`); returns the bundle's path."""
    with open_bundle(out, force=force, command=command) as bundle:
        write_explanation(ex, bundle, overlays=overlays)
    return bundle.root
