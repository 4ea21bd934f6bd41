"""Methods: hand-computed maps on a tiny model with hand-set weights, and one contract test for all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camanim
from camanim.compute.methods import get_method, list_methods, parse_methods
from camanim.compute.methods.eigen import first_component_projection

from .conftest import no_hooks


class HandSet(nn.Module):
    """A 1x1 convolution (2 channels) on a 3x3 single-channel input, then a linear head on the flat map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(18, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, 1.0]))
            self.head.weight.copy_(torch.arange(36, dtype=torch.float32).view(2, 18) / 10 - 1.5)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def test_hand_computed_gradcam_and_hirescam():
    x = np.arange(9, dtype=np.float32).reshape(3, 3) / 4 - 1
    # By hand: A_k = w_k x + b_k; the class-1 gradient w.r.t. A is row 1 of the head weights.
    a = np.stack([1.0 * x + 0.5, -2.0 * x + 1.0])
    g = (np.arange(36, dtype=np.float32).reshape(2, 18) / 10 - 1.5)[1].reshape(2, 3, 3)
    gradcam = g.mean(axis=(1, 2))[:, None, None] * a
    hires = g * a
    ex = camanim.explain(
        HandSet().eval(),
        torch.from_numpy(x)[None, None],
        methods="gradcam,hirescam,layercam",
        layers="conv",
        target=1,
    )
    assert np.allclose(ex.raw("gradcam", "conv")[0].numpy(), gradcam.sum(0), atol=1e-5)
    assert np.allclose(ex.raw("hirescam", "conv")[0].numpy(), hires.sum(0), atol=1e-5)
    assert np.allclose(ex.raw("layercam", "conv")[0].numpy(), (np.maximum(g, 0) * a).sum(0), atol=1e-5)


def test_gradcam_plusplus_and_xgradcam_formulas():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4)
    an, gn = a.double().numpy(), g.double().numpy()
    s = an.sum(axis=(2, 3), keepdims=True)
    alpha = gn**2 / (2 * gn**2 + s * gn**3 + 1e-6)
    w = (np.where(gn != 0, alpha, 0) * np.maximum(gn, 0)).sum(axis=(2, 3))
    assert np.allclose(get_method("gradcam++")(a, g).numpy(), np.einsum("bc,bchw->bhw", w, an), atol=1e-5)
    wx = (gn * an / (s + 1e-7)).sum(axis=(2, 3))
    assert np.allclose(get_method("xgradcam")(a, g).numpy(), np.einsum("bc,bchw->bhw", wx, an), atol=1e-5)
    assert np.allclose(
        get_method("gradcamelementwise")(a, g).numpy(), np.maximum(gn * an, 0).sum(1), atol=1e-5
    )


def test_eigen_matches_full_svd_and_sign_convention():
    torch.manual_seed(1)
    a = torch.rand(2, 16, 9, 9) ** 2
    proj = first_component_projection(a).double()
    for b in range(2):
        x = a[b].double().reshape(16, -1).T
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x.numpy(), full_matrices=True)
        ref = torch.from_numpy(x.numpy() @ vt[0]).reshape(9, 9)
        r = np.corrcoef(proj[b].ravel(), ref.ravel())[0, 1]
        assert abs(r) > 0.9999 and torch.allclose(proj[b].abs().max(), ref.abs().max(), rtol=1e-4)
        mean_act = a[b].mean(0).double()
        assert ((proj[b] * (mean_act - mean_act.mean())).sum()) >= 0
    # The convention is stable under a flip of the data's sign conventions: negating the input negates the map.
    assert torch.allclose(first_component_projection(-a), -first_component_projection(a), atol=1e-4)
    # Wide (C > h*w) and tall layers take different Gram paths; both agree with the SVD.
    wide = torch.rand(1, 64, 3, 3)
    x = wide[0].double().reshape(64, -1).T
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x.numpy())
    assert abs(np.corrcoef(first_component_projection(wide)[0].ravel(), x.numpy() @ vt[0])[0, 1]) > 0.9999


def test_randomcam_is_seeded_per_layer():
    a = torch.rand(1, 8, 4, 4)
    m0, m1 = get_method("randomcam", seed=0), get_method("randomcam", seed=1)
    assert torch.equal(m0(a, None, "layer.a"), get_method("randomcam", seed=0)(a, None, "layer.a"))
    assert not torch.equal(m0(a, None, "layer.a"), m0(a, None, "layer.b"))
    assert not torch.equal(m0(a, None, "layer.a"), m1(a, None, "layer.a"))


def test_registry_names_and_errors():
    assert parse_methods("GradCAM++, Grad-CAM") == ["gradcam++", "gradcam"]
    assert set(parse_methods("all")) == set(list_methods(one_pass=True))
    with pytest.raises(camanim.errors.MethodNotFoundError) as e:
        parse_methods("gradcm")
    assert "gradcam" in str(e.value)
    assert get_method("eigencam").needs_gradients is False
    assert get_method("randomcam").class_discriminative is False


@pytest.mark.parametrize("method", list_methods(one_pass=True))
def test_contract(method, tiny_model):
    """Every registered one-pass method: shape, finite values, hooks gone, model unchanged."""
    model = tiny_model
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ex = camanim.explain(model, torch.randn(2, 3, 32, 32), methods=method, layers="all", target=[1, 3])
        assert no_hooks(model)
        assert all(m.training for m in model.modules())
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert ex.chosen
        for layer in ex.chosen:
            m = ex.raw(method, layer.name)
            assert m.shape == (2, *layer.map_size)
            assert torch.isfinite(m).all()
            up = ex.upsampled(method, layer.name)
            assert up.shape == (2, 32, 32) and up.min() >= 0
        with pytest.raises(camanim.errors.TargetError):
            camanim.explain(model, torch.randn(2, 3, 32, 32), methods=method, target=[1, 2, 3])
        assert no_hooks(model)
    finally:
        model.eval()
