"""Cost of the layer-wise faithfulness metrics against the perturbed forwards they need, side by side.

    python benchmarks/bench_faithfulness.py                    # default model, chelsea, Grad-CAM, last 24 layers
    python benchmarks/bench_faithfulness.py --layers all --rounds 1 --write

For each family (ROAD; deletion + insertion with the RISE baseline; the confidence metrics), each alone and all
together in one pass: (a) ours = :func:`camanim.pipelines.faithfulness.faithfulness` on one explanation's maps
(the metric stage only: perturbed images made, deduplicated, forwarded, scored); (b) the floor = the forwards
of the same unique perturbed images alone (made beforehand, not timed), in batches of 64, through the same
optimised copy of the model. The target is (a)/(b) <= 1.5 (ybROAD's 1.36 in RESULTS.md). Also reported: the
perturbed images asked and forwarded (deduplication across layers and metrics), and the sanity check's cost
(one capture per depth) against a plain capture.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from camanim.compute.metrics import deletion as dele
from camanim.compute.metrics import faithfulness as fa
from camanim.compute.metrics.engine import PerturbationContext, _forward_copy, _probabilities
from camanim.compute.models import load_model
from camanim.pipelines.explain import explain
from camanim.pipelines.faithfulness import faithfulness
from camanim.pipelines.sanity import sanity

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Faithfulness metrics per layer and the sanity check"
FAMILIES = {
    "ROAD (road, morf, lerf)": "road,morf,lerf",
    "deletion + insertion (rise, 20 steps)": "deletion,insertion",
    "confidence (5 metrics)": "average_drop,increase_in_confidence,average_gain,confidence_change,drop_in_confidence",
    "all 10 metrics, one pass": "all",
}


def unique_images(ex, metrics: str, settings: fa.Settings, net, device) -> torch.Tensor:
    """Every distinct perturbed image the metrics ask for (made, not timed)."""
    names = fa.parse_metrics(metrics)
    families = [f for f in fa.FAMILIES if any(fa.METRICS[m].family == f for m in names)]
    x = ex.input[0]
    maps = [ex.upsampled(m, layer.name)[0].float() for m in ex.methods for layer in ex.chosen]
    units, _ = fa._units(maps, families, x.shape[-1] * x.shape[-2], settings)
    seen = {}
    for unit in units:
        for p in unit:
            if p is not None and p.key not in seen:
                seen[p.key] = p
    ctx = PerturbationContext(x.to(device), settings.imputer, settings.preprocessing, settings.seed)
    items = list(seen.values())
    return torch.cat([ctx.build(items[i : i + 64]) for i in range(0, len(items), 64)])


def floor(net, cl, images: torch.Tensor, target: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        _probabilities(net, images, target, 64, cl)
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    layers = "all" if args.layers == "all" else int(args.layers)
    ex = explain(lm, args.image, methods=args.method, layers=layers)
    x = ex.input[0]
    tgt = int(ex.targets[0])
    net, cl = _forward_copy(lm.model, None, x[None])
    device = next(net.parameters()).device
    from camanim.compute.metrics.road import _default_imputer

    settings = fa.Settings(imputer=_default_imputer(None), preprocessing=ex.preprocessing, steps=dele.STEPS)
    rows = []
    for label, metrics in FAMILIES.items():
        ours, base, stats = [], [], {}
        imgs = unique_images(ex, metrics, settings, net, device)
        for _ in range(args.rounds):
            res = faithfulness(lm, explanation=ex, metrics=metrics)
            ours.append(res.timings["metrics"])
            stats = res.stats
            base.append(floor(net, cl, imgs, tgt))
        assert int(stats["forwards"]) == imgs.shape[0], (stats["forwards"], imgs.shape[0])
        rows.append((label, int(stats["masks"]), int(stats["forwards"]), statistics.median(ours),
                     statistics.median(base), statistics.median(a / b for a, b in zip(ours, base, strict=True))))  # fmt: skip
    separate = sum(r[2] for r in rows[:3])
    t = time.perf_counter()
    explain(lm, args.image, methods=args.method, layers=layers)
    capture = time.perf_counter() - t
    t = time.perf_counter()
    san = sanity(lm, args.image, methods=args.method, layers=layers, depths=args.depths)
    t_san = time.perf_counter() - t
    load = os.getloadavg()
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_faithfulness.py --layers {args.layers} --rounds {args.rounds}`: {args.model} "
        f"(pretrained), `{args.image}` at {x.shape[-2]}x{x.shape[-1]}, {args.method} at {len(ex.chosen)} layers "
        f"({args.layers if args.layers == 'all' else 'the last ' + args.layers} spatial layers), target "
        f"{ex.target_names[0]!r}; {platform.machine()}, torch {torch.__version__} with {args.threads} thread(s); "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores (shared machine: "
        "compare the ratios, measured side by side in each round). Medians of "
        f"{args.rounds} round(s).",
        "",
        "| metrics | perturbed images asked | unique, forwarded | ours: metric stage (s) | floor: the forwards alone (s) | ours / floor (target <= 1.5) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, asked, fwd, a, b, r in rows:
        lines.append(f"| {label} | {asked} | {fwd} | {a:.1f} | {b:.1f} | **{r:.2f}** |")
    lines += [
        "",
        f"All ten metrics in one pass forward {rows[3][2]} images where the three families run separately forward "
        f"{separate} (shared: the deletion curves' all-baseline ends; with `--baseline road` deletion and "
        "insertion also reuse ROAD's MoRF and LeRF images). ROAD's share is imputation-bound (its images are "
        "made by the noisy linear imputer in a background thread while the previous batch is forwarded); the "
        "deletion and confidence images cost a `torch.where` or a product, so their stages are forward-bound.",
        "",
        f"Sanity check ({args.depths} depths + the original, {len(san.layers)} layers, Spearman + SSIM + HOG): "
        f"{t_san:.1f} s, against one capture of all layers {capture:.2f} s "
        f"(captures {san.timings['randomised captures']:.1f} s, similarities {san.timings['similarity']:.1f} s). "
        f"Verdict: median Spearman at full randomisation {san.verdicts()[args.method]['median']:.2f} "
        f"({'passes' if san.verdicts()[args.method]['passes'] else 'fails'}).",
        "",
    ]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    new = (
        old[: found.start()] + text.rstrip("\n") + "\n\n" + old[found.end() :]
        if found
        else old.rstrip("\n") + "\n\n" + text
    )
    path.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--image", default="chelsea")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--layers", default="24", help="all, or N: the last N spatial layers")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depths", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help=f"replace {SECTION!r} in RESULTS.md")
    args = p.parse_args(argv)
    text = run(args)
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
