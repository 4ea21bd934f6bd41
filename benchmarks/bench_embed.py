"""Embedding benchmark: every layer of the default model on the 1,797 digits, against the plain forwards.

The default EfficientNet-Lite0 (ImageNet weights, offline) on scikit-learn's 1,797 digits, upsampled to
224x224, in the batches ``camanim.embed`` makes (seeded order, ``--batch-size`` images):

(a) the floor: the plain forward of each batch (``torch.no_grad``), nothing kept;
(b) the stream of ``camanim embed``: the same batch through
    :func:`camanim.pipelines.embed.embed_batch`: one forward with every chosen layer pooled in its hook,
    vectors reduced by the seeded random projection (256 dims) and moved to the CPU, the unbiased HSIC of
    every pair of layers (for CKA), the top-1 class.

(a) and (b) run on the same input tensor, alternately batch by batch (the order swapped every batch), after
one warm-up batch each; preparing the input (upsampling the digits) is timed apart. Then, once, what
``embed`` does after the stream: separability of every layer (leave-one-out k-NN, the 5-fold ridge probe,
silhouette), the PCA projection with Procrustes alignment, and CKA from the summed HSIC. Reported: (b)/(a)
and (b + after)/(a).

Peak memory: ``camanim.embed(...)`` on the same images runs in a fresh subprocess with the random projection
(``max_dim=256``, the default) and without it (``max_dim=None``: every pooled vector kept whole); the peak RSS
(``VmHWM``, reset after the model is loaded via ``/proc/self/clear_refs``, glibc's mmap threshold pinned as
in bench_engine.py) over what the loaded model and process hold, and the bytes of the kept vectors.

Usage:
    python benchmarks/bench_embed.py                 # all 1,797 digits; ~15 min on 2 cores
    python benchmarks/bench_embed.py --write         # also replace the Embeddings section of RESULTS.md
    python benchmarks/bench_embed.py --limit 256 --no-memory   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PINNED_MALLOC, _peak_rss_kib, _release_free_memory, _reset_peak_rss  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Embeddings: every layer of a dataset from one forward per batch"


def setup(limit: int | None, batch_size: int):
    from camanim.compute.embeddings import RandomProjection
    from camanim.compute.layers import list_layers, select_layers
    from camanim.compute.models import load_model
    from camanim.pipelines.embed import _batches
    from camanim.pipelines.imageset import open_images

    lm = load_model()
    imgs = open_images("digits", limit=limit)
    table = list_layers(lm.model, imgs.input_shape(lm))
    chosen = select_layers(table, "all", keep_nonspatial=True)
    names = [layer.name for layer in chosen]
    return lm, imgs, names, _batches(len(imgs), batch_size, 0), RandomProjection(256, 0)


def stream(args: argparse.Namespace) -> dict:
    from camanim.compute.projections import project_layers
    from camanim.compute.separability import encode_labels, separability
    from camanim.compute.similarity import MinibatchCKA
    from camanim.pipelines.embed import embed_batch

    lm, imgs, names, batches, rp = setup(args.limit, args.batch_size)
    net = lm.model
    t_load = t_a = t_b = 0.0
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    order: list[np.ndarray] = []
    cka = MinibatchCKA()
    x, _ = imgs.load(batches[0][:8], lm)
    with torch.no_grad():  # warm-up, untimed
        net(x)
    embed_batch(net, x, names, rp)
    for i, index in enumerate(batches):
        t = time.perf_counter()
        x, _ = imgs.load(index, lm)
        t_load += time.perf_counter() - t
        for which in "ab" if i % 2 == 0 else "ba":
            gc.collect()
            t = time.perf_counter()
            if which == "a":
                with torch.no_grad():
                    net(x)
                t_a += time.perf_counter() - t
            else:
                res = embed_batch(net, x, names, rp)
                t_b += time.perf_counter() - t
        for n in names:
            kept[n].append(res.stored[n])
        order.append(index)
        cka.add(torch.from_numpy(res.hsic), len(index))
        print(f"batch {i + 1}/{len(batches)}: a {t_a:.1f} s, b {t_b:.1f} s", file=sys.stderr, flush=True)
    index = np.concatenate(order)
    inverse = np.argsort(index)
    vectors = {n: np.concatenate(kept[n])[inverse] for n in names}
    y, _ = encode_labels(imgs.labels)
    t = time.perf_counter()
    for n in names:
        separability(vectors[n], y)
    t_sep = time.perf_counter() - t
    t = time.perf_counter()
    project_layers([vectors[n] for n in names], "pca")
    t_proj = time.perf_counter() - t
    t = time.perf_counter()
    cka.compute()
    t_cka = time.perf_counter() - t
    return {
        "images": len(imgs),
        "layers": len(names),
        "batches": len(batches),
        "load": t_load,
        "a": t_a,
        "b": t_b,
        "separability": t_sep,
        "projection": t_proj,
        "cka": t_cka,
        "kept_bytes": int(sum(v.nbytes for v in vectors.values())),
    }


def memory_child(limit: int | None, batch_size: int, max_dim: int | None) -> None:
    """In a fresh subprocess: load the model and the digits, reset the peak RSS, run embed once, print JSON."""
    import camanim
    from camanim.compute.models import load_model
    from camanim.pipelines.imageset import open_images

    lm = load_model()
    imgs = open_images("digits", limit=limit)
    gc.collect()
    _release_free_memory()
    reset = _reset_peak_rss()
    before = _peak_rss_kib()
    emb = camanim.embed(lm, imgs, batch_size=batch_size, max_dim=max_dim)
    peak = _peak_rss_kib()
    kept = sum(v.nbytes for v in emb.vectors.values())
    full = len(emb) * sum(emb.dims) * 4
    print(
        json.dumps(
            {"reset": reset, "before_kib": before, "peak_kib": peak, "kept_bytes": kept, "full_bytes": full}
        )
    )


def memory(args: argparse.Namespace, max_dim: int | None) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(max_dim), "--batch-size", str(args.batch_size)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | PINNED_MALLOC
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def section(s: dict, mem: dict[str, dict], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    a, b = s["a"], s["b"]
    after = s["separability"] + s["projection"] + s["cka"]
    mib = 1024.0
    lines = [
        SECTION,
        "",
        f"{datetime.date.today().isoformat()} · {machine()} · load average before/after {loads[0]:.2f}/{loads[1]:.2f}",
        "",
        f"EfficientNet-Lite0 (ImageNet weights) on {s['images']} digits upsampled to 224x224, every layer with a map or a "
        f"vector ({s['layers']} layers), {s['batches']} batches of about {args.batch_size}; (a) and (b) alternate batch by batch "
        "on the same input (`python benchmarks/bench_embed.py`).",
        "",
        "| | seconds | per image (ms) | / (a) |",
        "|---|---:|---:|---:|",
        f"| (a) plain forwards | {a:.1f} | {1000 * a / s['images']:.1f} | 1.00 |",
        f"| (b) `camanim embed`'s stream: pooled forwards, random projection, HSIC | {b:.1f} | {1000 * b / s['images']:.1f} | "
        f"{b / a:.2f} |",
        f"| after the stream: separability of every layer | {s['separability']:.1f} | | {s['separability'] / a:.2f} |",
        f"| after the stream: PCA + Procrustes of every layer | {s['projection']:.1f} | | {s['projection'] / a:.3f} |",
        f"| after the stream: CKA from the summed HSIC | {s['cka']:.3f} | | |",
        f"| **(b) + after, all layers** | **{b + after:.1f}** | | **{(b + after) / a:.2f}** |",
        f"| (preparing the inputs: digits upsampled, both) | {s['load']:.1f} | | |",
        "",
    ]
    if mem:
        lines += [
            "Peak memory of `camanim.embed(...)` on the same images, each in a fresh subprocess: peak RSS over the loaded "
            "model and digits (`VmHWM` reset after loading; glibc's mmap threshold pinned as in bench_engine.py), and the "
            "bytes of the vectors kept for every layer.",
            "",
            "| | peak extra RSS (MiB) | kept vectors (MiB) |",
            "|---|---:|---:|",
        ]
        for label, m in mem.items():
            extra = (m["peak_kib"] - m["before_kib"]) / mib
            lines.append(f"| {label} | {extra:.0f} | {m['kept_bytes'] / 2**20:.0f} |")
        full = next(iter(mem.values()))["full_bytes"]
        lines += ["", f"The full pooled vectors of every layer and image take {full / 2**20:.0f} MiB.", ""]
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path = RESULTS) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--limit", type=int, default=None, help="a stratified sample of this many digits (default all)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--write", action="store_true", help="replace the Embeddings section of RESULTS.md")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(
            args.limit, args.batch_size, None if args.memory_child == "None" else int(args.memory_child)
        )
        return
    load0 = os.getloadavg()[0]
    s = stream(args)
    mem = {}
    if not args.no_memory:
        mem["with the random projection (256 dims, the default)"] = memory(args, 256)
        mem["without it (`max_dim=None`: full vectors)"] = memory(args, None)
    text = section(s, mem, args, (load0, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
