"""K task targets of one image from one capture: one forward pass, one backward pass per target, each target's
maps equal to its own call's, against grad-cam 1.5.7, for multi-label labels, detections and segmentation
classes, and from the CLI (``--each``)."""

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
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.tasks import BoxScoreTarget, MultiLabelTarget, SegmentationTarget, StackedTarget
from camanim.errors import TargetError

from .test_tasks import TinyFCN, _grad_cam, _layers, _pearson

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


class Passes:
    """Forwards of ``model`` and backward passes through the output of ``first`` (a tensor hook registered at
    each forward fires once per backward pass that reaches it), counted by hooks."""

    def __init__(self, model: nn.Module, first: nn.Module) -> None:
        self.forwards = self.backwards = 0
        self.handles = [
            model.register_forward_hook(self._forward),
            first.register_forward_hook(self._first),
        ]

    def _forward(self, *_: object) -> None:
        self.forwards += 1

    def _first(self, _m: nn.Module, _i: object, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, _g: torch.Tensor) -> None:
        self.backwards += 1

    def __enter__(self) -> Passes:
        return self

    def __exit__(self, *_: object) -> None:
        for h in self.handles:
            h.remove()


def _max_diff(ex_k, row: int, ex_1) -> float:
    return max(
        float((ex_k.maps[m][n][row] - ex_1.maps[m][n][0]).abs().max())
        for m in ex_k.maps
        for n in ex_k.maps[m]
    )


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return net, x, _layers(net, x)


def test_k_multilabel_targets_share_one_forward_and_equal_single_calls(classifier):
    net, x, names = classifier
    layers = ",".join(names)
    methods = "gradcam,hirescam,gradcam++"
    labels = (1, 4, 5)
    singles = [
        camanim.explain(net, x, methods=methods, layers=layers, target=MultiLabelTarget([c])) for c in labels
    ]
    with Passes(net, net.conv1) as p:
        ex = camanim.explain(
            net, x, methods=methods, layers=layers, target=MultiLabelTarget(labels, each=True)
        )
    assert (p.forwards, p.backwards) == (1, 3)
    assert ex.target_names == ("sigmoid of 1", "sigmoid of 4", "sigmoid of 5")
    assert ex.input.shape[0] == 3 and ex.display.shape[0] == 3 and ex.targets == (0, 0, 0)
    assert ex.maps["gradcam"][names[-1]].shape[0] == 3
    with torch.no_grad():
        expected = net(x)[0, list(labels)].sigmoid()
    assert torch.allclose(ex.probabilities[:, 0], expected, atol=1e-6)
    for k, single in enumerate(singles):
        assert _max_diff(ex, k, single) <= 1e-5, k
    # a list of targets stacks them: the same maps
    listed = camanim.explain(
        net, x, methods=methods, layers=layers, target=[MultiLabelTarget([c]) for c in labels]
    )
    assert listed.task["kind"] == "multilabel" and len(listed.task["targets"]) == 3
    for k, single in enumerate(singles):
        assert _max_diff(listed, k, single) <= 1e-5, k
    # top_k: the labels of highest sigmoid score, each
    top = camanim.explain(net, x, methods="gradcam", layers=layers, target=MultiLabelTarget(top_k=2))
    with torch.no_grad():
        ranked = net(x)[0].topk(2).indices.tolist()
    assert top.task["labels"] == ranked and top.target_names == tuple(f"sigmoid of {c}" for c in ranked)
    # the same maps as the top-K classes of the head scored by sigmoid (what FM-G-CAM's multilabel fuses)
    classes = camanim.explain(net, x, methods="gradcam", layers=layers, top_k=2, score="sigmoid")
    assert classes.targets == tuple(ranked)
    for name in names:
        assert torch.allclose(top.maps["gradcam"][name], classes.maps["gradcam"][name], atol=1e-5)


def test_k_multilabel_targets_equal_grad_cam(classifier):
    """Each target's map against grad-cam's ``ClassifierOutputTarget`` on the sigmoid of the head."""
    net, x, names = classifier
    ex = camanim.explain(
        net, x, methods="gradcam", layers=",".join(names), target=MultiLabelTarget([1, 4], each=True)
    )
    sigmoid_head = nn.Sequential(net, nn.Sigmoid()).eval()
    for k, label in enumerate((1, 4)):
        for name in names:
            ref = _grad_cam(sigmoid_head, f"0.{name}", x, ClassifierOutputTarget(label))
            assert _pearson(ref, ex.raw("gradcam", name)[k]) >= 0.999, (label, name)


def test_k_targets_explain_one_image(classifier):
    net, x, names = classifier
    with pytest.raises(TargetError, match="one image"):
        camanim.explain(
            net, x.expand(2, -1, -1, -1), layers=names[-1], target=MultiLabelTarget([1, 2], each=True)
        )
    with pytest.raises(TargetError, match="same way"):
        StackedTarget([MultiLabelTarget([1]), SegmentationTarget(1)])


def test_top_n_detections_each_share_one_forward():
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=160, box_score_thresh=0.0
    ).eval()
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    lm = wrap_model(det, preprocessing=Preprocessing(size=(160, 160), mean=(0.0,) * 3, std=(1.0,) * 3))
    layers = ",".join(_layers(det, x, prefix="backbone.body"))
    camanim.explain(lm, x, methods="gradcam", layers=layers, target=BoxScoreTarget(top_n=1))  # warm-up
    first = next(m for m in det.backbone.body.modules() if isinstance(m, nn.Conv2d))
    with Passes(det, first) as p:
        ex = camanim.explain(
            lm, x, methods="gradcam", layers=layers, target=BoxScoreTarget(top_n=3, each=True)
        )
    assert (p.forwards, p.backwards) == (1, 3)
    assert len(ex.boxes) == 3 and all(len(b) == 1 for b in ex.boxes)
    assert ex.maps["gradcam"][ex.chosen[-1].name].shape[0] == 3 and len(set(ex.target_names)) == 3
    for k, ((x1, y1, x2, y2, label),) in enumerate(ex.boxes):
        single = camanim.explain(
            lm, x, methods="gradcam", layers=layers, target=BoxScoreTarget([(x1, y1, x2, y2)], [int(label)])
        )
        assert float(single.probabilities[0, 0]) == pytest.approx(float(ex.probabilities[k, 0]), abs=1e-5)
        assert _max_diff(ex, k, single) <= 1e-5, k


def test_segmentation_classes_each():
    torch.manual_seed(0)
    seg = TinyFCN().eval()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((48, 48), bool)
    mask[10:30, 12:40] = True
    target = SegmentationTarget([0, 2], mask, each=True)
    ex = camanim.explain(seg, x, methods="gradcam", layers="features.4,classifier", target=target)
    assert ex.regions.shape == (2, 48, 48) and ex.probabilities.shape == (2, 1)
    for k, c in enumerate((0, 2)):
        single = camanim.explain(
            seg, x, methods="gradcam", layers="features.4,classifier", target=SegmentationTarget(c, mask)
        )
        assert _max_diff(ex, k, single) <= 1e-5


def test_cli_each_explain_and_animate(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    lm = wrap_model(net, preprocessing=Preprocessing(size=(64, 64)))
    monkeypatch.setattr(camanim.cli.commands, "load_model", lambda *a, **k: lm)
    task = ["--task", "multilabel", "--target", "0,3", "--each"]
    out = tmp_path / "ex"
    assert main(["--quiet", "explain", "--layers", "3", *task, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["targets"]] == ["sigmoid of class 0", "sigmoid of class 3"]
    assert manifest["task"]["each"] is True
    with np.load(out / "maps.npz") as maps:
        assert all(maps[k].shape[0] == 2 for k in maps.files)
    anim = tmp_path / "anim"
    assert main(["--quiet", "animate", "--layers", "3", *task, "--out", str(anim)]) == 0
    for k, name in enumerate(["sigmoid of class 0", "sigmoid of class 3"]):
        sub = anim / f"target_{k}"
        manifest = json.loads((sub / "manifest.json").read_text())
        assert manifest["animation"]["sample"] == k and (sub / "report.html").is_file()
        assert manifest["targets"][k]["name"] == name
    capsys.readouterr()
    bad = [
        ["explain", "--task", "regression", "--target", "1", "--each"],
        ["animate", "--task", "multilabel", "--target", "0,3", "--each", "--road"],
    ]
    for argv in bad:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("camanim: error:"), argv
