"""Layer embeddings: every chosen layer's output pooled to one vector per image, from one forward pass.

Pooling by layer kind (see :mod:`camanim.compute.layers`), on the output as it is when the layer's hook fires
(a later in-place operation does not change it):

* ``spatial`` ``(B, C, H, W)`` and ``channels_last`` ``(B, H, W, C)``: the global average over space, ``(B, C)``;
* ``token`` ``(B, N, C)``: the mean of the patch tokens (the ``N - P`` grid tokens); with prefix tokens
  (``P > 0``: a class token first, then distillation or register tokens) and ``tokens="concat"`` (the
  default), the class token (token 0) and that mean concatenated, ``(B, 2C)``: the class token is what a
  ViT's head reads, the patch mean what its spatial maps hold, and neither can be recovered from the other.
  ``tokens="average"`` averages the two, ``(B, C)``; ``tokens="patches"`` keeps the patch mean only;
* vectors ``(B, C)`` and ``1x1`` maps: the vector itself, ``(B, C)``.

:func:`pooled_forward` runs one forward pass with no backward and no autograd graph, pooling each chosen
layer in its hook, so memory holds one batch's activations as the network itself does plus a vector per
layer and image.

A :class:`RandomProjection` then reduces a vector of ``D > k`` dimensions to ``k`` (256 by default) before it
is stored: ``z = x R[:D]`` with ``R`` a seeded Gaussian matrix of iid ``N(0, 1/k)`` entries, so that
``E[<z, z'>] = <x, x'>`` and distances are kept within a few percent (Johnson and Lindenstrauss 1984; the
relative error of a squared distance has standard deviation ``sqrt(2/k)``, 9% at ``k = 256``). The rows of
``R`` are generated in blocks of 256 from the seed alone, so a layer of ``D`` dimensions always gets the same
first ``D`` rows whatever the other layers are; vectors of ``D <= k`` dimensions are stored as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import Layer, LayerTracker, as_bchw, model_errors
from camanim.compute.targets import OutputSelector
from camanim.errors import OptionError

TOKEN_POOLING = ("concat", "average", "patches")
#: Rows of a :class:`RandomProjection` generated per seeded block.
BLOCK_ROWS = 256


def embeddable(layer: Layer) -> bool:
    """Whether ``layer``'s output can be pooled to a vector per image (it has a map or is a vector)."""
    return layer.map_size is not None and len(layer.shape) >= 2


def pooled_dim(layer: Layer, tokens: str = "concat") -> int:
    """The length ``D`` of ``layer``'s pooled vector (see the module docstring)."""
    if layer.kind == "token":
        c = layer.shape[-1]
        return 2 * c if layer.prefix_tokens and tokens == "concat" else c
    if layer.kind == "channels_last":
        return layer.shape[-1]
    return layer.shape[1]


def pool(output: Tensor, layer: Layer, tokens: str = "concat") -> Tensor:
    """``layer``'s output pooled to ``(B, D)`` float32 by the layer's kind (see the module docstring).

    Example:
        >>> from camanim.compute.layers import Layer
        >>> conv = Layer(0, "c", "c", "Conv2d", "spatial", (2, 3, 4, 4), 0, (4, 4))
        >>> pool(torch.ones(2, 3, 4, 4), conv).shape
        torch.Size([2, 3])
    """
    if tokens not in TOKEN_POOLING:
        raise OptionError(f"token pooling must be one of {', '.join(TOKEN_POOLING)}, got {tokens!r}")
    out = output.detach()
    mean = as_bchw(out, layer).float().mean(dim=(2, 3))
    if layer.kind != "token" or not layer.prefix_tokens or tokens == "patches":
        return mean
    cls = out[:, 0, :].float()
    return torch.cat([cls, mean], dim=1) if tokens == "concat" else (cls + mean) / 2


class RandomProjection:
    """``x (B, D) -> x R[:D] (B, k)``: a seeded Gaussian random projection for vectors longer than ``k``.

    ``R`` has iid ``N(0, 1/k)`` entries; its rows are generated in blocks of :data:`BLOCK_ROWS` from
    ``seed`` (block ``j`` from ``torch.Generator().manual_seed(seed * 1_000_003 + j)``), on the CPU in
    float32, and kept for reuse: a matrix for vectors of up to ``D`` dimensions holds ``D x k`` floats
    (2.2 MB for DenseNet-161's widest layer at ``k = 256``), shared by every layer.

    Args:
        k: the stored dimension; ``None`` keeps every vector as it is.
        seed: the seed of ``R``.

    Example:
        >>> rp = RandomProjection(k=8, seed=0)
        >>> rp(torch.randn(5, 100)).shape, rp(torch.randn(5, 6)).shape
        (torch.Size([5, 8]), torch.Size([5, 6]))
    """

    def __init__(self, k: int | None = 256, seed: int = 0) -> None:
        if k is not None and k < 2:
            raise OptionError(f"the projected dimension must be at least 2, got {k}")
        self.k = k
        self.seed = int(seed)
        self._rows = torch.empty(0, k or 0)
        self._on: dict[tuple[int, str, torch.dtype], Tensor] = {}

    def out_dim(self, d: int) -> int:
        """The stored dimension of a ``d``-dimensional vector."""
        return d if self.k is None else min(d, self.k)

    def matrix(self, d: int) -> Tensor:
        """The first ``d`` rows of ``R``: ``(d, k)`` float32 on the CPU."""
        assert self.k is not None
        while self._rows.shape[0] < d:
            j = self._rows.shape[0] // BLOCK_ROWS
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            block = torch.randn(BLOCK_ROWS, self.k, generator=g) / math.sqrt(self.k)
            self._rows = torch.cat([self._rows, block])
            self._on.clear()
        return self._rows[:d]

    def __call__(self, x: Tensor) -> Tensor:
        d = x.shape[1]
        if self.k is None or d <= self.k:
            return x
        key = (d, str(x.device), x.dtype)
        r = self._on.get(key)
        if r is None:
            r = self._on[key] = self.matrix(d).to(device=x.device, dtype=x.dtype)
        return x @ r

    def describe(self) -> dict:
        """How stored vectors were reduced, as recorded in a manifest."""
        if self.k is None:
            return {"dim": None, "note": "no random projection: pooled vectors stored as they are"}
        return {
            "dim": self.k,
            "seed": self.seed,
            "matrix": f"R[:D] with iid N(0, 1/{self.k}) entries, rows in seeded blocks of {BLOCK_ROWS}; "
            "z = x R[:D] for D > k, x itself for D <= k",
        }


@dataclass
class PooledBatch:
    """What one forward pass gave.

    Attributes:
        layers: every layer of the forward pass, in execution order.
        chosen: the pooled layers, in execution order.
        pooled: per chosen layer name, its pooled vectors ``(B, D)`` float32 on the model's device.
        output: the model output ``(B, K)``, detached.
    """

    layers: list[Layer]
    chosen: list[Layer]
    pooled: dict[str, Tensor] = field(default_factory=dict)
    output: Tensor | None = None


def pooled_forward(
    model: nn.Module, x: Tensor, want: Callable[[Layer], bool], *, tokens: str = "concat"
) -> PooledBatch:
    """One forward pass of ``x`` (no backward, no autograd graph), every wanted layer pooled in its hook.

    Args:
        model: the network; left as found (training flags, ``requires_grad``; no hook remains, even when
            the forward raises).
        x: input ``(B, 3, H, W)`` on the model's device, normalised as the model expects.
        want: decides, per layer as it is produced, whether to pool it (layers without a map or vector are
            never pooled).
        tokens: how ``token`` layers are pooled (see the module docstring).

    Returns:
        A :class:`PooledBatch`.
    """
    if tokens not in TOKEN_POOLING:
        raise OptionError(f"token pooling must be one of {', '.join(TOKEN_POOLING)}, got {tokens!r}")
    tracker = LayerTracker(model, x)
    batch = PooledBatch(layers=tracker.layers, chosen=[])

    def hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        layer = tracker.observe(module, output)
        if not embeddable(layer) or not want(layer):
            return
        batch.chosen.append(layer)
        batch.pooled[layer.name] = pool(output, layer, tokens)

    handles = []
    try:
        with frozen_eval(model), torch.no_grad():
            for module in tracker.names:
                handles.append(module.register_forward_hook(hook))
            with model_errors(x):
                out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):  # a plain module returning a tuple, dict or dataclass
        out = OutputSelector()(out)
    batch.output = out.detach()
    return batch
