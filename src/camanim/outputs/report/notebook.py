"""Notebook display: results rendered as HTML for Jupyter's ``_repr_html_``.

An explanation is an overlay grid (methods x layers), an animation the report's interactive viewer inside a
sandboxed ``<iframe srcdoc>`` (its script and styles stay isolated from the notebook), ybROAD its plot and
summary table, embeddings their report page (scatter, separability curve, CKA heatmap).
"""

from __future__ import annotations

import html
from typing import Any

import camanim.outputs.report.tiles as T
from camanim.outputs.render import colormap_lut
from camanim.outputs.report import render
from camanim.outputs.report.embed import render_embed, view_from_embeddings
from camanim.outputs.report.source import from_animation, from_explanation
from camanim.outputs.report.viewer import relu, resize_display
from camanim.outputs.ybroad import plot_ybroad


def iframe(page: str, height: int = 900) -> str:
    """A full report page inside a sandboxed ``<iframe srcdoc>``: its script and styles stay isolated."""
    return (
        f'<div><iframe sandbox="allow-scripts" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:1px solid #ddd"></iframe></div>'
    )


def animation_html(anim: Any, *, tile: int | None = None, height: int = 900) -> str:
    """The report viewer of an in-memory :class:`~camanim.animation.Animation`, for ``_repr_html_``."""

    return iframe(render(from_animation(anim), tile=tile), height)


def explanation_html(ex: Any, *, columns: int = 11, tile: int = 112, sample: int = 0) -> str:
    """An :class:`~camanim.explanation.Explanation` as an overlay grid (methods x layers), for ``_repr_html_``.

    With more than ``columns`` layers, the layers at every 10th percentile of depth are shown. Each tile is
    scaled by its own range (local normalisation).
    """

    src = from_explanation(ex, sample)
    chosen = [layer.name for layer in ex.chosen]
    n = len(chosen)
    if n > columns:
        picks = sorted({round(k / (columns - 1) * (n - 1)) for k in range(columns)})
    else:
        picks = list(range(n))
    names = [chosen[p] for p in picks]
    in_hw = (int(ex.input.shape[-2]), int(ex.input.shape[-1]))
    size = T.tile_size(in_hw, tile)
    display = resize_display(src.display, size)
    lut = colormap_lut("jet")
    head = "".join(
        f"<th title='{html.escape(nm)}'>{p + 1}. {html.escape(nm)}</th>"
        for p, nm in zip(picks, names, strict=True)
    )
    rows = []
    for m in ex.methods:
        maps = [src.maps(f"{m}/{nm}")[sample] for nm in names]
        ranges = T.map_ranges(maps, in_hw, relu(m))
        chunk = next(
            T.overlay_tiles(
                maps,
                {"local": ranges},
                in_hw=in_hw,
                tile=size,
                display=display,
                lut=lut,
                alpha=0.5,
                relu=relu(m),
            )
        )
        cells = "".join(
            f"<td><img width='{size[1]}' height='{size[0]}' alt='{html.escape(m)} at {html.escape(nm)}' "
            f"src='{T.data_uri(T.encode(t, 'jpeg', 85), 'jpeg')}'></td>"
            for t, nm in zip(chunk["local"], names, strict=True)
        )
        rows.append(f"<tr><th>{html.escape(m)}</th>{cells}</tr>")
    c = ex.targets[sample]
    p = float(ex.probabilities[sample, c]) if c < ex.probabilities.shape[1] else float("nan")
    caption = (
        f"{html.escape(ex.model_name)}: {html.escape(ex.target_names[sample])} (p={p:.3f}); "
        f"{len(names)} of {n} layers, local normalisation"
    )
    return (
        f"<table style='border-collapse:collapse;font-size:11px'><caption style='text-align:left'>{caption}</caption>"
        f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def embed_html(emb: Any, *, height: int = 1000) -> str:
    """An :class:`~camanim.pipelines.embed.Embeddings` as its report page (scatter with a layer slider,
    separability curve, CKA heatmap), for ``_repr_html_``."""
    return iframe(render_embed(view_from_embeddings(emb)), height)


def ybroad_html(res: Any) -> str:
    """A :class:`~camanim.road.ybroad.YbRoadResult` as its plot and summary table, for ``_repr_html_``."""
    import io

    buf = io.BytesIO()
    plot_ybroad(res, buf)
    rows = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['mean_layerwise_road']:.4f}</td>"
        f"<td>{r['final_layer_road']:.4f}</td><td>{r['max_ybroad']:.4f}</td><td>{r['difference']:.4f}</td>"
        f"<td>{html.escape(str(r['best_layer']))} (index {r['best_index']})</td></tr>"
        for r in res.summary_rows()
    )
    return (
        f"<figure style='margin:0'><img style='max-width:100%' alt='ybROAD' src='{T.data_uri(buf.getvalue(), 'png')}'>"
        "<table><tr><th>method</th><th>mean ROAD</th><th>final</th><th>max</th><th>max-final</th><th>best layer</th></tr>"
        f"{rows}</table></figure>"
    )
