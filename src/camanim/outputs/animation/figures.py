"""The figures of a CAManim animation bundle, beside its videos.

* ``strip.png``: the layers at every 10th percentile of depth (:data:`PERCENTILES`), one row per method and
  normalisation (paper Figs 4 and 5), tiles coloured exactly as in the frames;
* ``layers.csv``: the layer table, one row per layer of the forward pass, kept (with its raw range) or skipped
  (with the reason);
* ``params.png``: the parameters of each kept layer on a log scale (paper Fig 3).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from camanim.compute.resize import shrink
from camanim.outputs.animation.frames import colour, map_size_text, style_of
from camanim.outputs.animation.volume import is_volume, volume_overlays
from camanim.outputs.bundle import Bundle
from camanim.outputs.fmgcam import with_legend
from camanim.outputs.render import grid, save_png
from camanim.pipelines.animate import Animation, raw_stack, tile_size

__all__ = ["PERCENTILES", "Strip", "layer_csv", "layer_table", "params_png", "strip", "write_figures"]

PERCENTILES = tuple(range(0, 101, 10))


@dataclass(frozen=True)
class Strip:
    """The strip figure: layers at every 10th percentile of depth (paper Figs 4 and 5).

    Attributes:
        image: ``(H, W, 3)`` uint8 figure.
        percentiles: the depth percentile of each column (0, 10, ..., 100).
        positions: each column's frame position (0-based index into the kept layers).
        layers: each column's layer name.
        rows: each row's label, ``"<method> · <normalisation>"``.
    """

    image: np.ndarray = field(repr=False)
    percentiles: tuple[int, ...]
    positions: tuple[int, ...]
    layers: tuple[str, ...]
    rows: tuple[str, ...]

    @property
    def n_columns(self) -> int:
        """Number of columns (11)."""
        return len(self.percentiles)


def strip(anim: Animation, tile: int = 112) -> Strip:
    """The strip figure: layers at depth 0, 10, ..., 100 %, one row per method and normalisation.

    Args:
        anim: the animation.
        tile: tile size in pixels (longer side).

    Returns:
        A :class:`Strip`; its ``image`` has 11 columns per row.
    """
    n = len(anim.layers)
    positions = tuple(round(p / 100 * (n - 1)) for p in PERCENTILES)
    size = tile_size(tile, anim.size)
    rows, labels = [], []
    for m in anim.methods:
        if is_volume(anim):  # each tile the layer's view of the volume (slices, projections, frames)
            for nm in anim.norms:
                rows.append(list(volume_overlays(anim, m, nm, positions, max(size))))
                labels.append(f"{m} · {nm}")
            continue
        stack = shrink(raw_stack(anim, m, positions), size)
        for nm in anim.norms:
            rows.append(list(colour(anim, stack, m, nm, positions, size)))
            labels.append(f"{m} · {nm}")
    ex = anim.explanation
    title = f"{ex.model_name} · {anim.target_text()} · layers at every 10th percentile of depth ({n} layers)"
    image = grid(
        rows,
        row_titles=labels,
        col_titles=[f"{p}% · #{q + 1}" for p, q in zip(PERCENTILES, positions, strict=True)],
        title=title,
        style=style_of(anim),
    )
    if anim.fusion is not None:
        image = with_legend(anim.fusion, image, font_size=style_of(anim).font_size)
    return Strip(
        image=image,
        percentiles=PERCENTILES,
        positions=positions,
        layers=tuple(anim.layers[q].name for q in positions),
        rows=tuple(labels),
    )


def layer_table(anim: Animation) -> list[dict[str, Any]]:
    """One row per layer of ``layers.csv``: every kept layer, then skipped layers with the reason.

    Columns: ``frame`` (1-based, empty when skipped), ``index`` (in the forward pass), ``name``, ``type``,
    ``kind``, ``map_size``, ``params``, ``kept``, ``skipped`` (reason), and per method ``<m>_min``,
    ``<m>_max``, ``<m>_mean`` (after ReLU, upsampled: the values normalisation scales; FM-G-CAM: over its
    K class planes) and ``<m>_flags`` (``flat``, ``no_gradient``... joined by ``;``).
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    for p, layer in enumerate(anim.layers):
        row: dict[str, Any] = {
            "frame": p + 1,
            "index": layer.index,
            "name": layer.name,
            "type": layer.type,
            "kind": layer.kind,
            "map_size": map_size_text(layer),
            "params": layer.params,
            "kept": 1,
            "skipped": "",
        }
        for m in anim.methods:
            s = anim.stats[m][p]
            row |= {
                f"{m}_min": s.min,
                f"{m}_max": s.max,
                f"{m}_mean": s.mean,
                f"{m}_flags": ";".join(anim.flags(m, p)),
            }
        rows.append((layer.index, row))
    for layer, reason in anim.skipped:
        row = {
            "frame": "",
            "index": layer.index,
            "name": layer.name,
            "type": layer.type,
            "kind": layer.kind,
            "map_size": map_size_text(layer) if layer.is_spatial else "",
            "params": layer.params,
            "kept": 0,
            "skipped": reason,
        }
        for m in anim.methods:
            row |= {f"{m}_min": "", f"{m}_max": "", f"{m}_mean": "", f"{m}_flags": "skipped"}
        rows.append((layer.index, row))
    return [r for _, r in sorted(rows, key=lambda t: t[0])]


def layer_csv(anim: Animation) -> str:
    """The animation's :meth:`~camanim.animation.Animation.layer_table` as CSV text."""
    table = anim.layer_table()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def params_png(anim: Animation, dpi: int = 110) -> bytes:
    """The parameters of each kept layer on a log scale (paper Fig 3), as PNG bytes (matplotlib)."""
    params = np.array([layer.params for layer in anim.layers], np.float64)
    types = [layer.type for layer in anim.layers]
    x = np.arange(1, len(params) + 1)
    fig = Figure(figsize=(10, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    common = sorted({t for t in types}, key=lambda t: -types.count(t))
    palette = [f"C{k}" for k in range(10)]
    for k, t in enumerate(common):
        sel = np.array([tt == t and p > 0 for tt, p in zip(types, params, strict=True)])
        if sel.any():
            label = t if k < 9 else None
            ax.vlines(x[sel], 1, params[sel], colors=palette[min(k, 9)], lw=1.0, label=label)
            ax.plot(x[sel], params[sel], "o", ms=2, color=palette[min(k, 9)])
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)
    ax.set_xlim(0, len(params) + 1)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("parameters (log scale)")
    zero = int((params == 0).sum())
    ax.set_title(
        f"{anim.explanation.model_name}: parameters per layer"
        + (f" ({zero} layers without parameters not shown)" if zero else ""),
        fontsize=10,
    )
    if any(params > 0):
        ax.legend(fontsize=7, ncols=min(5, len(common)), loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_figures(anim: Animation, bundle: Bundle, skip_existing: bool) -> None:
    """Write ``strip.png``, ``layers.csv`` and ``params.png`` into ``bundle``.

    Args:
        anim: the animation (its :meth:`~camanim.animation.Animation.strip`, ``layer_csv`` and ``params_png``
            make the files).
        bundle: the bundle being written.
        skip_existing: keep a file an interrupted run already wrote (resuming from the same maps and settings).
    """
    extras: dict[str, tuple[str, Callable[[], bytes | str | np.ndarray]]] = {
        "strip.png": (
            "strip figure: layers at every 10th percentile of depth",
            lambda: anim.strip().image,
        ),
        "layers.csv": (
            "one row per layer: kept or skipped (why), sizes, raw ranges, flags",
            anim.layer_csv,
        ),
        "params.png": ("parameters per kept layer, log scale", anim.params_png),
    }
    for rel, (role, make) in extras.items():
        if skip_existing and bundle.exists(rel):
            bundle.file(rel, role)
            continue
        data = make()
        if isinstance(data, np.ndarray):
            save_png(bundle.file(rel, role), data)
        elif isinstance(data, str):
            bundle.write_text(rel, data, role)
        else:
            bundle.write_bytes(rel, data, role)
