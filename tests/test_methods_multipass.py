"""Methods with passes of their own (ShapleyCAM, FinerCAM, guided backpropagation, Guided Grad-CAM) and the
eigen_smooth and aug_smooth options, against grad-cam 1.5.7.

Parity is checked at layers no later operation modifies in place (found by camanim's own dry run), where
grad-cam records the right values (../shared/notes/references.md: elsewhere grad-cam's stored activation
is the modified one)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import camanim
from camanim.compute.layers import default_layers, list_layers, modified_in_place

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.fixture(params=["resnet18", "squeezenet1_1"])  # a fresh model each: grad-cam leaves hooks on it
def setup(request):
    net = _model(request.param)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    changed = modified_in_place(net, x) or frozenset()
    pool = [la for la in default_layers(list_layers(net, x)) if la.name not in changed and "#" not in la.name]
    layers = [pool[0].name, pool[len(pool) // 2].name, pool[-1].name]
    return net, x, layers


def _grad_cam_raw(cam, x, target, **call):
    """grad-cam's raw map (before its scaling) of a one-layer method object."""
    holder = cam.base_cam if hasattr(cam, "base_cam") else cam
    captured = {}
    original = holder.get_cam_image

    def grab(*args, **kwargs):
        captured["raw"] = original(*args, **kwargs)
        return captured["raw"]

    holder.get_cam_image = grab
    cam(x, targets=None if target is None else [ClassifierOutputTarget(target)], **call)
    return captured["raw"][0]


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_shapleycam_and_finercam_equal_grad_cam(setup):
    net, x, layers = setup
    ex = camanim.explain(
        net, x, methods="shapleycam,finercam", layers=",".join(layers), options={"alpha": 0.6}
    )
    t = ex.targets[0]
    plain = camanim.explain(net, x, methods="gradcam", layers=",".join(layers), target=t)
    for name in layers:
        module = net.get_submodule(name)
        try:
            ref = _grad_cam_raw(gc.ShapleyCAM(net, [module]), x, t)
        except RuntimeError:  # grad-cam fails where the gradient does not depend on the layer (H A = 0)
            torch.testing.assert_close(ex.raw("shapleycam", name), plain.raw("gradcam", name))
            continue
        assert _pearson(ref, ex.raw("shapleycam", name)[0]) > 0.9999, name
        ref = _grad_cam_raw(gc.FinerCAM(net, [module]), x, None, alpha=0.6)
        assert _pearson(ref, ex.raw("finercam", name)[0]) > 0.9999, name


def test_guided_methods_equal_grad_cam(setup):
    net, x, layers = setup
    ex = camanim.explain(net, x, methods="guidedbackprop,guidedgradcam", layers=",".join(layers))
    t = ex.targets[0]
    # grad-cam swaps the ReLU modules of the model it is given (and back): give it a copy
    gb = GuidedBackpropReLUModel(copy.deepcopy(net), device="cpu")(x, target_category=t)  # (H, W, 3)
    saliency = np.abs(gb).max(axis=2)
    np.testing.assert_allclose(ex.raw("guidedbackprop", layers[0])[0].numpy(), saliency, rtol=1e-5, atol=1e-7)
    for name in layers:
        cam = torch.from_numpy(_grad_cam_raw(gc.GradCAM(net, [net.get_submodule(name)]), x, t)).clamp_min(0)
        up = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        ref = up.numpy() * saliency  # Guided Grad-CAM: grad-cam's Grad-CAM times its guided gradient
        assert _pearson(ref, ex.raw("guidedgradcam", name)[0]) > 0.9999, name
        assert ex.raw("guidedgradcam", name).shape[-2:] == x.shape[-2:]  # at the input's resolution


def test_eigen_smooth_equals_grad_cam(setup):
    net, x, layers = setup
    methods = {
        "gradcam": gc.GradCAM,
        "hirescam": gc.HiResCAM,
        "layercam": gc.LayerCAM,
        "xgradcam": gc.XGradCAM,
    }
    ex = camanim.explain(net, x, methods=",".join(methods), layers=",".join(layers), eigen_smooth=True)
    for m, cls in methods.items():
        for name in layers:
            ref = _grad_cam_raw(cls(net, [net.get_submodule(name)]), x, ex.targets[0], eigen_smooth=True)
            assert abs(_pearson(ref, ex.raw(m, name)[0])) > 0.9999, (m, name)  # an SVD's sign is arbitrary


def test_aug_smooth_is_the_mean_of_the_augmented_maps(setup):
    net, x, layers = setup
    ex = camanim.explain(net, x, methods="gradcam", layers=layers[-1], aug_smooth=True)
    t = ex.targets[0]
    parts = []
    for flip, factor in camanim.pipelines.explain.AUGMENTATIONS:
        xa = (x.flip(-1) if flip else x) * factor
        m = camanim.explain(net, xa, methods="gradcam", layers=layers[-1], target=t).raw(
            "gradcam", layers[-1]
        )
        parts.append(m.flip(-1) if flip else m)
    torch.testing.assert_close(
        ex.raw("gradcam", layers[-1]), torch.stack(parts).mean(0), rtol=1e-4, atol=1e-6
    )
    ref = gc.GradCAM(net, [net.get_submodule(layers[-1])])(
        x, targets=[ClassifierOutputTarget(t)], aug_smooth=True
    )
    ours = ex.upsampled("gradcam", layers[-1])[0].numpy()
    # grad-cam min-max scales each augmented map before averaging; here the raw maps are averaged
    assert _pearson(ref[0], ours) > 0.99
    assert ex.input.shape == x.shape and ex.targets == (t,)


@pytest.mark.parametrize("method", ["shapleycam", "finercam", "guidedbackprop", "guidedgradcam"])
def test_model_left_as_found_and_passes_logged(method, caplog):
    net = _model("resnet18")
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {p: p.requires_grad for p in net.parameters()}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="camanim.pipelines.explain"):
        ex = camanim.explain(net, x, methods=method, layers="first,last")
    assert f"{method}: " in caplog.text and "backward passes for 2 layer(s)" in caplog.text
    assert all(torch.isfinite(m).all() for m in ex.maps[method].values())
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad == f for p, f in flags.items()) and all(
        p.grad is None for p in net.parameters()
    )
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    assert all(type(m) is not camanim.compute.methods.guided._GuidedReLUModule for m in net.modules())
