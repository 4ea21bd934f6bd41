"""CAManim end to end: capture, normalise, render and encode every layer of DenseNet-161 into one MP4.

Workload: torchvision DenseNet-161 with random (seeded) weights, scikit-image's ``chelsea`` at 224x224, one
method (Grad-CAM), every spatial layer (duplicates of an earlier tensor left out), side-by-side layout
(local | global), H.264 MP4. Rounds are repeated and medians reported (this 2-core machine is shared).

Measured per round:

* ``fwd+bwd``: one plain forward and one ``torch.autograd.grad`` of the target logit (the unit of cost;
  median of 3 per round);
* ``animate``: :func:`camanim.animate` (one capture for all layers + exact local/global ranges);
* ``render+encode``: :meth:`Animation.save` of the MP4 only (frames composed and piped to ffmpeg);
* ``render``: composing the frames without encoding, per frame;
* ``total``: ``animate`` + ``save`` = capture, render and encode;
* ``extras``: strip figure, ``layers.csv`` and ``params.png`` (written by ``save`` too).

Reference ("CAManim-style", the paper's code path): per layer, one grad-cam ``GradCAM`` forward+backward on
that layer alone and a matplotlib figure (local and global panels, colour bar) saved as PNG. It is timed on a
handful of layers, each grad-cam call next to a plain forward+backward (their ratio is stable on a loaded
machine where absolute times are not), and extrapolated linearly to all layers at this run's
forward+backward speed; the final PNG-to-video step is not counted, so the reference is an underestimate.

Usage: python benchmarks/bench_animate.py [--repeats 3] [--ref-layers 4] [--model densenet161] [--write]

``--write`` replaces the "## Animation (CAManim)" section of benchmarks/RESULTS.md (creating the file with a
"# Benchmark results" heading if absent) and leaves every other section as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import camanim
from camanim.compute.models import wrap_model

log = logging.getLogger("bench_animate")

SECTION = "## Animation (CAManim)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, target: int) -> float:
    """Seconds for one forward and one backward (gradient of one logit with respect to the input)."""
    t = time.perf_counter()
    inp = x.clone().requires_grad_(True)
    torch.autograd.grad(model(inp)[0, target], inp)
    return time.perf_counter() - t


def reference_per_layer(lm, anim, n_layers: int, tmp: Path) -> dict[str, float | list[str]]:
    """The CAManim-style path on ``n_layers`` evenly spaced Conv2d layers (after one untimed warm-up).

    Each layer's grad-cam call is timed next to a plain forward+backward, so the ratio survives the load of
    a shared machine. Returns medians: ``gradcam`` and ``figure`` seconds per layer, ``ratio`` (grad-cam
    call / adjacent forward+backward), and the layer ``names``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ex = anim.explanation
    x = ex.input
    target = [ClassifierOutputTarget(ex.targets[0])]
    image = ex.display[0].astype(np.float32) / 255
    convs = [layer for layer in anim.layers if layer.type == "Conv2d" and "#" not in layer.name]
    picks = [convs[round(i * (len(convs) - 1) / max(1, n_layers - 1))] for i in range(n_layers)]
    gradcam_s, figure_s, ratio, names = [], [], [], []
    for k, layer in enumerate([picks[-1], *picks]):
        module = lm.model.get_submodule(layer.module_name)
        fb = fwd_bwd(lm.model, x, ex.targets[0])
        t = time.perf_counter()
        with GradCAM(model=lm.model, target_layers=[module]) as cam:
            grey = cam(input_tensor=x, targets=target)[0]  # grad-cam min-max scales each layer itself
        t1 = time.perf_counter()
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, title in zip(axes, ("local", "global"), strict=True):
            ax.imshow(image)
            shown = ax.imshow(grey, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"{layer.name} ({title})")
            ax.axis("off")
        fig.colorbar(shown, ax=axes.tolist())
        fig.savefig(tmp / f"{layer.index:04d}.png")
        plt.close(fig)
        t2 = time.perf_counter()
        if k == 0:
            continue  # warm-up
        gradcam_s.append(t1 - t)
        figure_s.append(t2 - t1)
        ratio.append((t1 - t) / fb)
        names.append(layer.name)
    return {
        "gradcam": statistics.median(gradcam_s),
        "figure": statistics.median(figure_s),
        "ratio": statistics.median(ratio),
        "names": names,
    }


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it), leaving other sections untouched."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if end < 0 else "\n" + old[end + 1 :])
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet161", help="a torchvision classification model name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ref-layers", type=int, default=4, help="layers timed for the CAManim-style reference"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help=f"replace the {SECTION!r} section of RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(args.device)
    lm = wrap_model(model, name=f"torchvision:{args.model}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_animate_"))
    try:
        # warm-up: first calls pay for allocator growth and kernel selection
        warm = camanim.animate(lm, "chelsea", layers="last")
        x = warm.explanation.input.to(args.device)
        target = warm.explanation.targets[0]
        fwd_bwd(model, x, target)

        rows: dict[str, list[float]] = {
            k: [] for k in ("fwdbwd", "animate", "capture", "ranges", "save", "total")
        }
        rows |= {"render_frame": [], "save_frame": [], "extras": []}
        anim = None
        for r in range(args.repeats):
            rows["fwdbwd"].append(statistics.median(fwd_bwd(model, x, target) for _ in range(3)))
            out = tmp / f"round{r}"
            t0 = time.perf_counter()
            anim = camanim.animate(lm, "chelsea", methods="gradcam", layers="all", layout="side-by-side")
            t1 = time.perf_counter()
            anim.save(out, formats="mp4", extras=False)
            t2 = time.perf_counter()
            n = len(anim)
            rows["animate"].append(t1 - t0)
            rows["capture"].append(anim.explanation.timings["capture"])
            rows["ranges"].append(anim._cache["timings"]["ranges"])
            rows["save"].append(t2 - t1)
            rows["save_frame"].append(anim._cache["last_timings"]["render_encode"] / n)
            rows["total"].append(t2 - t0)
            t = time.perf_counter()
            for _ in anim.frames():
                pass
            rows["render_frame"].append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            anim.strip()
            anim.layer_csv()
            anim.params_png()
            rows["extras"].append(time.perf_counter() - t)
            shutil.rmtree(out, ignore_errors=True)
        assert anim is not None
        med = {k: statistics.median(v) for k, v in rows.items()}
        best = {k: min(v) for k, v in rows.items()}
        per_round = {  # ratios taken within a round, where both sides saw the same machine load
            k: statistics.median(
                a * (n if "frame" in k else 1) / b for a, b in zip(v, rows["fwdbwd"], strict=True)
            )
            for k, v in rows.items()
        }
        n = len(anim)
        frame_shape = anim.frame(0).shape
        ref = reference_per_layer(lm, anim, args.ref_layers, tmp)
        fb = med["fwdbwd"]
        ref_layer = ref["ratio"] * fb + ref["figure"]  # per layer, at this run's forward+backward speed
        ref_total = ref_layer * n

        lines = [
            SECTION,
            "",
            f"`python benchmarks/bench_animate.py --repeats {args.repeats} --ref-layers {args.ref_layers}`: "
            f"torchvision {args.model} (random seeded weights), scikit-image `chelsea` at 224x224, Grad-CAM, "
            f"all {n} spatial layers (repeats of an earlier tensor left out), side-by-side layout (local | "
            f"global), H.264 MP4 of {frame_shape[1]}x{frame_shape[0]} frames.",
            "",
            f"Machine: {os.cpu_count()} CPUs (shared), torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, device {args.device}; load average at the end {os.getloadavg()[0]:.1f}. "
            f"{args.repeats} rounds: median and best round; the ratio column is the median of per-round ratios "
            f"(both sides measured under the same load).",
            "",
            "| stage | median s | best s | per frame, median (ms) | x one fwd+bwd |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, key in (
            ("one forward + backward (the unit)", "fwdbwd"),
            ("animate(): capture of all layers (explain)", "capture"),
            ("animate(): exact local/global ranges", "ranges"),
            ("animate() total", "animate"),
            ("save(): render + encode MP4, maps.npz, manifest", "save"),
            ("**end to end: capture, render, encode**", "total"),
            ("strip.png + layers.csv + params.png", "extras"),
            ("render only (frames composed, no encoder)", "render_frame"),
            ("render + encode (the video loop inside save)", "save_frame"),
        ):
            scale = n if "frame" in key else 1
            lines.append(
                f"| {label} | {med[key] * scale:.2f} | {best[key] * scale:.2f} | "
                f"{med[key] * scale / n * 1000:.2f} | {per_round[key]:.2f} |"
            )
        lines += [
            "",
            f"CAManim-style reference (one grad-cam `GradCAM` forward+backward per layer + one matplotlib "
            f"figure per frame saved as PNG), timed on {len(ref['names'])} layers ({', '.join(ref['names'])}): "
            f"the grad-cam call costs {ref['ratio']:.2f}x an adjacent plain forward+backward (it also fills "
            f"every parameter's .grad) and the figure {ref['figure'] * 1000:.0f} ms (medians; raw grad-cam call "
            f"{ref['gradcam']:.2f} s). At this run's forward+backward ({fb:.2f} s) that is {ref_layer:.2f} s per "
            f"layer; extrapolated linearly to {n} layers: {ref_total:.0f} s ({ref_total / 60:.1f} min), "
            f"{ref_total / med['total']:.0f}x our end-to-end median (encoding its PNGs into a video not "
            f"counted).",
            "",
            f"Targets: end to end <= 5 s: {'met' if med['total'] <= 5 else 'NOT met'} (median "
            f"{med['total']:.2f} s, best {best['total']:.2f} s); render + encode <= 5 ms per frame: "
            f"{'met' if med['save_frame'] <= 0.005 else 'NOT met'} (median {med['save_frame'] * 1000:.2f} ms, "
            f"best {best['save_frame'] * 1000:.2f} ms).",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.write:
            write_section(RESULTS, text)
            print(f"wrote the section into {RESULTS}")
        for k, v in rows.items():
            log.info("%s: %s", k, ", ".join(f"{s:.3f}" for s in v))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
