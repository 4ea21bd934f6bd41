"""Volumes: every layer of MONAI's 3-D DenseNet121 at 96^3 from one capture, against its floor and grad-cam.

    python benchmarks/bench_volume.py [--size 96] [--rounds 1] [--gradcam-layers 2] [--ops ...] [--threads N] [--write]

Random weights, one channel, two classes, one volume ``(1, 1, 96, 96, 96)``. Each measurement runs in a fresh
subprocess that builds the model and input, resets the peak RSS (``/proc/self/clear_refs``) and reports its
seconds and its peak RSS above what it held before:

* (a) ``floor``: one forward and ``torch.autograd.grad`` of the top logit with respect to the input;
* (b) ``gradcam``: ``camanim.explain(..., methods="gradcam", layers="all")`` (its dry run, cached per model,
  is run once before the clock starts: it is paid once per model and input shape);
* (b, all) ``all``: the same with every one-pass method defined for volumes;
* (c) ``gradcam_pkg``: grad-cam's ``GradCAM`` with one target layer, run for ``--gradcam-layers`` layers spread
  over the sweep; the time per layer times the number of layers of (b) extrapolates a per-layer loop.

Rounds are interleaved (a, b, b-all, c per round); medians are reported with (b)/(a), (b, all)/(a),
(c)/(b) and the peak-memory ratio (b)/(a). The load average is recorded: the machine has 2 cores shared with
other jobs. ``--write`` replaces the "Volumes: MONAI DenseNet121 at 96³" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTION = "## Volumes: MONAI DenseNet121 at 96³"
OPS = ("floor", "gradcam", "all", "gradcam_pkg")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(op: str, size: int, gradcam_layers: int) -> dict:
    """One measurement in this (fresh) process."""
    import gc

    import monai.networks.nets as nets
    import torch

    import camanim
    from camanim.compute.layers import default_layers, list_layers
    from camanim.compute.methods import list_methods

    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    layers = default_layers(list_layers(model, x))  # the dry run, once per model and shape (cached)
    info: dict = {"layers": len(layers)}
    methods = [m for m in list_methods(volumes=True) if m != "kpcacam"]  # kpcacam: quadratic, not in "all"
    gc.collect()
    before = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if op == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        torch.autograd.grad(out[0, out[0].argmax()], inp)
    elif op == "gradcam":
        camanim.explain(model, x, methods="gradcam", layers="all")
    elif op == "all":
        camanim.explain(model, x, methods=methods, layers="all")
        info["methods"] = methods
    elif op == "gradcam_pkg":
        import pytorch_grad_cam as pg

        modules = dict(model.named_modules())
        picks = [
            layers[round(i * (len(layers) - 1) / max(1, gradcam_layers - 1))] for i in range(gradcam_layers)
        ]
        per = []
        for layer in picks:
            t = time.perf_counter()
            with pg.GradCAM(model=model, target_layers=[modules[layer.module_name]]) as cam:
                cam(input_tensor=x, targets=None)
            per.append(time.perf_counter() - t)
        info["timed_layers"] = [la.name for la in picks]
        info["per_layer_s"] = per
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"op": op, "seconds": seconds, "peak_extra_mib": (peak - before) / 1024, "reset": reset, **info}


def run_child(op: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        op,
        "--size",
        str(args.size),
        "--gradcam-layers",
        str(args.gradcam_layers),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def versions() -> dict:
    import importlib.metadata

    import monai
    import torch

    import camanim

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "grad-cam": importlib.metadata.version("grad-cam"),
        "camanim": camanim.__version__,
    }


def summarise(runs: list[dict], args: argparse.Namespace, load: list[float]) -> tuple[dict, str]:
    by = {op: [r for r in runs if r["op"] == op] for op in OPS}
    med = {op: statistics.median(r["seconds"] for r in rs) for op, rs in by.items() if rs}
    mem = {op: statistics.median(r["peak_extra_mib"] for r in rs) for op, rs in by.items() if rs}
    n = by["gradcam"][0]["layers"]
    per_layer = statistics.median(t for r in by["gradcam_pkg"] for t in r["per_layer_s"])
    loop = per_layer * n
    s = args.size
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_volume.py --size {s} --rounds {args.rounds} --gradcam-layers {args.gradcam_layers}`"
        f" · {n} volume layers swept · random weights, input 1x1x{s}x{s}x{s} · load average before/after: "
        f"{load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores (shared) · {json.dumps(versions())}",
        "",
        "| | seconds (median) | ÷ floor | peak RSS above start (MiB) | ÷ floor |",
        "|---|---:|---:|---:|---:|",
        f"| (a) forward + `autograd.grad` (the floor) | {med['floor']:.1f} | 1.00 | {mem['floor']:.0f} | 1.00 |",
        f"| (b) `explain(methods='gradcam', layers='all')` | {med['gradcam']:.1f} | {med['gradcam'] / med['floor']:.2f} "
        f"| {mem['gradcam']:.0f} | {mem['gradcam'] / mem['floor']:.2f} |",
        *(
            [
                f"| (b) every one-pass volume method ({len(by['all'][0].get('methods', []))}), all layers "
                f"| {med['all']:.1f} | {med['all'] / med['floor']:.2f} | {mem['all']:.0f} | {mem['all'] / mem['floor']:.2f} |"
            ]
            if "all" in med
            else ["| (b) every one-pass volume method, all layers | not run (`--ops`) | | | |"]
        ),
        f"| (c) grad-cam `GradCAM`, one layer per call, x {n} layers (extrapolated from "
        f"{len(by['gradcam_pkg'][0]['timed_layers'])} timed: {', '.join(by['gradcam_pkg'][0]['timed_layers'])}) "
        f"| {loop:.0f} | {loop / med['floor']:.1f} | - | - |",
        "",
        f"(c)/(b): {loop / med['gradcam']:.0f}x. The dry run that classifies the layers (two forwards without "
        "gradients, the second at (D+8, H+32, W+32)) is cached per model and input shape and not timed. Raw maps "
        "are kept at each layer's resolution ((B, d, h, w)); upsampling to 96³ happens only for display.",
        "",
    ]
    summary = {"median_s": med, "peak_extra_mib": mem, "gradcam_pkg_loop_s": loop, "layers": n, "load": load}
    return summary, "\n".join(lines)


def write_section(text: str) -> None:
    path = HERE / "RESULTS.md"
    body = path.read_text()
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    body = (
        pattern.sub(lambda _: text + "\n", body)
        if pattern.search(body)
        else body.rstrip("\n") + "\n\n" + text + "\n"
    )
    path.write_text(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--gradcam-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ops", default=",".join(OPS), help="measurements to run (floor and gradcam are needed)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", choices=OPS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.gradcam_layers)))
        return
    load0 = os.getloadavg()[0]
    runs = []
    for r in range(args.rounds):
        for op in [o for o in OPS if o in args.ops.split(",")]:
            res = run_child(op, args)
            print(
                f"round {r + 1} {op}: {res['seconds']:.1f} s, peak +{res['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
            runs.append(res)
    summary, text = summarise(runs, args, [load0, os.getloadavg()[0]])
    print(text)
    (HERE / "bench_volume.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
