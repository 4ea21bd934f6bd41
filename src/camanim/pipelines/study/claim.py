"""The CAManim paper's claim tested on a set of images: is the best layer often not the last, and by how much?

The paper (Kaczmarek et al. 2024, Table 2) reports, for one image per row, the mean layer-wise ROAD, the final
layer's ROAD and the max ybROAD. Over a study's images, per model, checkpoint and method
(:func:`claim_table`):

* **max - final**: the distribution of (max ybROAD - final-layer ROAD): mean with a bootstrap 95 % CI,
  median, and the one-sided Wilcoxon signed-rank test of "max > final". The max is taken over the layers
  *of the same image*, so it is never below the final layer's ROAD and is lifted by ROAD's own noise: this
  test only says that the differences are not all zero.
* **held out**: the honest version. For each image the layer is chosen on the *other* images (the layer
  position of the highest mean ROAD over them, leave-one-out), and that layer's ROAD on this image is
  compared with the final layer's: mean difference with a bootstrap CI, and the one-sided Wilcoxon test of
  "chosen > final" (zero differences dropped, as ``scipy.stats.wilcoxon``'s default). A small p-value means
  a layer picked in advance beats the final layer on new images.
* **best layer's relative depth**: position of the arg-max layer among the scored layers, 0 = first,
  1 = final; its mean and median, and the share of images whose best layer is the final one.
* The Table 2 columns averaged over images (mean layer-wise ROAD, final ROAD, max ybROAD).

Example:
    >>> from camanim.pipelines.study.claim import claim_table
    >>> rows = claim_table(summary_rows, layer_rows)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BOOTSTRAP", "ClaimRow", "bootstrap_ci", "claim_table", "held_out_differences"]

#: Bootstrap resamples of the confidence intervals.
BOOTSTRAP = 10_000
GROUP = ("model", "checkpoint_index", "checkpoint", "method")


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (seeded); NaNs for fewer than 2 values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _wilcoxon_greater(d: Sequence[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value of "d > 0" (zeros dropped); NaN when nothing is left."""
    from scipy.stats import wilcoxon

    v = np.asarray([x for x in d if np.isfinite(x)], dtype=np.float64)
    if np.count_nonzero(v) == 0:
        return float("nan")
    return float(wilcoxon(v, alternative="greater", zero_method="wilcox").pvalue)


def held_out_differences(
    curves: Mapping[str, np.ndarray], final_position: int
) -> dict[str, tuple[int, float]]:
    """Per image: the layer position chosen on the other images (highest mean ROAD over them) and that
    layer's ROAD minus the final layer's on this image.

    Args:
        curves: per image, its ROAD at every scored layer position ``(L,)`` (same layers for every image).
        final_position: position of the final spatial layer.
    """
    names = list(curves)
    if len(names) < 2:
        return {}
    stack = np.stack([curves[n] for n in names])
    total = np.nansum(stack, axis=0)
    count = np.sum(np.isfinite(stack), axis=0)
    out = {}
    for i, name in enumerate(names):
        others = np.where(np.isfinite(stack[i]), total - stack[i], total)
        n_others = count - np.isfinite(stack[i])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n_others > 0, others / np.maximum(n_others, 1), -np.inf)
        pos = int(np.argmax(mean))
        out[name] = (pos, float(stack[i, pos] - stack[i, final_position]))
    return out


@dataclass(frozen=True)
class ClaimRow:
    """The claim's numbers for one model, checkpoint and method over the study's images."""

    model: str
    checkpoint: str
    method: str
    images: int
    layers: int
    mean_layerwise_road: float
    final_layer_road: float
    max_ybroad: float
    difference_mean: float
    difference_ci: tuple[float, float]
    difference_median: float
    wilcoxon_max_vs_final_p: float
    held_out_mean: float
    held_out_ci: tuple[float, float]
    held_out_wins: int
    held_out_wilcoxon_p: float
    held_out_layer: str
    best_depth_mean: float
    best_depth_median: float
    best_is_final_share: float

    def to_dict(self) -> dict[str, Any]:
        """JSON/CSV-ready (CIs as two columns)."""
        d = asdict(self)
        lo, hi = d.pop("difference_ci")
        hlo, hhi = d.pop("held_out_ci")
        d.update(difference_ci_low=lo, difference_ci_high=hi, held_out_ci_low=hlo, held_out_ci_high=hhi)
        return d


def claim_table(summary: Iterable[Mapping[str, Any]], layers: Iterable[Mapping[str, Any]]) -> list[ClaimRow]:
    """The claim's numbers per (model, checkpoint, method) from a study's tables (see the module docstring).

    Args:
        summary: the study's summary rows (one per image, model, checkpoint, method; as
            :meth:`camanim.outputs.study.store.StudyStore.read_summary` ``.to_pylist()``).
        layers: its layer rows (``road`` per ``position``).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in summary:
        groups.setdefault(tuple(r[c] for c in GROUP), []).append(r)
    curves: dict[tuple, dict[str, dict[int, float]]] = {}
    names: dict[tuple, dict[int, str]] = {}
    for r in layers:
        k = tuple(r[c] for c in GROUP)
        curves.setdefault(k, {}).setdefault(r["image"], {})[int(r["position"])] = float(r["road"])
        names.setdefault(k, {})[int(r["position"])] = str(r["layer_name"])
    out = []
    for k, rows in groups.items():
        n_layers = int(np.median([r["layers"] for r in rows]))
        rows = [r for r in rows if r["layers"] == n_layers]  # the same layer list for every image
        diff = [float(r["difference"]) for r in rows]
        depth = [r["best_position"] / max(r["layers"] - 1, 1) for r in rows]
        final_pos = int(np.median([r["final_position"] for r in rows]))
        per_image = {
            img: np.array([c.get(p, np.nan) for p in range(n_layers)])
            for img, c in curves.get(k, {}).items()
            if img in {r["image"] for r in rows}
        }
        ho = held_out_differences(per_image, final_pos)
        ho_d = [v for _, v in ho.values()]
        chosen = [p for p, _ in ho.values()]
        common = max(set(chosen), key=chosen.count) if chosen else -1
        out.append(
            ClaimRow(
                model=str(k[0]),
                checkpoint=str(k[2] or ""),
                method=str(k[3]),
                images=len(rows),
                layers=n_layers,
                mean_layerwise_road=float(np.mean([r["mean_layerwise_road"] for r in rows])),
                final_layer_road=float(np.mean([r["final_layer_road"] for r in rows])),
                max_ybroad=float(np.mean([r["max_ybroad"] for r in rows])),
                difference_mean=float(np.mean(diff)),
                difference_ci=bootstrap_ci(diff),
                difference_median=float(np.median(diff)),
                wilcoxon_max_vs_final_p=_wilcoxon_greater(diff),
                held_out_mean=float(np.mean(ho_d)) if ho_d else float("nan"),
                held_out_ci=bootstrap_ci(ho_d),
                held_out_wins=int(sum(v > 0 for v in ho_d)),
                held_out_wilcoxon_p=_wilcoxon_greater(ho_d) if ho_d else float("nan"),
                held_out_layer=names.get(k, {}).get(common, "") if common >= 0 else "",
                best_depth_mean=float(np.mean(depth)),
                best_depth_median=float(np.median(depth)),
                best_is_final_share=float(np.mean([r["best_position"] == r["final_position"] for r in rows])),
            )
        )
    return out
