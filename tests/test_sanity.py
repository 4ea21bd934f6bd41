"""The cascading model-randomisation check: a trained model's Grad-CAM passes, an edge detector fails, the
model is left as found, the numbers are deterministic; the similarity measures; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camanim.compute.methods.base import _REGISTRY, CAMMethod, register_method
from camanim.compute.metrics.sanity import (
    default_depths,
    parameterised_modules,
    randomise_cascade,
    similarity,
)
from camanim.outputs.bundle import read_manifest
from camanim.pipelines.sanity import sanity
from tests.conftest import TinyCNN, no_hooks, synthetic_batch


@pytest.fixture
def sobel_method():
    """A fake method whose map is the Sobel edge magnitude of the image (weights play no part)."""
    image = {}

    @register_method("sobeltest")
    class Sobel(CAMMethod):
        needs_gradients = False
        class_discriminative = False
        paper = "test: an edge detector"

        def raw_map(self, t):
            g = image["x"].mean(1, keepdim=True)
            kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None]
            e = (F.conv2d(g, kx, padding=1) ** 2 + F.conv2d(g, kx.transpose(2, 3), padding=1) ** 2).sqrt()
            e = F.interpolate(e, size=t.acts.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            return e.expand(t.acts.shape[0], -1, -1)

    try:
        yield image
    finally:
        del _REGISTRY["sobeltest"]


def test_trained_gradcam_passes_and_an_edge_detector_fails(localisation_model, sobel_method):
    model = localisation_model.model
    x = synthetic_batch(1, seed=11)[0]
    sobel_method["x"] = x
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = sanity(model, x, methods="gradcam,sobeltest", depths=None, measures="spearman,ssim,hog")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and no_hooks(model)
    assert not model.training
    assert res.depths == (0, 1, 2, 3, 4, 5) and len(res.modules) == 5 and res.modules[-1] == "fc"
    v = res.verdicts()
    assert v["gradcam"]["passes"] and v["gradcam"]["median"] < 0.3
    assert not v["sobeltest"]["passes"]
    for measure in ("spearman", "ssim", "hog"):
        np.testing.assert_allclose(res.table("sobeltest", measure), 1.0, atol=1e-9)  # never changes
        assert np.nanmedian(res.final_similarity("gradcam", measure)) < 0.6
    # Row 0 is the original against itself; randomising the logits layer alone already changes Grad-CAM
    # at every layer (its gradient comes through it).
    sp = res.table("gradcam")
    np.testing.assert_allclose(sp[0][np.isfinite(sp[0])], 1.0)
    assert np.nanmax(sp[1]) < 0.9
    again = sanity(model, x, methods="gradcam", depths=[1, 5], measures="spearman")
    np.testing.assert_array_equal(again.table("gradcam")[1:], sp[[1, 5]])  # deterministic, seeded per module


def test_cascade_order_copy_and_depths():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model.features[4].weight.data.fill_(2.0)  # as trained: a reset BatchNorm changes
    order = parameterised_modules(model, torch.rand(1, 3, 32, 32))
    assert [n for n, _ in order] == ["features.0", "features.3", "features.4", "features.7", "fc"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen = []
    for d, twin in randomise_cascade(model, order, [1, 3]):
        changed = [k for k, v in twin.state_dict().items() if not torch.equal(v, before[k])]
        seen.append((d, sorted({k.rsplit(".", 1)[0] for k in changed})))
    assert seen[0] == (1, ["fc"]) and seen[1][1] == ["fc", "features.4", "features.7"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random state is untouched
    assert default_depths(5, None) == [1, 2, 3, 4, 5] and default_depths(100, 4) == [1, 34, 67, 100]


def test_similarity_measures_against_scipy_and_skimage():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32))
    b = a + 0.3 * rng.random((2, 32, 32))
    b[1] = 0  # a constant map has no ranking
    s = similarity(a, b)
    assert s["spearman"][0] == pytest.approx(spearmanr(a[0].ravel(), b[0].ravel())[0], abs=1e-12)
    assert np.isnan(s["spearman"][1]) and np.isnan(s["hog"][1])
    scaled = [(m - m.min()) / (m.max() - m.min()) for m in (a[0], b[0])]
    assert s["ssim"][0] == pytest.approx(structural_similarity(*scaled, data_range=1.0), abs=1e-12)
    assert 0 < s["hog"][0] < 1


def test_cli_sanity_writes_heatmaps_animation_and_report(tmp_path):
    from camanim.cli import main

    out = tmp_path / "sanity"
    args = ["sanity", "--model", "resnet18", "--weights", "none", "--layers", "3", "--depths", "2"]
    args += ["--measures", "spearman", "--input-size", "64", "--methods", "gradcam,eigencam"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    for name in ("sanity.csv", "sanity.json", "sanity_spearman.png", "sanity_last.png", "sanity.mp4",
                 "sanity_maps.npz", "report.html", "maps.npz"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "sanity.json").read_text())
    assert summary["depths"][0] == 0 and len(summary["depths"]) == 3
    assert set(summary["verdicts"]) == {"gradcam", "eigencam"}
    assert read_manifest(out)["sanity"]["files"]["video"] == "sanity.mp4"
    assert "Model-randomisation sanity check" in (out / "report.html").read_text()
    assert main(["sanity", "--measures", "pearson", "--out", str(tmp_path / "x")]) == 2
