"""FinerCAM: what tells the target apart from the classes the model finds most like it.

Zhang et al. (CVPR 2025, "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
Explanation") explain the target's logit minus those of its nearest classes: with ``y`` the logits,
``p = softmax(y)`` and ``S`` the comparison classes (by default the 2nd, 3rd and 4th nearest to the
target's logit, ``|y_k - y_t|`` ascending: the target itself comes first),
``score = sum_{j in S} p_j (y_t - alpha y_j) / sum_{j in S} p_j`` (grad-cam 1.5.7's
``FinerWeightedTarget``; the weights ``p_j`` are differentiated too, as there). The map is the base
method's (Grad-CAM by default) for that score. Passes: one forward and one backward for every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from camanim.compute.capture import capture
from camanim.compute.layers import Layer
from camanim.compute.methods.base import LayerTensors, compute_maps, get_method, register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext

#: Positions, in the classes sorted by how close their logit is to the target's, that are compared.
DEFAULT_COMPARISON = (1, 2, 3)


class FinerTarget:
    """``score = sum_j p_j (y_t - alpha y_j) / sum_j p_j`` per sample (see the module docstring).

    Args:
        classes: the target class of every sample.
        comparison: positions in the closeness order (0 is the target itself) of the classes compared.
        alpha: how much of the comparison classes' logits is taken away.
    """

    def __init__(
        self, classes: Sequence[int], comparison: Sequence[int] = DEFAULT_COMPARISON, alpha: float = 1.0
    ):
        self.classes = tuple(int(c) for c in classes)
        self.comparison = tuple(int(c) for c in comparison)
        self.alpha = float(alpha)
        self.compared: list[tuple[int, ...]] = []

    def __call__(self, output: Tensor) -> Tensor:
        k = output.shape[1]
        idx = torch.as_tensor(self.classes, device=output.device).expand(output.shape[0])
        main = output.gather(1, idx[:, None])  # (B, 1)
        order = (output.detach() - main.detach()).abs().argsort(dim=1)
        positions = [p for p in self.comparison if p < k]
        if not positions:
            raise ValueError(f"FinerCAM compares classes at positions {self.comparison}; the model has {k}")
        others = order[:, positions]  # (B, J)
        self.compared = [tuple(int(c) for c in row) for row in others]
        p = output.softmax(dim=1).gather(1, others)
        y = output.gather(1, others)
        return (p * (main - self.alpha * y)).sum(dim=1) / (p.sum(dim=1) + 1e-9)


@register_method("finercam")
class FinerCAM(MultiPassMethod):
    """FinerCAM: the base method's map for the target minus its nearest classes (module docstring).

    Options (``explain(options=...)``, CLI ``--alpha``, ``--comparison``): ``alpha`` (default 1),
    ``comparison`` (default ``(1, 2, 3)``), ``finer_base`` (default ``"gradcam"``).
    """

    paper = "Zhang et al., Finer-CAM, CVPR 2025 (grad-cam's FinerCAM)"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 1

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        base = get_method(str(ctx.options.get("finer_base", "gradcam")), seed=ctx.seed)
        target = FinerTarget(
            ctx.classes,
            tuple(ctx.options.get("comparison", DEFAULT_COMPARISON)),
            float(ctx.options.get("alpha", 1.0)),
        )
        names = {layer.name for layer in ctx.layers}
        out: dict[str, Tensor] = {}

        def consumer(layer: Layer, value: Tensor, grad: Tensor | None, _k: int) -> None:
            if grad is None:
                out[layer.name] = torch.zeros(value.shape[0], *value.shape[2:], device=value.device)
            else:
                out[layer.name] = compute_maps({"base": base}, LayerTensors(value, grad, layer.name))["base"]

        capture(ctx.model, ctx.x, target, lambda layer: layer.name in names, consumer=consumer)
        return out
