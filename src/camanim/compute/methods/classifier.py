"""Methods that read the classifier: CAM, the original class activation map, where a network ends in global
average pooling and one linear layer.

Whether a layer has that structure is checked numerically, never guessed from names: a layer ``l`` with values
``A`` ``(B, C, h, w)`` qualifies when some ``nn.Linear`` of the model with ``C`` inputs and ``K`` outputs gives
the network's own class scores from the spatial mean of ``A``: ``logits == Linear(mean_ij A)`` (one forward
pass without gradient provides the logits). ResNets (``layer4`` and its last block), EfficientNets (``bn2``)
and DenseNet-like heads with a separate pooling qualify; a VGG (its head has three linear layers) or a ViT (a
norm between the tokens and the head) do not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import Layer
from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.errors import CamanimError

logger = logging.getLogger(__name__)

HEAD_RTOL = 1e-4
"""Relative tolerance of the check ``logits == Linear(mean_ij A)`` (float32 sums over thousands of channels
differ from the network's own in the last bits; a layer without the structure misses by orders more)."""


class MethodNotApplicableError(CamanimError, ValueError):
    """A method whose rule needs a structure the model or the chosen layers do not have."""


def model_output(model: nn.Module, x: Tensor) -> Tensor:
    """The class scores ``(B, K)`` of one forward pass without gradient; the model is left as found."""
    with frozen_eval(model), torch.no_grad():
        return model(x)


def linear_heads(model: nn.Module, values: Mapping[str, Tensor], logits: Tensor) -> dict[str, nn.Linear]:
    """Per layer name, the ``nn.Linear`` that gives ``logits`` ``(B, K)`` from the spatial mean of the layer's
    values ``(B, C, h, w)``; layers without one are left out (see the module docstring)."""
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    out: dict[str, nn.Linear] = {}
    scale = float(logits.abs().max()) + 1e-12
    for name, a in values.items():
        pooled = a.float().mean(dim=(2, 3))
        for lin in linears:
            if lin.in_features != a.shape[1] or lin.out_features != logits.shape[1]:
                continue
            with torch.no_grad():
                pred = nn.functional.linear(pooled, lin.weight.float(), _float(lin.bias))
            if torch.allclose(pred, logits.float(), rtol=HEAD_RTOL, atol=HEAD_RTOL * scale):
                out[name] = lin
                break
    return out


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def head_layers_message(model_layers: Sequence[Layer], heads: Mapping[str, Any]) -> str:
    found = [layer.name for layer in model_layers if layer.name in heads]
    return ", ".join(found) if found else "none"


@register_method("cam")
class CAM(MultiPassMethod):
    """CAM (Zhou et al., CVPR 2016): the classifier's weights on a globally average-pooled layer.

    For a layer whose spatial mean the last linear layer turns into the logits (``logits = W mean_ij A + b``,
    checked numerically, see the module docstring), the map of class ``k`` is ``sum_c W_kc A_c``: the logit
    is then exactly the spatial mean of the map plus ``b_k``. As torchcam's ``CAM`` (which takes the named
    ``fc_layer`` without checking).

    Only such layers have a CAM. Among the chosen layers, those without the structure get an all-zero map
    (logged); if none of them has it, :class:`MethodNotApplicableError` says which layers of the model do.

    Cost: one forward pass without gradient (the logits for the check); the values come from the capture.
    """

    paper = "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016"
    needs_gradients = False
    needs_values = True
    passes = "the shared capture's values + 1 forward (no backward) to check the head, for all N layers"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 0

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        values = {layer.name: ctx.values[layer.name] for layer in ctx.layers if layer.name in ctx.values}
        logits = model_output(ctx.model, ctx.x)
        heads = linear_heads(ctx.model, values, logits)
        if not heads:
            raise MethodNotApplicableError(
                "cam needs a layer whose spatial mean the model's last linear layer turns into its logits "
                "(global average pooling + one nn.Linear, checked numerically); none of the "
                f"{len(values)} chosen layer(s) has it: explain the last convolutional layer of a ResNet- or "
                "EfficientNet-like model, or use gradcam"
            )
        classes = torch.as_tensor(ctx.classes, device=logits.device)
        out: dict[str, Tensor] = {}
        missing = []
        for name, a in values.items():
            lin = heads.get(name)
            if lin is None:
                missing.append(name)
                out[name] = a.new_zeros(a.shape[0], *a.shape[2:])
                continue
            w = lin.weight.detach().to(a.dtype)[classes.to(lin.weight.device)].to(a.device)  # (B, C)
            out[name] = torch.einsum("bc,bchw->bhw", w, a)
        if missing:
            logger.warning(
                "cam: defined at %d of %d chosen layers (%s); the other %d get an all-zero map",
                len(heads),
                len(values),
                ", ".join(heads),
                len(missing),
            )
        return out
