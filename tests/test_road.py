"""ROAD and ybROAD: parity with grad-cam, tie-break, sanity on a trained model, determinism, CLI, resume."""

from __future__ import annotations

import csv
import importlib
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from camanim.compute.metrics.imputers import NoisyLinearImputer, SpsolveImputer
from camanim.compute.metrics.road import ROAD, RoadError, removal_masks, road_scores
from camanim.compute.models import Preprocessing
from camanim.outputs.bundle import read_manifest, staging_path
from camanim.pipelines.explain import explain
from camanim.pipelines.ybroad import smooth_series, ybroad
from tests.conftest import SHAPE, TinyCNN, _draw, no_hooks, synthetic_batch

ybroad_mod = importlib.import_module("camanim.pipelines.ybroad")
ybroad_files = importlib.import_module("camanim.outputs.ybroad")

PERCENTAGES = (20, 40, 60, 80)


def shape_image(
    size: int = 64, seed: int = 3, kind: int = 0
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """One synthetic (3, size, size) image of the localisation task and its shape's box."""
    img, box = _draw(kind, np.random.default_rng(seed), size)
    return torch.from_numpy(img), box


def tieless_map(size: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """A (size, size) float32 map peaking on ``box`` plus smooth noise, with all values distinct."""
    rng = np.random.default_rng(seed)
    ii, jj = np.mgrid[:size, :size]
    cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    blob = np.exp(-((ii - cy) ** 2 + (jj - cx) ** 2) / (2 * SHAPE**2))
    smooth = blob + 0.3 * ndimage.gaussian_filter(rng.random((size, size)), 3)
    ranks = np.empty(size * size)
    ranks[np.argsort(smooth.ravel(), kind="stable")] = np.arange(1, size * size + 1)
    m = (ranks / ranks.size).reshape(size, size).astype(np.float32)  # its ranking, as distinct values
    assert np.unique(m).size == m.size
    return m


@pytest.fixture
def quiet_gradcam_imputer(monkeypatch):
    """grad-cam's ROAD with its imputer's noise set to 0 (it draws noise from torch's global RNG)."""
    from pytorch_grad_cam.metrics import road as gc_road

    original = gc_road.NoisyLinearImputer

    class Noiseless(original):  # ROADMostRelevantFirst etc. look the class up in the module at call time
        def __init__(self, noise: float = 0.0, weighting=None) -> None:
            super().__init__(noise=0.0)

    monkeypatch.setattr(gc_road, "NoisyLinearImputer", Noiseless)
    return gc_road


# ------------------------------------------------------------------------------------------ the metric


def test_parity_with_gradcam_road_combined(localisation_model, quiet_gradcam_imputer):
    """Same imputer (noise off), same space (the model input, as grad-cam): ROAD within 1e-3."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = localisation_model.model
    x, box = shape_image(64, kind=1)  # a ring: removing it changes the trained model's mind
    cam = tieless_map(64, box)
    with torch.no_grad():
        target = int(model(x[None]).argmax())
    theirs = quiet_gradcam_imputer.ROADCombined(percentiles=list(PERCENTAGES))(
        x[None], cam[None], [ClassifierOutputSoftmaxTarget(target)], model
    )[0]
    for imputer in (SpsolveImputer(noise=0.0), NoisyLinearImputer(noise=0.0)):
        ours = road_scores(model, x, torch.from_numpy(cam), target, imputer=imputer, preprocessing=None)
        assert abs(ours.road[0] - theirs) <= 1e-3, (type(imputer).__name__, ours.road[0], theirs)
    # Not a trivially small number: removing the shape matters to the trained model.
    assert abs(theirs) > 0.05


def test_imputation_space_only_matters_through_the_noise(localisation_model):
    """Without noise, imputing in [0, 1] pixels equals imputing in the model space (affine invariance)."""
    model = localisation_model.model
    x, box = shape_image(64)
    cam = torch.from_numpy(tieless_map(64, box))
    prep = Preprocessing(size=(64, 64))
    imp = SpsolveImputer(noise=0.0)
    in_model = road_scores(model, x, cam, 0, imputer=imp, preprocessing=None)
    in_pixels = road_scores(model, x, cam, 0, imputer=imp, preprocessing=prep)
    np.testing.assert_allclose(in_pixels.morf, in_model.morf, atol=1e-5)
    np.testing.assert_allclose(in_pixels.lerf, in_model.lerf, atol=1e-5)


@pytest.mark.parametrize("size", [64, 75])
def test_tie_break_removes_exactly_p(size):
    """A constant map, and a map that is 85 % zeros, remove exactly round(p * H * W) pixels for every p."""
    flat = torch.full((size, size), 0.3)
    sparse = torch.zeros(size, size)
    sparse[: size // 3, : size // 2] = torch.rand(size // 3, size // 2) + 0.1  # about 15-17 % non-zero
    for saliency in (flat, sparse):
        morf, lerf = removal_masks(saliency, PERCENTAGES, seed=1)
        for i, p in enumerate(PERCENTAGES):
            k = round(p / 100 * size * size)
            assert int(morf[i].sum()) == k and int(lerf[i].sum()) == k
        # Nested sets, as the definition implies.
        assert bool((morf[:-1] <= morf[1:]).all()) and bool((lerf[:-1] <= lerf[1:]).all())
    # The most relevant pixels of the sparse map are its non-zero ones, removed first.
    morf, _ = removal_masks(sparse, [10], seed=1)
    assert bool((sparse[morf[0]] > 0).all())
    # grad-cam's threshold has no tie-break: its 20 % MoRF (percentile 80) keeps nothing of the sparse map.
    keep = np.float32(sparse.numpy() < np.percentile(sparse.numpy(), 80))
    assert keep.mean() < 0.9  # i.e. it removes ~15 %, not 20 %; and for a flat map it removes 100 %
    assert np.float32(flat.numpy() < np.percentile(flat.numpy(), 80)).mean() == 0.0


def test_road_scores_constant_map_reports_removed_fraction(tiny_model):
    x = torch.rand(3, 48, 48)
    s = road_scores(tiny_model, x, torch.ones(48, 48), 0, percentages=(10, 50), imputer=SpsolveImputer())
    np.testing.assert_array_equal(s.removed, [round(0.1 * 48 * 48) / 48**2, round(0.5 * 48 * 48) / 48**2])
    assert s.morf.shape == s.lerf.shape == (1, 2) and np.isfinite(s.road).all()


def test_model_left_as_found_and_clean_forward_reused(tiny_model):
    tiny_model.train()
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    x = torch.rand(1, 3, 40, 40)
    maps = {"a": torch.rand(40, 40), "b": torch.rand(40, 40)}
    s = road_scores(tiny_model, x, maps, 2, imputer=SpsolveImputer(noise=0.0))
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    assert all(p.requires_grad for p in tiny_model.parameters()) and no_hooks(tiny_model)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())
    assert s.keys == ("a", "b") and s.stats["forwards"] == 16
    again = road_scores(
        tiny_model, x, maps, 2, imputer=SpsolveImputer(noise=0.0), clean_probability=s.clean_probability
    )
    np.testing.assert_array_equal(again.road, s.road)
    assert again["b"] == pytest.approx(float(s.road[1]))


def test_identical_maps_share_masks_and_noise():
    """Layers with the same ranking share one imputation and one forward, and so get the same score."""
    torch.manual_seed(0)
    model = TinyCNN(classes=3).eval()
    x = torch.rand(3, 48, 48)
    m = torch.rand(48, 48)
    s = road_scores(model, x, torch.stack([m, 2 * m + 1, m.flip(0)]), 1)
    assert s.stats["masks"] == 24 and s.stats["unique_masks"] == 16
    np.testing.assert_array_equal(s.morf[0], s.morf[1])
    assert not np.array_equal(s.morf[0], s.morf[2])


def test_bad_inputs():
    model = TinyCNN(classes=3).eval()
    with pytest.raises(RoadError, match="percentages"):
        road_scores(model, torch.rand(3, 32, 32), torch.rand(32, 32), 0, percentages=(0, 50))
    with pytest.raises(RoadError, match="upsampled"):
        road_scores(model, torch.rand(3, 32, 32), torch.rand(8, 8), 0)
    with pytest.raises(RoadError, match="one image"):
        road_scores(model, torch.rand(2, 3, 32, 32), torch.rand(32, 32), 0)
    with pytest.raises(RoadError, match="before any update"):
        ROAD(model).compute()


def test_sanity_gradcam_beats_randomcam_on_held_out_images(localisation_model):
    """The trained model's last-layer Grad-CAM has a higher mean ROAD than RandomCAM on held-out images."""
    model = localisation_model.model
    assert localisation_model.accuracy > 0.9
    x, _, _ = synthetic_batch(10, seed=11)
    ex = explain(model, x, methods="gradcam,randomcam", layers="last")
    last = ex.chosen[-1].name
    metric = ROAD(model, seed=0)
    assert metric.higher_is_better
    metric.update(x, {m: ex.upsampled(m, last) for m in ex.methods}, list(ex.targets))
    scores = metric.compute()
    assert scores.images == 10 and scores.keys == ("gradcam", "randomcam")
    assert scores["gradcam"] > scores["randomcam"] + 0.05, scores.as_dict()
    # reset() forgets; one image at a time gives the batch's mean.
    metric = ROAD(model, seed=0)
    for i in range(3):
        metric.update(x[i], ex.upsampled("gradcam", last)[i], ex.targets[i])
    first3 = metric.compute().road[0]
    metric.reset()
    metric.update(x[:3], ex.upsampled("gradcam", last)[:3], list(ex.targets[:3]))
    assert metric.compute().road[0] == pytest.approx(first3, abs=1e-6)


# ------------------------------------------------------------------------------------------- ybROAD


def test_ybroad_is_deterministic_and_summarises(tiny_model):
    x = torch.rand(1, 3, 48, 48)
    a = ybroad(tiny_model, x, methods="gradcam,hirescam", seed=3)
    b = ybroad(tiny_model, x, methods="gradcam,hirescam", seed=3)
    for m in ("gradcam", "hirescam"):
        ra, rb = a[m], b[m]
        np.testing.assert_array_equal(ra.morf, rb.morf)
        np.testing.assert_array_equal(ra.lerf, rb.lerf)
        assert len(ra) == len(a.explanation.chosen) > 3
        assert [layer.index for layer in ra.layers] == sorted(layer.index for layer in ra.layers)
        assert ra.max == pytest.approx(float(ra.road.max())) and ra.mean == pytest.approx(
            float(ra.road.mean())
        )
        assert ra.best_layer.name == ra.layers[int(np.argmax(ra.road))].name
        assert ra.final_layer.name == a.explanation.chosen[-1].name
        assert ra.difference == pytest.approx(ra.max - ra.final) and ra.difference >= 0
    c = ybroad(tiny_model, x, methods="gradcam", layers="last", seed=4)
    assert not np.array_equal(c["gradcam"].morf, a["gradcam"].morf[-1:])


def test_smoothing_is_a_centred_moving_average():
    v = np.array([0.0, 3.0, 0.0, 3.0, 0.0])
    np.testing.assert_allclose(smooth_series(v, 3), [1.5, 1.0, 2.0, 1.0, 1.5])
    np.testing.assert_array_equal(smooth_series(v, 1), v)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_road_writes_the_bundle(tmp_path):
    from camanim.cli import main

    out = tmp_path / "road"
    args = ["road", "--model", "resnet18", "--weights", "none", "--layers", "1", "--percentages", "30,70"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    for name in ("ybroad.csv", "ybroad.json", "ybroad.png", "summary.csv", "maps.npz", "manifest.json"):
        assert (out / name).is_file(), name
    rows = _rows(out / "ybroad.csv")
    assert len(rows) == 1 and {"morf_30", "lerf_70", "removed_30", "road", "index", "name"} <= set(rows[0])
    assert float(rows[0]["removed_30"]) == pytest.approx(round(0.3 * 224 * 224) / 224**2)
    summary = _rows(out / "summary.csv")
    assert list(summary[0])[:8] == [
        "model", "image", "target", "method", "mean_layerwise_road", "final_layer_road", "max_ybroad",
        "difference",
    ]  # fmt: skip
    manifest = read_manifest(out)
    assert "ybroad.png" in manifest["files"] and "definition" in manifest["road"]
    assert manifest["road"]["methods"]["gradcam"]["layers"] == 1
    assert json.loads((out / "ybroad.json").read_text())["percentages"] == [30.0, 70.0]
    assert not (out / ybroad_files.CHECKPOINT).exists()
    from camanim.outputs.compare import load_road

    assert len(load_road(out)) == 1  # the compare command reads the manifest's ROAD results
    assert main([*args, "--out", str(out), "--quiet"]) == 2  # exists: refused without --force


def test_resume_after_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = TinyCNN(classes=4).eval()
    x = torch.rand(1, 3, 64, 64)
    kwargs = dict(methods="gradcam", imputer=SpsolveImputer(), batch_size=8, seed=5)
    full, _ = ybroad_files.save_ybroad(model, x, tmp_path / "full", **kwargs)
    n = len(full["gradcam"])
    assert n > 3

    real = ybroad_files.JsonCheckpoint.save
    calls = {"n": 0}

    def interrupt_after_two(self, state):
        real(self, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while layer scores were being saved

    out = tmp_path / "resumed"
    monkeypatch.setattr(ybroad_files.JsonCheckpoint, "save", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        ybroad_files.save_ybroad(model, x, out, **kwargs)
    monkeypatch.setattr(ybroad_files.JsonCheckpoint, "save", real)
    stage = staging_path(out.absolute())
    assert not out.exists() and (stage / ybroad_files.CHECKPOINT).is_file()
    done = len(json.loads((stage / ybroad_files.CHECKPOINT).read_text())["rows"])
    assert 0 < done < n

    res, path = ybroad_files.save_ybroad(model, x, out, resume=True, **kwargs)
    assert res.resumed == done and res.stats["masks"] == 8 * (n - done)
    np.testing.assert_array_equal(res["gradcam"].morf, full["gradcam"].morf)
    np.testing.assert_array_equal(res["gradcam"].lerf, full["gradcam"].lerf)
    assert path == out.absolute() and not stage.exists()
    assert read_manifest(out)["road"]["resumed"] == done


def test_best_layer_is_the_max_ybroad_layer(tiny_model):
    x = torch.rand(1, 3, 48, 48)
    res = ybroad(tiny_model, x, methods="gradcam")
    best = ybroad_mod.best_layer(tiny_model, x, method="gradcam")
    assert best.name == res["gradcam"].best_layer.name
    assert res["gradcam"].road[res["gradcam"].best_position] == res["gradcam"].max


def test_cli_animate_layers_best_and_road(tmp_path, monkeypatch):
    """``--layers best`` animates the max-ybROAD layer; ``--road`` puts each frame's ROAD in the bundle."""
    import camanim.cli.commands
    from camanim.cli import main

    real = camanim.cli.commands.ybroad
    calls = []

    def small_ybroad(*args, **kwargs):  # keep the test fast: last 3 layers, one p
        if kwargs.get("explanation") is None:
            kwargs["layers"] = 3
        kwargs["percentages"] = (50,)
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(camanim.cli.commands, "ybroad", small_ybroad)
    out = tmp_path / "anim"
    args = ["animate", "--model", "resnet18", "--weights", "none", "--size", "48", "--format", "frames"]
    assert main(["--quiet", *args, "--layers", "best", "--road", "--out", str(out)]) == 0
    best, scored = calls  # ybROAD over the last 3 layers picks the layer; then the animation's own maps
    manifest = read_manifest(out)
    assert manifest["chosen_layers"] == [best["gradcam"].best_layer.name]
    road = manifest["animation"]["road"]["gradcam"]
    np.testing.assert_allclose(road, scored["gradcam"].road)
    assert road == pytest.approx([best["gradcam"].max], abs=1e-6)  # same map, image and seed: same ROAD
