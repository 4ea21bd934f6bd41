"""Files of the model-randomisation sanity check: ``sanity.csv`` (similarity per method, depth and layer),
``sanity.json`` (settings, depths, verdicts), ``sanity_<measure>.png`` (the depth x layer heat maps),
``sanity_maps.npz`` (every depth's raw maps) and ``sanity.mp4``: the CAManim of a model being destroyed, one
frame per randomisation depth showing each method's maps at a few layers."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from camanim.compute.methods import get_method
from camanim.compute.normalize import normalize
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.explanation import write_explanation
from camanim.outputs.render import FrameStyle, grid, overlay, save_png
from camanim.outputs.video import default_fps, open_writer
from camanim.pipelines.sanity import SanityResult

__all__ = ["frames", "plot_heatmap", "sanity_csv", "save_result", "write_sanity"]

#: Layers shown per method in each animation frame (evenly spaced, the last included).
COLUMNS = 6


def sanity_csv(res: SanityResult) -> str:
    """One row per method, depth and layer with every measure."""
    rows = res.rows()
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.9g}" if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def plot_heatmap(res: SanityResult, path: str | os.PathLike[str], measure: str = "spearman") -> None:
    """``sanity_<measure>.png``: per method, a depth (rows: original, then deeper randomisation) x layer
    (columns, forward order) heat map of the similarity to the original's map (grey: undefined)."""
    n = len(res.methods)
    n_l, n_d = len(res.layers), len(res.depths)
    fig = _figure(max(7.0, min(3.0 + 0.09 * n_l, 16)), (1.4 + 0.22 * n_d) * n + 0.8)
    axes = fig.subplots(n, 1, squeeze=False).ravel()
    im = None
    verdicts = res.verdicts()
    for ax, m in zip(axes, res.methods, strict=True):
        t = np.ma.masked_invalid(res.table(m, measure))
        im = ax.imshow(t, aspect="auto", vmin=-1 if measure != "ssim" else 0, vmax=1, cmap="viridis",
                       interpolation="nearest")  # fmt: skip
        ax.set_facecolor("0.8")
        ax.set_yticks(range(n_d))
        ax.set_yticklabels(["original"] + [f"top {k}" for k in res.depths[1:]], fontsize=6)
        ax.set_ylabel(f"randomised (of {len(res.modules)})", fontsize=7)
        if n_l <= 30:
            ax.set_xticks(range(n_l))
            ax.set_xticklabels([layer.name for layer in res.layers], rotation=70, ha="right", fontsize=5)
        else:
            ax.set_xlabel("map layer (forward order)", fontsize=7)
        v = verdicts[m]
        ax.set_title(
            f"{m}: median Spearman at full randomisation {v['median']:.2f} -> "
            f"{'passes' if v['passes'] else 'FAILS'} (threshold {v['threshold']})",
            fontsize=8,
        )
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"{measure} similarity to the original map")
    fig.suptitle(
        f"Cascading model randomisation: {res.model_name}, {res.image_name}, target {res.target_name!r}",
        fontsize=9,
        y=1.0 + 0.1 / n,
    )
    fig.savefig(path, bbox_inches="tight")


def _shown_columns(n_layers: int, columns: int) -> list[int]:
    if n_layers <= columns:
        return list(range(n_layers))
    return sorted({int(round(v)) for v in np.linspace(0, n_layers - 1, columns)})


def _upsampled(raw: np.ndarray, method: str, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.asarray(raw, np.float32))[None, None]
    if get_method(method).relu:
        t = t.clamp_min(0)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def frames(res: SanityResult, *, columns: int = COLUMNS, tile: int = 128) -> Iterator[np.ndarray]:
    """One ``(Hf, Wf, 3)`` uint8 frame per depth: rows = methods, columns = a few layers, each map over the
    picture (local normalisation), titled with the depth and each tile's Spearman similarity."""
    ex = res.explanation
    display = np.asarray(ex.display[0])
    size = tuple(display.shape[:2])
    cols = _shown_columns(len(res.layers), columns)
    scale = tile / max(size)
    shown = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    from PIL import Image

    small = np.asarray(Image.fromarray(display).resize((shown[1], shown[0]), Image.BILINEAR))
    style = FrameStyle(font_size=11)
    sim = res.similarity.get("spearman")
    for d in range(len(res.depths)):
        tiles = []
        for m in res.methods:
            row = []
            for j in cols:
                up = _upsampled(res.maps[d][m][res.layers[j].name], m, shown)
                row.append(overlay(small, normalize(up)))
            tiles.append(row)
        col_titles = [res.layers[j].name[-18:] for j in cols]
        row_titles = list(res.methods)
        title = res.depth_label(d)
        if sim is not None and d > 0:
            med = np.nanmedian(sim[:, d, :], axis=1)
            title += " | median Spearman " + ", ".join(
                f"{m} {v:.2f}" for m, v in zip(res.methods, med, strict=True)
            )
        yield grid(tiles, row_titles, col_titles, title, style)


def write_sanity(res: SanityResult, bundle: Bundle, *, video: str | None = "mp4", plot: bool = True) -> None:
    """Write the sanity files into ``bundle`` and its manifest's ``sanity`` section."""
    bundle.write_text("sanity.csv", sanity_csv(res), "similarity per method, depth and layer")
    summary = res.describe()
    bundle.write_json("sanity.json", summary, "randomisation check summary")
    bundle.save_npz(
        "sanity_maps.npz",
        {
            f"{k}/{m}/{n}": a
            for d, k in enumerate(res.depths)
            for m, per in res.maps[d].items()
            for n, a in per.items()
        },
        "raw maps at every randomisation depth (key depth/method/layer)",
    )
    files = {"table": "sanity.csv", "summary": "sanity.json", "maps": "sanity_maps.npz"}
    if plot:
        for measure in res.measures:
            rel = f"sanity_{measure}.png"
            plot_heatmap(res, bundle.file(rel, f"depth x layer heat map ({measure})"), measure)
            files[f"heatmap_{measure}"] = rel
        files["heatmap"] = f"sanity_{'spearman' if 'spearman' in res.measures else res.measures[0]}.png"
    shown = list(frames(res)) if plot or video else []
    if plot:
        save_png(bundle.file("sanity_last.png", "maps at full randomisation"), shown[-1])
        files["last_frame"] = "sanity_last.png"
    if video:
        rel = "sanity.mp4" if video == "mp4" else ("sanity.gif" if video == "gif" else "sanity_frames")
        with open_writer(bundle.file(rel, "animation: the model destroyed from the top down"),
                         fps=min(default_fps(len(res.depths), 6.0), 4), fmt=video) as w:  # fmt: skip
            for frame in shown:
                w.write(frame)
        files["video"] = rel
    bundle.manifest["sanity"] = {**summary, "files": files}


def save_result(
    res: SanityResult,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    command: str = "",
    video: str | None = "mp4",
    finalize: Any = None,
) -> Path:
    """Write a bundle: the original's explanation (no overlays) plus the sanity files; also
    ``SanityResult.save``."""
    with open_bundle(out, force=force, command=command, finalize=finalize) as bundle:
        write_explanation(res.explanation, bundle, overlays=False)
        bundle.manifest.pop("overlays", None)
        write_sanity(res, bundle, video=video)
    return bundle.root
