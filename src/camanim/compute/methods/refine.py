"""RefineCAM: a layer's map multiplied by the maps of deeper layers, which denoises early layers.

RefineCAM scales each layer's map (ReLU, then min-max) and multiplies the maps of several layers, resized to
the largest of them. As a CAManim sweep, **layer ``l``'s frame is its own map refined by the anchor layers**
(by default the last chosen layer): ``n(M_l) * prod_a resize(n(M_a))``, i.e. torchcam's
``RefineCAM(model, [l, *anchors])`` for every ``l`` at once. The product of every layer of a sweep would be
zero almost everywhere, so the anchors are few: name them with the ``anchors`` option.

The base maps come from the shared capture (Grad-CAM++ by default, as torchcam and grad-cam), so with the
default base RefineCAM costs no pass of its own; another ``base`` costs one forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from camanim.compute.capture import capture
from camanim.compute.layers import Layer
from camanim.compute.methods.base import LayerTensors, compute_maps, method_class, register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.errors import LayerNotFoundError, OptionError

DEFAULT_BASE = "gradcam++"
NORM_EPS = 1e-8  # torchcam's _normalize


def relu_minmax(m: Tensor) -> Tensor:
    """ReLU, then each map of ``m`` ``(B, h, w)`` min-max scaled (torchcam's ``_normalize``)."""
    flat = m.float().clamp_min(0).flatten(1)
    shifted = flat - flat.amin(dim=1, keepdim=True)
    return (shifted / (shifted.amax(dim=1, keepdim=True) + NORM_EPS)).reshape(m.shape)


def refine(maps: list[Tensor]) -> Tensor:
    """The product of scaled maps ``(B, h_i, w_i)``, each resized (bilinear) to the largest ``h`` and ``w``."""
    shape = tuple(max(s) for s in zip(*(tuple(m.shape[-2:]) for m in maps), strict=True))
    out = None
    for m in maps:
        r = F.interpolate(relu_minmax(m)[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
        out = r if out is None else out * r
    return out


@register_method("refinecam")
class RefineCAM(MultiPassMethod):
    """RefineCAM (torchcam's and grad-cam's ``RefineCAM``): each layer's map refined by anchor layers.

    See the module docstring. Options: ``base`` (a one-pass method, default ``gradcam++``) and ``anchors``
    (comma-separated names of chosen layers; default the last chosen layer).
    """

    paper = "How to Evaluate and Refine your CAM, arXiv:2605.14641 (torchcam 0.5 and grad-cam 1.5 RefineCAM)"
    bases = (DEFAULT_BASE,)
    passes = "none of its own with the default base (the shared capture's maps); else 1 forward + 1 backward"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        base = method_class(str(options.get("base", DEFAULT_BASE)))
        if base.name == DEFAULT_BASE:
            return 0, 0
        return 1, int(base.needs_gradients)

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        base = method_class(str(ctx.options.get("base", DEFAULT_BASE)))
        if base.cost not in ("one_pass", "one_pass_quadratic"):
            raise OptionError(f"refinecam needs a one-pass base method, not {base.name!r} ({base.cost})")
        names = [layer.name for layer in ctx.layers]
        maps = dict(ctx.base_maps.get(base.name, {}))
        if not maps:
            maps = _capture_maps(ctx, base.name)
        spec = ctx.options.get("anchors")
        anchors = [a.strip() for a in str(spec).split(",") if a.strip()] if spec else names[-1:]
        for a in anchors:
            if a not in names:
                raise LayerNotFoundError(a, names, "refinecam's anchors must be among the explained layers")
        zeros = {
            layer.name: ctx.x.new_zeros(ctx.x.shape[0], *layer.map_size)
            for layer in ctx.layers
            if layer.name not in maps
        }
        maps.update(zeros)
        return {n: refine([maps[n], *(maps[a] for a in anchors if a != n)]) for n in names}


def _capture_maps(ctx: PassContext, base: str) -> dict[str, Tensor]:
    """Raw maps of ``base`` at every chosen layer from one capture of ``ctx.x``."""
    method = method_class(base)(seed=ctx.seed)
    wanted = {layer.name for layer in ctx.layers}
    out: dict[str, Tensor] = {}

    def consumer(layer: Layer, value: Tensor, grad: Tensor | None, _k: int) -> None:
        if method.needs_gradients and grad is None:
            return
        t = LayerTensors(value, grad, layer.name, ctx.options)
        out[layer.name] = compute_maps({base: method}, t)[base].detach()

    capture(
        ctx.model,
        ctx.x,
        ctx.target(),
        lambda layer: layer.name in wanted,
        consumer=consumer,
        gradients=method.needs_gradients,
    )
    return out
