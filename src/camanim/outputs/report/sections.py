"""The report's static sections: provenance rows and the bundle's figures."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import camanim.outputs.report.tiles as T
from camanim.outputs.report.source import Source, dig


def _preprocessing_text(prep: Mapping[str, Any]) -> str:
    """``224x224, center_crop (crop 0.875), bicubic, mean [...], std [...]`` from the manifest's record."""
    size = prep.get("size")
    resize = str(prep.get("resize") or "")
    if resize == "center_crop" and "crop_pct" in prep:
        resize += f" (crop {prep['crop_pct']})"
    parts = [
        f"{size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else "",
        resize,
        str(prep.get("interpolation") or ""),
        f"mean {prep['mean']}" if prep.get("mean") else "",
        f"std {prep['std']}" if prep.get("std") else "",
    ]
    return ", ".join(p for p in parts if p)


def provenance(src: Source, stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` rows: model, weights, preprocessing, image, methods, versions, command, timings, ROAD
    settings and how the report's frames were encoded. Texts are plain (the template escapes them)."""
    m = src.manifest
    rows: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if value in (None, "", [], {}):
            return
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        rows.append((key, str(value)))

    model = m.get("model") or {}
    add("model", model.get("name"))
    add("weights", model.get("weights"))
    add("preprocessing", _preprocessing_text(model.get("preprocessing") or {}))
    image = m.get("image") or {}
    add("image", image.get("source") if isinstance(image, Mapping) else image)
    if isinstance(image, Mapping):
        add(
            "original size, mode",
            " ".join(str(v) for v in (image.get("original_size"), image.get("original_mode")) if v),
        )
        add("image notes", "; ".join(str(v) for v in image.get("notes") or []))
    for meth in m.get("methods") or []:
        if isinstance(meth, Mapping):
            add(
                f"method {meth.get('name')}",
                " · ".join(str(v) for v in (meth.get("class"), meth.get("paper")) if v),
            )
    add("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()))
    add("command", m.get("command"))
    add("created", m.get("created"))
    add("schema version", m.get("schema_version"))
    timings = []
    for section, where in (
        ("run", m.get("timings")),
        ("animation", dig(m, "animation", "timings")),
        ("ROAD", dig(m, "road", "timings")),
    ):
        if isinstance(where, Mapping):
            parts = [f"{k} {v:.2f} s" for k, v in where.items() if isinstance(v, (int, float))]
            if parts:
                timings.append(f"{section}: " + ", ".join(parts))
    add("timings", "; ".join(timings))
    anim = m.get("animation") or {}
    if anim:
        add("normalisation", anim.get("normalisation"))
        _fmgcam_rows(add, anim.get("fmgcam"))
        skipped = anim.get("skipped") or []
        add(
            "layers left out",
            f"{len(skipped)} (non-spatial outputs or repeated tensors; see layers.csv)" if skipped else None,
        )
    else:  # an FM-G-CAM result bundle (camanim fmgcam): its settings in a top-level section
        _fmgcam_rows(add, m.get("fmgcam"))
    road = m.get("road") or {}
    if road:
        defin = road.get("definition")
        add("ROAD", defin.get("road") if isinstance(defin, Mapping) and "road" in defin else defin)
        add(
            "ROAD settings",
            ", ".join(
                f"{k} {road[k]}"
                for k in ("percentages", "imputer", "imputation_space", "seed", "clean_probability")
                if k in road
            ),
        )
    if stats:
        add(
            "report frames",
            f"{stats['tiles']} tiles of {stats['tile']} px ({stats['frames']} layers), {stats['format']} sprite sheets, "
            f"{stats['bytes'] / 1e6:.2f} MB, colour map {stats['colormap']}, alpha {stats['alpha']}, "
            f"rendered in {stats['seconds']:.2f} s",
        )
    add("bundle", src.origin)
    return rows


def _fmgcam_rows(add: Callable[[str, Any], None], fm: Any) -> None:
    """The FM-G-CAM settings rows of a manifest's ``fmgcam`` entry (an animation's or a result's), if any."""
    if isinstance(fm, Mapping):
        settings = ("k", "base", "activation", "norm", "probability")
        add("FM-G-CAM", ", ".join(f"{k} {fm[k]}" for k in settings if k in fm))
        add("FM-G-CAM normalisation", fm.get("normalisation"))


_FIGURE_TEXT = {
    "strip": (
        "Strip figure",
        "Layers at every 10th percentile of depth, one row per method and normalisation.",
    ),
    "fmgcam": ("FM-G-CAM", "The top-K classes fused into one map, each class in its own colour."),
    "compare": ("Method comparison", "Methods (rows) at a few convolution layers (columns) of one image."),
    "ybroad": (
        "ybROAD plot",
        "ROAD of every layer: raw and smoothed; star: max ybROAD; diamond: final layer.",
    ),
    "params": ("Parameters per layer", "Parameters of each animated layer, log scale."),
    "faithfulness": (
        "Faithfulness of every layer",
        "Each metric's value of every layer's map (star: best layer by that metric; diamond: final layer).",
    ),
    "agreement": (
        "Where the metrics agree",
        "Spearman rank correlation between the metrics' layer rankings, each oriented so higher is better.",
    ),
    "sanity": (
        "Model-randomisation sanity check",
        "Similarity of each layer's map to the original's as the model is randomised from the top down "
        "(rows: depth); a method that passes loses its maps once the weights behind them are random.",
    ),
    "sanity_last": (
        "Maps at full randomisation",
        "Each method's maps at a few layers once every weight is random.",
    ),
}


def figures(src: Source) -> list[dict[str, str]]:
    """The bundle's figures present (strip, FM-G-CAM, comparison, ybROAD plot, parameters) as data URIs."""
    out = []
    for role in _FIGURE_TEXT:
        data = src.figures.get(role)
        uri = T.figure_uri(data) if data else None
        if uri:
            title, caption = _FIGURE_TEXT[role]
            out.append({"id": f"figure-{role}", "title": title, "caption": caption, "uri": uri})
    return out
