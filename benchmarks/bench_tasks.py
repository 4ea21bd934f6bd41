"""Tasks: one capture per target. Passes counted on the model and timed for targets beyond one class.

Workloads (random seeded torchvision weights, nothing downloads; CPU):

* ``segmentation``: LR-ASPP MobileNetV3-Large (21 classes) at 224x224, :class:`SegmentationTarget` of
  class 1 over a box; K = 3: ``SegmentationTarget([1, 2, 3], box, each=True)``; grad-cam's
  ``SemanticSegmentationTarget``.
* ``detection``: Faster R-CNN MobileNetV3-Large 320 FPN (``box_score_thresh=0``, so random weights detect),
  :class:`BoxScoreTarget` of an explicit box (the first forward's most confident detection, given back as a
  box and label); K = 3: the three most confident boxes, ``BoxScoreTarget(boxes, labels, each=True)``;
  grad-cam's ``FasterRCNNBoxScoreTarget``.
* ``similarity``: ResNet-18 without its classifier (512-d embedding) at 224x224, :class:`SimilarityTarget`
  to another image's embedding; K = 3: a list of three ``SimilarityTarget`` (three references); grad-cam's
  tutorial ``SimilarityToConceptTarget``.
* ``multilabel``: ResNet-18 with 14 sigmoid outputs at 224x224, :class:`MultiLabelTarget` of label 2;
  K = 3: ``MultiLabelTarget([0, 1, 2], each=True)``; grad-cam with the sigmoid of the label as its target.

Measured per workload, in interleaved rounds (medians):

* (a) the floor: one forward and one ``torch.autograd.grad`` of the target's score w.r.t. the input;
* (b) ``camanim.explain(lm, x, methods="gradcam", layers="all", target=T)``: every spatial layer, one capture;
* (b, K=3) ``camanim.explain(lm, x, methods="gradcam", layers="all", target=T3)`` with three targets of the
  one image (``each=True`` targets giving 3 scores per sample ``(B, 3)``, or a list of three similarity
  targets): one shared forward, one backward per target, every spatial layer's Grad-CAM of each target;
* (c) grad-cam 1.5.7's ``GradCAM(model, [layer])`` once per layer with its matching target, timed on a few
  evenly spaced layers and extrapolated to every layer (b) explains (marked as such).

Passes are counted, not assumed: a forward hook on the network counts forwards; a forward hook on its first
convolution registers a tensor hook on that output, which fires once per backward pass that reaches it.

Usage:
    python benchmarks/bench_tasks.py                 # 4 workloads, 2 rounds (about 10 min on 2 loaded cores)
    python benchmarks/bench_tasks.py --rounds 2 --gradcam-layers 2 --tasks segmentation,multilabel
    python benchmarks/bench_tasks.py --write         # also replace "## Tasks: one capture per target" in RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import camanim
from camanim.compute.capture import frozen_eval
from camanim.compute.models import LoadedModel, Preprocessing, wrap_model
from camanim.compute.tasks import (
    BoxScoreTarget,
    MultiLabelTarget,
    SegmentationTarget,
    SimilarityTarget,
)

log = logging.getLogger("bench_tasks")

SECTION = "## Tasks: one capture per target"
RESULTS = Path(__file__).with_name("RESULTS.md")
TASKS = ("segmentation", "detection", "similarity", "multilabel")


class Counter:
    """Forwards of ``model`` and backward passes through its first convolution, counted by hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.forwards = self.backwards = 0
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.handles = [
            model.register_forward_hook(self._forward),
            first.register_forward_hook(self._first_conv),
        ]

    def _forward(self, *_: Any) -> None:
        self.forwards += 1

    def _first_conv(self, _m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, _g: torch.Tensor) -> None:
        self.backwards += 1

    def reset(self) -> tuple[int, int]:
        counts = (self.forwards, self.backwards)
        self.forwards = self.backwards = 0
        return counts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class OutOnly(nn.Module):
    """A torchvision segmentation model's ``out`` tensor (as grad-cam's tutorial wraps it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@dataclass
class Workload:
    """One task: the network, its input, our target, our K = 3 targets of the image, and grad-cam's model and
    target."""

    name: str
    label: str
    net: nn.Module
    lm: LoadedModel
    x: torch.Tensor
    target: Any
    targets: Any
    gc_model: nn.Module
    gc_target: Callable[[Any], torch.Tensor]
    gc_prefix: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)
    passes: dict[str, tuple[int, int]] = field(default_factory=dict)
    layers: int = 0
    gc_layers: list[str] = field(default_factory=list)


def _plain(size: int) -> Preprocessing:
    return Preprocessing(size=(size, size), mean=(0.0,) * 3, std=(1.0,) * 3)


def build(name: str) -> Workload:
    """The workload ``name`` (random seeded weights)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "segmentation":
        net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=21
        ).eval()
        x = torch.randn(1, 3, 224, 224, generator=gen)
        mask = np.zeros((224, 224), bool)
        mask[40:160, 60:180] = True
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

        return Workload(
            name, "LR-ASPP MobileNetV3-L, 224x224, class 1 over a box", net, wrap_model(net, preprocessing=_plain(224)),
            x, SegmentationTarget(1, mask), SegmentationTarget([1, 2, 3], mask, each=True), OutOnly(net),
            SemanticSegmentationTarget(1, mask.astype(np.float32)), "model.",
        )  # fmt: skip
    if name == "detection":
        net = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.0
        ).eval()
        x = torch.rand(1, 3, 320, 320, generator=gen)
        with torch.no_grad():
            first = net(x)[0]
        boxes = [first["boxes"][i].tolist() for i in range(3)]
        labels = [int(first["labels"][i]) for i in range(3)]
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

        return Workload(
            name, "Faster R-CNN MobileNetV3-L 320 FPN, 320x320, one explicit box", net,
            wrap_model(net, preprocessing=_plain(320)), x, BoxScoreTarget(boxes[:1], labels[:1]),
            BoxScoreTarget(boxes, labels, each=True), net,
            FasterRCNNBoxScoreTarget(labels[:1], [np.array(boxes[0])]),
        )  # fmt: skip
    if name == "similarity":
        net = torchvision.models.resnet18(weights=None).eval()
        net.fc = nn.Identity()
        x = torch.randn(1, 3, 224, 224, generator=gen)
        with torch.no_grad():
            refs = [net(torch.randn(1, 3, 224, 224, generator=gen))[0] for _ in range(3)]

        def concept(out: torch.Tensor, ref: torch.Tensor = refs[0]) -> torch.Tensor:
            return nn.functional.cosine_similarity(out, ref, dim=0)

        return Workload(
            name, "ResNet-18 embedding (512-d), 224x224, cosine to a reference", net,
            wrap_model(net, preprocessing=_plain(224)), x, SimilarityTarget(refs[0]),
            [SimilarityTarget(r) for r in refs], net, concept,
        )  # fmt: skip
    net = torchvision.models.resnet18(weights=None, num_classes=14).eval()
    x = torch.randn(1, 3, 224, 224, generator=gen)
    return Workload(
        name, "ResNet-18, 14 sigmoid labels, 224x224, label 2", net, wrap_model(net, preprocessing=_plain(224)),
        x, MultiLabelTarget([2]), MultiLabelTarget([0, 1, 2], each=True), net, lambda out: out[2].sigmoid(),
    )  # fmt: skip


def adapter(w: Workload, target: Any) -> nn.Module:
    """The network behind the output selector the target asks for (what explain differentiates)."""
    return w.lm.with_output(getattr(target, "output", None), target.expect).model


def floor(w: Workload) -> None:
    """(a): one forward and one autograd.grad of the target's score w.r.t. the input."""
    model = adapter(w, w.target)
    with frozen_eval(model):
        inp = w.x.clone().requires_grad_(True)
        torch.autograd.grad(w.target(model(inp)).sum(), inp)


def ours(w: Workload) -> None:
    """(b): every spatial layer's Grad-CAM from one capture."""
    camanim.explain(w.lm, w.x, methods="gradcam", layers="all", target=w.target)


def ours_k(w: Workload) -> None:
    """(b, K=3): every spatial layer's Grad-CAM of 3 targets of the image: one forward, one backward each."""
    ex = camanim.explain(w.lm, w.x, methods="gradcam", layers="all", target=w.targets)
    assert ex.input.shape[0] == 3, ex.target_names


def gradcam_layer(w: Workload, name: str) -> None:
    """(c): grad-cam's GradCAM on one layer."""
    import pytorch_grad_cam as gc

    cam = gc.GradCAM(w.gc_model, [w.gc_model.get_submodule(w.gc_prefix + name)])
    try:
        cam(w.x, targets=[w.gc_target])
    finally:
        cam.activations_and_grads.release()


def timed(fn: Callable[[], None], counter: Counter) -> tuple[float, tuple[int, int]]:
    counter.reset()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, counter.reset()


def run(w: Workload, rounds: int, gc_layers: int) -> None:
    """Warm up, then ``rounds`` interleaved rounds of (a) x3, (b), (b, K=3) and (c) on a few layers."""
    ex = camanim.explain(w.lm, w.x, methods="gradcam", layers="all", target=w.target)  # warm-up and layers
    w.layers = len(ex.chosen)
    names = [layer.name for layer in ex.chosen if "#" not in layer.name]  # grad-cam addresses modules
    idx = np.unique(np.linspace(0, len(names) - 1, gc_layers).round().astype(int))
    w.gc_layers = [names[i] for i in idx]
    ours_k(w)
    floor(w)
    counter = Counter(w.net)
    try:
        for _ in range(rounds):
            for _ in range(3):
                s, p = timed(lambda: floor(w), counter)
                w.runs.setdefault("a", []).append(s)
                w.passes["a"] = p
            s, p = timed(lambda: ours(w), counter)
            w.runs.setdefault("b", []).append(s)
            w.passes["b"] = p
            s, p = timed(lambda: ours_k(w), counter)
            w.runs.setdefault("bk", []).append(s)
            w.passes["bk"] = p
            per = []
            for name in w.gc_layers:
                s, p = timed(lambda name=name: gradcam_layer(w, name), counter)
                per.append(s)
                w.passes["c"] = p
            w.runs.setdefault("c", []).append(statistics.mean(per) * w.layers)
            log.info("%s: round done, load %.1f", w.name, os.getloadavg()[0])
    finally:
        counter.remove()


def section(ws: list[Workload], args: argparse.Namespace, loads: list[float]) -> str:
    med = {w.name: {k: statistics.median(v) for k, v in w.runs.items()} for w in ws}
    lines = [
        SECTION,
        "",
        f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"grad-cam {_gc_version()}, device `cpu`; {datetime.date.today().isoformat()}. Command: `python "
        f"benchmarks/bench_tasks.py --rounds {args.rounds} --gradcam-layers {args.gradcam_layers} --write`. "
        f"The machine is shared with other jobs: 1-min load average {min(loads):.1f} to {max(loads):.1f} "
        f"(sampled before and after each workload, on {os.cpu_count()} cores), so times are noisy; medians "
        f"of {args.rounds} interleaved rounds after a warm-up ((a): of {3 * args.rounds} runs).",
        "",
        "(a) one forward + `torch.autograd.grad` of the target's score w.r.t. the input (the floor); (b) "
        '`camanim.explain(lm, x, methods="gradcam", layers="all", target=T)`: every spatial layer from one '
        "capture; (b, K=3) the same call with three targets of the image (`each=True`, or a list of three "
        "similarity targets): one shared forward, one backward per target, maps `(3, h, w)`; (c) grad-cam 1.5.7's "
        "`GradCAM(model, [layer])` once per layer with its matching target, timed on "
        f"{args.gradcam_layers} evenly spaced layers and extrapolated to every layer of (b) (*). Passes are "
        "counted by hooks on the network (forwards of the network; backward passes through its first "
        "convolution's output), in the last timed round.",
        "",
        "| task | model, input, target | layers | (a) [s] | (b) [s] | (b)/(a) | passes (b) fwd/bwd | "
        "(b, K=3) [s] | (b,K=3)/(b) | passes (b, K=3) | (c)* [s] | (c)/(b) | passes (c) per layer |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for w in ws:
        m = med[w.name]
        pb, pk, pc = w.passes["b"], w.passes["bk"], w.passes["c"]
        lines.append(
            f"| {w.name} | {w.label} | {w.layers} | {m['a']:.3f} | {m['b']:.3f} | {m['b'] / m['a']:.1f} | "
            f"{pb[0]}/{pb[1]} | {m['bk']:.3f} | {m['bk'] / m['b']:.2f} | {pk[0]}/{pk[1]} | {m['c']:.1f} | "
            f"{m['c'] / m['b']:.0f} | {pc[0]}/{pc[1]} |"
        )
    if max(loads) > 2 * (os.cpu_count() or 1):
        lines += [
            "",
            f"At a load average above {2 * (os.cpu_count() or 1)} the times of one workload vary up to 2x "
            "between rounds, so the timed ratios are rough; the pass counts do not depend on the load.",
        ]
    lines += [
        "",
        "\\* extrapolated: the mean of grad-cam's per-layer time on the layers timed, times the number of layers "
        "(b) explains. Layers timed: " + "; ".join(f"{w.name}: {', '.join(w.gc_layers)}" for w in ws) + ".",
        "",
        "Passes: (a) is one forward and one backward by construction; (b) and (b, K=3) are read off the hooks. "
        "(b) makes one forward and one backward for a task target as for a class; with K = 3 targets "
        "`camanim.explain` shares the forward and makes one backward per target, as for `top_k` classes.",
        "",
    ]
    return "\n".join(lines)


def _gc_version() -> str:
    from importlib.metadata import version

    return version("grad-cam")


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are: the file
    is read again just before writing, since other benchmarks write their sections too."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if end < 0 else "\n" + old[end + 1 :])
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gradcam-layers", type=int, default=3, help="grad-cam layers timed per workload")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--write", action="store_true", help=f"replace {SECTION!r} in RESULTS.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("camanim").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    ws = []
    for name in args.tasks.split(","):
        w = build(name.strip())
        run(w, args.rounds, args.gradcam_layers)
        loads.append(os.getloadavg()[0])
        ws.append(w)
    text = section(ws, args, loads)
    print(text)
    if args.write:
        write_results(text)
        print(f"wrote {SECTION!r} into {RESULTS}")


if __name__ == "__main__":
    main()
