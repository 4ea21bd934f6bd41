"""Peak memory of ``animate`` on EfficientNet-b7 at its native 600x600 against one plain forward+backward.

torchvision ``efficientnet_b7`` (random weights, seed 0, via ``load_model("torchvision:efficientnet_b7",
"none")``), scikit-image's ``chelsea`` preprocessed by the model's own transform (600x600), on the CPU. Each
measurement runs in a fresh subprocess that loads the model and input, releases free memory, resets the peak
RSS (``/proc/self/clear_refs``), runs once and reads the peak (``VmHWM``), with glibc's mmap threshold pinned
at 128 KiB as ``bench_engine.py`` does (so the peak follows the tensors alive at once, not what the allocator
retains); the same runs with glibc's default behaviour are reported too.

* ``floor``: one forward and one ``torch.autograd.grad`` of the top-1 logit with respect to the input;
* ``animate``: ``camanim.animate(lm, "chelsea", methods="gradcam", layers="all")`` (one capture of every
  spatial layer + the local/global ranges);
* ``animate+save``: the same followed by ``Animation.save(out, formats="mp4")`` (render + encode + extras).

Then one more subprocess walks the stages one by one (explain, the animation's ranges, save), resetting the
peak before each, and reports what each stage holds: the RSS at its start, its peak, what it leaves, and the
sizes of what it keeps (the raw maps, the capture's copies, the values autograd saves for the backward).

Usage:
    python benchmarks/bench_memory_b7.py [--threads N] [--size 600] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Memory: animate on EfficientNet-b7 at 600x600"
MODEL = "torchvision:efficientnet_b7"
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TARGET = 2.0
MIB = 2**20


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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(size: int | None):
    """``(LoadedModel, x (1, 3, S, S))``: the model's own preprocessing (600x600) unless ``size`` is given."""
    from camanim.compute.models import load_model
    from camanim.pipelines.explain import prepare_input

    lm = load_model(MODEL, "none")
    if size:
        import dataclasses

        lm = dataclasses.replace(lm, preprocessing=dataclasses.replace(lm.preprocessing, size=(size, size)))
    x, _, _ = prepare_input("chelsea", lm)
    return lm, x


def floor(model, x) -> None:
    xi = x.detach().clone().requires_grad_(True)
    out = model(xi)
    torch.autograd.grad(out[0, out[0].argmax()], xi)


def child(op: str, size: int | None) -> dict:
    import camanim

    lm, x = build(size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_b7_"))
    if op != "floor":  # import what animate and save import, before measuring
        import matplotlib.pyplot  # noqa: F401

        import camanim.outputs.animation  # noqa: F401

    _release()
    reset = _reset_peak()
    before = _status_kib("VmHWM")
    t = time.perf_counter()
    info: dict = {}
    if op == "floor":
        floor(lm.model, x)
    elif op == "animate":
        anim = camanim.animate(lm, x, methods="gradcam", layers="all")
        info["frames"] = len(anim)
    elif op == "animate+save":
        anim = camanim.animate(lm, x, methods="gradcam", layers="all")
        anim.save(tmp / "b7", formats="mp4")
        info["frames"] = len(anim)
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"op": op, "reset": reset, "before_kib": before, "peak_kib": peak, "seconds": seconds, **info}


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while ``fn`` runs its forward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def stages_child(size: int | None) -> dict:
    """Peak per stage of an animation, in one process; sizes of what each stage keeps."""
    import camanim
    from camanim.compute.layers import list_layers, modified_in_place

    lm, x = build(size)
    import matplotlib.pyplot  # noqa: F401

    import camanim.outputs.animation  # noqa: F401

    out: dict = {"stages": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_b7_"))

    def stage(name: str, fn):
        _release()
        start = _status_kib("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t
        peak = _status_kib("VmHWM")
        _release()
        end = _status_kib("VmRSS")
        out["stages"].append(
            {
                "stage": name,
                "start_mib": start / 1024,
                "peak_mib": peak / 1024,
                "end_mib": end / 1024,
                "s": seconds,
            }
        )
        return result

    table = stage("list_layers (dry run, 2 sizes, no grad)", lambda: list_layers(lm.model, x))
    mutated = modified_in_place(lm.model, x)
    floor_saved = _saved_bytes(lambda: floor(lm.model, x))
    stage("floor: forward + autograd.grad", lambda: floor(lm.model, x))
    ex = stage(
        "explain(methods='gradcam', layers='all')",
        lambda: camanim.explain(lm, x, methods="gradcam", layers="all"),
    )
    anim = stage("Animation.from_explanation (ranges)", lambda: camanim.Animation.from_explanation(ex))
    stage("save(formats='mp4'): render + encode + extras", lambda: anim.save(tmp / "b7", formats="mp4"))

    chosen = {la.name for la in ex.chosen}
    swept = [la for la in table if la.name in chosen]
    outputs = sum(_numel(la.shape) * 4 for la in swept)
    copied = [la for la in swept if mutated is not None and la.name in mutated]
    out["sizes_mib"] = {
        "params": sum(p.numel() * p.element_size() for p in lm.model.parameters()) / MIB,
        "input": x.numel() * 4 / MIB,
        "autograd saved tensors of one forward (the floor's graph)": floor_saved / MIB,
        "outputs of every swept layer (float32)": outputs / MIB,
        "capture's copies (swept outputs modified in place later)": sum(_numel(la.shape) * 4 for la in copied)
        / MIB,
        "raw maps kept (explanation)": sum(m.numel() * m.element_size() for m in ex.maps["gradcam"].values())
        / MIB,
        "one upsampled chunk (128 maps at the input size, float32)": 128
        * x.shape[-2]
        * x.shape[-1]
        * 4
        / MIB,
        "all maps upsampled at once (float32)": len(anim) * x.shape[-2] * x.shape[-1] * 4 / MIB,
    }
    largest = max(swept, key=lambda la: _numel(la.shape))
    out["largest_output"] = [largest.name, list(largest.shape), _numel(largest.shape) * 4 / MIB]
    out["counts"] = {
        "layers": len(table),
        "swept": len(swept),
        "copied": len(copied),
        "modified in place (all layers)": None if mutated is None else len(mutated),
        "frames": len(anim),
    }
    out["frame_shape"] = list(anim.frame(0).shape)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _run_child(args: list[str], env: dict[str, str] | None, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, *args]
    if threads:
        cmd += ["--threads", str(threads)]
    child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | (env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    res: dict = {"load": [os.getloadavg()[0]]}
    size = ["--size", str(args.size)] if args.size else []
    for label, env in (("pinned", PINNED_MALLOC), ("default", None)):
        for op in ("floor", "animate", "animate+save"):
            r = _run_child(["--child", op, *size], env, args.threads)
            r["extra_mib"] = (r["peak_kib"] - r["before_kib"]) / 1024
            res[f"{label}:{op}"] = r
            res["load"].append(os.getloadavg()[0])
            print(
                f"  {label:7s} {op:13s} peak extra {r['extra_mib']:8.0f} MiB  ({r['seconds']:.0f} s)",
                flush=True,
            )
    res["stages"] = _run_child(["--stages", *size], PINNED_MALLOC, args.threads)
    res["load"].append(os.getloadavg()[0])
    return res


def section(res: dict, args) -> str:
    p = {op: res[f"pinned:{op}"] for op in ("floor", "animate", "animate+save")}
    d = {op: res[f"default:{op}"] for op in ("floor", "animate", "animate+save")}
    st = res["stages"]
    hw = "600x600 (the model's own preprocessing)" if not args.size else f"{args.size}x{args.size}"
    ratio = p["animate"]["extra_mib"] / p["floor"]["extra_mib"]
    ratio_save = p["animate+save"]["extra_mib"] / p["floor"]["extra_mib"]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_memory_b7.py{' ' + ' '.join(args.argv) if args.argv else ''}` "
        f"({datetime.date.today().isoformat()}): torchvision EfficientNet-b7 (random weights, seed 0), `chelsea` at "
        f"{hw}, {res.get('camanim') or camanim_source()}, CPU, {torch.get_num_threads()} threads; {os.cpu_count()} shared cores, 1-min load average "
        f"{min(res['load']):.1f} to {max(res['load']):.1f}. Each row: a fresh subprocess that loads the model and "
        "input, resets its peak RSS (`/proc/self/clear_refs`), runs once and reads `VmHWM`; peak extra = peak "
        "minus the RSS after loading. glibc's mmap threshold pinned at 128 KiB (as in `bench_engine.py`), and "
        "glibc's default for comparison.",
        "",
        "| run | peak extra RSS [MiB] | / floor | default malloc [MiB] | / floor | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op, label in (
        ("floor", "one forward + `autograd.grad` of the top-1 logit (the floor)"),
        (
            "animate",
            f'`camanim.animate(..., methods="gradcam", layers="all")`: {p["animate"].get("frames")} layers',
        ),
        ("animate+save", 'animate + `save(formats="mp4")` (render, encode, extras)'),
    ):
        lines.append(
            f"| {label} | {p[op]['extra_mib']:.0f} | {p[op]['extra_mib'] / p['floor']['extra_mib']:.2f} "
            f"| {d[op]['extra_mib']:.0f} | {d[op]['extra_mib'] / d['floor']['extra_mib']:.2f} | {p[op]['seconds']:.0f} |"
        )
    verdict = "MET" if ratio <= TARGET else "NOT MET"
    lines += [
        "",
        f"Target animate / floor <= {TARGET:.0f}: **{verdict}** ({ratio:.2f}; with the MP4 written: {ratio_save:.2f}).",
        "",
        "Stages, one process, peak reset before each (pinned mmap threshold; RSS includes the model, "
        f"{st['sizes_mib']['params']:.0f} MiB of parameters):",
        "",
        "| stage | RSS at start [MiB] | peak [MiB] | peak - start [MiB] | RSS after [MiB] | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in st["stages"]:
        lines.append(
            f"| {s['stage']} | {s['start_mib']:.0f} | {s['peak_mib']:.0f} | {s['peak_mib'] - s['start_mib']:.0f} "
            f"| {s['end_mib']:.0f} | {s['s']:.1f} |"
        )
    c = st["counts"]
    by = {s["stage"].split(":")[0].split("(")[0].strip(): s for s in st["stages"]}
    over = (by["explain"]["peak_mib"] - by["explain"]["start_mib"]) - (
        by["floor"]["peak_mib"] - by["floor"]["start_mib"]
    )
    copies = st["sizes_mib"]["capture's copies (swept outputs modified in place later)"]
    lines += [
        "",
        f"Where the memory goes: the explain stage peaks {over:.0f} MiB above the floor, which is the capture's "
        f"copies at hook time ({copies:.0f} MiB: {c['copied']} swept outputs that the forward pass modifies in "
        "place later, EfficientNet's BatchNorm outputs before an in-place SiLU, must be copied to keep the value "
        "the gradient refers to); every other swept output is held by reference to what autograd saves anyway. "
        f"The raw maps ({st['sizes_mib']['raw maps kept (explanation)']:.0f} MiB), the ranges (upsampled "
        f"{128} maps at a time) and the rendering stay far below the forward pass's own memory.",
    ]
    lines += [
        "",
        f"What is held (MiB): {'; '.join(f'{k} {v:.0f}' for k, v in st['sizes_mib'].items())}. Layers: {c['layers']} "
        f"in the forward pass, {c['swept']} swept, {c['copied']} of them copied at hook time (modified in place "
        f"later); largest swept output `{st['largest_output'][0]}` {st['largest_output'][1]} "
        f"({st['largest_output'][2]:.0f} MiB); frames {st['frame_shape']}.",
    ]
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
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's own, 600)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS}")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help=f"report a saved run (each run saves {tempfile.gettempdir()}/bench_memory_b7.json)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a != "--write"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.size)))
        return
    if args.stages:
        print(json.dumps(stages_child(args.size)))
        return
    json_out = Path(tempfile.gettempdir()) / "bench_memory_b7.json"
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        args.argv = res.get("argv", [])
    else:
        res = measure(args)
        res["argv"] = args.argv
        res["camanim"] = camanim_source()
        json_out.write_text(json.dumps(res, indent=1))
    text = section(res, args)
    print("\n" + text)
    if args.write:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
