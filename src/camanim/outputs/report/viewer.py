"""The report's viewer: frames of every layer (sprite sheets), their ranges, layer facts and ROAD.

Everything comes from a :class:`~camanim.report.source.Source` (a bundle's manifest and files); values the
manifest records (per-frame ranges, ROAD, best layer) are used as recorded and computed from the raw maps
only where a bundle lacks them (e.g. an ``explain`` bundle has no animation section).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import camanim.outputs.report.fused as F
import camanim.outputs.report.tiles as T
import camanim.outputs.report.volume as V
from camanim.compute.methods import method_class
from camanim.compute.normalize import Range
from camanim.outputs.render import colormap_lut
from camanim.outputs.report.source import Source, dig, finite, sample_of
from camanim.outputs.report.volume import is_volume_manifest

logger = logging.getLogger(__name__)

#: Longest side of a frame tile by default, in pixels.
DEFAULT_TILE = 224
NORM_TITLES = {"local": "local", "global": "global", "global-all": "global (all methods)"}


def relu(method: str) -> bool:
    """Whether ``method``'s displayed map is its raw map after ReLU (from the method registry)."""

    try:
        return bool(method_class(method).relu)
    except Exception:  # a method this installation does not know: every built-in method applies ReLU
        return True


def _lut(name: str) -> tuple[np.ndarray, str]:

    try:
        return colormap_lut(name), name
    except Exception:
        logger.warning("unknown colour map %r in the manifest: drawing with jet", name)
        return colormap_lut("jet"), "jet"


def _fmt_size(layer: Mapping[str, Any]) -> str:
    size = layer.get("map_size")
    if size:
        return "x".join(str(s) for s in size)
    shape = layer.get("shape") or []
    return "x".join(str(s) for s in shape[1:]) or "-"


def resize_display(display: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """The picture ``(H, W, 3)`` uint8 resized (bilinear, as the animation does) to ``tile`` ``(h, w)``."""
    from PIL import Image

    if display.shape[:2] == tuple(tile):
        return np.ascontiguousarray(display)
    img = Image.fromarray(display).resize((tile[1], tile[0]), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img))


def _frame_names(manifest: Mapping[str, Any]) -> list[str]:
    per_frame = dig(manifest, "animation", "per_frame")
    if isinstance(per_frame, list) and per_frame:
        return [str(f.get("layer")) for f in per_frame]
    return [str(n) for n in manifest.get("chosen_layers") or []]


def _methods(manifest: Mapping[str, Any]) -> list[str]:
    names = dig(manifest, "animation", "methods")
    if not names:
        names = [m.get("name") if isinstance(m, Mapping) else m for m in manifest.get("methods") or []]
    return [str(m) for m in names if m]


def _manifest_ranges(manifest: Mapping[str, Any], method: str, norm: str, n: int) -> list[Range] | None:
    per_frame = dig(manifest, "animation", "per_frame")
    if not isinstance(per_frame, list) or len(per_frame) != n:
        return None
    out = []
    for f in per_frame:
        r = dig(f, "ranges", method, norm)
        if not isinstance(r, list) or len(r) != 2 or finite(r[0]) is None or finite(r[1]) is None:
            return None
        out.append(Range(float(r[0]), float(r[1])))
    return out


def _ranges(
    manifest: Mapping[str, Any],
    methods: Sequence[str],
    norms: Sequence[str],
    raw: Mapping[str, list[np.ndarray]],
    in_hw: tuple[int, int],
    measure: Callable[[str], list[Range]] | None = None,
) -> dict[str, dict[str, list[Range]]]:
    """Per method and normalisation, the range of every frame: the manifest's, else computed from the maps
    (``measure(method)``: the local ranges; default each map's after the method's ReLU and upsampling)."""
    n = len(next(iter(raw.values())))
    measure = measure or (lambda m: T.map_ranges(raw[m], in_hw, relu(m)))
    local = {}
    for m in methods:
        local[m] = _manifest_ranges(manifest, m, "local", n) or measure(m)

    def union(rs: Sequence[Range]) -> Range:
        return Range(min(r.low for r in rs), max(r.high for r in rs))

    out: dict[str, dict[str, list[Range]]] = {}
    everything = union([r for rs in local.values() for r in rs])
    for m in methods:
        out[m] = {}
        for norm in norms:
            given = _manifest_ranges(manifest, m, norm, n)
            if given is not None:
                out[m][norm] = given
            elif norm == "local":
                out[m][norm] = local[m]
            elif norm == "global":
                out[m][norm] = [union(local[m])] * n
            else:
                out[m][norm] = [everything] * n
    return out


def _road(src: Source, methods: Sequence[str], frames: Sequence[str]) -> dict[str, Any]:
    """ROAD per method and frame (None where missing), the best and final frame, the mean: manifest first."""
    manifest = src.manifest
    results = dig(manifest, "road", "results")
    per_layer: dict[tuple[str, str], Any] = {}
    if isinstance(results, Mapping):
        for key, v in results.items():
            m, _, layer = str(key).partition("/")
            per_layer[(m, layer)] = v
    per_layer = per_layer or dict(src.road_rows)
    animated = dig(manifest, "animation", "road") or {}
    position = {name: i for i, name in enumerate(frames)}
    road: dict[str, list[float | None]] = {}
    best: dict[str, int | None] = {}
    final: dict[str, int | None] = {}
    mean: dict[str, float] = {}
    for m in methods:
        values = [finite(per_layer.get((m, name))) for name in frames]
        if (
            all(v is None for v in values)
            and isinstance(animated.get(m), list)
            and len(animated[m]) == len(frames)
        ):
            values = [finite(v) for v in animated[m]]
        if all(v is None for v in values):
            continue
        road[m] = values
        summary = dig(manifest, "road", "methods", m, default={})
        b = position.get(dig(summary, "best_layer", "name"))
        if b is None:
            b = int(np.nanargmax(np.array([np.nan if v is None else v for v in values])))
        best[m] = b
        final[m] = position.get(dig(summary, "final_layer", "name"))
        mv = finite(dig(summary, "mean_layerwise_road"))
        if mv is not None:
            mean[m] = mv
    return {"road": road, "roadBest": best, "roadFinal": final, "roadMean": mean}


def _frame_rows(
    manifest: Mapping[str, Any], frames: Sequence[str], first: Sequence[np.ndarray]
) -> list[dict]:
    """Per frame, the facts the page shows: name, type, kind, forward index, native map size, parameters."""
    layers = {la.get("name"): la for la in manifest.get("layers") or [] if isinstance(la, Mapping)}
    rows = []
    for name, a in zip(frames, first, strict=True):
        la = layers.get(name, {})
        rows.append(
            {
                "name": name,
                "index": la.get("index", "?"),
                "type": str(la.get("type", "?")),
                "kind": str(la.get("kind", "spatial")),
                "map_size": _fmt_size(la) if la else "x".join(str(s) for s in a.shape),
                "params": la.get("params") if isinstance(la.get("params"), int) else None,
            }
        )
    return rows


def _flags(manifest: Mapping[str, Any], methods: Sequence[str], frames: Sequence[str]) -> dict:
    """Per method, ``{frame: [flags]}`` where a map is flat, has no gradient...: the animation's, else the run's."""
    per_frame = dig(manifest, "animation", "per_frame")
    per_frame = per_frame if isinstance(per_frame, list) and len(per_frame) == len(frames) else None
    out: dict[str, dict[int, list[str]]] = {}
    for m in methods:
        by_layer = dig(manifest, "flags", m, default={}) or {}
        found = {}
        for i, name in enumerate(frames):
            f = (dig(per_frame[i], "flags", m) if per_frame else None) or by_layer.get(name)
            if f:
                found[i] = [str(x) for x in f]
        if found:
            out[m] = found
    return out


def viewer(
    src: Source, tile_px: int | None, fmt: str, quality: int
) -> tuple[dict | None, dict | None, str, dict[str, Any]]:
    """Everything the page's viewer needs.

    Args:
        src: the report's source.
        tile_px: longest side of a tile (default: the animation's tile size, at most :data:`DEFAULT_TILE`).
        fmt: tile encoding (``"webp"``, ``"jpeg"``, ``"png"``); ``quality`` its lossy quality.

    Returns:
        ``(data, sheets, why, stats)``: the JSON read by ``report.js`` (frames, methods, norms, ranges, raw
        ranges, flags, ROAD...; for an FM-G-CAM bundle also ``fusion``: base, activation, norm and the
        class legend), the sprite sheets' data URIs per method and normalisation, why there is no viewer
        (``data`` is then None), and figures for the provenance (tile count, bytes, seconds).

    An FM-G-CAM bundle (:mod:`camanim.report.fused`: an animation, or a ``camanim fmgcam`` result) gets one
    tile per layer and normalisation, its classes fused from the stored base maps and drawn each in its hue.
    """
    manifest = src.manifest
    anim = manifest.get("animation") if isinstance(manifest.get("animation"), Mapping) else {}
    fusion = F.fusion_of(manifest)
    frames = list(fusion.layers) if fusion is not None and fusion.layers else _frame_names(manifest)
    if not frames:
        return None, None, "This bundle has no layer maps to show.", {}
    sample = sample_of(manifest)
    volume = is_volume_manifest(manifest) and fusion is None
    raw: dict[str, list[Any]] = {}  # per method, a map per frame: (h, w) arrays, FM-G-CAM (K, h, w) tensors
    if fusion is not None:
        fused = F.fused_maps(src, fusion, frames)
        if fused is not None:
            raw[F.FMGCAM] = fused
    for m in [] if fusion is not None else _methods(manifest):
        arrays = [src.maps(f"{m}/{name}") for name in frames]
        if any(a is None for a in arrays):
            logger.info("no maps of %s for every frame in the bundle: not in the viewer", m)
            continue
        if volume:  # (B, d, h, w), or (B, h, w) for a 2-D layer of a volume model
            raw[m] = [a[min(sample, a.shape[0] - 1)] for a in arrays]
            continue
        raw[m] = [a[min(sample, a.shape[0] - 1)] if a.ndim == 3 else a for a in arrays]
    if not raw:
        return None, None, "The bundle's maps file is missing or holds no map of its layers.", {}
    methods = list(raw)
    norms = [n for n in (anim.get("norms") or ("local", "global")) if n in NORM_TITLES] or ["local", "global"]
    shape = dig(manifest, "input", "shape")
    in_hw = (int(shape[-2]), int(shape[-1])) if isinstance(shape, list) and len(shape) == 4 else None
    in_hw = in_hw or tuple(src.display.shape[:2])
    tile = T.tile_size(in_hw, tile_px or min(max(anim.get("tile_size") or in_hw), DEFAULT_TILE))
    lut, cmap = _lut(str(anim.get("colormap") or "jet"))
    alpha = finite(anim.get("alpha"))
    alpha = 0.5 if alpha is None or not 0 <= alpha <= 1 else alpha

    t = time.perf_counter()
    measure = None if fusion is None else (lambda m: F.local_ranges(raw[m], in_hw, T.PER_SHEET))
    if volume:
        measure = lambda m: V.local_ranges(raw[m], V.grid_of(manifest), relu(m))  # noqa: E731
    ranges = _ranges(manifest, methods, norms, raw, in_hw, measure)
    display = resize_display(src.display, tile)
    sheets: dict[str, dict[str, list[str]]] = {m: {nm: [] for nm in norms} for m in methods}
    size = 0
    for m in [] if volume else methods:
        if fusion is not None:
            chunks = F.fmgcam_tiles(
                raw[m], ranges[m], in_hw=in_hw, tile=tile, display=display, colors=fusion.colors,
                alpha=alpha, per_sheet=T.PER_SHEET,
            )  # fmt: skip
        else:
            chunks = T.overlay_tiles(
                raw[m], ranges[m], in_hw=in_hw, tile=tile, display=display, lut=lut, alpha=alpha, relu=relu(m)
            )
        for chunk in chunks:
            for nm, tiles in chunk.items():
                data = T.encode(T.pack(tiles), fmt, quality)
                size += len(data)
                sheets[m][nm].append(T.data_uri(data, fmt))
    elapsed = time.perf_counter() - t

    fps = anim.get("fps") if isinstance(anim.get("fps"), int) and anim.get("fps") > 0 else 10
    first = raw[methods[0]] if fusion is None else [a[0] for a in raw[methods[0]]]
    data = {
        "frames": _frame_rows(manifest, frames, first),
        "methods": methods,
        "norms": norms,
        "normTitles": {nm: NORM_TITLES[nm] for nm in norms},
        "ranges": {
            m: {nm: [[r.low, r.high] for r in rs] for nm, rs in per.items()} for m, per in ranges.items()
        },
        "raw": {m: [[float(a.min()), float(a.max())] for a in arrays] for m, arrays in raw.items()},
        "flags": _flags(manifest, methods, frames),
        "tile": list(tile),
        "columns": T.COLUMNS,
        "perSheet": T.PER_SHEET,
        "fps": min(int(fps), 60),
        "start": len(frames) - 1,
        "lut": ["#{:02x}{:02x}{:02x}".format(*lut[i]) for i in np.linspace(0, len(lut) - 1, 64).astype(int)],
        **_road(src, methods, frames),
    }
    if volume:
        data["volume"] = V.volume_block(src, raw, {m: relu(m) for m in methods}, lut, alpha)
        size = sum(len(b["data"]) for per in data["volume"]["maps"].values() for b in per)
        size += len(data["volume"]["display"])
        sheets = {}
    if fusion is not None:
        cmap = "one hue per class (FM-G-CAM)"
        data["fusion"] = {
            "base": fusion.base,
            "activation": fusion.activation,
            "norm": fusion.norm,
            "score": fusion.score,
            "normalisation": fusion.normalisation,
            "classes": F.legend(fusion),
        }
    stats = {
        "frames": len(frames),
        "tiles": len(frames) * len(methods) * len(norms),
        "tile": f"{tile[0]}x{tile[1]}",
        "format": f"{fmt} q{quality}" if fmt != "png" else "png",
        "bytes": size,
        "seconds": elapsed,
        "colormap": cmap,
        "alpha": alpha,
    }
    return data, sheets, "", stats
