"""Second-order methods: the gradient and a Hessian-vector product of every layer.

ShapleyCAM (Cai et al., 2025, arXiv:2501.06261) reads CAM methods as Shapley values of the channels and
weighs channel ``c`` by ``mean_ij (G - H A / 2)``, where ``H A`` is the Hessian of the target with respect
to the layer's values applied to the values themselves. The Hessian-vector product of a layer needs a
backward pass through the graph of the gradient, in the layer's own direction ``A_l``, so layers cannot
share it: one forward pass, one backward pass that keeps its graph, then one second-order backward pass
per layer (each runs from that layer's gradient back to the layer: the part of the network after it,
twice). grad-cam runs a whole forward, first- and second-order backward per layer; here the first two are
shared by every layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import as_bchw, model_errors
from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext, hooked_outputs


@register_method("shapleycam")
class ShapleyCAM(MultiPassMethod):
    """ShapleyCAM: channel weights ``w_c = mean_ij (G_c - (H A)_c / 2)``, map ``= sum_c w_c A_c``.

    ``H A`` is the Hessian-vector product of the target with respect to the layer's values, in the
    direction of the values (grad-cam 1.5.7's ``ShapleyCAM``). Passes for ``N`` layers: 1 forward, 1
    backward that keeps its graph, ``N`` second-order backward passes (see the module docstring).
    """

    paper = "Cai et al., ShapleyCAM, arXiv:2501.06261 (grad-cam's ShapleyCAM)"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 1 + layers

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        names = [layer.name for layer in ctx.layers]
        out: dict[str, Tensor] = {}
        with frozen_eval(ctx.model), torch.enable_grad(), hooked_outputs(ctx.model, ctx.x, names) as values:
            inp = ctx.x.detach().clone().requires_grad_(True)
            with model_errors(inp):
                scores = ctx.target()(ctx.model(inp))
            found = [n for n in names if n in values and values[n][0].requires_grad]
            tensors = [values[n][0] for n in found]
            grads = torch.autograd.grad(scores.sum(), tensors, create_graph=True, allow_unused=True)
            for n, a, g in zip(found, tensors, grads, strict=True):
                layer = values[n][1]
                acts = as_bchw(a.detach(), layer)
                if g is None:
                    out[n] = torch.zeros(acts.shape[0], *acts.shape[2:], device=acts.device)
                    continue
                hvp = (  # None where the gradient does not depend on the layer (a linear path to the output)
                    torch.autograd.grad(g, a, grad_outputs=a, retain_graph=True, allow_unused=True)[0]
                    if g.requires_grad
                    else None
                )
                weight = as_bchw((g if hvp is None else g - 0.5 * hvp).detach(), layer)
                out[n] = torch.einsum("bc,bchw->bhw", weight.mean(dim=(2, 3)), acts)
            for n in names:  # a layer the forward pass did not reach with a gradient
                if n not in out:
                    size = next(la.map_size for la in ctx.layers if la.name == n) or (1, 1)
                    shape = (ctx.x.shape[0], *size)
                    out[n] = torch.zeros(shape, device=ctx.x.device)
        return out
