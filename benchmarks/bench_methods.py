"""Every registered method at every layer of the default model, against the reference's per-layer loop.

EfficientNet-Lite0 (``load_model()``, offline), ``chelsea`` at 1x3x224x224, its top-1 class. Per method:

* ours: ``camanim.explain(lm, x, methods=M, layers=...)`` over every swept layer (one call);
* the reference the parity tests use for M, once per layer as the CAManim reference code loops: grad-cam
  1.5.7's ``pytorch_grad_cam.<Method>(model, target_layers=[module])`` or torchcam 0.5's extractor;
* the floor: one forward + ``torch.autograd.grad`` of the top-1 logit (``bench_engine.floor``), measured
  three times before each method's pair, so that every ratio is taken under the load of its own block.

The two sides of a method run back to back (ours, reference), one method after another. Cheap methods run
ours over all layers and the reference over ``--ref-layers`` evenly spaced layers, extrapolated linearly
(each reference call is one forward and backward plus the method's own work at that layer). Expensive
methods (per-channel scoring, second order, scale ensembles, kernel PCA) time the same subset of layers on
both sides and extrapolate to all layers by the method's work per layer (channels, positions squared, or
layers); SS-CAM and IS-CAM also run 2 samples on both sides and scale to their default sample counts,
SESS 4 of its 12 scales (13 of its 122 patches at 224x224), scaled by the patch count.
Every extrapolated figure is starred and the table says how. The pass counts are each method's
``plan()`` for all N layers (its metadata).

Usage:
    python benchmarks/bench_methods.py                          # ~20 min on 2 shared cores
    python benchmarks/bench_methods.py --methods gradcam,sess   # a few methods
    python benchmarks/bench_methods.py --write                  # replace the section of RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_engine import build, floor, machine, subset, timed

import camanim
from camanim.compute.layers import default_layers, list_layers
from camanim.compute.methods import list_methods, method_class
from camanim.compute.methods.base import pass_summary
from camanim.compute.methods.scale import window_starts

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Methods: every layer, each method"
SAMPLES = 2  # SS-CAM and IS-CAM: samples timed on both sides (scaled to the default counts)
SCALES = 4  # SESS: scales timed on both sides (scaled by the patch count to the default 12)


@dataclass(frozen=True)
class Spec:
    """How one method is timed: its reference, the layers both sides share, the extrapolation weight."""

    ref: str  # "gradcam:<Class>", "torchcam:<Class>", or a special key (fullgrad, guided, cam, refine, none)
    layers: str = "ref"  # "all": ours over all layers, reference on --ref-layers; "small:K"/"even:K": both
    weight: str = "layers"  # extrapolation: layers, channels, positions2 (h*w squared), size (C*h*w)
    options: tuple = ()
    ours_all: bool = False  # ours over all layers even for a subset spec (passes shared by all layers)


SPECS: dict[str, Spec] = {
    "gradcam": Spec("gradcam:GradCAM", "all"),
    "hirescam": Spec("gradcam:HiResCAM", "all"),
    "gradcamelementwise": Spec("gradcam:GradCAMElementWise", "all"),
    "gradcam++": Spec("gradcam:GradCAMPlusPlus", "all"),
    "xgradcam": Spec("gradcam:XGradCAM", "all"),
    "layercam": Spec("gradcam:LayerCAM", "all"),
    "randomcam": Spec("gradcam:RandomCAM", "all"),
    "eigencam": Spec("gradcam:EigenCAM", "all"),
    "eigengradcam": Spec("gradcam:EigenGradCAM", "all"),
    "fem": Spec("gradcam:FEM", "all"),
    "segeigencam": Spec("gradcam:SegEigenCAM", "all"),
    "finercam": Spec("gradcam:FinerCAM", "all"),
    "guidedbackprop": Spec("guided", "all"),
    "guidedgradcam": Spec("guided", "all"),
    "cam": Spec("cam", "all"),
    "fullgrad": Spec("fullgrad", "all"),
    "refinecam": Spec("refine", "all", options=(("base", "gradcam"),)),
    "smoothgradcam++": Spec("torchcam:SmoothGradCAMpp", "all"),
    "dff": Spec("gradcam:DeepFeatureFactorization", "even:3", "size"),
    "shapleycam": Spec("gradcam:ShapleyCAM", "even:3"),
    "sess": Spec("gradcam:SESS", "small:1", options=(("num_scales", SCALES),), ours_all=True),
    "kpcacam": Spec("gradcam:KPCA_CAM", "small:2", "positions2"),
    "scorecam": Spec("gradcam:ScoreCAM", "small:1", "channels"),
    "ablationcam": Spec("gradcam:AblationCAM", "small:1", "channels"),
    "sscam": Spec("torchcam:SSCAM", "small:1", "channels", (("samples", SAMPLES),)),
    "iscam": Spec("torchcam:ISCAM", "small:1", "channels", (("samples", SAMPLES),)),
    "legrad": Spec("none"),
}


def sess_patches(num_scales: int, size: int = 224) -> int:
    """SESS's patch count at ``size`` (square input; grad-cam's default window = step = ``size``)."""
    scales = [size + int(round(size * 2 / 7)) * i for i in range(num_scales)]
    return sum(len(window_starts(s, size, size)) ** 2 for s in scales)


def _weight(layer, kind: str) -> float:
    c, h, w = layer.shape[1], layer.shape[-2], layer.shape[-1]
    return {"layers": 1.0, "channels": c, "positions2": float(h * w) ** 2, "size": c * h * w}[kind]


def pick(sweep: list, spec: Spec, ref_layers: int) -> tuple[list, bool]:
    """The layers both sides time for a subset spec (``small:K``: K spread over the cheapest half by the
    spec's weight; ``even:K``: K evenly spaced), and whether ours runs over all layers instead."""
    if spec.layers == "all":
        return [sweep[i] for i in subset(len(sweep), ref_layers)], True
    kind, k = spec.layers.split(":")
    if kind == "even":
        return [sweep[i] for i in subset(len(sweep), int(k))], False
    cheap = sorted(sweep, key=lambda la: _weight(la, spec.weight if spec.weight != "layers" else "size"))
    cheap = [la for la in sweep if la in cheap[: max(int(k), len(sweep) // 4)]]
    return [cheap[i] for i in subset(len(cheap), int(k))], False


def reference(name: str, spec: Spec, net: torch.nn.Module, x: torch.Tensor, target: int, layers: list):
    """A callable that runs the reference once per layer of ``layers`` (or once, where it is layer-free)."""
    import pytorch_grad_cam as gc
    import torchcam.methods as tcm
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(net.named_modules())
    targets = [ClassifierOutputTarget(target)]

    def gradcam_loop(cls, batch_size: int | None = None, **kw) -> None:
        for la in layers:
            if cls is gc.DeepFeatureFactorization:
                cls(model=net, target_layer=modules[la.module_name])(x, n_components=5)
                continue
            with cls(model=net, target_layers=[modules[la.module_name]], **kw) as cam:
                if batch_size is not None:
                    cam.batch_size = batch_size
                cam(input_tensor=x, targets=targets)

    def guided() -> None:
        gb = GuidedBackpropReLUModel(net, device="cpu")  # swaps ReLUs in place and restores them
        gb(x, target_category=target)
        if name == "guidedgradcam":
            gradcam_loop(gc.GradCAM)

    def torchcam_loop(cls, **kw) -> None:
        for la in layers:
            with cls(net, target_layer=la.module_name, **kw) as extractor:
                with torch.set_grad_enabled(cls is tcm.SmoothGradCAMpp):
                    net(x)
                extractor(class_idx=target)

    def refine() -> None:
        last = layers[-1].module_name
        for la in layers:
            with tcm.RefineCAM(net, [la.module_name, last], base_method=tcm.GradCAM) as extractor:
                extractor(class_idx=target, scores=net(x))

    def cam() -> None:
        head = "classifier"
        with tcm.CAM(net, last_spatial, head) as extractor:
            with torch.no_grad():
                net(x)
            extractor(class_idx=target)

    last_spatial = layers[-1].module_name
    kind, _, cls_name = spec.ref.partition(":")
    if kind == "gradcam":
        kw = {"batch_size": 32} if cls_name in ("ScoreCAM", "AblationCAM") else {}
        kw |= {"num_scales": SCALES} if cls_name == "SESS" else {}
        return lambda: gradcam_loop(getattr(gc, cls_name), **kw)
    if kind == "torchcam":
        kw = {"num_samples": SAMPLES, "batch_size": 32} if cls_name in ("SSCAM", "ISCAM") else {}
        return lambda: torchcam_loop(getattr(tcm, cls_name), **kw)
    if kind == "fullgrad":
        return lambda: gc.FullGrad(net, [])(x, targets)
    return {"guided": guided, "refine": refine, "cam": cam}[kind]


@dataclass
class Row:
    method: str
    cost: str
    passes: str
    floor: float
    ours: float  # seconds, all layers (extrapolated when ours_star)
    ours_star: bool
    ref: float | None
    ref_star: bool
    ref_name: str
    timed_layers: int
    note: str = ""


def run_method(name: str, lm, net, x, sweep, target: int, args) -> Row:
    cls = method_class(name)
    spec = SPECS.get(name, Spec("none"))
    opts = dict(spec.options)
    n = len(sweep)
    samples_scale = cls.default_samples / SAMPLES if "samples" in opts else 1.0
    if "num_scales" in opts:
        samples_scale = sess_patches(cls.default_num_scales) / sess_patches(SCALES)
    try:
        method = cls()
        fwd, bwd = method.plan(n, 1, {}) if hasattr(method, "plan") else (None, None)
    except Exception:  # noqa: BLE001  (a plan that needs the model: fall back to words)
        fwd = bwd = None
    if fwd is None and cls.cost == "per_channel":
        fwd, bwd = 1 + sum(la.shape[1] for la in sweep), 1
    elif fwd is None:
        fwd, bwd = 1, 1
    if name in ("sscam", "iscam"):  # plan() counts the channels it is given: here every layer's
        fwd, bwd = cls.default_samples * sum(la.shape[1] for la in sweep), 0
    elif name == "sess":  # plan() leaves the patch count to the input size: 224x224 here
        fwd, bwd = 2 * sess_patches(cls.default_num_scales), sess_patches(cls.default_num_scales)
    passes = f"{fwd} / {bwd}"
    floors = [timed(lambda: floor(net, x), "cpu") for _ in range(3)]
    if spec.ref == "none":  # before picking layers: nothing runs
        return Row(name, cls.cost, passes, statistics.median(floors), float("nan"), False, None, False, "-", 0,
                   "needs self-attention blocks (ViTs): not applicable to a CNN")  # fmt: skip
    layers, ours_all = pick(sweep, spec, args.ref_layers)
    scale = sum(_weight(la, spec.weight) for la in sweep) / sum(_weight(la, spec.weight) for la in layers)
    ours_all = ours_all or spec.ours_all
    ours_layers = "all" if ours_all else [la.name for la in layers]
    kwargs = {"options": opts, "batch_size": 32}
    ours = timed(lambda: camanim.explain(lm, x, methods=name, layers=ours_layers, **kwargs), "cpu")
    ours_total = (ours if ours_all else ours * scale) * samples_scale
    run_ref = reference(name, spec, net, x, target, layers)
    try:
        ref = timed(run_ref, "cpu")
    except Exception as exc:  # noqa: BLE001  (report, go on with the others)
        print(f"  reference failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        ref = float("nan")
    for p in net.parameters():  # grad-cam calls loss.backward()
        p.grad = None
    layer_free = spec.ref in ("fullgrad", "cam") or name == "guidedbackprop"
    ref_total = ref if layer_free else ref * scale * samples_scale
    if name == "guidedgradcam":  # the guided gradient once, Grad-CAM per layer: only the loop scales
        ref_total = ref * scale  # (an upper bound: the single guided pass is scaled too)
    floors += [timed(lambda: floor(net, x), "cpu") for _ in range(2)]
    notes = {
        "fullgrad": "grad-cam: one call for its single map (all bias terms at once)",
        "cam": "torchcam: the one layer feeding the head (elsewhere the map is zero)",
        "guidedbackprop": "grad-cam: one guided backward (no layer)",
        "guidedgradcam": "grad-cam: one guided backward + GradCAM per layer",
        "refinecam": "base Grad-CAM on both sides; torchcam refines [layer, last] per layer",
    }
    note = notes.get(name, "")
    if "samples" in opts:
        note = f"{SAMPLES} samples timed, scaled to {cls.default_samples}"
    elif "num_scales" in opts:
        note = (
            f"{SCALES} scales ({sess_patches(SCALES)} patches) timed, scaled to {cls.default_num_scales} "
            f"({sess_patches(cls.default_num_scales)} patches)"
        )
    return Row(
        name, cls.cost, passes, statistics.median(floors), ours_total, not ours_all, ref_total,
        not layer_free or name == "guidedgradcam", spec.ref.split(":")[-1], 0 if layer_free else len(layers),
        note,
    )  # fmt: skip


def _f(v: float | None, star: bool = False) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.1f}{'*' if star else ''}" if v >= 1 else f"{v:.2f}{'*' if star else ''}"


def table(rows: list[Row], n: int) -> str:
    out = [
        f"| method | cost class | passes fwd / bwd (N = {n}) | ours, all layers [s] | x floor | reference "
        "| layers timed | reference, all layers [s] | x floor | reference / ours | notes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = r.ref / r.ours if r.ref and r.ours == r.ours and r.ours > 0 else None
        out.append(
            f"| {r.method} | {r.cost} | {r.passes} | {_f(r.ours, r.ours_star)} | {_f(r.ours / r.floor, r.ours_star)} "
            f"| {r.ref_name} | {r.timed_layers or '-'} | {_f(r.ref, r.ref_star)} "
            f"| {_f(r.ref / r.floor if r.ref else None, r.ref_star)} | {_f(speed)} | {r.note} |"
        )
    return "\n".join(out)


def section(rows: list[Row], n: int, args, loads: list[tuple[float, ...]], minutes: float) -> str:
    cmd = "python benchmarks/bench_methods.py " + " ".join(args.argv)
    load = ", ".join(f"{a:.1f}" for a, *_ in loads)
    floor_all = statistics.median(r.floor for r in rows)
    return "\n".join(
        [
            SECTION,
            "",
            f"_{datetime.date.today().isoformat()}; {machine('cpu')}; torchcam 0.5; `{cmd.strip()}`; "
            f"{minutes:.0f} min. 1-min load average sampled per method: {load} (a shared machine: compare "
            "the ratios, each taken under the load of its own block)._",
            "",
            f"EfficientNet-Lite0 (the default model), `chelsea` at 224x224, its top-1 class; N = {n} swept "
            f"layers. Floor: one forward + `torch.autograd.grad` (median {floor_all:.2f} s over the run; each "
            "row divides by the median of the 5 floors around its own pair). Ours: `camanim.explain(methods=M, "
            "layers=...)` in one call; reference: the implementation the parity tests compare with, once per "
            "layer (grad-cam 1.5.7 `<Method>(model, target_layers=[m])`, torchcam 0.5's extractor). "
            f"Cheap methods: ours over all N layers, the reference over {args.ref_layers} evenly spaced layers, "
            "extrapolated linearly (*). Expensive methods: the same layers on both sides (among the cheapest "
            "quarter for the per-channel and kernel ones, evenly spaced for DFF and ShapleyCAM), extrapolated "
            "to all layers by channels (Score-CAM family, Ablation), positions squared (KPCA), C x h x w (DFF) "
            "or layer count, and both sides starred. Extrapolating ours linearly overstates methods whose "
            "passes are shared by all layers (SESS, ShapleyCAM's first-order pass). Passes: each method's "
            "`plan()` for all N layers of one image (forwards / backwards; per-channel: one forward per "
            "channel).",
            "",
            table(rows, n),
            "",
        ]
    )


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, re-read just before writing."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    if found:
        new = old[: found.start()] + text.rstrip("\n") + "\n\n" + old[found.end() :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="comma-separated registry names (default: every method)")
    p.add_argument("--ref-layers", type=int, default=10, help="cheap methods: reference layers timed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--write", action="store_true", help=f"replace the section in {RESULTS}")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("camanim").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    names = (
        list_methods() if args.methods == "all" else [method_class(m).name for m in args.methods.split(",")]
    )
    lm, x = build("efficientnet_lite0", "cpu")
    net = getattr(lm.model, "_camanim_module", lm.model)
    sweep = default_layers(list_layers(lm.model, x))
    with torch.no_grad():
        target = int(net(x).argmax())
    camanim.explain(lm, x, methods="gradcam", layers="all")  # warm-up
    floor(net, x)
    rows, loads = [], []
    for name in names:
        loads.append(os.getloadavg())
        row = run_method(name, lm, net, x, sweep, target, args)
        rows.append(row)
        print(f"{name}: ours {_f(row.ours, row.ours_star)} s, reference {_f(row.ref, row.ref_star)} s, "
              f"floor {row.floor:.3f} s, load {loads[-1][0]:.1f}  {pass_summary(method_class(name))}",
              flush=True)  # fmt: skip
    text = section(rows, len(sweep), args, loads, (time.perf_counter() - t0) / 60)
    print(text)
    if args.write:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
