"""The paper's claim over a study's images: max - final, the held-out layer, Wilcoxon tests, bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from camanim.pipelines.study.claim import bootstrap_ci, claim_table, held_out_differences

L = 6
FINAL = L - 1


def _tables(curves: dict[str, np.ndarray], method: str = "gradcam"):
    summary, layers = [], []
    for img, c in curves.items():
        best = int(np.argmax(c))
        key = {"model": "m", "checkpoint_index": -1, "checkpoint": "", "method": method, "image": img}
        summary.append(
            key
            | {
                "layers": L,
                "mean_layerwise_road": float(c.mean()),
                "final_layer_road": float(c[FINAL]),
                "max_ybroad": float(c.max()),
                "difference": float(c.max() - c[FINAL]),
                "best_position": best,
                "final_position": FINAL,
            }
        )
        layers += [
            key | {"position": p, "road": float(v), "layer_name": f"layer{p}"} for p, v in enumerate(c)
        ]
    return summary, layers


def test_a_layer_that_is_better_everywhere_is_found_held_out():
    rng = np.random.default_rng(0)
    curves = {
        f"img{i}": 0.02 * rng.standard_normal(L) + np.where(np.arange(L) == 2, 0.1, 0.0) for i in range(8)
    }
    (row,) = claim_table(*_tables(curves))
    assert row.images == 8 and row.layers == L and row.held_out_layer == "layer2"
    d = np.array([c[2] - c[FINAL] for c in curves.values()])
    assert row.held_out_mean == pytest.approx(d.mean())
    assert row.held_out_wins == int((d > 0).sum()) == 8
    assert row.held_out_wilcoxon_p == pytest.approx(wilcoxon(d, alternative="greater").pvalue)
    assert row.held_out_wilcoxon_p < 0.01 and row.held_out_ci[0] > 0
    assert row.best_depth_mean == pytest.approx(np.mean([np.argmax(c) / (L - 1) for c in curves.values()]))


def test_noise_alone_makes_max_beat_final_but_not_a_held_out_layer():
    rng = np.random.default_rng(1)
    curves = {f"img{i}": 0.05 * rng.standard_normal(L) for i in range(12)}
    (row,) = claim_table(*_tables(curves))
    assert row.difference_mean > 0 and row.wilcoxon_max_vs_final_p < 0.01  # the in-sample max is biased
    assert row.held_out_wilcoxon_p > 0.05  # a layer picked on other images does not beat the final one
    lo, hi = row.held_out_ci
    assert lo < 0 < hi or row.held_out_mean < 0


def test_held_out_is_leave_one_out_and_bootstrap_is_seeded():
    curves = {"a": np.array([0.0, 1.0, 0.0]), "b": np.array([0.0, 0.0, 0.0]), "c": np.array([2.0, 0.0, 0.0])}
    ho = held_out_differences(curves, final_position=2)
    assert ho["a"][0] == 0  # chosen on b and c: position 0
    assert ho["c"][0] == 1  # chosen on a and b: position 1
    assert ho["c"][1] == pytest.approx(0.0)
    v = [0.1, 0.2, 0.4, -0.1]
    ci = bootstrap_ci(v)
    assert ci == bootstrap_ci(v) and ci[0] < np.mean(v) < ci[1]
    assert np.isnan(bootstrap_ci([1.0])[0])
