"""Targets beyond one class label, at every layer: segmentation, detection, embeddings, multi-label and
regression, against grad-cam 1.5.7's targets (and its tutorial's similarity target), a segmentation network
trained in the session, and the CLI end to end.

grad-cam references are taken at layers no later operation modifies in place (found by camanim's own dry
run), where grad-cam records the right values (../shared/notes/references.md)."""

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
from camanim.compute.layers import default_layers, list_layers, modified_in_place
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.tasks import (
    BoxScoreTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
)

from .conftest import SIZE, synthetic_batch

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget  # noqa: E402


def _layers(model: nn.Module, x: torch.Tensor, prefix: str = "") -> list[str]:
    """First, middle and last spatial layers that no later operation modifies in place."""
    changed = modified_in_place(model, x) or frozenset()
    pool = [
        la.name
        for la in default_layers(list_layers(model, x))
        if la.name not in changed
        and "#" not in la.name
        and la.name.startswith(prefix)
        and la.kind == "spatial"
    ]
    return [pool[0], pool[len(pool) // 2], pool[-1]]


def _grad_cam(model, name, x, target, reshape=None) -> np.ndarray:
    """grad-cam's raw Grad-CAM map (before its scaling) for one layer and one target."""
    cam = gc.GradCAM(model, [model.get_submodule(name)], reshape_transform=reshape)
    captured = {}
    original = cam.get_cam_image

    def grab(*args, **kwargs):
        captured["raw"] = original(*args, **kwargs)
        return captured["raw"]

    cam.get_cam_image = grab
    cam(x, targets=[target])
    cam.activations_and_grads.release()
    return captured["raw"][0]


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


class OutOnly(nn.Module):
    """A torchvision segmentation model as grad-cam's tutorial wraps it: its ``out`` tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_segmentation_equals_grad_cam():
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4
    ).eval()
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((96, 96), bool)
    mask[20:60, 30:80] = True
    names = _layers(seg, x)
    ex = camanim.explain(
        seg, x, methods="gradcam", layers=",".join(names), target=SegmentationTarget(2, mask)
    )
    assert (
        ex.task["kind"] == "segmentation" and ex.regions.shape == (1, 96, 96) and bool(ex.regions[0, 25, 40])
    )
    wrapped = OutOnly(seg)
    for name in names:
        ref = _grad_cam(wrapped, f"model.{name}", x, SemanticSegmentationTarget(2, mask.astype(np.float32)))
        assert _pearson(ref, ex.raw("gradcam", name)[0]) > 0.999, name
    with torch.no_grad():
        expected = (seg(x)["out"][0, 2] * torch.from_numpy(mask)).sum()
    assert float(ex.probabilities[0, 0]) == pytest.approx(float(expected), rel=1e-5)


def test_detection_equals_grad_cam_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=160, box_score_thresh=0.0
    ).eval()
    state = {k: v.clone() for k, v in det.state_dict().items()}
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = det(x)[0]
    box, label = first["boxes"][0].tolist(), int(first["labels"][0])
    lm = wrap_model(det, preprocessing=Preprocessing(size=(160, 160), mean=(0.0,) * 3, std=(1.0,) * 3))
    names = _layers(det, x, prefix="backbone.body")
    target = BoxScoreTarget([box], [label], names=[f"c{i}" for i in range(5)])
    ex = camanim.explain(lm, x, methods="gradcam", layers=",".join(names), target=target)
    assert ex.boxes == [[(*box, f"c{label}")]] and ex.task["kind"] == "detection"
    for name in names:
        ref = _grad_cam(det, name, x, FasterRCNNBoxScoreTarget([label], [np.array(box)]))
        assert _pearson(ref, ex.raw("gradcam", name)[0]) > 0.999, name
    assert all(torch.equal(state[k], v) for k, v in det.state_dict().items()) and not det.training
    top = camanim.explain(lm, x, methods="gradcam", layers="last", target=BoxScoreTarget(top_n=2))
    assert len(top.boxes[0]) == 2 and top.chosen[-1].name.startswith("backbone")  # the RPN head: no gradient
    assert any("no path leads" in r for _, r in top.passed_over)


def test_similarity_multilabel_and_regression_equal_their_definitions():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    names = _layers(net, x)
    embedder = torchvision.models.resnet18(weights=None).eval()
    embedder.fc = nn.Identity()
    ref_vec = embedder(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)))[0].detach()

    def concept(out):  # grad-cam's tutorial SimilarityToConceptTarget, on one sample
        return torch.nn.functional.cosine_similarity(out, ref_vec, dim=0)

    cases = [
        (embedder, SimilarityTarget(ref_vec), concept),
        (net, MultiLabelTarget([1, 4]), lambda out: out[1].sigmoid() + out[4].sigmoid()),
        (net, RegressionTarget(3), lambda out: out[3]),
    ]
    for model, ours, reference in cases:
        ex = camanim.explain(model, x, methods="gradcam", layers=",".join(names), target=ours)
        for name in names:
            assert _pearson(_grad_cam(model, name, x, reference), ex.raw("gradcam", name)[0]) > 0.999


class TinyFCN(nn.Module):
    """Three conv blocks and a 1x1 classifier, upsampled to the input: per-pixel logits of 3 classes
    (background, filled square, hollow ring), returned as torchvision's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Conv2d(32, 3, 1)

    def forward(self, x):
        out = nn.functional.interpolate(self.classifier(self.features(x)), size=x.shape[-2:], mode="bilinear")
        return {"out": out}


@pytest.fixture(scope="module")
def trained_fcn():
    torch.manual_seed(0)
    model = TinyFCN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y, boxes = synthetic_batch(1200, seed=5)
    labels = torch.zeros(len(x), SIZE, SIZE, dtype=torch.long)
    for i, (t, left, b, r) in enumerate(boxes):
        labels[i, t:b, left:r] = 1 + y[i]
    for _ in range(4):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 48):
            idx = perm[i : i + 48]
            loss = nn.functional.cross_entropy(model(x[idx])["out"], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_a_trained_segmenter_looks_inside_the_shape(trained_fcn):
    """The Grad-CAM of the shape's class over its predicted pixels peaks inside the shape, at the last
    layers (as the classification localisation test does)."""
    x, y, boxes = synthetic_batch(40, seed=6)
    hits = 0
    for i in range(len(x)):
        target = SegmentationTarget(1 + int(y[i]))
        ex = camanim.explain(
            trained_fcn, x[i : i + 1], methods="gradcam", layers="features.7,classifier", target=target
        )
        up = ex.upsampled("gradcam", "classifier")[0]
        r, c = divmod(int(up.argmax()), up.shape[1])
        t, left, b, rt = boxes[i]
        hits += int(t - 2 <= r < b + 2 and left - 2 <= c < rt + 2)
    assert hits >= 34, hits


def test_cli_segmentation_and_bad_combinations(tmp_path, monkeypatch, trained_fcn, capsys):
    lm = wrap_model(
        trained_fcn, preprocessing=Preprocessing(size=(SIZE, SIZE)), class_names=["bg", "square", "ring"]
    )
    monkeypatch.setattr(camanim.cli.commands, "load_model", lambda *a, **k: lm)
    out = tmp_path / "seg"
    args = ["--quiet", "animate", "--task", "segmentation", "--target", "square", "--region", "5,5,40,40"]
    assert main([*args, "--layers", "all", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == {
        "kind": "segmentation",
        "class": 1,
        "region": "box [5.0, 5.0, 40.0, 40.0]",
        "score": "logit",
    }
    assert manifest["targets"][0]["score"] == "target" and (out / "report.html").is_file()
    bad = [
        ["explain", "--task", "segmentation", "--box", "1,2,3,4"],
        ["explain", "--task", "detection", "--box", "5,5,2,2"],
        ["explain", "--task", "embedding"],
        ["explain", "--task", "segmentation", "--top-k", "2"],
        ["animate", "--task", "regression", "--layers", "best", "--by", "average_drop"],
        ["explain", "--task", "segmentation", "--region", "no-such-mask.png"],
    ]
    for argv in bad:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("camanim: error:"), argv
    assert not (tmp_path / "x").exists()


def test_cli_embedding_regression_and_multilabel(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    lm = wrap_model(net, preprocessing=Preprocessing(size=(64, 64)))
    monkeypatch.setattr(camanim.cli.commands, "load_model", lambda *a, **k: lm)
    np.save(tmp_path / "ref.npy", np.random.default_rng(0).normal(size=512).astype(np.float32))
    runs = {
        "emb": [
            "--task",
            "embedding",
            "--reference",
            str(tmp_path / "ref.npy"),
            "--embedding-layer",
            "avgpool",
        ],
        "emb2": ["--task", "embedding", "--reference", "astronaut", "--embedding-layer", "layer4"],
        "reg": ["--task", "regression", "--target", "2"],
        "ml": ["--task", "multilabel", "--target", "0,3"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["--quiet", "animate", "--layers", "3", *extra, "--out", str(out)]) == 0, name
        task = json.loads((out / "manifest.json").read_text())["task"]
        assert (
            task["kind"]
            == {"emb": "embedding", "emb2": "embedding", "reg": "regression", "ml": "multilabel"}[name]
        )
