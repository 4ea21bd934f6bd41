"""ROAD and the other faithfulness metrics of task targets: the score is the target's own score of the perturbed
image minus the original's, pixels ranked over the whole image, a segmentation region kept as decided on the
original, a detection re-matched by IoU in the perturbed image.

Checked against a computation by hand (the same imputed images, a plain forward, the target's score written
out in torch), against the class path (a callable giving the softmax equals the class index), on a segmenter
trained in the session (its Grad-CAM beats a random map), and from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import camanim
import camanim.cli.commands
from camanim.cli import main
from camanim.compute.metrics.engine import PerturbationContext, impute
from camanim.compute.metrics.faithfulness import faithfulness_scores
from camanim.compute.metrics.imputers import NoisyLinearImputer
from camanim.compute.metrics.road import RoadError, removal_masks, road_scores
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.tasks import BoxScoreTarget, SegmentationTarget
from camanim.errors import CamanimError
from camanim.pipelines.ybroad import ybroad

from .conftest import SIZE, synthetic_batch
from .test_tasks import TinyFCN, trained_fcn  # noqa: F401  (the module-scoped fixture)


class Out(nn.Module):
    """A segmentation model's ``out`` tensor ``(B, K, H, W)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _by_hand(net: nn.Module, x: torch.Tensor, mask: np.ndarray, score, seed: int) -> float:
    """The target's score of the image with ``mask`` ``(H, W)`` imputed (the engine's seeded imputation), by a
    plain forward."""
    ctx = PerturbationContext(x, NoisyLinearImputer(), None, seed)
    img = ctx.build([impute(mask.reshape(-1))])
    with torch.no_grad():
        return float(score(net(img)))


def test_road_of_a_segmentation_region_equals_a_hand_computation():
    torch.manual_seed(5)  # a random net that predicts class 2 on part of this image only
    net = Out(TinyFCN()).eval()
    x = synthetic_batch(1, seed=1)[0][0]
    maps = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    maps[2] = 0.0  # a flat map: the tie-break decides
    ps, seed = (25.0, 60.0), 3
    target = SegmentationTarget(2)  # the predicted pixels, decided by the metric's first (clean) forward
    s = road_scores(net, x, maps, target, percentages=ps, seed=seed, optimize=False)

    with torch.no_grad():
        clean_out = net(x[None])
    region = clean_out.argmax(dim=1)[0] == 2
    assert 20 < int(region.sum()) < SIZE * SIZE - 20  # a region to keep, not the whole image
    assert torch.equal(target.region()[0], region)

    def score(out: torch.Tensor) -> torch.Tensor:  # the summed logit of class 2 over the fixed region
        return (out[0, 2] * region).sum()

    clean = float(score(clean_out))
    assert s.clean_probability == pytest.approx(clean, rel=1e-6)
    for i, m in enumerate(maps):
        morf, lerf = removal_masks(m, ps, seed)
        for j in range(len(ps)):
            for got, masks in ((s.morf, morf), (s.lerf, lerf)):
                expected = _by_hand(net, x, masks[j].numpy(), score, seed) - clean
                assert got[i, j] == pytest.approx(expected, abs=1e-5, rel=1e-5), (i, j)
    assert s.target is None and s.stats["unique_masks"] <= 12
    # the perturbed image is scored over the original's region, not its own prediction
    assert s.morf[0, 1] != pytest.approx(s.lerf[0, 1])


def test_a_callable_giving_the_softmax_equals_the_class_index(tiny_model):
    """For a classifier the class path is unchanged: a callable reading the same softmax gives the same
    numbers, through the optimised copy or not."""
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    maps = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(5))
    for optimize in (False, True):
        by_class = road_scores(tiny_model, x, maps, 2, percentages=(30, 70), optimize=optimize)
        by_callable = road_scores(
            tiny_model, x, maps, lambda out: out.double().softmax(dim=1)[:, 2], percentages=(30, 70),
            optimize=optimize,
        )  # fmt: skip
        np.testing.assert_allclose(by_callable.morf, by_class.morf, atol=1e-12)
        np.testing.assert_allclose(by_callable.lerf, by_class.lerf, atol=1e-12)
        assert by_class.target == 2 and by_callable.target is None
    # every metric goes through the same readout; the ratio metrics need a probability
    f = faithfulness_scores(
        tiny_model,
        x,
        maps,
        lambda out: out.softmax(dim=1)[:, 2],
        metrics="road,deletion",
        percentages=(30, 70),
    )
    np.testing.assert_allclose(f.values["road"], by_class.road, atol=1e-6)
    with pytest.raises(CamanimError, match="probability"):
        faithfulness_scores(tiny_model, x, maps, lambda out: out[:, 2], metrics="average_drop")


def test_a_trained_segmenter_s_grad_cam_beats_a_random_map(trained_fcn):  # noqa: F811
    """The last layer's Grad-CAM of the shape's class removes what the region's logits depend on: MoRF falls
    further and ROAD is higher than for a random map of the same image."""
    lm = wrap_model(trained_fcn, preprocessing=Preprocessing(size=(SIZE, SIZE)))
    x, y, _ = synthetic_batch(8, seed=11)
    wins, gaps = 0, []
    for i in range(len(x)):
        target = SegmentationTarget(1 + int(y[i]))
        ex = camanim.explain(lm, x[i : i + 1], methods="gradcam", layers="classifier", target=target)
        res = ybroad(lm, explanation=ex, target=target, percentages=(10, 20, 40), seed=i)
        cam = res["gradcam"]
        rand = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(100 + i))
        net = lm.with_output("out", "maps").model
        other = road_scores(
            net, x[i], rand, target, percentages=(10, 20, 40), seed=i, preprocessing=ex.preprocessing
        )
        scale = abs(res.clean_probability)
        assert res.clean_probability == pytest.approx(other.clean_probability, rel=1e-5)
        wins += int(cam.road[0] > other.road[0] and cam.morf.mean() < other.morf.mean())
        gaps.append((cam.road[0] - other.road[0]) / scale)
    assert wins >= 7 and np.mean(gaps) > 0.05, (wins, gaps)


def _detector():
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=160, box_score_thresh=0.0
    ).eval()
    lm = wrap_model(det, preprocessing=Preprocessing(size=(160, 160), mean=(0.0,) * 3, std=(1.0,) * 3))
    return det, lm


def test_detection_road_rematches_the_box_in_the_perturbed_image():
    det, lm = _detector()
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = det(x)[0]
    box, label = first["boxes"][0], int(first["labels"][0])
    target = BoxScoreTarget([box.tolist()], [label])
    layer = "backbone.body.16"
    ex = camanim.explain(lm, x, methods="gradcam", layers=layer, target=target)
    res = ybroad(lm, explanation=ex, target=target, percentages=(30, 70), imputation_space="model", seed=1)

    def score(out) -> float:  # grad-cam's FasterRCNNBoxScoreTarget, written out
        o = out[0]
        if len(o["boxes"]) == 0:
            return 0.0
        ious = torchvision.ops.box_iou(box[None], o["boxes"])[0]
        j = int(ious.argmax())
        return (
            float((ious[j] + o["scores"][j]).detach())
            if ious[j] > 0.5 and int(o["labels"][j]) == label
            else 0.0
        )

    with torch.no_grad():
        clean = score(det(x))
    assert res.clean_probability == pytest.approx(clean, abs=1e-5) and clean > 1.0
    up = ex.upsampled("gradcam", layer)[0]
    morf, lerf = removal_masks(up, (30, 70), 1)
    for j in range(2):
        for got, masks in ((res["gradcam"].morf, morf), (res["gradcam"].lerf, lerf)):
            expected = _by_hand(det, x[0], masks[j].numpy(), score, 1) - clean
            assert got[0, j] == pytest.approx(expected, abs=1e-4), j
    # a box no detection overlaps: the score is 0 on the original and on every perturbed image
    lost = BoxScoreTarget([[0.0, 0.0, 4.0, 4.0]], [label])
    ex0 = camanim.explain(lm, x, methods="gradcam", layers=layer, target=lost)
    assert float(ex0.probabilities[0, 0]) == 0.0
    with pytest.raises(RoadError, match="no detection matching"):
        ybroad(lm, explanation=ex0, target=lost, percentages=(50,))
    with pytest.raises(RoadError, match="same target callable"):  # a task's maps need their target
        ybroad(lm, explanation=ex, percentages=(50,))


def test_cli_road_and_faithfulness_of_a_segmentation_model(tmp_path, capsys):
    out = tmp_path / "road"
    common = [
        "--model",
        "lraspp_mobilenet_v3_large",
        "--weights",
        "none",
        "--input-size",
        "64",
        "--layers",
        "2",
    ]
    task = ["--task", "segmentation", "--target", "1", "--region", "8,8,40,40"]
    assert main(["--quiet", "road", *common, *task, "--percentages", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("segmentation: class 1 over the region, score = ")
    summary = (out / "summary.csv").read_text().splitlines()
    header, row = summary[0].split(","), summary[1].split(",")
    assert header[-2:] == ["task", "target_score"] and row[header.index("task")] == "segmentation"
    road = json.loads((out / "ybroad.json").read_text())
    assert road["task"]["kind"] == "segmentation" and road["target"]["class"] is None
    assert float(row[-1]) == pytest.approx(road["target_score"], rel=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["task"]["region"] == "box [8.0, 8.0, 40.0, 40.0]"
        and "segmentation" in manifest["road"]["definition"]["score"]
    )

    out = tmp_path / "faith"
    argv = [
        "--quiet",
        "faithfulness",
        *common,
        *task,
        "--metrics",
        "all",
        "--steps",
        "4",
        "--percentages",
        "50",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "faithfulness.json").read_text())["metrics"]
    assert "road" in metrics and "deletion" in metrics and "average_drop" not in metrics
    html = (out / "report.html").read_text()
    assert "Explained (segmentation)" in html and "score = " in html
    capsys.readouterr()
    refused = [
        ["faithfulness", *common, *task, "--metrics", "road,average_drop"],
        ["animate", *common, *task, "--layers", "best", "--by", "average_gain"],
    ]
    for argv in refused:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("camanim: error:") and "probability" in err[0], argv
    assert not (tmp_path / "x").exists()


def test_cli_animate_with_road_and_best_layer_of_a_trained_segmenter(tmp_path, monkeypatch, trained_fcn):  # noqa: F811
    lm = wrap_model(
        trained_fcn, preprocessing=Preprocessing(size=(SIZE, SIZE)), class_names=["bg", "square", "ring"]
    )
    monkeypatch.setattr(camanim.cli.commands, "load_model", lambda *a, **k: lm)
    out = tmp_path / "anim"
    args = ["--quiet", "animate", "--task", "segmentation", "--target", "square", "--format", "frames"]
    assert main([*args, "--road", "--out", str(out)]) == 0
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",task,target_score") and ",segmentation," in summary[1]
    out = tmp_path / "best"
    assert main([*args, "--layers", "best", "--out", str(out)]) == 0
    assert len(json.loads((out / "manifest.json").read_text())["chosen_layers"]) == 1


def test_cli_detection_without_a_matching_detection_is_refused(tmp_path, capsys):
    """A random-weight detector finds nothing above its score threshold: ROAD of the box is not defined."""
    argv = [
        "road", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--task", "detection",
        "--box", "10,10,200,200", "--target", "1", "--layers", "1", "--percentages", "50",
    ]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "det")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camanim: error:") and "no detection matching" in err[0]
    assert not (tmp_path / "det").exists()
