"""The one-pass capture: in-place safety, no gradient path, model left as found, one forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camanim.compute.capture import capture
from camanim.compute.targets import ClassLogit

from .conftest import no_hooks


class InPlaceAfter(nn.Module):
    """``conv``'s output is tripled in place after its hook has fired; an unused branch hangs off it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.side = nn.Conv2d(2, 2, 1)  # computed, but its result never reaches the output
        self.head = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.side(y)
        y.mul_(3.0)
        return self.head(y.flatten(1))


def _all(_layer) -> bool:
    return True


def test_value_and_gradient_are_the_pre_inplace_ones():
    torch.manual_seed(0)
    model = InPlaceAfter().eval()
    x = torch.randn(1, 1, 3, 3)
    res = capture(model, x, ClassLogit((1,)), _all)
    expected_value = model.conv(x).detach()
    assert torch.allclose(res.values["conv"], expected_value)
    # d out / d y_pre = 3 * W[1] reshaped; the post-change tensor's gradient would be W[1].
    expected_grad = 3.0 * model.head.weight[1].detach().reshape(1, 2, 3, 3)
    assert torch.allclose(res.gradients["conv"], expected_grad)


def test_unused_branch_reported_not_crashed():
    model = InPlaceAfter().eval()
    res = capture(model, torch.randn(1, 1, 3, 3), ClassLogit((0,)), _all)
    assert res.no_gradient == ["side"]
    assert res.gradients["side"] is None


def test_default_model_bn_drop_is_pre_activation(default_model):
    """timm's BatchNormAct2d applies an in-place ReLU6 to its ``drop`` output: the recorded value must not be clipped."""
    x = torch.randn(1, 3, 224, 224)
    res = capture(
        default_model.model, x, ClassLogit((285,)), lambda layer: layer.name in ("bn1.drop", "bn1.act")
    )
    pre, post = res.values["bn1.drop"], res.values["bn1.act"]
    assert pre.min() < 0 and pre.max() > 6  # the BN output itself
    assert torch.allclose(post, pre.clamp(0, 6))
    # ReLU6's derivative: the pre-activation gradient vanishes wherever the activation is clipped.
    g_pre, g_post = res.gradients["bn1.drop"], res.gradients["bn1.act"]
    inside = (pre > 0) & (pre < 6)
    assert torch.allclose(g_pre[inside], g_post[inside])
    assert torch.all(g_pre[~inside] == 0) and g_post[~inside].abs().sum() > 0


def test_model_left_as_found_even_after_an_error(resnet18):
    model = resnet18
    model.train()
    model.fc.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(_output):
        raise RuntimeError("target failed")

    try:
        with pytest.raises(RuntimeError, match="target failed"):
            capture(model, torch.randn(2, 3, 64, 64), boom, _all)
        assert no_hooks(model)
        res = capture(model, torch.randn(2, 3, 64, 64), ClassLogit((3, 4)), _all)
        assert res.chosen and no_hooks(model)
        assert all(m.training for m in model.modules())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        # Eval mode was used for the capture: BN running statistics did not move.
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    finally:
        model.fc.weight.requires_grad_(True)
        model.eval()


def test_works_under_no_grad_and_inference_mode(tiny_model):
    x = torch.randn(1, 3, 32, 32)
    ref = capture(tiny_model, x, ClassLogit((1,)), _all)
    with torch.no_grad():
        a = capture(tiny_model, x, ClassLogit((1,)), _all)
    with torch.inference_mode():
        b = capture(tiny_model, x, ClassLogit((1,)), _all)
    for name, g in ref.gradients.items():
        assert torch.allclose(a.gradients[name], g) and torch.allclose(b.gradients[name], g)


def test_one_forward_for_all_layers(resnet18):
    calls = []
    h = resnet18.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        res = capture(resnet18, torch.randn(1, 3, 64, 64), ClassLogit((0,)), _all)
    finally:
        h.remove()
    assert len(calls) == 1
    assert len(res.chosen) > 50 and not res.no_gradient


def test_consumer_receives_every_layer_once(tiny_model):
    seen = []
    res = capture(
        tiny_model,
        torch.randn(2, 3, 32, 32),
        ClassLogit((0,)),
        _all,
        consumer=lambda layer, v, g, k: seen.append((layer.name, v.shape, g.shape)),
    )
    assert sorted(n for n, _, _ in seen) == sorted(layer.name for layer in res.chosen)
    assert all(vs == gs for _, vs, gs in seen)
    assert not res.values  # handed over, not kept


class InPlaceWhenFlagged(nn.Module):
    """Modifies ``conv``'s output in place only when ``flag`` is set: a path the dry run may not take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(2 * 3 * 3, 2)
        self.flag = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.flag:
            y.mul_(3.0)
        return self.head(y.flatten(1))


def test_modified_in_place_found_by_the_dry_run(resnet18):
    from camanim.compute.layers import modified_in_place

    mod = modified_in_place(resnet18, (1, 3, 64, 64))
    # ReLU(inplace=True) after every BN; ``out += identity`` on a block's last BN.
    assert {"bn1", "layer1.0.bn1", "layer1.0.bn2", "layer4.1.bn2"} <= mod
    assert not {"conv1", "layer1.0.conv1", "maxpool", "layer1.0.relu", "layer1.0.relu#2"} & mod
    assert modified_in_place(InPlaceAfter(), (1, 1, 3, 3)) == {"conv"}


@pytest.mark.parametrize("model_name", ["resnet18", "default_model"])
def test_references_equal_copies(model_name, request):
    """Holding unmodified outputs by reference gives exactly what copying every output gives."""
    fixture = request.getfixturevalue(model_name)
    model = getattr(fixture, "model", fixture)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 96)
    lean = capture(model, x, ClassLogit((3, 7)), _all)
    full = capture(model, x, ClassLogit((3, 7)), _all, copy_all=True)
    assert lean.values.keys() == full.values.keys() and len(lean.values) > 20
    for name in full.values:
        assert torch.equal(lean.values[name], full.values[name]), name
        g1, g2 = lean.gradients[name], full.gradients[name]
        assert (g1 is None and g2 is None) or torch.equal(g1, g2), name


def test_path_not_taken_by_the_dry_run_is_caught():
    """An in-place change the dry run did not see is detected by version counters and the capture redone."""
    torch.manual_seed(0)
    model = InPlaceWhenFlagged().eval()
    x = torch.randn(1, 1, 3, 3)
    from camanim.compute.layers import modified_in_place

    assert modified_in_place(model, x) == frozenset()
    model.flag = True
    res = capture(model, x, ClassLogit((1,)), _all)
    assert torch.allclose(res.values["conv"], model.conv(x).detach())
    assert torch.allclose(res.gradients["conv"], 3.0 * model.head.weight[1].detach().reshape(1, 2, 3, 3))
    assert no_hooks(model)
