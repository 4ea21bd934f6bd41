"""Study figures (PNG, matplotlib) and the self-contained study report (``study.html``).

* ``band_<model>.png``: per method, ROAD across the scored layers (forward order) as the mean over images
  with a band of +- one standard deviation and the 10th-90th percentile range; the final spatial layer is
  marked. For a checkpoint study, the last checkpoint.
* ``best_layers_<model>.png``: per method, a histogram of the best layer (arg-max ROAD) over images.
* ``epochs_<model>.png``: for a checkpoint study, per method, an epoch x layer heat map of the mean ROAD.
* ``claim_<model>.png``: per method, the distribution over images of (max ybROAD - final ROAD) and of the
  held-out difference, and of the best layer's relative depth: the CAManim paper's claim on many images
  (:mod:`camanim.pipelines.study.claim`, whose numbers are written to ``claim.csv`` and ``study.html``).

The report embeds the figures as base64 PNGs and escapes every string (jinja2 autoescape); it needs no file
besides itself.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camanim.outputs.bundle import atomic_write_bytes
from camanim.outputs.study.store import StudyStore
from camanim.pipelines.study.claim import ClaimRow, claim_table
from camanim.pipelines.study.units import StudyError

log = logging.getLogger(__name__)

REPORT_FILE = "study.html"
FIGURES_DIR = "figures"
CLAIM_CSV = "claim.csv"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _group(table: Any, keys: Sequence[str], aggs: Sequence[tuple]) -> list[dict[str, Any]]:
    """Arrow group-by (ordered, so ``first`` works), as a list of small dicts: the tables may be large."""
    if table.num_rows == 0:
        return []
    return table.group_by(list(keys), use_threads=False).aggregate(list(aggs)).to_pylist()


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _axes(fig: Any, n: int, **kwargs: Any) -> list[Any]:
    nr, nc = _grid(n)
    axes = fig.subplots(nr, nc, squeeze=False, **kwargs).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _layer_ticks(ax: Any, names: dict[int, str]) -> None:
    pos = sorted(names)
    if len(pos) <= 24:
        ax.set_xticks(pos)
        ax.set_xticklabels([names[p] for p in pos], rotation=60, ha="right", fontsize=6)
    ax.set_xlabel("scored layer (forward order)")


def _per_layer(layers: Any) -> list[dict[str, Any]]:
    """Per (model, checkpoint, method, layer position): ROAD mean, std, 10th/90th percentiles, images."""
    import pyarrow.compute as pc

    return _group(
        layers,
        ["model", "checkpoint_index", "checkpoint", "epoch", "method", "position"],
        [
            ("road", "mean"),
            ("road", "stddev"),
            ("road", "tdigest", pc.TDigestOptions(q=[0.1, 0.9])),
            ("road", "count"),
            ("layer_name", "first"),
            ("is_final", "max"),
        ],
    )


def _last_checkpoints(stats: list[dict[str, Any]]) -> dict[str, int]:
    last: dict[str, int] = {}
    for r in stats:
        last[r["model"]] = max(last.get(r["model"], -1), r["checkpoint_index"])
    return last


def plot_bands(stats: list[dict[str, Any]], folder: Path) -> list[tuple[Path, str]]:
    """``band_<model>.png`` per model from :func:`_per_layer` rows; returns ``(path, caption)`` pairs."""
    out = []
    for model, ck in _last_checkpoints(stats).items():
        rows = [r for r in stats if r["model"] == model and r["checkpoint_index"] == ck]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        nr, nc = _grid(len(methods))
        fig = _figure(4.2 * nc, 3.4 * nr + 0.6)
        for k, (ax, method) in enumerate(zip(_axes(fig, len(methods), sharey=True), methods, strict=True)):
            sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["position"])
            xs = np.array([r["position"] for r in sel])
            mean = np.array([r["road_mean"] for r in sel])
            std = np.array([r["road_stddev"] for r in sel])
            lo, hi = np.array([r["road_tdigest"] for r in sel], dtype=np.float64).T
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.15, lw=0, label="10th-90th percentile")
            ax.fill_between(xs, mean - std, mean + std, color="C0", alpha=0.3, lw=0, label="mean +- 1 std")
            ax.plot(xs, mean, color="C0", lw=1.6, marker=".", ms=4, label="mean")
            for r in sel:
                if r["is_final_max"]:
                    ax.axvline(r["position"], color="0.4", ls="--", lw=0.8)
            ax.axhline(0.0, color="0.6", lw=0.6)
            ax.set_title(f"{method} ({max(r['road_count'] for r in sel)} images)", fontsize=9)
            ax.set_ylabel("ROAD")
            _layer_ticks(ax, {r["position"]: r["layer_name_first"] for r in sel})
            if k == 0:
                ax.legend(fontsize=6, loc="best")
        ck_note = "" if ck < 0 else f", checkpoint {rows[0]['checkpoint']}"
        fig.suptitle(f"ybROAD across layers: {model}{ck_note} (dashed: final layer)", fontsize=10)
        fig.tight_layout()
        path = folder / f"band_{_safe(model)}.png"
        fig.savefig(path)
        out.append((path, f"ybROAD across layers, mean and spread over images: {model}{ck_note}"))
    return out


def plot_best_layers(summary: Any, stats: list[dict[str, Any]], folder: Path) -> list[tuple[Path, str]]:
    """``best_layers_<model>.png`` per model: histogram of the best layer over images, per method."""
    from matplotlib.ticker import MaxNLocator

    counts = _group(summary, ["model", "checkpoint_index", "method", "best_position"], [("unit", "count")])
    out = []
    for model, ck in _last_checkpoints(stats).items():
        rows = [r for r in counts if r["model"] == model and r["checkpoint_index"] == ck]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        nr, nc = _grid(len(methods))
        fig = _figure(4.2 * nc, 3.2 * nr + 0.6)
        for ax, method in zip(_axes(fig, len(methods), sharey=True), methods, strict=True):
            names = {
                r["position"]: r["layer_name_first"]
                for r in stats
                if r["model"] == model and r["checkpoint_index"] == ck and r["method"] == method
            }
            n = {r["best_position"]: r["unit_count"] for r in rows if r["method"] == method}
            xs = sorted(names) or sorted(n)
            ax.bar(xs, [n.get(p, 0) for p in xs], color="C1", width=0.8)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(method, fontsize=9)
            ax.set_ylabel("images")
            _layer_ticks(ax, names)
        fig.suptitle(f"Best layer (max ROAD) per image: {model}", fontsize=10)
        fig.tight_layout()
        path = folder / f"best_layers_{_safe(model)}.png"
        fig.savefig(path)
        out.append((path, f"Histogram of the best layer over images: {model}"))
    return out


def plot_epochs(stats: list[dict[str, Any]], folder: Path) -> list[tuple[Path, str]]:
    """``epochs_<model>.png`` per model with several checkpoints: epoch x layer heat map of mean ROAD."""
    out = []
    for model in dict.fromkeys(r["model"] for r in stats):
        rows = [r for r in stats if r["model"] == model and r["checkpoint_index"] >= 0]
        cks = sorted({r["checkpoint_index"] for r in rows})
        if len(cks) < 2:
            continue
        epochs = {r["checkpoint_index"]: r["epoch"] for r in rows}
        methods = list(dict.fromkeys(r["method"] for r in rows))
        nr, nc = _grid(len(methods))
        fig = _figure(4.6 * nc, 0.25 * len(cks) * nr + 2.6 * nr)
        for ax, method in zip(_axes(fig, len(methods)), methods, strict=True):
            sel = [r for r in rows if r["method"] == method]
            names = {r["position"]: r["layer_name_first"] for r in sel}
            pos = sorted(names)
            grid = np.full((len(cks), len(pos)), np.nan)
            for r in sel:
                grid[cks.index(r["checkpoint_index"]), pos.index(r["position"])] = r["road_mean"]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
            ax.set_yticks(range(len(cks)))
            ax.set_yticklabels([str(epochs[c]) for c in cks], fontsize=6)
            ax.set_ylabel("epoch")
            if len(pos) <= 24:
                ax.set_xticks(range(len(pos)))
                ax.set_xticklabels([names[p] for p in pos], rotation=60, ha="right", fontsize=6)
            ax.set_xlabel("scored layer (forward order)")
            ax.set_title(method, fontsize=9)
            fig.colorbar(im, ax=ax, label="mean ROAD")
        fig.suptitle(f"Epoch-wise ybROAD: {model}", fontsize=10)
        fig.tight_layout()
        path = folder / f"epochs_{_safe(model)}.png"
        fig.savefig(path)
        out.append((path, f"Epoch x layer heat map of the mean ROAD over images: {model}"))
    return out


def study_claim(store: StudyStore) -> list[ClaimRow]:
    """The claim's numbers of a study (:func:`camanim.pipelines.study.claim.claim_table`)."""
    summary = store.read_summary()
    if summary.num_rows == 0:
        return []
    cols = ["model", "checkpoint_index", "checkpoint", "method", "image", "position", "road", "layer_name"]
    return claim_table(summary.to_pylist(), store.read_layers().select(cols).to_pylist())


def write_claim(study_dir: str | os.PathLike[str]) -> tuple[Path, list[ClaimRow]]:
    """Write ``STUDY_DIR/claim.csv`` (one row per model, checkpoint and method); returns it and the rows."""
    store = StudyStore(Path(study_dir))
    rows = study_claim(store)
    buf = io.StringIO()
    dicts = [r.to_dict() for r in rows]
    if dicts:
        w = csv.DictWriter(buf, fieldnames=list(dicts[0]), lineterminator="\n")
        w.writeheader()
        for d in dicts:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in d.items()})
    path = store.root / CLAIM_CSV
    atomic_write_bytes(path, buf.getvalue().encode())
    return path, rows


def plot_claim(summary: Any, layers: Any, claim: list[ClaimRow], folder: Path) -> list[tuple[Path, str]]:
    """``claim_<model>.png`` per model: per method, (max - final) and the held-out difference over images,
    and a histogram of the best layer's relative depth (last checkpoint)."""
    rows = summary.to_pylist()
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model]
        last = max(r["checkpoint_index"] for r in sel)
        sel = [r for r in sel if r["checkpoint_index"] == last]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        fig = _figure(10, 3.6)
        ax1, ax2 = fig.subplots(1, 2)
        diffs = [[r["difference"] for r in sel if r["method"] == m] for m in methods]
        ax1.boxplot(diffs, positions=np.arange(len(methods)) * 2.0, widths=0.6)
        held = {c.method: c for c in claim if c.model == model}
        for i, m in enumerate(methods):
            ax1.plot(np.full(len(diffs[i]), 2.0 * i), diffs[i], ".", color="C0", alpha=0.6)
            c = held.get(m)
            if c is not None and np.isfinite(c.held_out_mean):
                lo, hi = c.held_out_ci
                ax1.errorbar(2.0 * i + 0.8, c.held_out_mean, yerr=[[c.held_out_mean - lo], [hi - c.held_out_mean]],
                             fmt="s", color="C3", capsize=3)  # fmt: skip
        ax1.axhline(0, color="0.5", lw=0.6)
        ax1.set_xticks(np.arange(len(methods)) * 2.0 + 0.4)
        ax1.set_xticklabels(methods, fontsize=7, rotation=30)
        ax1.set_ylabel("ROAD difference")
        ax1.set_title("max ybROAD - final ROAD (box, dots: images);\nheld-out layer - final (red: mean, 95 % CI)",
                      fontsize=8)  # fmt: skip
        bins = np.linspace(0, 1, 11)
        for i, m in enumerate(methods):
            depth = [r["best_position"] / max(r["layers"] - 1, 1) for r in sel if r["method"] == m]
            ax2.hist(depth, bins=bins, histtype="step", lw=1.5, color=f"C{i % 10}", label=m)
        ax2.set_xlabel("best layer's relative depth (0 = first scored layer, 1 = final)")
        ax2.set_ylabel("images")
        ax2.legend(fontsize=7)
        fig.suptitle(
            f"Is the best layer the last? {model}, {len({r['image'] for r in sel})} images", fontsize=10
        )
        fig.tight_layout()
        path = folder / f"claim_{_safe(model)}.png"
        fig.savefig(path)
        out.append((path, f"The CAManim paper's claim over the study's images: {model}"))
    return out


def plot_study(study_dir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """Render every figure of a study into ``STUDY_DIR/figures``; returns ``(path, caption)`` pairs."""

    store = StudyStore(Path(study_dir))
    layers, summary = store.read_layers(), store.read_summary()
    folder = store.root / FIGURES_DIR
    folder.mkdir(exist_ok=True)
    if summary.num_rows == 0:
        return []
    stats = _per_layer(layers)
    claim = study_claim(store)
    return (
        plot_bands(stats, folder)
        + plot_best_layers(summary, stats, folder)
        + plot_epochs(stats, folder)
        + plot_claim(summary, layers, claim, folder)
    )


SUMMARY_STATS = ("mean_layerwise_road", "max_ybroad", "final_layer_road", "difference")


def aggregate(summary: Any) -> list[dict[str, Any]]:
    """Per (model, checkpoint, method): images, mean and std of the summary numbers, the most frequent best layer."""
    keys = ["model", "checkpoint_index", "checkpoint", "epoch", "method"]
    rows = _group(
        summary,
        keys,
        [("unit", "count")] + [(c, a) for c in SUMMARY_STATS for a in ("mean", "stddev")],
    )
    best: dict[tuple, tuple[int, str]] = {}
    for r in _group(summary, [*keys, "best_layer_name"], [("unit", "count")]):
        k = tuple(r[c] for c in keys)
        best[k] = max(best.get(k, (0, "")), (r["unit_count"], r["best_layer_name"]))
    out = []
    for r in rows:
        n_best, name = best[tuple(r[c] for c in keys)]
        out.append(
            {
                "model": r["model"],
                "checkpoint": r["checkpoint"],
                "epoch": r["epoch"],
                "method": r["method"],
                "images": r["unit_count"],
                **{c: (r[f"{c}_mean"], r[f"{c}_stddev"]) for c in SUMMARY_STATS},
                "best_layer": name,
                "best_share": n_best / r["unit_count"],
            }
        )
    return out


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>camanim study: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
code, pre { font-size: 0.85em; } pre { white-space: pre-wrap; max-height: 12em; overflow: auto; background: #f8f8f8; }
</style></head><body>
<h1>ybROAD study</h1>
<p>{{ title }}: {{ done }} of {{ units }} units in the store{% if failed %}, {{ failed }} failed{% endif %}.
Results: <code>layers/*.parquet</code> (one row per image, model, checkpoint, method and layer),
<code>summary/*.parquet</code> and <code>summary.csv</code> (one row per image, model, checkpoint and method).</p>
<h2>Settings</h2>
<table>{% for k, v in settings %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<h2>Summary (mean +- std over images)</h2>
<table><tr><th>model</th><th>checkpoint</th><th>method</th><th>images</th><th>mean layer-wise ROAD</th>
<th>max ybROAD</th><th>final-layer ROAD</th><th>max - final</th><th>most frequent best layer</th></tr>
{% for r in rows %}<tr><td>{{ r.model }}</td><td>{{ r.checkpoint or "-" }}</td><td>{{ r.method }}</td>
<td class="n">{{ r.images }}</td>
{% for c in ["mean_layerwise_road", "max_ybroad", "final_layer_road", "difference"] %}
<td class="n">{{ "%.4f"|format(r[c][0]) }} &plusmn; {{ "%.4f"|format(r[c][1]) }}</td>{% endfor %}
<td>{{ r.best_layer }} ({{ "%.0f"|format(100 * r.best_share) }} %)</td></tr>{% endfor %}
</table>
{% if claim %}<h2>Is the best layer the last? (the CAManim paper's claim over these images)</h2>
<p>Per model and method over the images: (max ybROAD &minus; final-layer ROAD) with a bootstrap 95 % CI and the
one-sided Wilcoxon signed-rank p of &ldquo;max &gt; final&rdquo; (the max is taken on the same image, so this
difference is never negative and is lifted by ROAD's noise); the <em>held-out</em> difference, where each image's
layer is the one of highest mean ROAD over the <em>other</em> images (leave-one-out), against the final layer,
with its CI, wins and Wilcoxon p; and the best layer's relative depth (0 first, 1 final).</p>
<table><tr><th>model</th><th>method</th><th>images</th><th>max &minus; final: mean [95 % CI]</th><th>Wilcoxon p</th>
<th>held-out &minus; final: mean [95 % CI]</th><th>wins</th><th>Wilcoxon p</th><th>held-out layer (most chosen)</th>
<th>best depth: mean / median</th><th>best is final</th></tr>
{% for c in claim %}<tr><td>{{ c.model }}</td><td>{{ c.method }}</td><td class="n">{{ c.images }}</td>
<td class="n">{{ "%.4f"|format(c.difference_mean) }} [{{ "%.4f"|format(c.difference_ci[0]) }}, {{ "%.4f"|format(c.difference_ci[1]) }}]</td>
<td class="n">{{ "%.2g"|format(c.wilcoxon_max_vs_final_p) }}</td>
<td class="n">{{ "%.4f"|format(c.held_out_mean) }} [{{ "%.4f"|format(c.held_out_ci[0]) }}, {{ "%.4f"|format(c.held_out_ci[1]) }}]</td>
<td class="n">{{ c.held_out_wins }}/{{ c.images }}</td><td class="n">{{ "%.2g"|format(c.held_out_wilcoxon_p) }}</td>
<td>{{ c.held_out_layer }}</td>
<td class="n">{{ "%.2f"|format(c.best_depth_mean) }} / {{ "%.2f"|format(c.best_depth_median) }}</td>
<td class="n">{{ "%.0f"|format(100 * c.best_is_final_share) }} %</td></tr>{% endfor %}
</table>{% endif %}
{% for f in figures %}<figure><img alt="{{ f.caption }}" src="data:image/png;base64,{{ f.data }}">
<figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% if failures %}<h2>Failed units</h2>
<table><tr><th>image</th><th>model</th><th>checkpoint</th><th>method</th><th>attempts</th><th>error</th></tr>
{% for f in failures %}<tr><td>{{ f.image }}</td><td>{{ f.model }}</td><td>{{ f.checkpoint or "-" }}</td>
<td>{{ f.method }}</td><td class="n">{{ f.attempts }}</td><td><pre>{{ f.error }}</pre></td></tr>{% endfor %}
</table>{% endif %}
<p><small>Versions: {{ versions }}</small></p>
</body></html>
"""


def write_study_report(study_dir: str | os.PathLike[str], *, figures: bool = True) -> Path:
    """Render ``STUDY_DIR/study.html``: settings, summary table, figures (embedded), failed units.

    Args:
        study_dir: a study folder (see :func:`camanim.study.run_study`).
        figures: (re)render the figures first; otherwise embed the PNGs already in ``figures/``.

    Returns:
        The report's path.

    Raises:
        StudyError: the folder holds no study.
    """
    import jinja2

    store = StudyStore(Path(study_dir))
    cfg = store.read_config()
    if cfg is None:
        raise StudyError(f"{str(study_dir)!r} holds no study (no study.json)")
    if figures:
        figs = plot_study(store.root)
    else:
        figs = [(p, p.stem.replace("_", " ")) for p in sorted((store.root / FIGURES_DIR).glob("*.png"))]
    summary = store.read_summary()
    settings = dict(cfg.get("settings", {}))
    inputs = dict(cfg.get("inputs", {}))
    shown = [
        ("images", f"{inputs.get('images', '?')} ({inputs.get('image_count', '?')} images, {inputs.get('labelled', 0)} labelled)"),
        ("models", ", ".join(inputs.get("models", []))),
        ("methods", ", ".join(inputs.get("methods", []))),
        ("checkpoints", f"{len(inputs.get('checkpoints', []))}"),
    ] + [(k, v) for k, v in settings.items()]  # fmt: skip
    failures = store.failures()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_TEMPLATE).render(
        title=store.root.name,
        done=summary.num_rows,
        units=inputs.get("units", summary.num_rows),
        failed=len(failures),
        settings=shown,
        rows=aggregate(summary) if summary.num_rows else [],
        claim=write_claim(store.root)[1] if summary.num_rows else [],
        figures=[{"caption": c, "data": base64.b64encode(p.read_bytes()).decode("ascii")} for p, c in figs],
        failures=list(failures.values()),
        versions=", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items()),
    )
    path = store.root / REPORT_FILE
    atomic_write_bytes(path, page.encode("utf-8"))
    log.info("study report: %s", path)
    return path
