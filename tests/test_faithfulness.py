"""Faithfulness metrics per layer: parity with torchcam and grad-cam on the same maps, shared images, the
per-layer pipeline, files and the command line."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
import torch

from camanim.compute.metrics.confidence import confidence_scores, explanation_map
from camanim.compute.metrics.deletion import DeletionInsertion, deletion_scores
from camanim.compute.metrics.engine import MetricError, blur, rise_kernel
from camanim.compute.metrics.faithfulness import METRICS, faithfulness_scores, parse_metrics
from camanim.compute.metrics.imputers import SpsolveImputer
from camanim.compute.metrics.road import road_scores
from camanim.errors import UnknownNameError
from camanim.outputs.bundle import read_manifest
from camanim.pipelines.faithfulness import faithfulness, rank_agreement
from tests.conftest import no_hooks
from tests.test_road import PERCENTAGES, quiet_gradcam_imputer, shape_image, tieless_map  # noqa: F401

SIZE = 48  # 2304 pixels: steps 16 divides it, so our curve points are torchcam's


class FixedCAM:
    """A torchcam CAM extractor that returns a given map (torchcam's metrics only need this protocol)."""

    def __init__(self, model: torch.nn.Module, cam: np.ndarray) -> None:
        self.model = model
        self.cam = torch.from_numpy(np.asarray(cam, np.float32))

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.cam[None]]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


@pytest.fixture(scope="module")
def case(localisation_model):
    """The trained model, an image whose shape it recognises, a tie-free map on the shape, the target."""
    model = localisation_model.model
    x, box = shape_image(SIZE, kind=1)
    cam = tieless_map(SIZE, box)
    with torch.no_grad():
        target = int(model(x[None]).argmax())
    return model, x, cam, target


@pytest.mark.parametrize("baseline", ["zero", "blur", "rise"])
def test_deletion_insertion_match_torchcam(case, baseline):
    tm = pytest.importorskip("torchcam.metrics")
    model, x, cam, target = case
    ours = deletion_scores(model, x, torch.from_numpy(cam), target, steps=16, baseline=baseline)
    sub = {"zero": ("zero", "zero"), "blur": ("blur", "blur"), "rise": ("zero", "blur")}[baseline]
    base = {"zero": None, "blur": lambda t: blur(t[0])[None]}
    theirs = {}
    for curve, name in zip(("deletion", "insertion"), sub, strict=True):
        metric = tm.DeletionInsertionMetric(
            FixedCAM(model, cam), partial(torch.softmax, dim=-1), steps=16, baseline=base[name]
        )
        metric.update(x[None], class_idx=target)
        theirs[curve] = metric.summary()[f"{curve}_auc"]
    assert ours.deletion_auc[0] == pytest.approx(theirs["deletion"], abs=2e-6)
    assert ours.insertion_auc[0] == pytest.approx(theirs["insertion"], abs=2e-6)
    assert ours.insertion_auc[0] - ours.deletion_auc[0] > 0.05  # the map is on the shape: a real difference


def test_rise_kernel_is_risees_gkern():
    from scipy.stats import norm

    x = np.linspace(-5, 5, 12)
    k1 = np.diff(norm.cdf(x))
    k = np.outer(k1, k1)
    np.testing.assert_allclose(rise_kernel(), k / k.sum(), atol=1e-15)
    img = torch.zeros(3, 15, 15)
    img[:, 7, 7] = 1.0
    np.testing.assert_allclose(blur(img)[0, 2:13, 2:13].numpy(), rise_kernel(), atol=1e-7)


def test_confidence_metrics_match_torchcam_and_gradcam(case):
    tm = pytest.importorskip("torchcam.metrics")
    from pytorch_grad_cam.metrics.cam_mult_image import (
        CamMultImageConfidenceChange,
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, cam, target = case
    maps = torch.stack([torch.from_numpy(cam), torch.from_numpy(1 - cam)])  # on the shape, and its opposite
    ours = confidence_scores(model, x, maps, target)
    for i in range(2):
        e = explanation_map(maps[i])
        metric = tm.ClassificationMetric(FixedCAM(model, e.numpy()), partial(torch.softmax, dim=-1))
        metric.update(x[None], class_idx=target)
        got = metric.summary()
        assert ours.average_drop[i] == pytest.approx(got["avg_drop"], rel=1e-5, abs=1e-6)
        assert ours.increase_in_confidence[i] == got["conf_increase"]
        args = (x[None], e.numpy()[None], [ClassifierOutputSoftmaxTarget(target)], model)
        assert ours.confidence_change[i] == pytest.approx(
            float(CamMultImageConfidenceChange()(*args)[0]), abs=1e-6
        )
        assert ours.drop_in_confidence[i] == pytest.approx(float(DropInConfidence()(*args)[0]), abs=1e-6)
        assert ours.increase_in_confidence[i] == float(IncreaseInConfidence()(*args)[0])
        with torch.no_grad():  # Average Gain: no library has it; a direct computation
            y = float(model(x[None]).softmax(1)[0, target])
            o = float(model(x[None] * e).softmax(1)[0, target])
        assert ours.average_gain[i] == pytest.approx(max(o - y, 0) / (1 - y), abs=1e-6)
    assert ours.average_drop[0] < ours.average_drop[1]  # keeping the shape keeps the confidence


def test_morf_and_lerf_match_gradcam(case, quiet_gradcam_imputer):  # noqa: F811
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, cam, target = case
    ours = faithfulness_scores(
        model, x, torch.from_numpy(cam), target, metrics="morf,lerf", imputer=SpsolveImputer(noise=0.0)
    )
    args = (x[None], cam[None], [ClassifierOutputSoftmaxTarget(target)], model)
    g = quiet_gradcam_imputer
    morf = g.ROADMostRelevantFirstAverage(percentiles=list(PERCENTAGES))(*args)[0]
    lerf = g.ROADLeastRelevantFirstAverage(percentiles=list(PERCENTAGES))(*args)[0]
    assert ours.values["morf"][0] == pytest.approx(morf, abs=1e-3)
    assert ours.values["lerf"][0] == pytest.approx(lerf, abs=1e-3)
    assert ours.values["lerf"][0] - ours.values["morf"][0] > 0.05


def test_one_pass_equals_each_family_and_shares_images(tiny_model):
    x = torch.rand(3, SIZE, SIZE)
    maps = torch.rand(4, SIZE, SIZE)
    maps[2] = maps[1]  # two layers with one map: one set of images
    imp = SpsolveImputer(noise=0.0)
    all_ = faithfulness_scores(tiny_model, x, maps, 3, steps=5, baseline="road", imputer=imp)
    road = road_scores(tiny_model, x, maps, 3, imputer=imp)
    dele = deletion_scores(tiny_model, x, maps, 3, steps=5, baseline="road", imputer=imp)
    conf = confidence_scores(tiny_model, x, maps, 3)
    np.testing.assert_allclose(all_.values["road"], road.road, atol=1e-7)
    np.testing.assert_allclose(all_.values["deletion"], dele.deletion_auc, atol=1e-7)
    np.testing.assert_allclose(all_.values["insertion"], dele.insertion_auc, atol=1e-7)
    np.testing.assert_allclose(all_.values["average_drop"], conf.average_drop, atol=1e-7)
    # With the ROAD baseline at 20 % steps, deletion's points are ROAD's MoRF images (plus the clean image).
    np.testing.assert_allclose(dele.deletion[:, 1:5] - dele.clean_probability, road.morf, atol=1e-7)
    # Per map: ROAD 8 images, deletion and insertion 2 x 6 points less the 2 clean ones, 1 masked image.
    assert all_.stats["masks"] == 4 * (8 + 10 + 1)
    # Shared: map 2 repeats map 1; deletion's 4 inner points are ROAD's MoRF images and insertion's ROAD's
    # LeRF images; the all-baseline image ends and starts every curve: 8 + 1 new images per distinct map.
    assert all_.stats["forwards"] == 3 * (8 + 1) + 1
    assert set(all_.values) == set(METRICS)


def test_stateful_metric_means_over_images(tiny_model):
    xs = torch.rand(2, 3, SIZE, SIZE)
    maps = torch.rand(2, SIZE, SIZE)
    metric = DeletionInsertion(tiny_model, steps=4)
    metric.update(xs, maps, [1, 2])
    got = metric.compute()
    one = [deletion_scores(tiny_model, xs[i], maps[i], t, steps=4) for i, t in enumerate([1, 2])]
    np.testing.assert_allclose(got.deletion_auc, np.mean([o.deletion_auc for o in one], axis=0), atol=1e-9)
    assert got.images == 2 and got.target is None
    with pytest.raises(MetricError, match="before any update"):
        DeletionInsertion(tiny_model).compute()


def test_bad_names():
    with pytest.raises(UnknownNameError, match="deletion"):
        parse_metrics("delation")
    assert parse_metrics("all") == tuple(METRICS)
    with pytest.raises(MetricError, match="baseline"):
        deletion_scores(torch.nn.Identity(), torch.rand(3, 8, 8), torch.rand(8, 8), 0, baseline="grey")


def test_pipeline_per_layer_best_layers_agreement_and_model_left_as_found(tiny_model):
    tiny_model.train()
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    x = torch.rand(1, 3, SIZE, SIZE)
    kw = dict(methods="gradcam,hirescam", metrics="road,deletion,insertion,average_drop", steps=4, seed=2)
    a = faithfulness(tiny_model, x, **kw)
    b = faithfulness(tiny_model, x, **kw)
    assert tiny_model.training and no_hooks(tiny_model)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())
    tiny_model.eval()
    for m in ("gradcam", "hirescam"):
        for name, s in a[m].items():
            np.testing.assert_array_equal(s.values, b[m][name].values)  # deterministic
            assert len(s) == len(a.explanation.chosen)
            best = np.argmax(s.values) if s.higher_is_better else np.argmin(s.values)
            assert s.best_position == best and s.gain >= 0
            assert a.best_layer(m, name).name == s.best_layer.name
        names, mat = a.agreement(m)
        assert names == a.metrics and mat.shape == (4, 4)
    # ROAD here is ybROAD's: the same maps, seed and masks give the same numbers.
    from camanim.pipelines.ybroad import ybroad

    yb = ybroad(tiny_model, explanation=a.explanation, methods="gradcam", seed=2)
    np.testing.assert_allclose(a.ybroad()["gradcam"].road, yb["gradcam"].road, atol=1e-6)
    rows = a.summary_rows()
    assert {"best_deletion", "best_insertion_value", "max_ybroad"} <= set(rows[0])


def test_rank_agreement_orients_metrics():
    from camanim.compute.layers import Layer
    from camanim.pipelines.faithfulness import LayerSeries

    layers = tuple(Layer(i, f"l{i}", f"l{i}", "Conv2d", "spatial", (1, 4, 4, 4), 0, (4, 4)) for i in range(5))

    v = np.arange(5.0)
    s = {
        "road": LayerSeries("m", "road", layers, v, True),
        "deletion": LayerSeries("m", "deletion", layers, -v, False),  # lower is better: the same ranking
        "average_gain": LayerSeries("m", "average_gain", layers, np.zeros(5), True),
    }
    _, mat = rank_agreement(s)
    assert mat[0, 1] == pytest.approx(1.0) and np.isnan(mat[0, 2]) and np.isnan(mat[2, 2])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_faithfulness_bundle_and_report(tmp_path):
    from camanim.cli import main

    out = tmp_path / "faith"
    args = ["faithfulness", "--model", "resnet18", "--weights", "none", "--layers", "2", "--steps", "4"]
    args += ["--metrics", "road,insertion,average_drop", "--percentages", "50", "--input-size", "64"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    for name in ("faithfulness.csv", "faithfulness.json", "summary.csv", "curves.npz", "faithfulness.png",
                 "agreement.png", "ybroad.csv", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    assert len(_rows(out / "faithfulness.csv")) == 2
    summary = _rows(out / "summary.csv")[0]
    assert {"best_road", "best_insertion", "best_average_drop", "max_ybroad"} <= set(summary)
    manifest = read_manifest(out)
    assert manifest["faithfulness"]["metrics"] == ["road", "insertion", "average_drop"]
    assert json.loads((out / "faithfulness.json").read_text())["settings"]["steps"] == 4
    html = (out / "report.html").read_text()
    assert "Faithfulness of every layer" in html and "Where the metrics agree" in html
    assert main([*args, "--out", str(out), "--quiet"]) == 2  # exists: refused without --force
    assert main(["faithfulness", "--metrics", "nope", "--out", str(tmp_path / "x")]) == 2


def test_cli_layers_best_by_metric(tmp_path, monkeypatch, capsys):
    import camanim.cli.layerwise
    from camanim.cli import main

    real = camanim.cli.layerwise.faithfulness
    calls = []

    def small(*args, **kwargs):  # keep the test fast: the last 3 layers
        kwargs["layers"] = 3
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(camanim.cli.layerwise, "faithfulness", small)
    out = tmp_path / "ex"
    args = ["explain", "--model", "resnet18", "--weights", "none", "--input-size", "64", "--no-overlays"]
    assert main(["--quiet", *args, "--layers", "best", "--by", "insertion", "--out", str(out)]) == 0
    (res,) = calls
    assert res.metrics == ("insertion",)
    assert read_manifest(out)["chosen_layers"] == [res["gradcam"]["insertion"].best_layer.name]
    assert main([*args, "--by", "insertion", "--out", str(tmp_path / "y")]) == 2  # --by without best
    assert "--layers best" in capsys.readouterr().err
