"""FullGrad: the input-gradient term plus one bias-gradient term per layer with a bias.

Srinivas & Fleuret's full-gradient decomposition writes a ReLU network's output as
``f(x) = grad_x f . x + sum_l sum_c grad_{b_lc} f . b_lc``: the input term and one term per bias. FullGrad's
saliency map post-processes each term (absolute value, per-channel min-max, resize to the input) and adds
them. Every term belongs to one layer, so the terms are a natural CAManim sweep: **each layer's frame is that
layer's term** (``sum_c norm(|b_c G_c|)`` at the layer's own resolution), and grad-cam's single FullGrad map
is the input term plus every layer's term upsampled to the input (:func:`full_map`, kept in
:attr:`FullGrad.extras` as ``"full"``).

Layers with a bias: a ``Conv2d`` with a bias (its output ``W * x + b``), a ``BatchNorm2d`` in eval mode (its
effective bias ``beta - mu gamma / sqrt(var + eps)``, as the paper's code), and timm's ``BatchNormAct2d``,
whose affine output is that of its ``drop`` child (before its activation). grad-cam takes ``Conv2d`` and
``BatchNorm2d`` of exactly those types, so it leaves out timm's ``BatchNormAct2d`` (on EfficientNet-Lite0 its
FullGrad is the input term alone); the two agree wherever the sets of layers do. A chosen layer without a
bias (an activation, a block's output, a convolution without bias) has no term: its map is all zero.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import Layer, list_layers
from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext, hooked_outputs

logger = logging.getLogger(__name__)

NORM_EPS = 1e-7  # grad-cam's scale_cam_image: (x - min) / (1e-7 + max(x - min))


def effective_bias(module: nn.Module) -> Tensor | None:
    """The bias a module adds per channel, ``(C,)``, or None: a convolution's bias, or an eval-mode batch
    norm's ``beta - mu gamma / sqrt(var + eps)``."""
    if isinstance(module, nn.Conv2d):
        return None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach()
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias.detach()
    return None


def bias_layers(model: nn.Module, layers: list[Layer]) -> dict[str, Tensor]:
    """Per layer name, the bias ``(C,)`` of the layers whose output is an affine output with a bias (see the
    module docstring)."""
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for layer in layers:
        if layer.kind != "spatial":
            continue
        module = modules.get(layer.module_name)
        if isinstance(module, nn.Conv2d) or type(module) is nn.BatchNorm2d:
            bias = effective_bias(module)
        elif layer.module_name.endswith(".drop"):  # timm's BatchNormAct2d: its affine output is drop's
            parent = modules.get(layer.module_name.rsplit(".", 1)[0])
            is_bn_act = isinstance(parent, nn.BatchNorm2d) and type(parent) is not nn.BatchNorm2d
            bias = effective_bias(parent) if is_bn_act else None
        else:
            bias = None
        if bias is not None and bias.shape[0] == layer.shape[1]:
            out[layer.name] = bias
    return out


def channel_normalised(t: Tensor) -> Tensor:
    """Each ``(b, c)`` plane of ``t`` ``(B, C, h, w)`` min-max scaled as grad-cam's ``scale_cam_image``."""
    flat = t.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    shifted = flat - lo
    return (shifted / (NORM_EPS + shifted.amax(dim=2, keepdim=True))).reshape(t.shape)


def bias_term(bias: Tensor, grad: Tensor) -> Tensor:
    """One layer's FullGrad term ``sum_c norm(|b_c G_c|)`` ``(B, h, w)`` from its bias ``(C,)`` and gradient."""
    return channel_normalised((bias.to(grad)[None, :, None, None] * grad).abs()).sum(dim=1)


def input_term(x: Tensor, grad: Tensor) -> Tensor:
    """The input term ``sum_c norm(|x_c grad_x_c|)`` ``(B, H, W)``."""
    return channel_normalised((x * grad).abs()).sum(dim=1)


def full_map(inp: Tensor, terms: Mapping[str, Tensor]) -> Tensor:
    """grad-cam's FullGrad map before its final min-max: the input term ``(B, H, W)`` plus every layer's term
    bilinearly upsampled to the input (as ``cv2.resize``)."""
    out = inp.clone()
    size = tuple(inp.shape[-2:])
    for term in terms.values():
        out += F.interpolate(term[:, None].to(out), size=size, mode="bilinear", align_corners=False)[:, 0]
    return out


@register_method("fullgrad")
class FullGrad(MultiPassMethod):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019): each layer's bias-gradient term (see the module docstring).

    The map of a chosen layer with a bias is ``sum_c norm(|b_c G_c|)``; ``extras`` holds ``"input"`` (the
    input term ``(B, H, W)``), ``"terms"`` (every bias layer's term, chosen or not) and ``"full"``, grad-cam's
    FullGrad map (:func:`full_map`). One forward and one backward pass of its own give the gradient at the
    input and at every bias layer at once.
    """

    paper = (
        "Srinivas and Fleuret, Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019"
    )
    passes = "1 forward + 1 backward of its own for all N layers (every bias layer and the input at once)"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.extras: dict[str, Any] = {}

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 1

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        model, x = ctx.model, ctx.x
        inner = getattr(model, "_camanim_module", model)
        biases = bias_layers(inner, list_layers(model, x[:1]))
        names = list(biases)
        with frozen_eval(model), torch.enable_grad(), hooked_outputs(model, x, names) as outs:
            inp = x.detach().clone().requires_grad_(True)
            scores = ctx.target()(model(inp))
            got = [n for n in names if n in outs and outs[n][0].requires_grad]  # spatial: (B, C, h, w)
            grads = torch.autograd.grad(scores.sum(), [inp, *(outs[n][0] for n in got)], allow_unused=True)
        terms = {
            n: bias_term(biases[n], g.detach()) for n, g in zip(got, grads[1:], strict=True) if g is not None
        }
        inp_term = input_term(x.detach(), grads[0].detach())
        self.extras = {"input": inp_term, "terms": terms, "full": full_map(inp_term, terms)}
        out: dict[str, Tensor] = {}
        for layer in ctx.layers:
            term = terms.get(layer.name)
            out[layer.name] = term if term is not None else x.new_zeros(x.shape[0], *layer.map_size)
        with_term = sum(layer.name in terms for layer in ctx.layers)
        if with_term < len(ctx.layers):
            logger.info(
                "fullgrad: %d of %d chosen layers have a bias term (%d bias layers in all); the others "
                "have no term and an all-zero map",
                with_term,
                len(ctx.layers),
                len(terms),
            )
        return out
