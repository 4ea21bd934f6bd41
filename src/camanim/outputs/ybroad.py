"""ybROAD's files: ``ybroad.csv``, ``ybroad.json``, ``summary.csv`` (the CAManim paper's Table 2 columns),
``ybroad.png``, and a resumable bundle (:func:`save_ybroad`)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camanim.outputs.bundle import Bundle, atomic_write_bytes, open_bundle
from camanim.outputs.explanation import write_explanation
from camanim.pipelines.ybroad import SMOOTH_WINDOW, YbRoadResult, ybroad

#: Finished layers of an interrupted run, kept in the bundle's staging folder (removed on success).
CHECKPOINT = ".ybroad-checkpoint.json"


class JsonCheckpoint:
    """A :class:`~camanim.pipelines.ybroad.Checkpoint` in a JSON file, written atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> Mapping[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, state: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path, json.dumps(state).encode())


def save_result(
    res: YbRoadResult,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    command: str = "",
    smooth: int = SMOOTH_WINDOW,
) -> Path:
    """Write a bundle: explanation basics (no overlays) plus the ybROAD files (:func:`write_ybroad`); also
    ``YbRoadResult.save``."""
    with open_bundle(out, force=force, command=command) as bundle:
        write_explanation(res.explanation, bundle, overlays=False)
        bundle.manifest.pop("overlays", None)
        write_ybroad(res, bundle, smooth=smooth)
    return bundle.root


def _fmt_p(p: float) -> str:
    return f"{p:g}"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.9g}" if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def ybroad_csv(res: YbRoadResult) -> str:
    """``ybroad.csv``: one row per method and layer."""
    ps = [_fmt_p(p) for p in res.percentages]
    header = ["method", "position", "index", "name", "road"]
    header += [f"morf_{p}" for p in ps] + [f"lerf_{p}" for p in ps] + [f"removed_{p}" for p in ps]
    rows = []
    for m, r in res.results.items():
        for i, (layer, v) in enumerate(zip(r.layers, r.road, strict=True)):
            rows.append(
                [m, i, layer.index, layer.name, float(v)]
                + [float(a) for a in r.morf[i]]
                + [float(a) for a in r.lerf[i]]
                + [float(a) for a in r.removed]
            )
    return _csv_text(header, rows)


def summary_csv(res: YbRoadResult) -> str:
    """``summary.csv``: Table 2's columns, one row per method."""
    rows = res.summary_rows()
    header = list(rows[0]) if rows else []
    return _csv_text(header, [list(r.values()) for r in rows])


def plot_ybroad(res: YbRoadResult, path: str | os.PathLike[str], *, smooth: int = SMOOTH_WINDOW) -> None:
    """``ybroad.png``: ROAD against layer index per method, raw and smoothed, best and final layer marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    for k, (m, r) in enumerate(res.results.items()):
        col = colours[k % len(colours)]
        xs = np.array([layer.index for layer in r.layers])
        ax.plot(xs, r.road, color=col, lw=0.8, alpha=0.4, marker=".", ms=3, label=f"{m} (raw)")
        if smooth > 1 and len(r) > 2:
            ax.plot(xs, r.smoothed(smooth), color=col, lw=2.0, label=f"{m} (moving average, {smooth} layers)")
        b, f = r.best_position, r.final_position
        ax.plot(xs[b], r.road[b], marker="*", ms=14, color=col, mec="k", ls="none")
        ax.annotate(
            f"max {r.max:.3f}\n{r.best_layer.name}", (xs[b], r.road[b]), textcoords="offset points",
            xytext=(6, 6), fontsize=7, color=col,
        )  # fmt: skip
        ax.plot(xs[f], r.road[f], marker="D", ms=8, color=col, mec="k", ls="none")
        ax.annotate(
            f"final {r.final:.3f}", (xs[f], r.road[f]), textcoords="offset points", xytext=(-60, -14),
            fontsize=7, color=col,
        )  # fmt: skip
        ax.axhline(r.mean, color=col, lw=0.8, ls="--", alpha=0.7)
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.margins(x=0.04, y=0.2)
    ax.set_xlabel("layer index (forward order)")
    ax.set_ylabel("ROAD")
    ax.set_title(
        f"ybROAD: {res.model_name}, {res.image_name}, target {res.target_name!r} "
        f"(p = {', '.join(_fmt_p(p) for p in res.percentages)} %)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="best")
    ax.text(
        0.99, 0.01, "star: max ybROAD; diamond: final layer; dashed: mean", transform=ax.transAxes,
        ha="right", va="bottom", fontsize=7, color="0.3",
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


def write_ybroad(
    res: YbRoadResult, bundle: Bundle, *, smooth: int = SMOOTH_WINDOW, plot: bool = True
) -> None:
    """Write ``ybroad.csv``, ``ybroad.json``, ``ybroad.png``, ``summary.csv`` and the manifest's ``road``."""
    bundle.write_text("ybroad.csv", ybroad_csv(res), "ROAD per method and layer")
    summary = res.describe()
    summary["smoothing"] = {"plot_only": True, "moving_average_layers": smooth}
    bundle.write_json("ybroad.json", summary, "ybROAD summary per method")
    bundle.write_text("summary.csv", summary_csv(res), "Table 2 columns per method")
    if plot:
        plot_ybroad(res, bundle.file("ybroad.png", "ybROAD plot"), smooth=smooth)
    bundle.manifest["road"] = {
        **summary,
        "files": {"table": "ybroad.csv", "summary": "ybroad.json", "table2": "summary.csv"}
        | ({"plot": "ybroad.png"} if plot else {}),
        "results": {f"{m}/{name}": v for m, r in res.results.items() for name, v in r.as_dict().items()},
        "resumed": res.resumed,
    }


def save_ybroad(
    model: Any,
    image: Any,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    resume: bool = False,
    command: str = "",
    smooth: int = SMOOTH_WINDOW,
    **kwargs: Any,
) -> tuple[YbRoadResult, Path]:
    """Run :func:`ybroad` into a bundle at ``out``, resumably.

    Finished layers are checkpointed in the staging folder (``.NAME.partial/`` + :data:`CHECKPOINT`) as
    they complete; after an interruption the staging folder is kept and ``resume=True`` scores only the
    missing layers (the same numbers as an uninterrupted run: noise depends on the mask, not the order).

    Args:
        model, image: as :func:`ybroad`.
        out: bundle folder.
        force: replace an existing non-empty folder.
        resume: continue an interrupted run.
        command: the command line recorded in the manifest.
        smooth: moving-average window of the plot.
        **kwargs: passed to :func:`ybroad`.

    Returns:
        ``(result, bundle path)``.
    """
    with open_bundle(out, force=force, resume=resume, resumable=True, command=command) as bundle:
        ckpt = bundle.path / CHECKPOINT
        if not resume:
            with contextlib.suppress(FileNotFoundError):
                ckpt.unlink()
        res = ybroad(model, image, checkpoint=JsonCheckpoint(ckpt), **kwargs)
        write_explanation(res.explanation, bundle, overlays=False)
        bundle.manifest.pop("overlays", None)
        write_ybroad(res, bundle, smooth=smooth)
        with contextlib.suppress(FileNotFoundError):
            ckpt.unlink()
    return res, bundle.root
