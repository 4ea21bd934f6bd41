"""The CAManim paper's Table 1 beside ours: its six models, every layer animated end to end, against the
paper's per-layer loop measured side by side, next to the paper's K80 times.

Models (torchvision, random weights, seed 0, via ``load_model("torchvision:NAME", "none")``): alexnet,
convnext_base (88,591,464 parameters, the paper's ConvNeXt), densenet161, efficientnet_b7, maxvit_t and
squeezenet1_0 (1,248,424 parameters, the paper's SqueezeNet; 1_1 has 1,235,496), each at its own default
input size (torchvision's transform: 600x600 for EfficientNet-b7, 224x224 for the others); EfficientNet-b7
again at 224x224, the size the paper resized every image to. Image: scikit-image's ``chelsea``. Method:
HiResCAM, as in the paper's Table 1 (``--method gradcam`` for Grad-CAM; both cost one forward and one
backward per layer in grad-cam).

Per model, in one run, interleaved over ``--repeats`` rounds (medians reported):

* ``fwd+bwd``: one plain forward and one ``torch.autograd.grad`` of the target logit (the unit of cost);
* ours: ``camanim.animate(lm, "chelsea", methods=METHOD, layers="all")`` + ``Animation.save(out,
  formats="mp4", extras=False)``: one capture of every swept layer (spatial, no repeats of a tensor), local
  and global ranges, every frame rendered and encoded into one H.264 MP4;
* the paper's loop (as its public code runs it): per layer, grad-cam's CAM class on that layer alone (one
  forward and one backward) and one matplotlib figure (local and global panels, colour bar) saved as PNG.
  Timed on ``--ref-layers`` evenly spaced swept layers per round and extrapolated linearly to every swept
  layer; grad-cam gets the layer's reshape (``channels_last`` permuted, tokens read as their grid), and the
  k-th call of a reused module is addressed by its module (grad-cam records every call; the cost, one
  forward and backward, is the same). Encoding the PNGs into a video is not counted: an underestimate.

The paper's K80 column is its Table 1 (Intel Xeon 2.20 GHz, Tesla K80; HiResCAM): total CAManim time and
average time per layer.

Usage: python benchmarks/bench_table1.py [--repeats 3] [--ref-layers 4] [--models alexnet,...] [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Table 1 of the CAManim paper, side by side"

# (label, torchvision name, input size override or None for the model's own)
MODELS = {
    "alexnet": ("AlexNet", "alexnet", None),
    "convnext_base": ("ConvNeXt", "convnext_base", None),
    "densenet161": ("DenseNet-161", "densenet161", None),
    "efficientnet_b7": ("EfficientNet-b7", "efficientnet_b7", None),
    "efficientnet_b7@224": ("EfficientNet-b7", "efficientnet_b7", 224),
    "maxvit_t": ("MaxViT-t", "maxvit_t", None),
    "squeezenet1_0": ("SqueezeNet", "squeezenet1_0", None),
}
# The paper's Table 1: parameters, CAManim time (s), average parameters per layer, average layer time (s).
PAPER = {
    "AlexNet": (61_100_840, 16.67, 329_292.8, 0.2622),
    "ConvNeXt": (88_591_464, 392.78, 1_140_535.1, 0.2665),
    "DenseNet-161": (28_681_000, 514.99, 180_814.6, 0.0997),
    "EfficientNet-b7": (66_347_960, 972.42, 345_325.1, 0.1375),
    "MaxViT-t": (30_919_624, 596.84, 292_907.1, 0.1080),
    "SqueezeNet": (1_248_424, 52.54, 48_030.8, 0.0144),
}


def camanim_source() -> str:
    """Which camanim ran: a snapshot (a folder with a REVISION file beside ``src/``) or the working tree."""
    import subprocess as sp

    import camanim

    pkg = Path(camanim.__file__).resolve().parent
    rev = pkg.parent.parent / "REVISION"
    if rev.exists():
        return f"camanim {rev.read_text().strip()[:10]} (snapshot in {pkg.parent.parent})"
    try:
        head = sp.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = sp.run(["git", "-C", str(pkg), "diff", "--quiet", "HEAD", "--", "."], capture_output=True)
        return f"camanim working tree at {head.stdout.strip()}" + (
            " with uncommitted changes" if dirty.returncode else ""
        )
    except OSError:
        return f"camanim from {pkg}"


def build(name: str, size: int | None):
    """``(LoadedModel, x)``: random weights (seed 0), the model's own preprocessing or ``size`` x ``size``."""
    from camanim.compute.models import load_model
    from camanim.pipelines.explain import prepare_input

    lm = load_model(f"torchvision:{name}", "none")
    if size:
        lm = dataclasses.replace(lm, preprocessing=dataclasses.replace(lm.preprocessing, size=(size, size)))
    x, _, _ = prepare_input("chelsea", lm)
    return lm, x


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, target: int) -> float:
    t = time.perf_counter()
    inp = x.clone().requires_grad_(True)
    torch.autograd.grad(model(inp)[0, target], inp)
    return time.perf_counter() - t


def ours(lm, method: str, out: Path):
    """End to end: animate every swept layer and write the MP4; returns (animation, animate s, save s)."""
    import camanim

    t0 = time.perf_counter()
    anim = camanim.animate(lm, "chelsea", methods=method, layers="all", layout="side-by-side")
    t1 = time.perf_counter()
    anim.save(out, formats="mp4", extras=False)
    return anim, t1 - t0, time.perf_counter() - t1


def _reshape(layer):
    """grad-cam's ``reshape_transform`` for a camanim layer kind (None for plain ``(B, C, h, w)``)."""
    if layer.kind == "channels_last":
        return lambda t: t.permute(0, 3, 1, 2)
    if layer.kind == "token":
        h, w = layer.map_size
        p = layer.prefix_tokens
        return lambda t: t[:, p:, :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    return None


def paper_loop(lm, anim, picks, method: str, tmp: Path) -> dict[str, list[float]]:
    """The paper's per-layer path on ``anim.layers[picks]``: grad-cam's CAM on one layer + one figure (PNG).

    Each grad-cam call is timed next to a plain forward+backward. Returns per-layer lists: ``cam`` and
    ``figure`` seconds, ``ratio`` (cam call / adjacent forward+backward).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = {"gradcam": GradCAM, "hirescam": HiResCAM}[method]
    ex = anim.explanation
    x = ex.input
    target = [ClassifierOutputTarget(ex.targets[0])]
    image = ex.display[0].astype(np.float32) / 255
    out: dict[str, list[float]] = {"cam": [], "figure": [], "ratio": []}
    for i in picks:
        layer = anim.layers[i]
        module = lm.model.get_submodule(layer.module_name)
        fb = fwd_bwd(lm.model, x, ex.targets[0])
        t = time.perf_counter()
        with cam_class(model=lm.model, target_layers=[module], reshape_transform=_reshape(layer)) as cam:
            grey = cam(input_tensor=x, targets=target)[0]
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
        out["cam"].append(t1 - t)
        out["figure"].append(t2 - t1)
        out["ratio"].append((t1 - t) / fb)
    for p in lm.model.parameters():  # grad-cam calls loss.backward()
        p.grad = None
    return out


def spaced(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k < n else list(range(n))


def run_model(key: str, args, tmp: Path) -> dict:
    label, name, size = MODELS[key]
    load0 = os.getloadavg()[0]
    print(f"\n== {key}", flush=True)
    lm, x = build(name, size)
    params = sum(p.numel() for p in lm.model.parameters())
    # warm-up (allocator growth, kernel choice, the dry run's cache); also gives the swept layers
    anim, _, _ = ours(lm, args.method, tmp / f"{key}_warm")
    shutil.rmtree(tmp / f"{key}_warm", ignore_errors=True)
    target = anim.explanation.targets[0]
    n = len(anim)
    picks = spaced(n, args.ref_layers)
    paper_loop(lm, anim, picks[-1:], args.method, tmp)  # warm-up of grad-cam and matplotlib
    rounds: dict[str, list[float]] = {
        k: [] for k in ("fwdbwd", "animate", "save", "total", "cam", "figure", "ratio")
    }
    for r in range(args.repeats):
        rounds["fwdbwd"].append(statistics.median(fwd_bwd(lm.model, x, target) for _ in range(2)))
        out = tmp / f"{key}_{r}"
        anim, a, s = ours(lm, args.method, out)
        shutil.rmtree(out, ignore_errors=True)
        rounds["animate"].append(a)
        rounds["save"].append(s)
        rounds["total"].append(a + s)
        ref = paper_loop(lm, anim, picks, args.method, tmp)
        for k in ("cam", "figure", "ratio"):
            rounds[k] += ref[k]
        print(
            f"  round {r}: ours {a + s:.1f} s; grad-cam {statistics.median(ref['cam']):.2f} s/layer",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rounds.items()}
    per_layer = med["cam"] + med["figure"]
    row = {
        "key": key,
        "label": label,
        "name": name,
        "size": list(x.shape[-2:]),
        "params": params,
        "layers": len(anim.explanation.layers),
        "swept": n,
        "kinds": dict(_count(la.kind for la in anim.layers)),
        "passed_over": len(anim.explanation.passed_over),
        "picks": [anim.layers[i].name for i in picks],
        "med": med,
        "best_total": min(rounds["total"]),
        "loop_per_layer": per_layer,
        "loop_total": per_layer * n,
        "load": [load0, os.getloadavg()[0]],
    }
    print(
        f"  {n} layers; ours {med['total']:.1f} s (animate {med['animate']:.1f} + save {med['save']:.1f}); "
        f"loop {row['loop_total']:.0f} s extrapolated ({per_layer:.2f} s/layer); x{row['loop_total'] / med['total']:.0f}",
        flush=True,
    )
    return row


def _count(items):
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def section(rows: list[dict], args) -> str:
    loads = [v for r in rows for v in r["load"]]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_table1.py{' ' + ' '.join(args.argv) if args.argv else ''}` "
        f"({datetime.date.today().isoformat()}): torchvision models with random weights (seed 0), `chelsea`, "
        f"{args.method}, {args.source}, CPU: {os.cpu_count()} shared cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; 1-min load average {min(loads):.1f} to {max(loads):.1f}. Medians of {args.repeats} interleaved "
        'rounds. **Ours**: `camanim.animate(lm, "chelsea", methods=..., layers="all")` + '
        '`save(formats="mp4", extras=False)`: one capture, ranges, every frame rendered (local | global) and '
        "encoded. **Loop**: the paper's code path, per layer one grad-cam CAM call (forward + backward) and one "
        f"matplotlib figure saved as PNG, timed on {args.ref_layers} evenly spaced swept layers per round and "
        "extrapolated to all (video encoding of the PNGs not counted). **Paper (K80)**: its Table 1 (Xeon "
        "2.20 GHz + Tesla K80, HiResCAM, 224x224 inputs).",
        "",
        "| model | input | params (ours) | params (paper) | swept layers | fwd+bwd [s] | ours end to end [s] "
        "| ours per layer [ms] | loop per layer [s] | loop, all layers [s] | loop / ours "
        "| paper K80 total [s] | paper K80 per layer [s] | paper total / ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p_params, p_time, _, p_layer = PAPER[r["label"]]
        m = r["med"]
        lines.append(
            f"| {r['label']} (`{r['name']}`) | {r['size'][0]}x{r['size'][1]} | {r['params']:,} | {p_params:,} "
            f"| {r['swept']} | {m['fwdbwd']:.2f} | {m['total']:.1f} (best {r['best_total']:.1f}) "
            f"| {m['total'] / r['swept'] * 1000:.1f} | {r['loop_per_layer']:.2f} | {r['loop_total']:.0f}* "
            f"| {r['loop_total'] / m['total']:.0f}* | {p_time:.2f} | {p_layer:.4f} | {p_time / m['total']:.1f} |"
        )
    lines += ["", "\\* extrapolated from the timed layers:", ""]
    for r in rows:
        m = r["med"]
        lines.append(
            f"- {r['label']} {r['size'][0]}x{r['size'][1]}: kinds swept {r['kinds']}, {r['passed_over']} trailing "
            f"layers passed over (gradient zero everywhere); ours = animate {m['animate']:.1f} s + save "
            f"{m['save']:.1f} s; loop per layer = grad-cam {m['cam']:.2f} s ({m['ratio']:.2f}x an adjacent "
            f"fwd+bwd) + figure {m['figure']:.2f} s, timed on {', '.join(f'`{n}`' for n in r['picks'])}; load "
            f"{r['load'][0]:.1f} -> {r['load'][1]:.1f}."
        )
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this section of RESULTS.md, re-read right before writing; ``###`` notes kept."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    if found:
        notes = re.search(r"^### .*", found.group(0), re.S | re.M)
        body = text.rstrip("\n") + ("\n\n" + notes.group(0).rstrip("\n") if notes else "") + "\n\n"
        new = old[: found.start()] + body + old[found.end() :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    p.add_argument("--method", default="hirescam", choices=("hirescam", "gradcam"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-layers", type=int, default=4, help="layers timed for the per-layer loop, per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS}")
    p.add_argument("--from-json", type=Path, default=None, help="report a saved run (bench_table1.json)")
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a != "--write"]
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, args.argv, args.source = saved["rows"], saved["argv"], saved["camanim"]
        args.method, args.repeats, args.ref_layers = saved["method"], saved["repeats"], saved["ref_layers"]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_table1_"))
        try:
            rows = [run_model(k, args, tmp) for k in keys]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        args.source = camanim_source()
        saved = {"rows": rows, "argv": args.argv, "camanim": args.source, "method": args.method}
        saved |= {"repeats": args.repeats, "ref_layers": args.ref_layers}
        out = Path(tempfile.gettempdir()) / "bench_table1.json"
        out.write_text(json.dumps(saved, indent=1))
        print(f"saved {out}")
    text = section(rows, args)
    print("\n" + text)
    if args.write:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
