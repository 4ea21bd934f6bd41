"""FM-G-CAM: Eqs 1-6 against an independent re-implementation, invariants, the reference package, rendering."""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch

import camanim
from camanim.compute.fusion import fmgcam_sweep, fuse
from camanim.compute.normalize import normalize
from camanim.outputs.fmgcam import MAX_DISTINCT_COLORS, class_colors, fused_overlay
from camanim.pipelines.fmgcam import fmgcam

from .conftest import no_hooks

# ------------------------------------------------------------------------- an independent Eqs 1-6, in loops


def _gelu(v: float) -> float:
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def _elu(v: float) -> float:
    return v if v > 0 else math.expm1(v)


def _paper_fmgcam(R: np.ndarray, activation: str) -> np.ndarray:
    """Eqs 4-6 written out element by element, in float64, from the paper's text.

    ``R`` is ``(K, I, J)``, most probable class first (Eq 1 orders the classes; Eqs 2-3 made the maps).
    """
    K, rows, cols = R.shape
    S = np.zeros_like(R, dtype=np.float64)
    for i in range(rows):
        for j in range(cols):
            m = max(R[k, i, j] for k in range(K))
            for k in range(K):
                S[k, i, j] = R[k, i, j] if R[k, i, j] == m else 0.0  # Eq 4
    S_prime = np.stack([S[k] for k in range(K)], axis=-1)  # Eq 5: I x J x K
    norm = math.sqrt(sum(float(v) ** 2 for v in S_prime.ravel()))  # ||S'||_2 of the whole tensor
    act = {"relu": lambda v: max(v, 0.0), "elu": _elu, "gelu": _gelu}[activation]
    out = np.vectorize(act)(S_prime / norm)  # Eq 6
    return np.moveaxis(out, -1, 0)  # back to (K, I, J)


@pytest.mark.parametrize("activation", ["relu", "elu", "gelu"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fuse_equals_paper_equations(activation, k):
    rng = np.random.default_rng(k)
    R = rng.normal(size=(k, 7, 9)).astype(np.float32)
    ours = fuse(torch.from_numpy(R), activation).numpy()
    ref = _paper_fmgcam(R.astype(np.float64), activation)
    assert np.array_equal(ours == 0, ref == 0)  # the same positions filtered out, exactly
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-8)  # float32 rounding of the same numbers


def test_fuse_ties_and_degenerate_maps():
    tie = torch.tensor([[[2.0, 1.0]], [[2.0, 3.0]]])
    out = fuse(tie)
    assert out[0, 0, 0] > 0 and out[1, 0, 0] == 0  # a tie goes to the more probable class
    assert torch.equal(fuse(torch.zeros(3, 4, 4)), torch.zeros(3, 4, 4))  # no division by zero
    nan = torch.tensor([[[float("nan"), 1.0]]])
    assert torch.isfinite(fuse(nan)).all()
    with pytest.raises(KeyError, match="activation"):
        fuse(tie, "tanh")
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        fuse(torch.zeros(4, 4))


def test_norm_options():
    R = torch.tensor([[[4.0, 0.0]], [[0.0, 1.0]]])
    assert torch.allclose(fuse(R, norm="stack"), R / math.sqrt(17))
    assert torch.allclose(fuse(R, norm="class"), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert torch.equal(fuse(R, norm="none"), R)


# ---------------------------------------------------------------------------------------- the pipeline


@pytest.fixture
def tiny(tiny_model):
    torch.manual_seed(5)
    return tiny_model, torch.randn(1, 3, 48, 48)


def test_each_position_carries_at_most_one_class(tiny):
    model, x = tiny
    for activation in ("relu", "elu", "gelu"):
        res = fmgcam(model, x, k=4, layers="all", activation=activation)
        for layer in res.layers:
            assert res.fused[layer].shape[0] == 4
            assert int((res.fused[layer] != 0).sum(dim=0).max()) <= 1, (activation, layer)


def test_k1_reduces_to_the_base_methods_normalised_map(tiny):
    model, x = tiny
    for base in ("gradcam", "hirescam"):
        res = fmgcam(model, x, k=1, base=base, layers="all")
        single = camanim.explain(model, x, methods=base, layers="all")
        assert res.classes == single.targets
        for layer in res.layers:
            m = single.raw(base, layer)[0]
            torch.testing.assert_close(res.fused[layer][0], m.clamp_min(0) / m.norm(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(
                normalize(res.fused[layer][0].numpy()), normalize(m.clamp_min(0).numpy()), atol=1e-5
            )


def test_class_maps_come_from_one_capture(tiny, monkeypatch):
    """The K classes share ONE capture (one forward of the image, one backward pass per class), and each
    class's base map equals a single-class explanation of that class."""
    import camanim.pipelines.explain as explanation

    model, x = tiny
    calls = []
    original = explanation.capture

    grads = []
    real_grad = torch.autograd.grad

    def counting(net, inp, *args, **kwargs):
        calls.append(tuple(inp.shape))
        monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: grads.append(1) or real_grad(*a, **kw))
        try:
            return original(net, inp, *args, **kwargs)
        finally:
            monkeypatch.setattr(torch.autograd, "grad", real_grad)

    monkeypatch.setattr(explanation, "capture", counting)
    res = fmgcam(model, x, k=3, base="gradcam++", layers="first,last")
    assert calls == [(1, 3, 48, 48)] and len(grads) == 3
    probs = torch.softmax(model(x), dim=1)[0].detach()
    assert list(res.classes) == probs.argsort(descending=True)[:3].tolist()
    np.testing.assert_allclose(res.probabilities, probs[list(res.classes)].numpy(), rtol=1e-5)
    monkeypatch.setattr(explanation, "capture", original)
    for rank, c in enumerate(res.classes):
        one = camanim.explain(model, x, methods="gradcam++", layers="first,last", target=c)
        for layer in res.layers:
            torch.testing.assert_close(
                res.base_maps[layer][rank], one.raw("gradcam++", layer)[0], rtol=1e-4, atol=1e-6
            )
    assert no_hooks(model)


def test_sweep_over_an_explanation(tiny):
    model, x = tiny
    ex = camanim.explain(model, x, methods="gradcam,eigencam", layers="all", top_k=3)
    sweep = fmgcam_sweep(ex)  # the first class-discriminative method: gradcam
    assert list(sweep) == [layer.name for layer in ex.chosen]
    for layer, fused in sweep.items():
        torch.testing.assert_close(fused, fuse(ex.raw("gradcam", layer)))
    with pytest.raises(ValueError, match="class-discriminative"):
        fmgcam_sweep(camanim.explain(model, x, methods="eigencam", layers="last", top_k=2))
    with pytest.raises(ValueError, match="top_k"):
        fmgcam_sweep(
            camanim.explain(model, torch.cat([x, x]), methods="gradcam", layers="last", target=[1, 1])
        )


def test_multilabel_ranks_and_scores_by_sigmoid(tiny):
    model, x = tiny
    res = fmgcam(model, x, k=2, multilabel=True)
    logits = model(x)[0].detach()
    assert list(res.classes) == logits.argsort(descending=True)[:2].tolist()
    np.testing.assert_allclose(res.probabilities, logits.sigmoid()[list(res.classes)].numpy(), rtol=1e-5)
    assert res.explanation is not None and res.multilabel


def test_base_must_be_class_discriminative(tiny):
    model, x = tiny
    for base in ("eigencam", "fem", "dff"):
        with pytest.raises(ValueError, match="class-discriminative base method.*Accepted: gradcam, "):
            fmgcam(model, x, base=base)


def test_model_left_as_found(tiny):
    model, x = tiny
    model.train()
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    fmgcam(model, x, k=3, layers="all")
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and no_hooks(model)


# --------------------------------------------------------------------------- the reference implementation


@pytest.fixture(scope="module")
def reference_case():
    """A seeded random ResNet-18 and the reference package's maps at ``layer4`` for its top-3 classes."""
    pytest.importorskip("xai_inference_engine", reason="the xai-inference-engine package is not installed")
    import torchvision
    from xai_inference_engine.utils import GradUtils

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _, order, grads, acts = GradUtils.get_model_pred_with_grads(model, x[0], model.layer4, 3)
        weights = [g[0].mean(dim=(0, 2, 3)).detach().clone() for g in grads]
        acts0 = acts[0].detach().clone()  # before weight_activations multiplies it in place
        maps = torch.cat(GradUtils.weight_activations(acts, grads))  # (K, h, w)
    finally:
        for n, p in model.named_parameters():  # the package leaves every parameter frozen and .grad filled
            p.requires_grad_(flags[n])
            p.grad = None
    return model, x, order[:3].tolist(), maps, weights, acts0


def test_top1_map_equals_reference_package(reference_case):
    from xai_inference_engine.services import FMGCam

    model, x, order, ref_maps, _, _ = reference_case
    res = fmgcam(model, x, k=3, layers="layer4")
    assert list(res.classes) == order
    ours = res.base_maps["layer4"]  # (K, h, w): Grad-CAM, without the paper's 1/C
    torch.testing.assert_close(ours[0] / 512, ref_maps[0], rtol=1e-4, atol=1e-7)
    # The package's own top-1 output (no filtering, no L2) after its ReLU and min-max:
    flags = [p.requires_grad for p in model.parameters()]
    try:
        _, _, top1 = FMGCam(model, model.layer4, torch.device("cpu"))(
            x[0], class_count=3, class_rank_index=0, enhance=False
        )
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    np.testing.assert_allclose(normalize(ours[0].clamp_min(0).numpy()), top1[0], atol=1e-5)


def test_reference_package_defects_are_as_documented(reference_case):
    """Its class-k map is weighted by the product of the channel weights of classes 1..k (one tensor
    multiplied in place), which is why only its top-1 map can be compared."""
    _, _, _, ref_maps, weights, acts = reference_case
    expected = torch.einsum("c,chw->hw", weights[0] * weights[1], acts[0]) / 512
    torch.testing.assert_close(ref_maps[1], expected, rtol=1e-4, atol=1e-9)
    correct = torch.einsum("c,chw->hw", weights[1], acts[0]) / 512
    assert not torch.allclose(ref_maps[1], correct, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- rendering


def test_class_colors_distinct_and_larger_k(caplog):
    small = class_colors(MAX_DISTINCT_COLORS)
    assert small.shape == (MAX_DISTINCT_COLORS, 3) and len({tuple(c) for c in small}) == MAX_DISTINCT_COLORS
    assert not any(c[0] == c[1] == c[2] for c in small)  # no grey
    with caplog.at_level(logging.WARNING, logger="camanim.outputs.fmgcam"):
        big = class_colors(40)
    assert big.shape == (40, 3) and len({tuple(c) for c in big}) == 40
    assert "evenly spaced hues" in caplog.text


def test_fused_overlay_colours_each_class():
    image = np.full((8, 8, 3), 100, np.uint8)
    fused = torch.zeros(2, 2, 2)
    fused[0, 0, 0] = 1.0  # class 1 at the top-left cell only
    fused[1, 1, 1] = 0.5  # class 2, half as strong, bottom-right
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    out = fused_overlay(fused, image, colors=colors, alpha=1.0)
    assert out.shape == (8, 8, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)  # full intensity: the hue
    assert tuple(out[7, 7]) == (50, 50, 178)  # half intensity: half image, half hue
    assert tuple(out[0, 7]) == (100, 100, 100)  # no class: the image
    np.testing.assert_array_equal(fused_overlay(fused, image, colors=colors, alpha=0.0), image)


def test_render_and_bundle(tiny, tmp_path):
    from camanim.outputs.bundle import load_maps, read_manifest

    model, x = tiny
    res = fmgcam(model, x, k=3, layers="first,last")
    fig = res.render()
    assert fig.dtype == np.uint8 and fig.shape[0] % 2 == 0 and fig.shape[1] >= 4 * 48
    assert res.render(panels=False).shape[1] < fig.shape[1]
    path = res.save(tmp_path / "fm")
    manifest = read_manifest(path)
    assert (path / "fmgcam.png").is_file()
    assert [c["class"] for c in manifest["fmgcam"]["classes"]] == list(res.classes)
    assert manifest["fmgcam"]["layers"] == list(res.layers) and len(manifest["fmgcam"]["figures"]) == 2
    maps = load_maps(path)
    for layer in res.layers:
        np.testing.assert_array_equal(maps[f"fmgcam/{layer}"], res.fused[layer].numpy())
        assert maps[f"gradcam/{layer}"].shape == tuple(res.fused[layer].shape)
    json.dumps(manifest)


def test_cli_fmgcam(tmp_path, capsys):
    from camanim.cli import main
    from camanim.outputs.bundle import load_maps, read_manifest

    out = tmp_path / "fm"
    args = ["fmgcam", "--model", "resnet18", "--weights", "none", "--top-k", "2", "--activation", "gelu"]
    assert main([*args, "--base", "hirescam", "--out", str(out)]) == 0
    assert (out / "fmgcam.png").is_file()
    manifest = read_manifest(out)
    assert len(manifest["fmgcam"]["classes"]) == 2 and manifest["fmgcam"]["base"] == "hirescam"
    assert load_maps(out)["fmgcam/layer4.1.relu#2"].shape == (2, 7, 7)
    assert "FM-G-CAM (hirescam, gelu)" in capsys.readouterr().out
