"""Attention methods for vision transformers: LeGrad, gradients with respect to each block's attention.

LeGrad is layer-wise by construction: block ``l``'s tokens give a class score ``s_l`` through the model's final
norm and head, and the block's map is the gradient of ``s_l`` with respect to the block's own attention
probabilities. One forward pass records every block's tokens and attention; then one backward pass per block
runs from ``s_l`` back to that block's attention only (autograd visits just the block's tail and the head).

The attention probabilities are read on a private copy of the network, never the user's: timm's
``Attention`` computes them only on its unfused path (``fused_attn = False`` on the copy), and torchvision's
``nn.MultiheadAttention`` returns them per head when asked (``need_weights=True``,
``average_attn_weights=False``; its output is then recomputed from them, as torchcam does, so that they are
what the output depends on).

A chosen layer inside a block (the block's output or one of its parts) shows that block's map; a layer
outside every block (the patch embedding, the final norm) has none and gets an all-zero map.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.layers import list_layers
from camanim.compute.methods.base import register_method
from camanim.compute.methods.classifier import MethodNotApplicableError
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.errors import OptionError

logger = logging.getLogger(__name__)

POOLS = ("mean", "model")


@dataclass
class _Block:
    name: str  # the block's qualified name
    module: nn.Module
    attention: nn.Module
    kind: str  # "timm" or "mha"


def attention_blocks(model: nn.Module) -> list[_Block]:
    """The transformer blocks of ``model`` with a self-attention whose probabilities LeGrad can read: timm
    ``Attention`` (a child ``attn`` with ``qkv`` and ``attn_drop``) and torchvision ``EncoderBlock``
    (a child ``self_attention``, an ``nn.MultiheadAttention``)."""
    blocks = []
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, nn.Module) and all(hasattr(attn, a) for a in ("qkv", "attn_drop", "fused_attn")):
            blocks.append(_Block(name, module, attn, "timm"))
            continue
        mha = getattr(module, "self_attention", None)
        if isinstance(mha, nn.MultiheadAttention):
            blocks.append(_Block(name, module, mha, "mha"))
    return blocks


def score_projection(model: nn.Module, pool: str) -> Callable[[Tensor], Tensor]:
    """Class scores ``(B, K)`` from a block's tokens ``(B, N, D)``: the model's final norm and head applied to
    the mean of all tokens (``pool="mean"``, LeGrad's and torchcam's), or the model's own pooling
    (``pool="model"``: its class token or its average, as at the last block)."""
    if pool not in POOLS:
        raise OptionError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    encoder = getattr(model, "encoder", None)
    if isinstance(getattr(encoder, "ln", None), nn.Module) and isinstance(
        getattr(model, "heads", None), nn.Module
    ):
        ln, heads = encoder.ln, model.heads  # torchvision VisionTransformer
        if pool == "mean":
            return lambda z: heads(ln(z.mean(dim=1)))
        return lambda z: heads(ln(z[:, 0]))
    if callable(getattr(model, "forward_head", None)) and isinstance(getattr(model, "norm", None), nn.Module):
        if pool == "model":  # timm: exactly the model's path after its last block
            return lambda z: model.forward_head(model.norm(z))
        fc_norm = getattr(model, "fc_norm", nn.Identity())
        return lambda z: model.head(fc_norm(model.norm(z.mean(dim=1))))
    raise MethodNotApplicableError(
        f"legrad reads class scores from every block through the model's final norm and head; "
        f"{type(model).__name__} has neither torchvision's (encoder.ln, heads) nor timm's (norm, forward_head)"
    )


@register_method("legrad")
class LeGrad(MultiPassMethod):
    """LeGrad (Bousselham et al., 2024): ``ReLU(d s_l / d A_l)`` averaged over heads and queries, per block.

    ``A_l`` ``(B, heads, N, N)`` are block ``l``'s attention probabilities and ``s_l`` the explained class's
    score read from the block's tokens (:func:`score_projection`); the map is the key axis without the prefix
    tokens, on the patch grid. As torchcam's ``LeGrad`` with one target block (torchcam averages the maps of
    the blocks it is given; here each block keeps its own). Not defined for networks without attention: a
    clear error names what it needs.

    Options: ``pool`` (``"mean"``, LeGrad's and torchcam's, or ``"model"``).
    """

    paper = "Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation Sensitivity, arXiv:2404.03214"
    passes = "1 forward of its own + N partial backwards (each from block l's score to its attention only)"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, layers

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        inner = getattr(ctx.model, "_camanim_module", ctx.model)
        blocks = attention_blocks(inner)
        if not blocks:
            raise MethodNotApplicableError(
                f"legrad needs transformer blocks with self-attention (timm Attention or "
                f"nn.MultiheadAttention); {type(inner).__name__} has none: use gradcam or another method"
            )
        owner = {}
        for layer in ctx.layers:
            for blk in blocks:
                if layer.module_name == blk.name or layer.module_name.startswith(blk.name + "."):
                    owner[layer.name] = blk.name  # the innermost block wins (blocks are listed outer first)
        if not owner:
            raise MethodNotApplicableError(
                "legrad maps a transformer block's attention: none of the chosen layers is a block or inside "
                f"one (blocks: {', '.join(b.name for b in blocks[:4])}{', ...' if len(blocks) > 4 else ''})"
            )
        wanted = sorted(set(owner.values()), key=[b.name for b in blocks].index)
        per_block = _legrad(
            inner, ctx, [b for b in blocks if b.name in wanted], str(ctx.options.get("pool", "mean"))
        )
        out: dict[str, Tensor] = {}
        for layer in ctx.layers:
            blk = owner.get(layer.name)
            out[layer.name] = per_block[blk] if blk else ctx.x.new_zeros(ctx.x.shape[0], *layer.map_size)
        if len(owner) < len(ctx.layers):
            logger.warning(
                "legrad: %d of %d chosen layers are outside every transformer block and get an all-zero map",
                len(ctx.layers) - len(owner),
                len(ctx.layers),
            )
        return out


def _legrad(model: nn.Module, ctx: PassContext, blocks: list[_Block], pool: str) -> dict[str, Tensor]:
    """Block name -> LeGrad map ``(B, gh, gw)``, computed on a private copy of ``model``."""
    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    tokens: dict[str, Tensor] = {}
    attention: dict[str, Tensor] = {}
    handles = []

    def keep_tokens(name: str):
        def hook(_m: nn.Module, _i: tuple, output: Tensor) -> None:
            tokens[name] = output

        return hook

    try:
        for blk in blocks:
            module, attn = (
                modules[blk.name],
                getattr(modules[blk.name], "attn" if blk.kind == "timm" else "self_attention"),
            )
            handles.append(module.register_forward_hook(keep_tokens(blk.name)))
            if blk.kind == "timm":
                attn.fused_attn = False  # the copy's own flag: the unfused path computes the probabilities
                handles.append(attn.attn_drop.register_forward_hook(_keep_output(attention, blk.name)))
            else:
                handles.append(attn.register_forward_pre_hook(_ask_weights, with_kwargs=True))
                handles.append(attn.register_forward_hook(_replay(attention, blk.name), with_kwargs=True))
        project = score_projection(net, pool)
        with frozen_eval(net), torch.enable_grad():
            inp = ctx.x.detach().clone().requires_grad_(True)
            net(inp)
            classes = torch.as_tensor(ctx.classes, device=inp.device)
            table = {layer.name: layer for layer in list_layers(ctx.model, ctx.x[:1])}
            out = {}
            for i, blk in enumerate(blocks):
                z, a = tokens.get(blk.name), attention.get(blk.name)
                if z is None or a is None:
                    raise MethodNotApplicableError(f"legrad: block {blk.name} did not run its attention")
                score = project(z).gather(1, classes[:, None]).sum()
                (grad,) = torch.autograd.grad(score, a, retain_graph=i < len(blocks) - 1)
                layer = table.get(blk.name)
                prefix = layer.prefix_tokens if layer is not None else 1
                rel = grad.clamp_min(0).mean(dim=(1, 2))[:, prefix:]
                gh, gw = layer.map_size if layer is not None and layer.map_size else _square(rel.shape[1])
                out[blk.name] = rel.reshape(rel.shape[0], gh, gw).detach()
        return out
    finally:
        for h in handles:
            h.remove()
        del net


def _square(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise MethodNotApplicableError(f"legrad: cannot lay {n} patch tokens on a square grid")
    return side, side


def _keep_output(store: dict[str, Tensor], name: str):
    def hook(_m: nn.Module, _i: tuple, output: Tensor) -> None:
        store[name] = output

    return hook


def _ask_weights(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook: ask ``nn.MultiheadAttention`` for per-head probabilities (positions as its ``forward``)."""
    args, kwargs = list(args), dict(kwargs)
    if len(args) > 4:
        args[4] = True
    else:
        kwargs["need_weights"] = True
    if len(args) > 6:
        args[6] = False
    else:
        kwargs["average_attn_weights"] = False
    return tuple(args), kwargs


def _replay(store: dict[str, Tensor], name: str):
    """Forward hook: recompute the attention output from the returned probabilities (so the output depends on
    them in the graph) and keep them."""

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> tuple:
        probs = output[1]
        value = args[2] if len(args) > 2 else kwargs["value"]
        b, n, d = value.shape
        w_v = module.in_proj_weight[2 * d :]
        b_v = None if module.in_proj_bias is None else module.in_proj_bias[2 * d :]
        v = F.linear(value, w_v, b_v).reshape(b, n, module.num_heads, d // module.num_heads).transpose(1, 2)
        attended = torch.matmul(probs, v).transpose(1, 2).reshape(b, probs.shape[-2], d)
        store[name] = probs
        return module.out_proj(attended), None

    return hook
