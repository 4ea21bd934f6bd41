"""ybROAD end to end: camanim's full ybROAD against grad-cam's ROADCombined looped over the same layers.

Per run, side by side in one process (the machine is shared: compare ratios, not absolute times):

* **ours**: ``camanim.road.ybroad(model, image, methods="gradcam")`` over every spatial layer (one capture,
  deduplicated masks, batched imputation and forwards), at 224 x 224;
* **floor**: the batched forwards alone of as many perturbed images as ours forwarded (same batch size,
  same optimised copy: channels-last, Conv-BN folded), on random inputs of the same shape; the target is ours <= 1.5x this;
* **grad-cam**: ``ROADCombined(percentiles=[20, 40, 60, 80])`` on the same upsampled maps, one call per
  layer, with ``ClassifierOutputSoftmaxTarget``; timed on ``--gradcam-layers`` evenly spaced layers and
  extrapolated to all of them (a full loop takes ~15 min); the target is ours >= 10x faster;
* **imputation**: masks per second of ``NoisyLinearImputer`` (batched) and ``SpsolveImputer`` (one solve per
  mask) on real ybROAD masks of the run, and the largest difference between them (noise off).

Also times the default model's full ybROAD. Prints markdown; ``--write`` replaces the "## ybROAD" section of
benchmarks/RESULTS.md.

Usage: python benchmarks/bench_road.py [--model resnet50] [--repeats 2] [--gradcam-layers 10] [--write]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from camanim.compute.metrics.imputers import NoisyLinearImputer, SpsolveImputer
from camanim.compute.metrics.road import _forward_copy, _probabilities, removal_masks
from camanim.compute.models import load_model
from camanim.pipelines.ybroad import ybroad

log = logging.getLogger("bench_road")
RESULTS = Path(__file__).with_name("RESULTS.md")
PERCENTAGES = (20, 40, 60, 80)


def time_ours(lm, image: str, batch_size: int):
    """(wall s, process CPU s, result) of a full ybROAD."""
    t, c = time.perf_counter(), time.process_time()
    res = ybroad(lm, image, methods="gradcam", batch_size=batch_size)
    return time.perf_counter() - t, time.process_time() - c, res


def time_floor(lm, n: int, size: tuple[int, int], batch_size: int, target: int) -> tuple[float, float]:
    """(wall s, CPU s) to forward ``n`` images in batches, the way ybROAD does (optimised copy, inference)."""
    x = torch.randn(min(n, batch_size), 3, *size, generator=torch.Generator().manual_seed(0))
    net, cl = _forward_copy(lm.model, None, x[:1])
    with torch.inference_mode():
        _probabilities(net, x[:2], target, batch_size, cl)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        done = 0
        while done < n:
            k = min(batch_size, n - done)
            _probabilities(net, x[:k], target, batch_size, cl)
            done += k
    return time.perf_counter() - t, time.process_time() - c


def time_gradcam(model: torch.nn.Module, res, layers_timed: int) -> tuple[float, float, int]:
    """Mean wall and CPU seconds per layer of grad-cam's ROADCombined on evenly spaced layers."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    ex = res.explanation
    chosen = ex.chosen
    idx = np.unique(np.linspace(0, len(chosen) - 1, min(layers_timed, len(chosen))).round().astype(int))
    metric = ROADCombined(percentiles=list(PERCENTAGES))
    targets = [ClassifierOutputSoftmaxTarget(res.target)]
    secs, cpu = [], []
    for i in idx:
        cam = ex.upsampled("gradcam", chosen[i].name)[0].numpy()[None]
        t, c = time.perf_counter(), time.process_time()
        metric(ex.input, cam, targets, model)
        secs.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        log.info("grad-cam layer %s: %.1f s (CPU %.1f s)", chosen[i].name, secs[-1], cpu[-1])
    return float(np.mean(secs)), float(np.mean(cpu)), len(idx)


def time_imputers(res, n_masks: int) -> dict[str, float]:
    """Masks/s of the batched fast imputer and of spsolve on real masks of the run (noise off)."""
    ex = res.explanation
    pixels = ex.preprocessing.denormalize(ex.input[0])
    chosen = ex.chosen
    layers = np.linspace(0, len(chosen) - 1, max(1, n_masks // 8)).round().astype(int)
    masks = []
    for i in layers:
        morf, lerf = removal_masks(ex.upsampled("gradcam", chosen[i].name)[0], PERCENTAGES)
        masks += [morf, lerf]
    masks = torch.cat(masks)[:n_masks]
    images = pixels.expand(masks.shape[0], -1, -1, -1)
    fast, ref = NoisyLinearImputer(noise=0.0), SpsolveImputer(noise=0.0)
    fast(images[:8], masks[:8])  # warm-up
    t = time.perf_counter()
    a = fast(images, masks)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    b = torch.cat([ref(images[i : i + 1], masks[i : i + 1]) for i in range(masks.shape[0])])
    t_ref = time.perf_counter() - t
    return {
        "masks": masks.shape[0],
        "fast": masks.shape[0] / t_fast,
        "spsolve": masks.shape[0] / t_ref,
        "diff": float((a - b).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision/timm name, random weights")
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (ours, floor), medians kept")
    parser.add_argument("--gradcam-layers", type=int, default=10, help="layers timed for grad-cam; 0 skips")
    parser.add_argument("--impute-masks", type=int, default=32, help="masks for the imputer throughput")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-default-model", dest="default_model", action="store_false")
    parser.add_argument("--write", action="store_true", help="replace the ybROAD section of RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lm = load_model(args.model, "none")
    size = lm.preprocessing.size
    ours, ours_cpu, floors, floors_cpu, results, gcs = [], [], [], [], [], []
    for r in range(args.repeats):
        secs, cpu, res = time_ours(lm, args.image, args.batch_size)
        fl, fl_cpu = time_floor(lm, int(res.stats["forwards"]), size, args.batch_size, res.target)
        ours.append(secs)
        ours_cpu.append(cpu)
        floors.append(fl)
        floors_cpu.append(fl_cpu)
        results.append(res)
        log.info("round %d: ours %.1f s, floor %.1f s (%d forwards)", r + 1, secs, fl, res.stats["forwards"])
        if args.gradcam_layers:  # interleaved with ours, so that both see alike load
            gcs.append(time_gradcam(lm.model, res, args.gradcam_layers))
            log.info("round %d: grad-cam %.2f s per layer (CPU %.2f s)", r + 1, gcs[-1][0], gcs[-1][1])
    res = results[-1]
    same = all(np.array_equal(x["gradcam"].road, res["gradcam"].road) for x in results)
    n_layers = len(res["gradcam"])
    gc = None
    if gcs:
        per_layer = statistics.median(g[0] for g in gcs)
        per_layer_cpu = statistics.median(g[1] for g in gcs)
        gc = (per_layer, per_layer_cpu, gcs[0][2], per_layer * n_layers, per_layer_cpu * n_layers)
    imp = time_imputers(res, args.impute_masks)
    default = None
    if args.default_model:
        dm = load_model()
        d_secs, _, d_res = time_ours(dm, args.image, args.batch_size)
        d_floor, _ = time_floor(
            dm, int(d_res.stats["forwards"]), dm.preprocessing.size, args.batch_size, d_res.target
        )
        default = (dm.name, d_secs, d_floor, d_res)

    t_ours, t_floor = statistics.median(ours), statistics.median(floors)
    c_ours, c_floor = statistics.median(ours_cpu), statistics.median(floors_cpu)
    st = res.stats
    lines = [
        "## ybROAD",
        "",
        f"`python benchmarks/bench_road.py --repeats {args.repeats} --gradcam-layers {args.gradcam_layers}` "
        f"on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}. "
        "The machine was shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end): absolute times are inflated and noisy, the ratios are taken "
        "side by side in one run.",
        "",
        f"Workload: {lm.name} with random weights, image `{args.image}` at {size[0]}x{size[1]}, Grad-CAM at "
        f"all {n_layers} spatial layers, p = 20/40/60/80 %, one target ({res.target_name!r}).",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| ours: full ybROAD, median of {len(ours)} (s) | {t_ours:.1f} |",
        f"| ours: rounds (s) | {', '.join(f'{s:.1f}' for s in ours)} |",
        f"| masks asked / unique (imputed and forwarded) | {int(st['masks'])} / {int(st['forwards'])} |",
        f"| of which capture (s) / imputation (s) / forwards (s) | {res.timings['explain']:.1f} / "
        f"{st['t_impute']:.1f} / {st['t_forward']:.1f} |",
        f"| ours: process CPU time, median (s) | {c_ours:.1f} |",
        f"| floor: batched forwards of {int(st['forwards'])} images, median (s) | {t_floor:.1f} |",
        f"| floor: process CPU time, median (s) | {c_floor:.1f} |",
        f"| **ours / floor**, wall (target <= 1.5) | **{t_ours / t_floor:.2f}** |",
        f"| ours / floor, CPU time | {c_ours / c_floor:.2f} |",
    ]
    if gc is not None:
        per_layer, per_layer_cpu, timed, total, total_cpu = gc
        ref = 5.7 * n_layers  # the reference: 5.7 s per layer, measured earlier on this machine
        lines += [
            f"| grad-cam ROADCombined: s per layer, mean of {timed} evenly spaced layers, median of "
            f"{len(gcs)} rounds (wall / CPU) | {per_layer:.2f} / {per_layer_cpu:.2f} |",
            f"| grad-cam: all {n_layers} layers, extrapolated (wall / CPU s) | {total:.0f} / {total_cpu:.0f} |",
            f"| **speed-up over grad-cam**, wall, side by side (target >= 10x) | **{total / t_ours:.1f}x** |",
            f"| speed-up over grad-cam, process CPU time | {total_cpu / c_ours:.1f}x |",
            f"| speed-up against the issue's reference (5.7 s per layer x {n_layers} = {ref:.0f} s, "
            f"measured on a quieter machine) vs ours today | {ref / t_ours:.1f}x |",
        ]
    lines += [
        f"| imputation, NoisyLinearImputer batched, {imp['masks']} real masks (masks/s) | {imp['fast']:.1f} |",
        f"| imputation, SpsolveImputer one per mask (masks/s) | {imp['spsolve']:.1f} |",
        f"| imputation speed-up / max abs diff (noise off) | {imp['fast'] / imp['spsolve']:.1f}x / "
        f"{imp['diff']:.1e} |",
        f"| identical ybROAD in every round | {same} |",
    ]
    if default is not None:
        name, d_secs, d_floor, d_res = default
        dst = d_res.stats
        lines += [
            f"| default model ({name}, pretrained): full ybROAD, {len(d_res[d_res.methods[0]])} layers (s) "
            f"| {d_secs:.1f} |",
            f"| default model: masks / unique; imputation (s) / forwards (s) / floor (s) | "
            f"{int(dst['masks'])} / {int(dst['forwards'])}; {dst['t_impute']:.1f} / {dst['t_forward']:.1f} / "
            f"{d_floor:.1f} |",
        ]
    summary = res["gradcam"]
    lines += [
        "",
        f"ResNet-50 (random weights) ybROAD: mean {summary.mean:.4f}, max {summary.max:.4f} at "
        f"`{summary.best_layer.name}`, final `{summary.final_layer.name}` {summary.final:.4f}.",
    ]
    if default is not None:
        r0 = default[3][default[3].methods[0]]
        lines.append(
            f"Default model ybROAD (target {default[3].target_name!r}): mean {r0.mean:.4f}, max {r0.max:.4f} at "
            f"`{r0.best_layer.name}`, final `{r0.final_layer.name}` {r0.final:.4f}."
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        write_section(text)


def write_section(text: str) -> None:
    """Replace (or append) the "## ybROAD" section of RESULTS.md, leaving the other sections alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## ybROAD\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


if __name__ == "__main__":
    main()
