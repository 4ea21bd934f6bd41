"""The report page of layer embeddings (``camanim embed``): scatter, separability curve and CKA heatmap.

One self-contained page, like every camanim report: the scatter of the current layer (a canvas; colour =
label; a slider, play/pause and the arrow keys move through the layers, the points gliding from one
layout to the next; hovering a point shows its thumbnail, id, label and the model's top-1 class; clicking
a legend entry highlights that class), the layer's facts and scores, the separability curve over depth
(k-NN, linear probe, silhouette; the best layer starred; click a point to go there) and the linear-CKA
heatmap (hover for a pair's value, click to go to a row's layer).

It is rendered from the bundle's files (:func:`view_from_bundle`: the manifest, ``projections.npz``,
``images.csv``, the thumbnails sprite sheet, ``cka.npy``) or from an :class:`~camanim.pipelines.embed.Embeddings`
in memory (:func:`view_from_embeddings`), never by running a model. Layouts travel as 16-bit integers and
CKA as 8-bit, base64 in a JSON block; every text goes through the template's autoescape or the script's
``textContent``; the Content-Security-Policy admits only the page's own script and style and ``data:``
images.
"""

from __future__ import annotations

import base64
import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import camanim.outputs.report.tiles as T
from camanim.compute.separability import METRIC_TITLES, METRICS
from camanim.errors import CamanimError
from camanim.outputs.bundle import read_manifest
from camanim.outputs.render import colormap_lut
from camanim.outputs.report.page import asset, csp_hash, markup, script_json
from camanim.outputs.report.source import _inside, dig, finite
from camanim.outputs.scatter import axis_limit, hex_color, label_colors
from camanim.outputs.video import default_fps
from camanim.pipelines.embed import Embeddings
from camanim.version import __version__

SPRITE_COLUMNS = 64


def is_embed_manifest(manifest: Mapping[str, Any]) -> bool:
    """Whether a manifest is an embedding bundle's (``camanim embed``)."""
    return isinstance(manifest.get("embed"), Mapping)


@dataclass
class EmbedView:
    """What the page shows.

    Attributes:
        manifest: the bundle's manifest (``model`` and ``embed`` sections at least).
        names: the layers, in forward order; ``layouts`` their aligned ``(M, 2)`` layouts.
        labels: per shown image its class index into ``manifest["embed"]["classes"]``, or ``None``.
        ids: per shown image its id; ``predictions`` the model's top-1 class (a name when known).
        sprite: the thumbnails sprite sheet (image file bytes), or ``None``.
        cka: ``(L, L)``.
        origin: a folder, or "memory".
    """

    manifest: dict
    names: list[str]
    layouts: list[np.ndarray]
    labels: np.ndarray | None
    ids: list[str]
    predictions: list[str]
    sprite: bytes | None
    cka: np.ndarray
    origin: str = "memory"


def view_from_bundle(folder: str | Path) -> EmbedView:
    """Read an embedding bundle's files (only those its manifest names, inside the folder)."""
    root = Path(folder).expanduser().absolute()
    m = read_manifest(root)
    files = dig(m, "embed", "files", default={}) or {}
    names = [str(n) for n in m.get("chosen_layers") or []]
    layouts: list[np.ndarray] = []
    p = _inside(root, files.get("projections"))
    if p is not None:
        with np.load(p, allow_pickle=False) as z:
            layouts = [np.asarray(z[n], np.float32) for n in names if n in z.files]
    if len(layouts) != len(names) or not names:
        raise CamanimError(
            f"{str(root)!r} is an embedding bundle without a 2-D layout for every layer (projections.npz): "
            "it cannot be reported; run camanim embed again"
        )
    classes = [str(c) for c in dig(m, "embed", "classes", default=[]) or []]
    index = {c: i for i, c in enumerate(classes)}
    rows: list[dict[str, str]] = []
    p = _inside(root, files.get("images"))
    if p is not None:
        with p.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("shown") or "").strip()]
        rows.sort(key=lambda r: int(r["shown"]))
    labels = None
    if classes and rows and all(r.get("label") in index for r in rows):
        labels = np.array([index[r["label"]] for r in rows], np.int64)
    p = _inside(root, files.get("cka"))
    cka = np.load(p, allow_pickle=False) if p is not None else np.full((len(names),) * 2, np.nan)
    p = _inside(root, files.get("thumbnails"))
    return EmbedView(
        manifest=m,
        names=names,
        layouts=layouts,
        labels=labels,
        ids=[r.get("id", "") for r in rows],
        predictions=[r.get("prediction_name") or r.get("prediction", "") for r in rows],
        sprite=p.read_bytes() if p is not None else None,
        cka=np.asarray(cka, np.float64),
        origin=str(root),
    )


def view_from_embeddings(emb: Embeddings) -> EmbedView:
    """An :class:`~camanim.pipelines.embed.Embeddings` in memory as a view (nothing is written)."""
    thumbs = emb.thumbnails
    sprite = T.encode(T.pack(thumbs, SPRITE_COLUMNS), "webp", 85) if len(thumbs) else None
    y = emb.y
    manifest = {
        "model": {
            "name": emb.model_name,
            "weights": emb.weights,
            "preprocessing": emb.preprocessing.to_dict(),
        },
        "embed": emb.describe()
        | {
            "thumbnails": {"tile": int(thumbs.shape[1]) if thumbs.ndim == 4 else 0, "columns": SPRITE_COLUMNS}
        },
        "chosen_layers": list(emb.names),
        "layers": [layer.to_dict() for layer in emb.layers],
        "command": "(in memory)",
    }
    return EmbedView(
        manifest=manifest,
        names=list(emb.names),
        layouts=[emb.projections[n] for n in emb.names],
        labels=None if y is None else y[emb.shown],
        ids=[emb.ids[i] for i in emb.shown],
        predictions=[emb.prediction_name(int(emb.predictions[i])) for i in emb.shown],
        sprite=sprite,
        cka=np.asarray(emb.cka, np.float64),
    )


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def page_data(view: EmbedView) -> dict[str, Any]:
    """The JSON the page's script reads (see ``embed.js``)."""
    e = view.manifest.get("embed") or {}
    per_layer = {str(r.get("name")): r for r in e.get("layers") or [] if isinstance(r, Mapping)}
    facts = {str(r.get("name")): r for r in view.manifest.get("layers") or [] if isinstance(r, Mapping)}
    layers = []
    for i, name in enumerate(view.names):
        r, f = per_layer.get(name, {}), facts.get(name, {})
        layers.append(
            {
                "name": name,
                "position": i,
                "index": r.get("index", f.get("index")),
                "type": str(r.get("type") or f.get("type") or ""),
                "kind": str(r.get("kind") or f.get("kind") or ""),
                "shape": "x".join(str(s) for s in (f.get("shape") or [])[1:]),
                "dim": r.get("dim"),
                "stored": r.get("stored_dim"),
            }
        )
    scores = None
    if all(m in next(iter(per_layer.values()), {}) for m in METRICS) and per_layer:
        scores = {m: [finite(per_layer.get(n, {}).get(m)) for n in view.names] for m in METRICS}
    sep = e.get("separability") or {}
    classes = [str(c) for c in e.get("classes") or []]
    colors = [hex_color(c) for c in label_colors(len(classes))]
    lim = axis_limit(view.layouts) if view.layouts else 1.0
    m = len(view.ids) if view.ids else (len(view.layouts[0]) if view.layouts else 0)
    q = np.stack(view.layouts) if view.layouts else np.zeros((0, m, 2))
    q = np.clip(np.round((np.nan_to_num(q) / lim + 1) / 2 * 65535), 0, 65535).astype("<u2")
    cka = np.asarray(view.cka, np.float64)
    c8 = np.where(np.isfinite(cka), np.clip(np.round(np.nan_to_num(cka) * 254), 0, 254), 255).astype(np.uint8)
    thumbs = dig(e, "thumbnails", default={}) or {}
    kind = T.image_format(view.sprite) if view.sprite else None
    counts = e.get("class_counts") or {}
    return {
        "layers": layers,
        "scores": scores,
        "titles": METRIC_TITLES,
        "best": {k: v.get("best_position") for k, v in sep.items()} if sep else None,
        "emerges": dig(sep, "knn", "emerges_at"),
        "chance": (max(counts.values()) / sum(counts.values())) if counts and sum(counts.values()) else None,
        "classes": classes,
        "colors": colors,
        "n": m,
        "labels": _b64(view.labels.astype("<u2")) if view.labels is not None else None,
        "ids": view.ids,
        "predictions": view.predictions,
        "layouts": _b64(q),
        "cka": _b64(c8),
        "lut": [hex_color(c) for c in colormap_lut("magma", 256)],
        "sprite": T.data_uri(view.sprite, kind) if kind else None,
        "tile": int(thumbs.get("tile") or 0),
        "columns": int(thumbs.get("columns") or SPRITE_COLUMNS),
        "fps": default_fps(len(view.names)),
        "projection": str(e.get("projection") or ""),
    }


def _provenance(view: EmbedView) -> list[tuple[str, str]]:
    m = view.manifest
    e = m.get("embed") or {}
    s = e.get("settings") or {}
    rows = [
        ("model", str(dig(m, "model", "name", default="?"))),
        ("weights", str(dig(m, "model", "weights", default="?"))),
        ("images", f"{e.get('images', '?')} from {e.get('source', '?')}"),
        ("labels", str(e.get("labels") or "none")),
        ("layers", f"{len(view.names)} (every layer with a map or a vector, forward order)"),
        ("pooling", "; ".join(f"{k}: {v}" for k, v in (s.get("pooling") or {}).items())),
        ("stored vectors", str(dig(s, "random_projection", "matrix", default="")) or "as pooled"),
        (
            "projection",
            f"{e.get('projection', '?')}, each layout centred, unit RMS radius, rotated onto the previous "
            "layer's by orthogonal Procrustes",
        ),  # fmt: skip
        (
            "separability",
            f"k-NN k={s.get('k')} leave-one-out; ridge linear probe, {s.get('folds')} stratified folds; "
            f"silhouette (Euclidean); on {s.get('metric_images_used', e.get('images'))} images",
        ),  # fmt: skip
        ("CKA", str(s.get("cka", ""))),
        (
            "batches",
            f"{s.get('batches')} of about {s.get('batch_size')} images, one forward each ({s.get('forwards')} run "
            f"now, {s.get('resumed_batches', 0)} resumed); seed {s.get('seed')}",
        ),  # fmt: skip
        (
            "timings",
            ", ".join(
                f"{k} {v:.2f} s" for k, v in (e.get("timings") or {}).items() if isinstance(v, (int, float))
            ),
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())),
        ("command", str(m.get("command") or "")),
        ("created", str(m.get("created") or "")),
        ("bundle", view.origin),
    ]
    return [(k, v) for k, v in rows if v and v != "None"]


def render_embed(view: EmbedView) -> str:
    """The report page of ``view`` as an HTML string."""
    import jinja2

    js = asset("embed.js")
    css = asset("report.css") + asset("embed.css")
    if "</script" in js.lower() or "</style" in css.lower():  # pragma: no cover - a packaging mistake
        raise RuntimeError("report assets must not contain a closing script or style tag")
    csp = (
        f"default-src 'none'; img-src data:; style-src {csp_hash(css)}; script-src {csp_hash(js)}; "
        "base-uri 'none'; form-action 'none'"
    )
    data = page_data(view)
    e = view.manifest.get("embed") or {}
    model = str(dig(view.manifest, "model", "name", default="model"))
    sep = e.get("separability") or {}
    summary = None
    if sep:
        knn = sep.get("knn") or {}
        summary = {
            "best": str(knn.get("best_layer", "?")),
            "max": finite(knn.get("max")),
            "first": finite(knn.get("first")),
            "final": finite(knn.get("final")),
            "emerges": view.names[knn["emerges_at"]] if isinstance(knn.get("emerges_at"), int) else "?",
        }
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    page = env.from_string(asset("embed.html.j2"))
    return page.render(
        title=f"camanim embeddings: {model} · {e.get('source', '')}",
        subtitle=" · ".join(
            str(v)
            for v in (
                f"{e.get('images', '?')} images",
                f"{len(data['classes'])} classes" if data["classes"] else "no labels",
                f"{len(view.names)} layers",
                f"{data['projection'].upper()} projection",
                view.manifest.get("created") or "",
            )
            if v
        ),
        version=__version__,
        csp=csp,
        css=markup(css),
        js=markup(js),
        classes=list(zip(data["classes"], data["colors"], strict=True)),
        summary=summary,
        labelled=data["scores"] is not None,
        provenance=_provenance(view),
        data_json=markup(script_json(data)),
        origin=view.origin,
    )
