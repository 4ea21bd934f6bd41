"""Throughput of ROAD's noisy linear imputation: grad-cam vs SpsolveImputer vs NoisyLinearImputer.

The workload is ybROAD's: one 224x224x3 image; per "layer" a smooth random saliency map whose pixel
ranking gives 8 masks (MoRF and LeRF at 20 / 40 / 60 / 80 % removed). Every imputer runs with noise off
on the same masks; rounds are interleaved and the best round of each is kept (this machine is shared).
Prints a markdown table: masks per second, speed-up over SpsolveImputer, and max abs difference from it.

Usage: python benchmarks/bench_imputer.py [--layers 8] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from camanim.compute.metrics.imputers import NoisyLinearImputer, SpsolveImputer

log = logging.getLogger("bench_imputer")

FRACTIONS = (0.2, 0.4, 0.6, 0.8)


def test_image(size: int = 224) -> torch.Tensor:
    """skimage's astronaut, resized to (3, size, size) float32 in [0, 1]."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float()


def layer_masks(layers: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(8 * layers, size, size) bool: per layer MoRF and LeRF of a smooth random map at each fraction."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        sigma = rng.uniform(4, 24)  # CAMs of different layers have different spatial scales
        order = np.argsort(ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma).ravel())
        for frac in FRACTIONS:
            k = int(round(frac * size * size))
            for idx in (order[-k:], order[:k]):
                m = np.zeros(size * size, dtype=bool)
                m[idx] = True
                out.append(m.reshape(size, size))
    return torch.from_numpy(np.stack(out))


def grad_cam_runner() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """grad-cam's NoisyLinearImputer, one image at a time; its mask is a keep mask (1 = keep)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer as GradCamImputer

    imputer = GradCamImputer(noise=0.0)
    return lambda images, masks: torch.stack(
        [imputer(images[i], (~masks[i]).float()) for i in range(masks.shape[0])]
    )


def run_in_calls(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    masks: torch.Tensor,
    per_call: int,
) -> tuple[float, torch.Tensor]:
    """Impute all masks, ``per_call`` per call; returns (seconds, (N, C, H, W) output)."""
    outs = []
    start = time.perf_counter()
    for i in range(0, masks.shape[0], per_call):
        chunk = masks[i : i + per_call]
        outs.append(fn(image.expand(chunk.shape[0], -1, -1, -1), chunk))
    return time.perf_counter() - start, torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of 8 masks each (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions, best kept")
    parser.add_argument("--gradcam-layers", type=int, default=1, help="layers timed for grad-cam (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    image = test_image()
    masks = layer_masks(args.layers)
    n = masks.shape[0]
    n_gc = min(n, 8 * args.gradcam_layers)
    n_few = min(n, 16)
    spsolve = SpsolveImputer(noise=0.0)
    fast = NoisyLinearImputer(noise=0.0)
    # (name, function, masks per call, number of masks timed)
    runs = [
        ("grad-cam NoisyLinearImputer", grad_cam_runner(), 1, n_gc),
        ("SpsolveImputer", spsolve, 1, n),
        ("NoisyLinearImputer, 8 masks/call", fast, 8, n),
        ("NoisyLinearImputer, 64 masks/call", fast, 64, n),
        # Variants, on fewer masks: torch's own intra-op threads instead of the pool; float64 CG.
        ("NoisyLinearImputer, 8/call, workers=1", NoisyLinearImputer(noise=0.0, workers=1), 8, n_few),
        (
            "NoisyLinearImputer, 8/call, float64 CG",
            NoisyLinearImputer(noise=0.0, dtype=torch.float64),
            8,
            n_few,
        ),
    ]
    fast(image.expand(8, -1, -1, -1), masks[:8])  # warm up torch's thread pool and allocator
    best: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name, fn, per_call, count in runs:
            secs, out = run_in_calls(fn, image, masks[:count], per_call)
            best[name] = min(best.get(name, float("inf")), secs / count)
            outputs[name] = out
            log.info("round %d  %-44s %6.1f ms/mask", r + 1, name, 1e3 * secs / count)

    ref = outputs["SpsolveImputer"]
    base = 1.0 / best["SpsolveImputer"]
    print(f"\n224x224x3 image, {n} masks ({args.layers} layers x MoRF/LeRF x 20/40/60/80 %), ", end="")
    print(f"torch threads: {torch.get_num_threads()}, best of {args.rounds} rounds\n")
    print("| imputer | masks timed | masks/s | ms/mask | vs spsolve | max abs diff vs spsolve |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _, count in runs:
        rate = 1.0 / best[name]
        diff = (outputs[name] - ref[:count]).abs().max().item()
        print(f"| {name} | {count} | {rate:.1f} | {1e3 * best[name]:.1f} | {rate / base:.2f}x | {diff:.1e} |")
    print(f"\nCG iterations per batch, last 64-mask call: {fast.last_iterations}")


if __name__ == "__main__":
    main()
