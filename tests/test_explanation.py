"""The pipeline: localisation on a trained model, invariances, targets, flags, the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camanim
from camanim.errors import ClassNotFoundError, TargetError

from .conftest import synthetic_batch

ONE_PASS = ",".join(camanim.list_methods(one_pass=True))


def _peak_in_box(up: torch.Tensor, boxes) -> float:
    hits = 0
    for b, (top, left, bottom, right) in enumerate(boxes):
        r, c = divmod(int(up[b].argmax()), up.shape[-1])
        hits += top <= r < bottom and left <= c < right
    return hits / len(boxes)


def test_localisation_on_trained_model(localisation_model):
    assert localisation_model.accuracy > 0.95
    x, y, boxes = synthetic_batch(100, seed=7)
    ex = camanim.explain(
        localisation_model.model, x, methods="gradcam,hirescam,layercam", layers="last", target=y.tolist()
    )
    last = ex.chosen[-1].name
    for method in ex.methods:
        assert _peak_in_box(ex.upsampled(method, last), boxes) >= 0.9, method


def test_random_baseline_does_not_localise_as_well(localisation_model):
    x, y, boxes = synthetic_batch(100, seed=8)
    ex = camanim.explain(
        localisation_model.model, x, methods="gradcam,randomcam", layers="last", target=y.tolist()
    )
    last = ex.chosen[-1].name
    assert _peak_in_box(ex.upsampled("gradcam", last), boxes) > _peak_in_box(
        ex.upsampled("randomcam", last), boxes
    )


def test_sweep_equals_single_layer_runs(resnet18):
    x = torch.randn(1, 3, 64, 64)
    sweep = camanim.explain(resnet18, x, methods=ONE_PASS, layers="all", target=7)
    for layer in (sweep.chosen[0], sweep.chosen[len(sweep.chosen) // 2], sweep.chosen[-1]):
        single = camanim.explain(resnet18, x, methods=ONE_PASS, layers=layer.name, target=7)
        assert [c.name for c in single.chosen] == [layer.name]
        for m in sweep.methods:
            assert torch.allclose(
                sweep.raw(m, layer.name), single.raw(m, layer.name), rtol=1e-4, atol=1e-6
            ), (m, layer.name)


def test_batch_equals_one_by_one(resnet18):
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    targets = [1, 500, 999]
    batch = camanim.explain(resnet18, x, methods=ONE_PASS, layers="first,middle,last", target=targets)
    for b in range(3):
        one = camanim.explain(
            resnet18, x[b : b + 1], methods=ONE_PASS, layers="first,middle,last", target=targets[b]
        )
        for m in batch.methods:
            for layer in batch.chosen:
                got, want = batch.raw(m, layer.name)[b], one.raw(m, layer.name)[0]
                # The eigen methods' subspace iteration stops at a relative residual of 1e-4, after a
                # number of iterations that depends on every sample of the batch.
                atol = 1e-3 * float(want.abs().max()) if m.startswith("eigen") else 1e-5
                assert torch.allclose(got, want, rtol=1e-3, atol=atol), (m, layer.name)


def test_default_model_predicts_and_explains(default_model):
    ex = camanim.explain(default_model, "chelsea", methods="gradcam,eigencam", layers="last")
    assert ex.targets == (285,) and ex.target_names == ("Egyptian cat",)
    assert ex.top(1)[0][2] == pytest.approx(0.773, abs=0.01)
    assert ex.input.shape == (1, 3, 224, 224) and ex.display.shape == (1, 224, 224, 3)
    coffee = camanim.explain(default_model, "coffee", layers="last")
    assert coffee.targets == (967,)


def test_targets_by_name_topk_and_errors(default_model):
    ex = camanim.explain(default_model, "chelsea", layers="last", target="tiger cat")
    assert ex.targets == (282,)
    top = camanim.explain(default_model, "chelsea", layers="last", top_k=3)
    assert top.targets == (285, 282, 281) and top.input.shape[0] == 3
    single = camanim.explain(default_model, "chelsea", layers="last", target=282)
    last = top.chosen[-1].name
    assert torch.allclose(top.raw("gradcam", last)[1], single.raw("gradcam", last)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ClassNotFoundError, match="tiger cat"):
        camanim.explain(default_model, "chelsea", layers="last", target="tiger kat")
    with pytest.raises(TargetError, match="out of range"):
        camanim.explain(default_model, "chelsea", layers="last", target=1000)


class Dead(nn.Module):
    """A layer whose output is zero everywhere and a branch with no path to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.zero = nn.Conv2d(4, 4, 1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(self, x):
        a = self.conv(x)
        self.branch(a)
        z = self.zero(a)
        return self.fc((a + z).mean(dim=(2, 3)))


def test_flags_flat_zero_and_no_gradient():
    ex = camanim.explain(Dead().eval(), torch.randn(1, 3, 8, 8), methods="gradcam,eigencam", target=0)
    assert "no_gradient" in ex.flags["gradcam"]["branch"]
    assert {"flat", "zero"} <= set(ex.flags["gradcam"]["zero"])
    assert torch.isfinite(ex.raw("gradcam", "zero")).all()
    assert ex.flags["eigencam"]["branch"] == ()  # gradient-free methods still have a map there
    assert not ex.flags["gradcam"]["conv"]


class Overflow(nn.Module):
    """A side branch whose output overflows to inf at one position (no path to the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.blowup = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.blowup.bias[2] = float("inf")

    def forward(self, x):
        a = self.conv(x)
        self.blowup(a)
        return self.fc(a.mean(dim=(2, 3)))


def test_nonfinite_maps_are_zeroed_and_flagged():
    ex = camanim.explain(Overflow().eval(), torch.randn(1, 3, 8, 8), methods="eigencam,randomcam", target=0)
    # RandomCAM's weighted sum carries the inf into its map: replaced by 0 and flagged.
    assert "nonfinite" in ex.flags["randomcam"]["blowup"]
    # The eigen methods treat non-finite values as 0 (as grad-cam means to) before their decomposition.
    assert "nonfinite" not in ex.flags["eigencam"]["blowup"] and ex.raw("eigencam", "blowup").abs().max() > 0
    for method in ("eigencam", "randomcam"):
        assert torch.isfinite(ex.raw(method, "blowup")).all()
        assert "nonfinite" not in ex.flags[method]["conv"]


def test_token_model_maps():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5).eval()
    ex = camanim.explain(
        vit, torch.randn(1, 3, 64, 64), methods="gradcam,hirescam", layers="blocks.*", target=2
    )
    assert ex.chosen and all(layer.kind == "token" for layer in ex.chosen)
    assert ex.raw("gradcam", ex.chosen[-1].name).shape == (1, 4, 4)


def test_display_and_input_agree(default_model):
    ex = camanim.explain(default_model, "coffee", layers="last")
    pixels = default_model.preprocessing.denormalize(ex.input)[0].permute(1, 2, 0).numpy()
    assert np.abs(pixels * 255 - ex.display[0]).max() <= 1.0


def test_keep_nonspatial_gives_one_by_one_maps(tiny_model):
    x = torch.randn(1, 3, 32, 32)
    default = camanim.explain(tiny_model, x, methods="gradcam", target=0)
    kept = camanim.explain(tiny_model, x, methods="gradcam", target=0, keep_nonspatial=True)
    extra = [layer for layer in kept.chosen if not layer.is_spatial]
    assert {layer.name for layer in extra} == {"pool", "fc"}
    assert all(layer.name not in {c.name for c in default.chosen} for layer in extra)
    assert kept.raw("gradcam", "pool").shape == (1, 1, 1)
    assert "flat" in kept.flags["gradcam"]["fc"]
