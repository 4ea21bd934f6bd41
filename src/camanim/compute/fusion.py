"""FM-G-CAM (Fused Multi-class Grad-CAM; Rammuni Silva & Bird, 2024): one map for the top-K classes.

Eqs 1-6 of the paper, for the top-K classes ``n_1..n_K`` by predicted probability (Eq 1) at one layer:

* Eqs 2-3: each class's map ``R_k`` from the base method (Grad-CAM in the paper; any registered
  class-discriminative method here). The paper's ``1/C`` in Eq 3 is a common positive factor of
  every ``R_k``; Eq 6 divides it out, so it is omitted.
* Eq 4 (filtering): at each position only the class whose map is largest keeps its value; the others are
  set to 0. On an exact tie the most probable class keeps it (the reference implementation's ``argmax``;
  the equation would keep both), so every position carries at most one class.
* Eqs 5-6 (L2 normalisation, activation): ``S' = [S_1 .. S_K]`` in ``R^(I x J x K)`` and
  ``S_FM-G-CAM = act(S' / ||S'||_2)``, where ``||S'||_2`` is the L2 (Frobenius) norm of the whole stack: all
  ``K x I x J`` entries, one number. Why that axis: Eq 6 writes the norm of the 3-D tensor with no axis,
  which by convention is the entrywise norm; a per-position norm across the K maps cannot be meant,
  because after Eq 4 a position has at most one non-zero entry, so it would turn every position into
  ``sign(S)`` (a binary map, unlike the paper's figures); and a norm per class map would change the
  relative strength of the classes, which Eq 6 does not. ``norm="class"`` (each map by its own L2 norm over
  ``I x J``, the reading of the paper's remark that the normalisation lifts weaker classes) and
  ``norm="none"`` are offered as options. With ``"stack"`` every fused map has unit norm before the
  activation (comparable across layers and images); a display min-max cancels the scale under ReLU, not
  under ELU/GELU, whose curvature acts near 0.

Differences from the reference package ``xai-inference-engine`` 0.1.4 (the paper's code): its K activation
tensors are one tensor multiplied in place, so only the top-1 map is right (class ``k`` is weighted by the
product of the channel weights of classes ``1..k``); it L2-normalises along the height axis
(``F.normalize(maps, dim=1)`` on ``(K, h, w)``) instead of over the stack; it min-max normalises the
result for display (done here at rendering); it runs K backward passes with ``.backward()``, leaving
``.grad`` filled and every parameter with ``requires_grad = False``. Here the K classes share one forward
pass and their K backward passes are ``torch.autograd.grad`` calls on its retained graph
(:func:`camanim.explain` with ``top_k``; cheaper on a CPU than one pass over a batch of K copies of the
image, see benchmarks/RESULTS.md), and the model is left as found.

The result and its pipeline are in :mod:`camanim.pipelines.fmgcam`; its colours, figures and files in
:mod:`camanim.outputs.fmgcam`; every layer as one video frame each: ``camanim animate --method fmgcam``.

Example:
    >>> import torch
    >>> maps = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]])  # K=2 classes, 1x2 map
    >>> fuse(maps)
    tensor([[[0.3162, 0.0000]],
    <BLANKLINE>
            [[0.0000, 0.9487]]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.compute.methods import list_methods, method_class
from camanim.errors import CamanimError, UnknownNameError

ACTIVATIONS = {"relu": F.relu, "elu": F.elu, "gelu": F.gelu}
NORMS = ("stack", "class", "none")
_EPS = 1e-12


class FusionError(CamanimError, ValueError):
    """FM-G-CAM cannot be made as asked: a base method that is not class-discriminative, an explanation
    that is not a top-K capture of one image, or options that do not fit together."""


def check_base(base: str) -> str:
    """The registry name of ``base`` when it can serve FM-G-CAM: a class-discriminative method (one-pass
    methods share the K-class capture; the others run their own passes over the K classes at once).

    Raises:
        MethodNotFoundError: an unknown method.
        FusionError: a method that is not class-discriminative (its K class maps would be one map).
    """
    cls = method_class(base)
    if not cls.class_discriminative:
        accepted = ", ".join(n for n in list_methods() if method_class(n).class_discriminative)
        raise FusionError(
            f"FM-G-CAM needs a class-discriminative base method; {cls.name!r} gives the same map for every "
            f"class. Accepted: {accepted}"
        )
    return cls.name


# ------------------------------------------------------------------------------------------- the maths


def fuse(maps: Tensor | np.ndarray, activation: str = "relu", *, norm: str = "stack") -> Tensor:
    """Fuse K class maps at one layer (Eqs 4-6; see the module docstring for the norm's axis).

    Args:
        maps: raw per-class maps ``(K, h, w)`` of the base method, most probable class first.
        activation: ``"relu"`` (the paper's default), ``"elu"`` or ``"gelu"``.
        norm: ``"stack"`` (Eq 6: one L2 norm over all ``K x h x w`` entries), ``"class"`` (each class map
            by its own L2 norm over ``h x w``) or ``"none"``.

    Returns:
        ``(K, h, w)`` float32; at each position at most one class is non-zero before the activation.
    """
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    if norm not in NORMS:
        raise UnknownNameError("FM-G-CAM norm", norm, NORMS)
    m = torch.as_tensor(maps).float()
    if m.dim() != 3:
        raise ValueError(f"maps must be (K, h, w), got {tuple(m.shape)}")
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    winner = m.argmax(dim=0, keepdim=True)  # (1, h, w); the first (most probable) class on a tie
    keep = torch.arange(m.shape[0], device=m.device)[:, None, None] == winner
    s = torch.where(keep, m, torch.zeros_like(m))
    if norm == "stack":
        s = s / s.square().sum().sqrt().clamp_min(_EPS)
    elif norm == "class":
        s = s / s.square().sum(dim=(1, 2), keepdim=True).sqrt().clamp_min(_EPS)
    return ACTIVATIONS[activation](s)


def fmgcam_sweep(
    explanation: Any, base: str | None = None, activation: str = "relu", *, norm: str = "stack"
) -> dict[str, Tensor]:
    """FM-G-CAM at every layer of an explanation made with ``top_k`` (its batch axis holds the classes), or
    with ``K`` task targets of one image (``each=True`` targets, a list of targets: its batch axis holds the
    targets, in their order; on an exact tie the first keeps the position).

    Args:
        explanation: a :class:`~camanim.explanation.Explanation` from ``explain(..., top_k=K)`` or
            ``explain(..., target=<K targets>)``.
        base: which of its methods to fuse (default: the first class-discriminative one).
        activation, norm: see :func:`fuse`.

    Returns:
        ``{layer name: fused (K, h, w)}`` in forward order.
    """
    ex = explanation
    if base is None:
        base = next((m for m in ex.methods if method_class(m).class_discriminative), None)
        if base is None:
            raise FusionError(f"none of the explanation's methods {list(ex.methods)} is class-discriminative")
    if base not in ex.maps:
        raise UnknownNameError("method", base, list(ex.maps), "not in this explanation")
    one_image = bool((ex.input == ex.input[:1]).all()) if ex.input.shape[0] > 0 else False
    tasked = (getattr(ex, "task", None) or {}).get("kind", "classification") != "classification"
    distinct = len(set(ex.target_names if tasked else ex.targets)) == len(ex.targets)
    if not distinct or not one_image:
        raise FusionError(
            "FM-G-CAM needs an explanation made with top_k (one image, one distinct class per batch row) or "
            "with K targets of one image (one distinct target per batch row)"
        )
    return {name: fuse(maps, activation, norm=norm) for name, maps in ex.maps[base].items()}
