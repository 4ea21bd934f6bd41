"""Task targets in the commands that fuse or survey: FM-G-CAM of K task targets (one forward pass, K backward
passes, equal to the fusion of K single-target explanations) and studies of a task target per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import camanim
from camanim.cli import main
from camanim.compute.fusion import fuse
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.tasks import (
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
)
from camanim.errors import CamanimError
from camanim.pipelines.fmgcam import fmgcam
from camanim.pipelines.study.units import TaskSpec

from .conftest import SIZE, synthetic_batch

TIMM = ["--model", "timm:test_efficientnet", "--weights", "none", "--num-classes", "5", "--input-size", "48"]
SEG_CLASSES = ("bg", "square", "ring")


class Passes:
    """Forwards of ``model`` and backward passes through the output of ``first``, counted by hooks."""

    def __init__(self, model: nn.Module, first: nn.Module) -> None:
        self.forwards = self.backwards = 0
        self.handles = [model.register_forward_hook(self._forward), first.register_forward_hook(self._first)]

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


class SegNet(nn.Module):
    """Two conv blocks and a 1x1 classifier upsampled to the input: per-pixel logits of 3 classes, returned
    as torchvision's segmentation models do (``{"out": (B, 3, H, W)}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Conv2d(16, 3, 1)
        with torch.no_grad():  # every class predicted somewhere on a random picture
            self.classifier.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = nn.functional.interpolate(self.classifier(self.features(x)), size=x.shape[-2:], mode="bilinear")
        return {"out": out}


def seg_model():
    """A study's model factory: an untrained SegNet (the study seeds it) at 48 x 48 pixels."""
    return wrap_model(SegNet(), preprocessing=Preprocessing(size=(SIZE, SIZE)), class_names=SEG_CLASSES)


def head_model():
    """A study's model factory: a small untrained CNN with 4 outputs (multi-label, regression, embedding)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    return wrap_model(net, preprocessing=Preprocessing(size=(SIZE, SIZE)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three small PNGs of shapes."""
    folder = tmp_path_factory.mktemp("task_images")
    x, _, _ = synthetic_batch(3, seed=7)
    for i in range(3):
        arr = (x[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return net, x


# ---------------------------------------------------------------------------------------------------------
# FM-G-CAM of task targets.
# ---------------------------------------------------------------------------------------------------------


def test_fmgcam_of_three_multilabel_targets_is_the_fusion_of_single_explains(classifier):
    net, x = classifier
    layers = "layer3,layer4"
    with torch.no_grad():
        ranked = net(x)[0].topk(3).indices.tolist()
    # single-target explains first (they also list the model's layers: the dry run is not counted below)
    singles = [
        camanim.explain(net, x, methods="gradcam", layers=layers, target=MultiLabelTarget([c]))
        for c in ranked
    ]
    with Passes(net, net.conv1) as p:
        res = fmgcam(net, x, target=MultiLabelTarget(top_k=3), layers=layers, base="gradcam")
    assert (p.forwards, p.backwards) == (1, 3)
    assert res.classes == tuple(ranked) and res.multilabel and res.score_label == "sigmoid"
    assert res.names == tuple(f"sigmoid of {c}" for c in ranked)
    assert res.task["kind"] == "multilabel" and res.task["labels"] == ranked
    for k, single in enumerate(singles):
        assert res.probabilities[k] == pytest.approx(float(single.probabilities[0, 0]), abs=1e-6)
    for name in res.layers:
        expected = fuse(torch.stack([s.maps["gradcam"][name][0] for s in singles]))
        assert float((res.fused[name] - expected).abs().max()) <= 1e-5, name
    # the classifier's multi-label case (multilabel=True: the top-K classes scored by sigmoid) fuses the same
    classic = fmgcam(net, x, k=3, multilabel=True, layers=layers)
    assert classic.classes == res.classes and not classic.is_task
    assert classic.probabilities == pytest.approx(res.probabilities, abs=1e-6)
    for name in res.layers:
        assert torch.allclose(classic.fused[name], res.fused[name], atol=1e-5)
    # labels given, or a list of targets: the same fusion
    listed = fmgcam(net, x, target=[MultiLabelTarget([c]) for c in ranked], layers=layers)
    for name in res.layers:
        assert torch.allclose(listed.fused[name], res.fused[name], atol=1e-5)


def test_fmgcam_of_two_segmentation_classes_names_each_and_draws_regions(tmp_path):
    torch.manual_seed(1)
    lm = seg_model()
    x, _, _ = synthetic_batch(1, seed=2)
    res = fmgcam(lm, x, target=SegmentationTarget([1, 2], each=True), layers="features.3,classifier")
    assert res.names == ("class 1 over its predicted pixels", "class 2 over its predicted pixels")
    assert res.classes == (1, 2) and res.score_label == "score" and not res.multilabel
    regions = res.explanation.regions
    assert regions.shape == (2, SIZE, SIZE) and bool(regions[0].any()) and bool(regions[1].any())
    for k, c in enumerate((1, 2)):
        one = camanim.explain(lm, x, methods="gradcam", layers="classifier", target=SegmentationTarget(c))
        assert res.probabilities[k] == pytest.approx(float(one.probabilities[0, 0]), rel=1e-5)
        assert torch.equal(one.regions[0], regions[k])
    plain = res.render(panels=False)
    unmarked = camanim.outputs.fmgcam.fused_overlay(res.fused["classifier"], res.explanation.display[0])
    assert plain.shape[0] > unmarked.shape[0] and not np.array_equal(plain[: unmarked.shape[0]], unmarked)
    path = res.save(tmp_path / "seg")
    manifest = json.loads((path / "manifest.json").read_text())
    table = manifest["fmgcam"]["classes"]
    assert [(c["class"], c["name"]) for c in table] == list(zip(res.classes, res.names, strict=True))
    assert (
        manifest["fmgcam"]["task"]["class"] == [1, 2] and manifest["fmgcam"]["probability"] == "target score"
    )
    assert np.load(path / "regions.npy").shape == (2, SIZE, SIZE)


def test_fmgcam_refuses_targets_with_nothing_to_fuse(classifier):
    net, x = classifier
    bad = [
        SimilarityTarget(torch.randn(6)),  # one score
        RegressionTarget(2),  # one output
        MultiLabelTarget([1, 4]),  # one summed score
        [MultiLabelTarget([1])],  # a list of one
        MultiLabelTarget([1], each=True),  # one target found
    ]
    for target in bad:
        with pytest.raises(CamanimError, match="several targets"):
            fmgcam(net, x, target=target, layers="layer4")


def test_cli_fmgcam_multilabel_writes_a_complete_bundle(tmp_path, capsys):
    out = tmp_path / "ml"
    argv = ["--quiet", "fmgcam", *TIMM, "--task", "multilabel", "--top-k", "3", "--layers", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sigmoid=" in printed and f"bundle: {out}" in printed
    for name in ("manifest.json", "fmgcam.png", "maps.npz", "input.npy", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"]["kind"] == "multilabel" and manifest["task"]["top_k"] == 3
    entry = manifest["fmgcam"]
    assert entry["k"] == 3 and entry["probability"] == "sigmoid" and len(entry["layers"]) == 3
    assert [c["name"] for c in entry["classes"]] == [
        f"sigmoid of class {c}" for c in manifest["task"]["labels"]
    ]
    assert len(entry["figures"]) == 3 and all((out / f).is_file() for f in entry["figures"].values())
    maps = np.load(out / "maps.npz")
    assert all(maps[f"fmgcam/{name}"].shape[0] == 3 for name in entry["layers"])
    # labels named instead: the same fusion of those labels
    out2 = tmp_path / "ml2"
    labels = ",".join(str(c) for c in manifest["task"]["labels"])
    argv2 = ["--quiet", "fmgcam", *TIMM, "--task", "multilabel", "--target", labels, "--layers", "3"]
    assert main([*argv2, "--out", str(out2)]) == 0
    maps2 = np.load(out2 / "maps.npz")
    for name in entry["layers"]:
        np.testing.assert_allclose(maps2[f"fmgcam/{name}"], maps[f"fmgcam/{name}"], atol=1e-5)


def test_cli_fmgcam_refuses_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "ref.npy", np.zeros(5, np.float32))
    bad = [
        ["--task", "embedding", "--reference", str(tmp_path / "ref.npy")],
        ["--task", "regression", "--target", "1"],
        ["--task", "regression", "--target", "a,b"],
        ["--task", "segmentation", "--target", "1"],
        ["--task", "multilabel", "--target", "2"],
        ["--task", "multilabel", "--top-k", "1"],
        ["--task", "detection"],
        ["--task", "segmentation", "--target", "1,2", "--multilabel"],
    ]
    for extra in bad:
        assert main(["fmgcam", *TIMM, *extra, "--out", str(tmp_path / "x")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("camanim: error:"), (extra, err)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# Studies of task targets.
# ---------------------------------------------------------------------------------------------------------

STUDY_ARGS = ["--layers", "last-2", "--percentages", "20,80", "--threads", "1", "--no-figures"]


def test_cli_study_segmentation_scores_each_images_class_region(images, tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="studies store their results with pyarrow")
    from camanim.outputs.study.runner import load_study

    out = tmp_path / "study"
    model = "tests.test_tasks_commands:seg_model"
    argv = ["--quiet", "study", "--images", str(images), "--models", model, *STUDY_ARGS]
    seg = ["--task", "segmentation", "--target", "square"]
    assert main([*argv, *seg, "--out", str(out)]) == 0
    assert "3 units; 0 already done, 3 run now, 0 failed" in capsys.readouterr().out
    study = load_study(out)
    assert study.settings["task"] == TaskSpec("segmentation", "square").__dict__
    summary = study.summary.to_pylist()
    assert len(summary) == 3
    for row in summary:
        assert row["task"] == "segmentation" and row["target_source"] == "given"
        assert row["target_name"] == "class 1 over its predicted pixels" and row["target"] is None
        assert np.isfinite(row["target_score"]) and row["target_score"] == row["target_probability"]
        assert all(np.isfinite(row[c]) for c in ("mean_layerwise_road", "max_ybroad", "final_layer_road"))
    roads = study.layers.column("road").to_pylist()
    assert len(roads) == 6 and all(np.isfinite(roads))
    assert len({r["target_score"] for r in summary}) == 3  # each image's own region
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"task", "target_score"} <= set(header)
    # the same settings resume; another target class is refused in one line
    assert main([*argv, *seg, "--out", str(out)]) == 0
    assert "3 already done, 0 run now" in capsys.readouterr().out
    assert main([*argv, "--task", "segmentation", "--target", "ring", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "task" in err[0]


def test_study_multilabel_regression_and_embedding_targets_per_image(images, tmp_path):
    pytest.importorskip("pyarrow", reason="studies store their results with pyarrow")
    from camanim.outputs.study.runner import load_study, run_study

    common = {"models": "tests.test_tasks_commands:head_model", "layers": "last-2", "percentages": (20, 80)}
    cases = {
        "multilabel": ({}, "top1", "sigmoid of "),
        "regression": ({"target": "2"}, "given", "output 2"),
        "embedding": ({"reference": str(images / "img0.png")}, "reference", "similarity to img0.png"),
    }
    for kind, (extra, source, name) in cases.items():
        out = tmp_path / kind
        res = run_study(images, out, task=kind, figures=False, threads=1, **common, **extra)
        assert res.complete and not res.failed, (kind, res.failed)
        rows = load_study(out).summary.to_pylist()
        assert {r["task"] for r in rows} == {kind} and {r["target_source"] for r in rows} == {source}
        assert all(r["target_name"].startswith(name) for r in rows), kind
        assert all(np.isfinite(r["target_score"]) and np.isfinite(r["max_ybroad"]) for r in rows), kind
        if kind == "embedding":  # the reference image is its own nearest embedding
            best = max(rows, key=lambda r: r["target_score"])
            assert best["image"] == "img0.png" and best["target_score"] == pytest.approx(1.0, abs=1e-5)


def test_cli_study_refuses_task_settings_in_one_line(images, tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="studies store their results with pyarrow")
    argv = ["study", "--images", str(images), "--models", "tests.test_tasks_commands:seg_model", *STUDY_ARGS]
    bad = [
        ["--task", "segmentation"],  # no class and no labels
        ["--task", "detection", "--box", "1,1,9,9"],  # a box of one image
        ["--task", "segmentation", "--target", "1", "--each"],  # several targets
        ["--task", "embedding"],  # no reference
        ["--task", "multilabel", "--region", "1,1,9,9"],  # a region of a segmentation
    ]
    for extra in bad:
        assert main([*argv, *extra, "--out", str(tmp_path / "x")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("camanim: error:"), (extra, err)
    assert not (tmp_path / "x").exists()
