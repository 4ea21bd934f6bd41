"""The files of layer embeddings (``camanim embed``): a bundle, its figures and video, and a resumable run.

A bundle holds:

* ``embeddings.npz``: per layer name, the kept vectors ``(N, min(D, max_dim))`` float32 (row ``i`` is image
  ``i`` of ``images.csv``); ``embeddings_full.npz`` the full pooled vectors, only when asked (``keep_full``);
* ``projections.npz``: per layer name, the aligned 2-D layout ``(M, 2)`` of the shown images (the rows of
  ``images.csv`` whose ``shown`` column is set, in that order);
* ``images.csv``: per image its id, label, the model's top-1 class and probability, and its row in the
  projections; ``thumbnails.png`` (or ``.jpg`` when large): the shown images' thumbnails, a sprite sheet;
* ``separability.csv`` (with labels; ``layers.csv`` without): per layer its kind, dimensions and k-NN,
  linear-probe and silhouette scores; ``separability.png``: those over depth, the best layer starred;
* ``cka.npy`` ``(L, L)`` and ``cka.png``: linear CKA between every pair of layers;
* ``embed.mp4``: the scatter of every layer in forward order; ``report.html``; ``manifest.json``.

:func:`run_embed` keeps each finished batch in the staging folder (``.embed-batches/``), so an interrupted
run continues with ``resume=True`` (``camanim embed --resume``) from the batches it had finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from camanim.compute.separability import METRIC_TITLES, METRICS
from camanim.errors import CamanimError
from camanim.outputs.bundle import REPORT, Bundle, atomic_write_bytes, open_bundle
from camanim.outputs.report import write_report
from camanim.outputs.report.tiles import encode, pack
from camanim.outputs.scatter import ScatterFrames, axis_limit, label_colors
from camanim.outputs.video import default_fps, open_writer
from camanim.pipelines.embed import BatchResult, Embeddings, embed
from camanim.pipelines.imageset import EmbedError

logger = logging.getLogger(__name__)

#: Finished batches of an interrupted run, in the bundle's staging folder (removed on success).
BATCHES = ".embed-batches"
#: Thumbnails sprite sheets above this size are stored as JPEG rather than PNG.
MAX_PNG_SPRITE = 4_000_000
SPRITE_COLUMNS = 64


# --------------------------------------------------------------------------------------------- resume


class NpzBatchCheckpoint:
    """A :class:`~camanim.pipelines.embed.BatchCheckpoint` in a folder: one ``.npz`` per finished batch and
    the run's settings in ``settings.json``, each written atomically."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def finished(self, fingerprint: Mapping[str, Any]) -> set[int]:
        settings = self.folder / "settings.json"
        if not settings.is_file():
            return set()
        try:
            before = json.loads(settings.read_text())
        except (OSError, ValueError):
            return set()
        if before != json.loads(json.dumps(dict(fingerprint))):
            changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            raise EmbedError(
                f"the interrupted run kept in {str(self.folder.parent)!r} used other settings "
                f"({', '.join(changed)}): rerun it with the same options, or without --resume to start again"
            )
        return {int(p.stem.split("_")[1]) for p in self.folder.glob("batch_*.npz")}

    def read(self, number: int) -> BatchResult | None:
        path = self.folder / f"batch_{number:06d}.npz"
        try:
            return _read_batch(path)
        except (
            OSError,
            ValueError,
            KeyError,
            zipfile.BadZipFile,
        ) as exc:  # a torn file: that batch runs again
            logger.warning("ignoring unreadable batch file %s (%s)", path, exc)
            return None

    def save(self, number: int, result: BatchResult, fingerprint: Mapping[str, Any]) -> None:
        settings = self.folder / "settings.json"
        if not settings.is_file():
            atomic_write_bytes(settings, json.dumps(dict(fingerprint)).encode())
        arrays = {
            "index": result.index,
            "predictions": result.predictions,
            "confidence": result.confidence,
            "shown": result.shown,
            "thumbnails": result.thumbnails,
        }
        if result.hsic is not None:
            arrays["hsic"] = result.hsic
        for i, (name, v) in enumerate(result.stored.items()):
            arrays[f"stored_{i}"] = v
            if result.full is not None:
                arrays[f"full_{i}"] = result.full[name]
        arrays["names"] = np.array(list(result.stored), dtype=str)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.folder / f"batch_{number:06d}.npz", buf.getvalue())


def _read_batch(path: Path) -> BatchResult:
    with np.load(path, allow_pickle=False) as z:
        names = [str(v) for v in z["names"]]
        full = {n: z[f"full_{i}"] for i, n in enumerate(names)} if "full_0" in z.files else None
        return BatchResult(
            index=z["index"],
            stored={n: z[f"stored_{i}"] for i, n in enumerate(names)},
            full=full,
            hsic=z["hsic"] if "hsic" in z.files else None,
            predictions=z["predictions"],
            confidence=z["confidence"],
            shown=z["shown"],
            thumbnails=z["thumbnails"],
        )


# -------------------------------------------------------------------------------------------- tables


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def layers_csv(emb: Embeddings) -> str:
    """Per layer: position, index, name, type, kind, pooled and stored dimensions, and its scores."""
    header = ["position", "index", "name", "type", "kind", "dim", "stored_dim"]
    if emb.separability is not None:
        header += list(METRICS)
    rows = []
    for i, layer in enumerate(emb.chosen):
        row = [
            i,
            layer.index,
            layer.name,
            layer.type,
            layer.kind,
            emb.dims[i],
            emb.vectors[layer.name].shape[1],
        ]
        if emb.separability is not None:
            row += [emb.separability[layer.name][m] for m in METRICS]
        rows.append(row)
    return _csv(header, rows)


def images_csv(emb: Embeddings) -> str:
    """Per image: its row, id, label, the model's top-1 class and probability, its row in the projections."""
    where = np.full(len(emb), -1)
    where[emb.shown] = np.arange(len(emb.shown))
    rows = [
        [
            i,
            emb.ids[i],
            None if emb.labels is None else emb.labels[i],
            int(emb.predictions[i]),
            emb.prediction_name(int(emb.predictions[i])),
            float(emb.confidence[i]),
            None if where[i] < 0 else int(where[i]),
        ]
        for i in range(len(emb))
    ]
    return _csv(["row", "id", "label", "prediction", "prediction_name", "confidence", "shown"], rows)


# ------------------------------------------------------------------------------------------- figures


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def chance_level(emb: Embeddings) -> float:
    """The accuracy of always answering the most frequent label."""
    y = emb.y
    return float(np.bincount(y).max() / len(y)) if y is not None else float("nan")


def plot_separability(emb: Embeddings, path: str | os.PathLike[str] | io.BytesIO) -> None:
    """``separability.png``: k-NN, probe and silhouette over depth; star: best k-NN layer; diamond: final."""
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(emb.chosen))
    colors = {"knn": "#2563eb", "probe": "#c2410c", "silhouette": "#16a34a"}
    for m in METRICS:
        ax.plot(xs, emb.curve(m), color=colors[m], lw=1.6, marker="." if len(xs) < 60 else None, ms=4,
                label=METRIC_TITLES[m])  # fmt: skip
    knn = emb.curve("knn")
    b, e = emb.best("knn"), emb.emergence("knn")
    ax.plot(xs[b], knn[b], marker="*", ms=15, color=colors["knn"], mec="k", ls="none")
    ax.annotate(
        f"best k-NN {knn[b]:.3f}\n{emb.chosen[b].name}", (xs[b], knn[b]), textcoords="offset points",
        xytext=(-8, -30), ha="right", fontsize=7, color=colors["knn"],
    )  # fmt: skip
    ax.plot(xs[-1], knn[-1], marker="D", ms=7, color=colors["knn"], mec="k", ls="none")
    ax.axvline(xs[e], color="0.4", lw=0.8, ls=":")
    ax.annotate(
        f"90% of the rise: {emb.chosen[e].name}", (xs[e], 0.0), xycoords=("data", "axes fraction"),
        textcoords="offset points", xytext=(3, 3), fontsize=7, color="0.3",
    )  # fmt: skip
    ax.axhline(chance_level(emb), color="0.5", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_ylim(min(-0.05, float(np.nanmin(emb.curve("silhouette"))) - 0.05), 1.04)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("separability")
    ax.set_title(
        f"Where class information appears: {emb.model_name}, {len(emb)} images, {len(emb.classes)} classes",
        fontsize=9, loc="left",
    )  # fmt: skip
    ax.legend(fontsize=7, loc="center right", frameon=False)
    fig.text(
        0.01, 0.01, "star: best k-NN layer; diamond: final layer; dashed: majority-class rate; dotted: where "
        "k-NN first reaches 90% of its rise from the first layer", fontsize=6.5, color="0.35", va="bottom",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, format="png")


def plot_cka(emb: Embeddings, path: str | os.PathLike[str] | io.BytesIO) -> None:
    """``cka.png``: linear CKA between every pair of layers, forward order on both axes."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    n = len(emb.chosen)
    im = ax.imshow(emb.cka, cmap="magma", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("layer (forward order)")
    ticks = sorted({0, n - 1, *range(0, n, max(1, n // 6))})
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(f"Layer-to-layer similarity: {emb.model_name}, {len(emb)} images", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------- video


def caption_lines(emb: Embeddings, i: int) -> list[str]:
    """The two caption lines of layer ``i``'s frame: name and shape, then its scores."""
    layer = emb.chosen[i]
    shape = "x".join(str(s) for s in layer.shape[1:])
    first = f"{i + 1}/{len(emb.chosen)}  {layer.name}  ({layer.type}, {shape}, {emb.dims[i]} dims)"
    if emb.separability is not None:
        s = emb.separability[layer.name]
        second = f"k-NN {s.knn:.3f} · probe {s.probe:.3f} · silhouette {s.silhouette:.3f}"
        if i == emb.best("knn"):
            second += "  (best k-NN layer)"
    else:
        second = "no labels: no separability scores"
    return [first, f"{second}   ·  {emb.projection.upper()}, aligned to the previous layer"]


def scatter_frames(emb: Embeddings) -> ScatterFrames:
    """The frame drawer of ``emb``'s animation (colours, limits, the strip's curves)."""
    layouts = [emb.projections[n] for n in emb.names]
    curves = {} if emb.separability is None else {m: emb.curve(m) for m in ("knn", "probe")}
    best = None if emb.separability is None else emb.best("knn")
    return ScatterFrames(emb.classes, label_colors(len(emb.classes)), curves, best, axis_limit(layouts))


def write_video(emb: Embeddings, path: str | os.PathLike[str], fps: int | None = None) -> Path:
    """``embed.mp4``: one frame per layer in forward order."""
    draw = scatter_frames(emb)
    y = emb.y
    labels = None if y is None else y[emb.shown]
    with open_writer(path, fps or default_fps(len(emb.chosen))) as w:
        for i, name in enumerate(emb.names):
            w.write(draw(emb.projections[name], labels, caption_lines(emb, i), i))
    return Path(path)


# -------------------------------------------------------------------------------------------- bundle


def _thumbnail_sheet(emb: Embeddings) -> tuple[bytes, str]:
    sheet = pack(emb.thumbnails, SPRITE_COLUMNS) if len(emb.thumbnails) else np.zeros((1, 1, 3), np.uint8)
    data = encode(sheet, "png")
    if len(data) > MAX_PNG_SPRITE:
        return encode(sheet, "jpeg", 90), "jpg"
    return data, "png"


def write_embeddings(emb: Embeddings, bundle: Bundle, *, video: bool = True, fps: int | None = None) -> None:
    """Write every file of ``emb`` into ``bundle`` and its manifest sections (``model``, ``layers``, ``embed``)."""
    bundle.save_npz(
        "embeddings.npz", emb.vectors, "kept vectors per layer (N, min(D, max_dim))", compress=False
    )
    if emb.full is not None:
        bundle.save_npz(
            "embeddings_full.npz", emb.full, "full pooled vectors per layer (N, D)", compress=False
        )
    bundle.save_npz("projections.npz", emb.projections, "aligned 2-D layout per layer (M, 2)", compress=False)
    bundle.write_text("images.csv", images_csv(emb), "images: id, label, prediction, row in the projections")
    sheet, ext = _thumbnail_sheet(emb)
    bundle.write_bytes(f"thumbnails.{ext}", sheet, "thumbnails of the shown images (sprite sheet)")
    table = "separability.csv" if emb.separability is not None else "layers.csv"
    bundle.write_text(table, layers_csv(emb), "per layer: dimensions and separability")
    bundle.save_npy("cka.npy", np.asarray(emb.cka, np.float64), "linear CKA between layers (L, L)")
    files: dict[str, Any] = {
        "vectors": "embeddings.npz",
        "projections": "projections.npz",
        "images": "images.csv",
        "thumbnails": f"thumbnails.{ext}",
        "table": table,
        "cka": "cka.npy",
    }
    if emb.full is not None:
        files["full"] = "embeddings_full.npz"
    if emb.separability is not None:
        plot_separability(emb, bundle.file("separability.png", "separability over depth"))
        files["separability_plot"] = "separability.png"
    plot_cka(emb, bundle.file("cka.png", "CKA heatmap"))
    files["cka_plot"] = "cka.png"
    if video:
        write_video(emb, bundle.file("embed.mp4", "scatter of every layer"), fps)
        files["video"] = "embed.mp4"
    bundle.manifest["model"] = {
        "name": emb.model_name,
        "weights": emb.weights,
        "preprocessing": emb.preprocessing.to_dict(),
    }
    bundle.manifest["layers"] = [layer.to_dict() for layer in emb.layers]
    bundle.manifest["chosen_layers"] = list(emb.names)
    thumbs = emb.thumbnails.shape
    bundle.manifest["embed"] = emb.describe() | {
        "files": files,
        "thumbnails": {
            "tile": int(thumbs[1]) if len(thumbs) > 1 else 0,
            "columns": SPRITE_COLUMNS,
            "count": int(thumbs[0]),
        },  # fmt: skip
        "colors": [[int(v) for v in c] for c in label_colors(len(emb.classes))],
    }


def _report_into(bundle: Bundle) -> None:
    try:
        write_report(bundle.path)
    except (CamanimError, ValueError, RuntimeError, KeyError, OSError) as exc:
        logger.warning("could not write report.html (%s); rerun: camanim report %s", exc, bundle.root)
        return
    bundle.file(REPORT, "interactive report (camanim report)")


def save_embeddings(
    emb: Embeddings,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    video: bool = True,
    report: bool = True,
    command: str = "",
) -> Path:
    """Write ``emb`` as a bundle at ``out`` (see the module docstring); also ``Embeddings.save``."""
    with open_bundle(out, force=force, command=command, finalize=_report_into if report else None) as bundle:
        write_embeddings(emb, bundle, video=video)
    return bundle.root


def run_embed(
    model: Any,
    images: Any,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    resume: bool = False,
    video: bool = True,
    report: bool = True,
    command: str = "",
    progress: Callable[[str, int, int], None] | None = None,
    **kwargs: Any,
) -> tuple[Embeddings, Path]:
    """Run :func:`~camanim.pipelines.embed.embed` into a bundle at ``out``, resumably.

    Each finished batch is kept in the staging folder (``.NAME.partial/.embed-batches/``); after an
    interruption the staging folder stays and ``resume=True`` runs only the missing batches (the same
    numbers as an uninterrupted run: batches and their order depend on the seed only).

    Args:
        model, images: as :func:`~camanim.pipelines.embed.embed`.
        out: the bundle folder.
        force: replace an existing camanim bundle; resume: continue an interrupted run.
        video: write ``embed.mp4``; report: write ``report.html``.
        command: the command line recorded in the manifest.
        progress: called with ``(stage, done, total)``.
        **kwargs: passed to :func:`~camanim.pipelines.embed.embed`.

    Returns:
        ``(embeddings, bundle path)``.
    """
    finalize = _report_into if report else None
    with open_bundle(
        out, force=force, resume=resume, resumable=True, command=command, finalize=finalize
    ) as bundle:
        folder = bundle.path / BATCHES
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        emb = embed(model, images, checkpoint=NpzBatchCheckpoint(folder), progress=progress, **kwargs)
        write_embeddings(emb, bundle, video=video)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)
    return emb, bundle.root
