"""Throughput of ROAD's noisy linear imputation: grad-cam vs SpsolveImputer vs NoisyLinearImputer.

The workload is ybROAD's: one 224x224x3 image; per "layer" a smooth random saliency map whose pixel
ranking gives 8 masks (MoRF and LeRF at 20 / 40 / 60 / 80 % removed). Every imputer runs with noise off
on the same masks; rounds are interleaved and the best round of each is kept (this machine is shared).
Prints a markdown table: masks per second, speed-up over SpsolveImputer, and max abs difference from it.

Usage: python benchmarks/bench_imputer.py [--layers 8] [--rounds 2] [--threads N]

``--3d``: volumes instead. One smooth random map per size (32³, 64³, 96³ by default), its top 20 / 50 / 80 %
removed, a single one-channel volume per call; per mask, interleaved: ``NoisyLinearImputer3D`` (multigrid-
preconditioned CG), the conjugate gradients it replaced (Jacobi-preconditioned, float64, one ``conv3d`` per
iteration; kept here only for the comparison) and ``spsolve`` on the assembled system (the reference; SuperLU
fill-in grows fast in 3-D, so only up to ``--ref-max-size``). Prints seconds per mask, the speed-up, the max
abs difference from spsolve (or from the old solver above ``--ref-max-size``) relative to the volume's range,
and the 1-min load average before and after.

Usage: python benchmarks/bench_imputer.py --3d [--sizes 32,64,96] [--rounds 2] [--threads 2]
    [--old-max-size 64] [--ref-max-size 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from camanim.compute.metrics.imputers import NoisyLinearImputer, SpsolveImputer
from camanim.compute.metrics.imputers3d import NoisyLinearImputer3D, assemble_system_3d, neighbour_kernel

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


# ------------------------------------------------------------------------------------------------ volumes

FRACTIONS_3D = (0.2, 0.5, 0.8)


def jacobi_cg_3d(
    images: torch.Tensor, masks: torch.Tensor, tol: float = 1e-8, max_iter: int = 5000
) -> torch.Tensor:
    """The 3-D solver before the multigrid one: CG with a Jacobi preconditioner, float64, ``conv3d`` operator."""
    m = masks.to(torch.bool)
    b, c = images.shape[:2]
    x = images.to(torch.float64)
    kernel = neighbour_kernel()
    rm = m[:, None].expand_as(x).to(torch.float64)
    known = x * (1 - rm)

    def neighbours(u: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv3d(u.reshape(b * c, 1, *u.shape[2:]), kernel, padding=1).reshape(
            u.shape
        )

    s = neighbours(torch.ones_like(x)) * rm
    f = neighbours(known) * rm
    inv = torch.where(rm > 0, 1 / s.clamp_min(1e-12), torch.zeros_like(s))
    u = f * inv
    r = f - (s * u - neighbours(u)) * rm
    z = r * inv
    p = z.clone()
    rz = (r * z).flatten(2).sum(2)
    fnorm = f.flatten(2).norm(dim=2)
    for _ in range(max_iter):
        if bool((r.flatten(2).norm(dim=2) <= tol * fnorm).all()):
            break
        ap = (s * p - neighbours(p)) * rm
        pap = (p * ap).flatten(2).sum(2)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-300), torch.zeros_like(pap))[..., None, None, None]
        u, r = u + alpha * p, r - alpha * ap
        z = r * inv
        rz_new = (r * z).flatten(2).sum(2)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p, rz = z + beta[..., None, None, None] * p, rz_new
    return torch.where(m[:, None], (known + u * rm).to(images.dtype), images)


def spsolve_3d(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """spsolve (SuperLU) on :func:`assemble_system_3d`, one volume at a time."""
    from scipy.sparse.linalg import spsolve

    out = images.clone().to(torch.float64)
    for i in range(images.shape[0]):
        mask = masks[i].numpy()
        mat, rhs = assemble_system_3d(mask, out[i].numpy())
        out[i][:, torch.from_numpy(mask)] = torch.from_numpy(
            np.asarray(spsolve(mat.tocsc(), rhs)).reshape(rhs.shape).T
        )
    return out.to(images.dtype)


def volume_case(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth one-channel volume (1, 1, S, S, S) in [0, 1] and its masks (3, S, S, S) at 20 / 50 / 80 %."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random((size,) * 3), 2)
    volume = (volume - volume.min()) / np.ptp(volume)
    order = np.argsort(
        ndimage.gaussian_filter(rng.standard_normal((size,) * 3), size / 8).ravel(), kind="stable"
    )
    masks = []
    for frac in FRACTIONS_3D:
        m = np.zeros(size**3, dtype=bool)
        m[order[size**3 - int(round(frac * size**3)) :]] = True  # the most "relevant" voxels, as MoRF
        masks.append(m.reshape((size,) * 3))
    return torch.from_numpy(volume).float()[None, None], torch.from_numpy(np.stack(masks))


def main_3d(args: argparse.Namespace) -> None:
    sizes = [int(v) for v in args.sizes.split(",")]
    new = NoisyLinearImputer3D(noise=0.0)
    cases = {size: volume_case(size) for size in sizes}
    new.impute_clean(*(t[:1] for t in volume_case(16)))  # warm up the pool and the allocator
    load_before = os.getloadavg()[0]
    best: dict[tuple[int, float, str], float] = {}
    outputs: dict[tuple[int, float, str], torch.Tensor] = {}
    iterations: dict[tuple[int, float], list[int]] = {}
    for r in range(args.rounds):
        for size in sizes:
            volume, masks = cases[size]
            runs = [("new", new.impute_clean)]
            if size <= args.old_max_size:
                runs.append(("old", jacobi_cg_3d))
            if size <= args.ref_max_size and r == 0:
                runs.append(("spsolve", spsolve_3d))
            for frac, mask in zip(FRACTIONS_3D, masks, strict=True):
                for name, fn in runs:
                    start = time.perf_counter()
                    out = fn(volume, mask[None])
                    secs = time.perf_counter() - start
                    key = (size, frac, name)
                    best[key] = min(best.get(key, float("inf")), secs)
                    outputs[key] = out
                    if name == "new":
                        iterations[(size, frac)] = list(new.last_iterations)
                    log.info("round %d  %d³ %2.0f %%  %-8s %8.2f s", r + 1, size, 100 * frac, name, secs)
    load_after = os.getloadavg()[0]
    print(
        f"\nOne 1-channel volume per call, torch threads: {torch.get_num_threads()}, best of {args.rounds} rounds ",
        end="",
    )
    print(f"(spsolve: 1 round); 1-min load average before/after: {load_before:.1f} / {load_after:.1f}\n")
    print(
        "| size | removed | before: Jacobi CG [s/mask] | after: multigrid CG [s/mask] | speed-up | CG iterations "
        "| spsolve [s/mask] | max abs diff / range |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for frac in FRACTIONS_3D:
            new_s = best[(size, frac, "new")]
            old_s = best.get((size, frac, "old"))
            ref_s = best.get((size, frac, "spsolve"))
            ref_name = "spsolve" if ref_s is not None else "old" if old_s is not None else None
            diff = "-"
            if ref_name is not None:
                d = (outputs[(size, frac, "new")] - outputs[(size, frac, ref_name)]).abs().max().item()
                diff = f"{d:.1e}" + ("" if ref_name == "spsolve" else " (vs before)")
            print(
                f"| {size}³ | {100 * frac:.0f} % | {'-' if old_s is None else f'{old_s:.2f}'} | {new_s:.2f} | "
                f"{'-' if old_s is None else f'{old_s / new_s:.1f}x'} | {iterations[(size, frac)]} | "
                f"{'-' if ref_s is None else f'{ref_s:.2f}'} | {diff} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of 8 masks each (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions, best kept")
    parser.add_argument("--gradcam-layers", type=int, default=1, help="layers timed for grad-cam (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--3d", dest="volumes", action="store_true", help="volumes: the 3-D imputer")
    parser.add_argument("--sizes", default="32,64,96", help="--3d: volume sides")
    parser.add_argument(
        "--old-max-size", type=int, default=64, help="--3d: largest side timed for the old solver"
    )
    parser.add_argument("--ref-max-size", type=int, default=32, help="--3d: largest side solved by spsolve")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.volumes:
        main_3d(args)
        return

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
