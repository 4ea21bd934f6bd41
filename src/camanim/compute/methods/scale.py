"""SESS, Saliency Enhancing with Scaling and Sliding: any one-pass method, ensembled over scales and windows.

The image is resized to several scales, a window slides over each, and the base method's map of every
window (patch) is weighted by the patch's class score, pasted back where the patch came from and fused with
the others. The base maps of a batch of patches at *every* chosen layer come from one capture (one forward and
one backward pass, :func:`camanim.compute.capture.capture`), so a sweep over ``N`` layers costs the same
``P`` patch passes as one layer (``P = 122`` for a 224x224 input with the defaults), where a per-layer loop
repeats them ``N`` times.

Everything follows grad-cam's ``SESS`` (the paper's procedure, its defaults): ``num_scales = 12`` scales from
the window size up in steps of ``2/7`` of it, the window the input's shorter side and the step the window
(border windows shifted back inside), patch scores the softmax probability of the class (clipped at 0) divided
by the best patch's, each patch map min-max scaled, resized to the window, min-max scaled again and weighted,
pasted and resized to the input (bilinear, as ``cv2.resize``), fused by a mean over the patches whose value
exceeds ``theta = 0`` at each pixel (or a max), then blurred by an 11x11 Gaussian of sigma 5 (as
``cv2.GaussianBlur``). The maps are at the input's resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.compute.capture import capture, frozen_eval
from camanim.compute.layers import Layer
from camanim.compute.methods.base import CAMMethod, LayerTensors, compute_maps, method_class, register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.compute.methods.sampling import MAX_GRADIENT_BATCH, non_negative, positive_int
from camanim.compute.targets import TARGET_KINDS
from camanim.errors import OptionError

logger = logging.getLogger(__name__)

NORM_EPS = 1e-7  # grad-cam's scale_cam_image
BLUR_SIZE, BLUR_SIGMA = 11, 5.0


def window_starts(length: int, step: int, window: int) -> list[int]:
    """Starts of the windows covering ``length``, the last shifted back inside (grad-cam's ``window_starts``)."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def _minmax(t: Tensor) -> Tensor:
    """Each map of ``t`` ``(n, h, w)`` min-max scaled as grad-cam's ``scale_cam_image``."""
    flat = t.flatten(1)
    shifted = flat - flat.amin(dim=1, keepdim=True)
    return (shifted / (NORM_EPS + shifted.amax(dim=1, keepdim=True))).reshape(t.shape)


def _resize_taps(src: int, dst: int, start: int, width: int, device: torch.device):
    """For a bilinear resize of ``src`` samples to ``dst`` (``align_corners=False``, as ``cv2.resize``), the two
    source taps of every output sample relative to a window ``[start, start + width)`` of the source, and
    their weights, zero for taps outside the window: ``(i0, i1, w0, w1)``, each ``(dst,)``."""
    pos = ((torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp_min(0)
    i0 = pos.floor().long()
    frac = pos - i0
    i1 = (i0 + 1).clamp_max(src - 1)
    i0 = i0.clamp_max(src - 1)
    w0, w1 = 1 - frac, frac
    r0, r1 = i0 - start, i1 - start
    w0 = torch.where((r0 >= 0) & (r0 < width), w0, 0.0)
    w1 = torch.where((r1 >= 0) & (r1 < width), w1, 0.0)
    return r0.clamp(0, width - 1), r1.clamp(0, width - 1), w0.float(), w1.float()


def paste_resized(
    cam: Tensor, x1: int, y1: int, scaled_hw: tuple[int, int], out_hw: tuple[int, int]
) -> Tensor:
    """``cam`` ``(L, s, s)`` pasted at ``(x1, y1)`` into zeros of ``scaled_hw`` and resized to ``out_hw``:
    ``(L, H, W)``, without building the scaled canvas (only the window's taps are read)."""
    (sh, sw), (h, w) = scaled_hw, out_hw
    s = cam.shape[-1]
    y0, y1i, wy0, wy1 = _resize_taps(sh, h, y1, cam.shape[-2], cam.device)
    x0, x1i, wx0, wx1 = _resize_taps(sw, w, x1, s, cam.device)
    rows = cam[:, y0, :] * wy0[None, :, None] + cam[:, y1i, :] * wy1[None, :, None]  # (L, H, s)
    return rows[:, :, x0] * wx0[None, None, :] + rows[:, :, x1i] * wx1[None, None, :]


def gaussian_blur(maps: Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """``cv2.GaussianBlur(m, (size, size), sigma)`` of each map ``(L, H, W)`` (reflect-101 borders)."""
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = (g / g.sum()).to(maps)
    pad = size // 2
    x = maps[:, None]
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), g.view(1, 1, 1, size))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), g.view(1, 1, size, 1))
    return x[:, 0]


@register_method("sess")
class SESS(MultiPassMethod):
    """SESS (Tursun et al., 2022): a base method ensembled over scaled, sliding windows (module docstring).

    Options (grad-cam's names and defaults): ``base`` (a one-pass method, default ``gradcam``),
    ``num_scales`` (12), ``scales`` (the shorter sides, overriding ``num_scales``), ``window`` (the input's
    shorter side), ``step`` (the window), ``pre_filter`` (0.0: the share of lowest-scoring patches dropped),
    ``theta`` (0.0), ``pool`` (``"mean"`` or ``"max"``), ``smooth`` (True), ``softmax_scores`` (True).
    """

    paper = "Tursun et al., SESS: Saliency Enhancing with Scaling and Sliding, ECCV 2022"
    resolution = "input"
    default_num_scales = 12
    passes = (
        "P patches x (1 scoring forward + 1 forward + 1 backward) per image for all N layers (batched); "
        "P = 122 at 224x224"
    )

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 0, 0  # the patch count depends on the input size: compute_layers logs it

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        opts = _options(ctx.options)
        base = method_class(opts["base"])
        if base.cost != "one_pass" and base.cost != "one_pass_quadratic":
            raise OptionError(f"sess needs a one-pass base method, not {base.name!r} ({base.cost})")
        method = base(seed=ctx.seed)
        maps = [self._image(ctx, b, method, opts) for b in range(ctx.x.shape[0])]
        return {layer.name: torch.stack([m[layer.name] for m in maps]) for layer in ctx.layers}

    def _image(self, ctx: PassContext, b: int, base: CAMMethod, opts: dict) -> dict[str, Tensor]:
        from torchvision.transforms.functional import resize

        x = ctx.x[b : b + 1]
        h, w = x.shape[-2:]
        window = opts["window"] or min(h, w)
        step = opts["step"] or window
        scales = opts["scales"] or [
            window + int(round(window * opts["scale_step_ratio"])) * i for i in range(opts["num_scales"])
        ]
        patches, coords = [], []
        for scale in scales:
            if scale < window:
                raise OptionError(f"every scale must be at least the window size {window}, got {scale}")
            scaled = resize(x, scale)
            sh, sw = scaled.shape[-2:]
            for y in window_starts(sh, step, window):
                for xx in window_starts(sw, step, window):
                    patches.append(scaled[:, :, y : y + window, xx : xx + window])
                    coords.append((xx, y, sh, sw))
        batch = max(1, min(ctx.batch_size, MAX_GRADIENT_BATCH))
        logger.info(
            "sess: %d patches of %dx%d from %d scale(s): %d scoring forwards, %d forward and %s backward "
            "passes for %d layer(s)",
            len(patches),
            window,
            window,
            len(scales),
            len(patches),
            len(patches),
            len(patches) if base.needs_gradients else 0,
            len(ctx.layers),
        )
        cls = ctx.classes[b]
        with frozen_eval(ctx.model), torch.no_grad():
            outs = [ctx.model(torch.cat(patches[i : i + batch])) for i in range(0, len(patches), batch)]
        out = torch.cat(outs).float()
        probs = out.softmax(dim=-1) if opts["softmax_scores"] else out
        scores = probs[:, cls].clamp_min(0).cpu().numpy()
        order = np.argsort(scores)[int(len(scores) * opts["pre_filter"]) :]
        best = scores[order[-1]]
        weights = scores[order] / best if best > 0 else np.ones(len(order), np.float32)

        names = [layer.name for layer in ctx.layers]
        wanted = set(names)
        total = x.new_zeros(len(names), h, w, dtype=torch.float32)  # every layer's fusion, (L, H, W)
        counts = torch.zeros_like(total)
        kind = TARGET_KINDS[ctx.score]
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            inp = torch.cat([patches[i] for i in idx])
            got: dict[str, Tensor] = {}

            def consumer(layer: Layer, value: Tensor, grad: Tensor | None, _k: int, got=got) -> None:
                if base.needs_gradients and grad is None:
                    return
                t = LayerTensors(value, grad, layer.name, ctx.options)
                got[layer.name] = compute_maps({base.name: base}, t)[base.name].detach().float()

            capture(
                ctx.model,
                inp,
                kind((cls,) * len(idx)),
                lambda layer: layer.name in wanted,
                consumer=consumer,
                gradients=base.needs_gradients,
            )
            # Each patch map: ReLU, min-max, resized to the window, min-max again (grad-cam's base CAM and its
            # one-layer aggregation); a layer the gradient did not reach adds nothing.
            cams = inp.new_zeros(len(names), len(idx), window, window, dtype=torch.float32)
            for li, name in enumerate(names):
                if name in got:
                    cam = _minmax(got[name].clamp_min(0))[:, None]
                    cam = F.interpolate(cam, size=(window, window), mode="bilinear", align_corners=False)
                    cams[li] = _minmax(cam[:, 0])
            for j, i in enumerate(idx):
                xx, y, sh, sw = coords[i]
                pasted = paste_resized(cams[:, j] * float(weights[start + j]), xx, y, (sh, sw), (h, w))
                if opts["pool"] == "max":
                    torch.maximum(total, pasted, out=total)
                else:
                    mask = pasted > opts["theta"]
                    total += torch.where(mask, pasted, 0.0)
                    counts += mask
        fused = total
        if opts["pool"] != "max":
            fused = torch.where(counts > 0, total / counts.clamp_min(1), 0.0)
        if opts["smooth"]:
            fused = gaussian_blur(fused)
        result = {name: fused[li] for li, name in enumerate(names)}
        return result


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    scales = options.get("scales")
    if isinstance(scales, str):
        scales = [int(s) for s in scales.split(",") if s.strip()]
    pool = str(options.get("pool", "mean"))
    if pool not in ("mean", "max"):
        raise OptionError(f"pool must be 'mean' or 'max', got {pool!r}")
    pre_filter = non_negative(options, "pre_filter", 0.0)
    if not pre_filter < 1:
        raise OptionError(f"pre_filter must be in [0, 1), got {pre_filter}")
    theta = non_negative(options, "theta", 0.0)
    return {
        "base": str(options.get("base", "gradcam")),
        "num_scales": positive_int(options, "num_scales", SESS.default_num_scales),
        "scales": list(scales) if scales else None,
        "scale_step_ratio": float(options.get("scale_step_ratio", 2.0 / 7.0)),
        "window": positive_int(options, "window", 1) if options.get("window") else None,
        "step": positive_int(options, "step", 1) if options.get("step") else None,
        "pre_filter": pre_filter,
        "theta": theta,
        "pool": pool,
        "smooth": _flag(options.get("smooth", True)),
        "softmax_scores": _flag(options.get("softmax_scores", True)),
    }


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)
