"""Guided backpropagation and Guided Grad-CAM: input-resolution detail, at every layer.

Guided backpropagation (Springenberg et al., ICLR 2015 workshop) takes the gradient of the target with
respect to the input through every ``nn.ReLU`` with the guided rule: the gradient passes where both the
ReLU's input and the incoming gradient are positive. It runs on a copy of the model whose ``nn.ReLU``
modules are replaced (the user's model is never changed; functional ReLUs in a ``forward`` are not
replaced, as in grad-cam 1.5.7's ``GuidedBackpropReLUModel``), one forward and one backward pass. Its map
is the largest absolute gradient over the colour channels at each pixel (Simonyan et al.'s saliency), the
same at every layer.

Guided Grad-CAM (Selvaraju et al., ICCV 2017) multiplies it by a layer's Grad-CAM, after ReLU and
bilinearly upsampled to the input: the high-resolution detail of guided backpropagation where that
layer's class evidence is. Its Grad-CAM maps come from the shared capture, so it costs one guided pass for
every layer. grad-cam multiplies the min-max scaled Grad-CAM by the three-channel guided gradient; the map
here is ``ReLU(Grad-CAM) * max_c |guided gradient|``, which equals the channel-wise maximum of grad-cam's
product up to the Grad-CAM's scale.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import model_errors
from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.compute.targets import Target


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes the gradient only where both the input and the gradient are positive."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


class _GuidedReLUModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return GuidedReLU.apply(x)


def guided_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by :class:`GuidedReLU` (in eval mode)."""
    guided = copy.deepcopy(model).eval()
    for parent in guided.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, _GuidedReLUModule())
    return guided


def guided_gradient(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    """The guided-backpropagation gradient of ``target`` with respect to ``x``: ``(B, 3, H, W)``."""
    guided = guided_model(model)
    with frozen_eval(guided), torch.enable_grad():
        inp = x.detach().clone().requires_grad_(True)
        with model_errors(inp):
            scores = target(guided(inp))
        return torch.autograd.grad(scores.sum(), inp)[0].detach()


def saliency(gradient: Tensor) -> Tensor:
    """The largest absolute gradient over the channels: ``(B, C, H, W)`` -> ``(B, H, W)``."""
    return gradient.abs().amax(dim=1)


@register_method("guidedbackprop", "guidedbp")
class GuidedBackprop(MultiPassMethod):
    """Guided backpropagation's saliency ``max_c |guided dy/dx|`` at input resolution; the same at every
    layer (module docstring). Passes: one forward, one backward for every layer."""

    paper = "Springenberg et al., Striving for Simplicity, ICLR 2015 workshop (grad-cam's GuidedBackpropReLUModel)"
    resolution = "input"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 1

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        s = saliency(guided_gradient(ctx.model, ctx.x, ctx.target()))
        return {layer.name: s for layer in ctx.layers}


@register_method("guidedgradcam")
class GuidedGradCAM(MultiPassMethod):
    """Guided Grad-CAM: ``ReLU(Grad-CAM) * max_c |guided dy/dx|`` at input resolution (module docstring).
    Passes: the shared capture's Grad-CAM, plus one forward and one backward for every layer."""

    paper = "Selvaraju et al., Grad-CAM, ICCV 2017 (Guided Grad-CAM)"
    resolution = "input"
    bases = ("gradcam",)

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 1

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        s = saliency(guided_gradient(ctx.model, ctx.x, ctx.target()))
        size = tuple(s.shape[-2:])
        out: dict[str, Tensor] = {}
        for layer in ctx.layers:
            cam = ctx.base_maps["gradcam"][layer.name].to(s.device).clamp_min(0)
            up = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
            out[layer.name] = up * s
        return out
