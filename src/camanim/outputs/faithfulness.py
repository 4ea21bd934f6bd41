"""Files of a layer-wise faithfulness run: ``faithfulness.csv`` (every metric of every layer),
``faithfulness.json``, ``summary.csv`` (per method the best layer by each metric, and Table 2's ROAD
columns), ``curves.npz`` (ROAD's MoRF/LeRF, the deletion and insertion curves, ``Y`` and ``O`` per layer),
``faithfulness.png`` (each metric's curve on the layer axis) and ``agreement.png`` (rank correlation of the
metrics' layer rankings); with ROAD among the metrics also ybROAD's files, so the report's viewer shows each
layer's ROAD."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camanim.compute.metrics.faithfulness import METRICS
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.explanation import write_explanation
from camanim.outputs.ybroad import write_ybroad
from camanim.pipelines.faithfulness import FaithfulnessResult

__all__ = [
    "faithfulness_csv",
    "plot_agreement",
    "plot_faithfulness",
    "save_result",
    "summary_csv",
    "write_faithfulness",
]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.9g}" if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def faithfulness_csv(res: FaithfulnessResult) -> str:
    """One row per method and layer: every metric's value."""
    header = ["method", "position", "index", "name", *res.metrics]
    rows = []
    for m, per in res.series.items():
        first = next(iter(per.values()))
        for i, layer in enumerate(first.layers):
            rows.append([m, i, layer.index, layer.name, *(float(per[n].values[i]) for n in res.metrics)])
    return _csv_text(header, rows)


def summary_csv(res: FaithfulnessResult) -> str:
    """One row per method: the best layer and value by each metric, the final layer's value (and Table 2's
    ROAD columns when ROAD was scored)."""
    rows = res.summary_rows()
    header = list(rows[0]) if rows else []
    return _csv_text(header, [list(r.values()) for r in rows])


def curves(res: FaithfulnessResult) -> dict[str, np.ndarray]:
    """The raw curves per method: ``<method>/morf`` and ``/lerf`` ``(L, P)``, ``/deletion`` and
    ``/insertion`` ``(L, S + 1)`` with ``fractions`` ``(S + 1,)``, ``/masked_probability`` ``(L,)``."""
    out: dict[str, np.ndarray] = {}
    for m, s in res.scores.items():
        if s.road is not None:
            out[f"{m}/morf"], out[f"{m}/lerf"] = s.road.morf, s.road.lerf
            out["percentages"] = np.asarray(s.road.percentages)
        if s.deletion is not None:
            out[f"{m}/deletion"], out[f"{m}/insertion"] = s.deletion.deletion, s.deletion.insertion
            out["fractions"] = s.deletion.fractions
        if s.confidence is not None:
            out[f"{m}/masked_probability"] = s.confidence.masked_probability
    return out


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def plot_faithfulness(res: FaithfulnessResult, path: str | os.PathLike[str]) -> None:
    """``faithfulness.png``: one panel per metric, its value against the layer index, one line per method;
    star: the best layer (by the metric's direction), diamond: the final layer."""
    n = len(res.metrics)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = _figure(4.4 * cols, 2.9 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, name in zip(axes, res.metrics, strict=False):
        info = METRICS[name]
        for k, (m, per) in enumerate(res.series.items()):
            s = per[name]
            col = f"C{k % 10}"
            xs = np.array([layer.index for layer in s.layers])
            ax.plot(xs, s.values, color=col, lw=1.0, marker=".", ms=3, label=m)
            b, f = s.best_position, s.final_position
            ax.plot(xs[b], s.values[b], marker="*", ms=11, color=col, mec="k", ls="none")
            ax.plot(xs[f], s.values[f], marker="D", ms=6, color=col, mec="k", ls="none")
        ax.set_title(f"{info.label} ({'higher' if info.higher_is_better else 'lower'} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(x=0.03, y=0.15)
    axes[0].legend(fontsize=7, loc="best")
    for ax in axes[max(0, n - cols) : n]:
        ax.set_xlabel("layer index (forward order)", fontsize=8)
    fig.suptitle(
        f"Faithfulness of every layer's map: {res.model_name}, {res.image_name}, target {res.target_name!r} "
        "(star: best layer, diamond: final layer)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)


def plot_agreement(res: FaithfulnessResult, path: str | os.PathLike[str]) -> None:
    """``agreement.png``: per method, the Spearman correlation between the metrics' layer rankings (each
    oriented so that higher is better; grey where a metric is constant over the layers)."""
    methods = res.methods
    m = len(res.metrics)
    size = 0.5 * m + 2.2
    fig = _figure(size * len(methods) + 0.8, size + 0.6)
    axes = fig.subplots(1, len(methods), squeeze=False).ravel()
    im = None
    for ax, method in zip(axes, methods, strict=True):
        names, mat = res.agreement(method)
        shown = np.ma.masked_invalid(mat)
        im = ax.imshow(shown, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_facecolor("0.85")
        labels = [METRICS[n].label for n in names]
        ax.set_xticks(range(m))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(m))
        ax.set_yticklabels(labels, fontsize=7)
        for i in range(m):
            for j in range(m):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(method, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="Spearman rank correlation of layer rankings")
    fig.suptitle("Where the metrics agree on which layer explains best", fontsize=9)
    fig.savefig(path, bbox_inches="tight")


def write_faithfulness(res: FaithfulnessResult, bundle: Bundle, *, plot: bool = True) -> None:
    """Write the faithfulness files into ``bundle`` and its manifest's ``faithfulness`` section (and, with
    ROAD among the metrics, ybROAD's files and ``road`` section)."""
    if "road" in res.metrics:
        write_ybroad(res.ybroad(), bundle, plot=plot)
    bundle.write_text("faithfulness.csv", faithfulness_csv(res), "every metric of every layer")
    summary = res.describe()
    bundle.write_json("faithfulness.json", summary, "faithfulness summary per method and metric")
    bundle.write_text("summary.csv", summary_csv(res), "best layer per metric, per method")
    bundle.save_npz("curves.npz", curves(res), "raw curves per method (MoRF/LeRF, deletion/insertion)")
    files = {
        "table": "faithfulness.csv",
        "summary": "faithfulness.json",
        "best_layers": "summary.csv",
        "curves": "curves.npz",
    }
    if plot:
        plot_faithfulness(res, bundle.file("faithfulness.png", "every metric on the layer axis"))
        plot_agreement(res, bundle.file("agreement.png", "rank agreement between metrics"))
        files.update(plot="faithfulness.png", agreement="agreement.png")
    bundle.manifest["faithfulness"] = {**summary, "files": files}


def save_result(
    res: FaithfulnessResult,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    command: str = "",
    finalize: Any = None,
) -> Path:
    """Write a bundle: explanation basics (no overlays) plus the faithfulness files; also
    ``FaithfulnessResult.save``."""
    with open_bundle(out, force=force, command=command, finalize=finalize) as bundle:
        write_explanation(res.explanation, bundle, overlays=False)
        bundle.manifest.pop("overlays", None)
        write_faithfulness(res, bundle)
    return bundle.root
