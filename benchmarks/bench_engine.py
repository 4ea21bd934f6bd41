"""Engine benchmark: every layer from one capture, against the floor and against a per-layer grad-cam loop.

Per model (torchvision ResNet-50 and DenseNet-161 with random seeded weights, and the default
EfficientNet-Lite0; eval mode; the ``chelsea`` sample preprocessed to 1x3x224x224) it measures:

(a) the floor: one forward and one ``torch.autograd.grad`` of the top-1 logit with respect to the input;
(b) ours: ``camanim.explain(model, x, methods="all", layers="all")``: every spatial layer, all one-pass
    methods, from one capture;
(c) the per-layer loop the CAManim reference code runs: for each layer of (b), a grad-cam
    ``GradCAM(model, target_layers=[module])`` run once (one forward and one backward per layer). grad-cam
    addresses modules, not calls, so the k-th call of a reused module (ResNet's ``relu#2``) is timed with
    the module itself: the cost, one forward and backward, is the same.

(a) and (b) are warmed up once, then run ``--repeats`` times interleaved; the median is reported. (c) runs
once; with ``--loop-layers N`` only N evenly spaced layers run and the total is extrapolated linearly to all
layers (marked in the output). Peak extra memory of (a) and (b): on CUDA ``torch.cuda.max_memory_allocated``
over the allocation before the call; on CPU each runs once in a fresh subprocess that loads the model and
input, resets the peak RSS (``/proc/self/clear_refs``), runs it once and reads the peak (``VmHWM``); where
the reset is not allowed, the delta of the peak over a baseline subprocess that only loads the model and input.
The subprocesses run with glibc's mmap threshold pinned at its default 128 KiB (``MALLOC_MMAP_THRESHOLD_``):
by default glibc raises the threshold after each large ``free``, after which freed tensors stay in the heap
and the peak RSS measures what the allocator retains (ResNet-50's (b) measured 238 to 303 MiB between runs
of one revision). Pinned, every tensor of 128 KiB or more is its own mapping, returned when freed, so the
peak RSS follows the tensors alive at once. The peak with glibc's default behaviour is reported too.

Usage:
    python benchmarks/bench_engine.py                      # CPU, all three models, prints a markdown table
    python benchmarks/bench_engine.py --write              # also updates benchmarks/RESULTS.md (Engine section)
    python benchmarks/bench_engine.py --device cuda --loop-layers all
    python benchmarks/bench_engine.py --models resnet50 --loop-layers 20 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import json
import os
import platform
import pstats
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MODELS = ("resnet50", "densenet161", "efficientnet_lite0")
LABELS = {"resnet50": "ResNet-50", "densenet161": "DenseNet-161", "efficientnet_lite0": "EfficientNet-Lite0"}
# grad-cam loop size per model by default (None = every layer): the full DenseNet-161 loop takes ~7 min here.
DEFAULT_LOOP = {"resnet50": None, "densenet161": 60, "efficientnet_lite0": None}
# Targets the project has set.
MAX_B_OVER_A = 2.0
MIN_C_OVER_B = {"resnet50": 100.0, "densenet161": 300.0}
MAX_MEM_RATIO = 2.0

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Engine: every layer from one capture"


def build(name: str, device: str):
    """``(LoadedModel, x (1, 3, 224, 224))`` on ``device``; torchvision models get random weights, seed 0."""
    from camanim.compute.models import load_model, wrap_model
    from camanim.pipelines.explain import prepare_input

    if name == "efficientnet_lite0":
        lm = load_model(device=device)
    else:
        import torchvision

        torch.manual_seed(0)
        lm = wrap_model(getattr(torchvision.models, name)(weights=None).eval().to(device), name=name)
    x, _, _ = prepare_input("chelsea", lm)
    return lm, x.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor(model: torch.nn.Module, x: torch.Tensor) -> None:
    """(a): one forward and one autograd.grad of the top-1 logit with respect to the input."""
    xi = x.detach().clone().requires_grad_(True)
    out = model(xi)
    torch.autograd.grad(out[0, out[0].argmax()], xi)


def ours(lm, x: torch.Tensor):
    """(b): every spatial layer, every one-pass method, one capture."""
    import camanim

    return camanim.explain(lm, x, methods="all", layers="all")


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def subset(n_layers: int, n: int | None) -> list[int]:
    """``n`` evenly spaced indices into ``range(n_layers)`` (all when ``n`` is None or too large)."""
    if n is None or n >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(i)) for i in np.linspace(0, n_layers - 1, n)})


def gradcam_loop(
    lm, x: torch.Tensor, layers, indices: list[int], target: int, device: str
) -> tuple[float, int]:
    """(c): one grad-cam GradCAM run per layer (module-addressed), timed; returns (seconds, failures)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(lm.model.named_modules())
    targets = [ClassifierOutputTarget(target)]
    failures = 0
    total = 0.0
    for i in indices:
        module = modules[layers[i].module_name]

        def run(module=module) -> None:
            with GradCAM(model=lm.model, target_layers=[module]) as cam:
                cam(input_tensor=x, targets=targets)

        try:
            total += timed(run, device)
        except Exception as exc:  # report, keep timing the others
            failures += 1
            print(f"    grad-cam failed at {layers[i].name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    for p in lm.model.parameters():  # grad-cam calls loss.backward()
        p.grad = None
    return total, failures


# ---------------------------------------------------------------------------------------------- memory


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS, so a later peak is not hidden in reused pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM`` where /proc exists, else ``ru_maxrss``.

    ``ru_maxrss`` alone can report the *parent's* peak: at exec Linux folds the peak of the memory map being
    replaced into it, and a vfork'ed child (Python's subprocess) execs from the parent's map.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(name: str, op: str, device: str) -> None:
    """Runs in a fresh subprocess: load, reset the peak RSS, run ``op`` once, print JSON (KiB)."""
    from camanim.compute.methods import parse_methods

    lm, x = build(name, device)
    parse_methods("all")  # import every method family before measuring
    gc.collect()
    _release_free_memory()
    reset = _reset_peak_rss()
    before = _peak_rss_kib()
    if op == "floor":
        floor(lm.model, x)
    elif op == "ours":
        ours(lm, x)
    peak = _peak_rss_kib()
    print(json.dumps({"reset": reset, "before_kib": before, "peak_kib": peak}))


PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _child(name: str, op: str, device: str, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, op, "--device", device]
    cmd += ["--threads", str(torch.get_num_threads())]
    child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | (env or {})
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_memory(name: str, device: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Peak extra RSS (MiB) of (a) and (b), each in a fresh subprocess with ``env``; and the method used."""
    a, b = _child(name, "floor", device, env), _child(name, "ours", device, env)
    if a["reset"] and b["reset"]:
        method = "fresh subprocess per run; peak RSS (VmHWM) reset after loading via /proc/self/clear_refs"
        return (a["peak_kib"] - a["before_kib"]) / 1024, (b["peak_kib"] - b["before_kib"]) / 1024, method
    base = _child(name, "none", device, env)
    method = "fresh subprocess per run; peak RSS minus that of a baseline subprocess (load only)"
    return (a["peak_kib"] - base["peak_kib"]) / 1024, (b["peak_kib"] - base["peak_kib"]) / 1024, method


def cuda_memory(fn: Callable[[], object]) -> float:
    """Peak extra CUDA memory (MiB) allocated by ``fn`` over what was allocated before."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Row:
    name: str
    layers: int
    a_runs: list[float] = field(default_factory=list)
    b_runs: list[float] = field(default_factory=list)
    c_seconds: float = float("nan")
    c_measured: float = float("nan")
    c_layers: int = 0
    c_failures: int = 0
    mem_a: float = float("nan")
    mem_b: float = float("nan")
    mem_a_default: float = float("nan")  # glibc's default malloc (CPU only)
    mem_b_default: float = float("nan")

    @property
    def a(self) -> float:
        return statistics.median(self.a_runs)

    @property
    def b(self) -> float:
        return statistics.median(self.b_runs)

    @property
    def best_ratio(self) -> float:
        """(b)/(a) from the fastest run of each: less sensitive to bursts of load from other jobs."""
        return min(self.b_runs) / min(self.a_runs)

    @property
    def extrapolated(self) -> bool:
        return 0 < self.c_layers < self.layers


def profile_ours(lm, x: torch.Tensor, top: int = 18) -> str:
    """cProfile of one (b) run: the functions with the most own time (CPU only; CUDA is asynchronous)."""
    prof = cProfile.Profile()
    prof.enable()
    ex = ours(lm, x)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    stages = ", ".join(f"{k} {v:.3f}s" for k, v in ex.timings.items())
    return f"explain stages: {stages}\n" + buf.getvalue()


def run_model(name: str, args: argparse.Namespace) -> Row:
    device = args.device
    print(f"\n== {LABELS[name]} on {device}", flush=True)
    lm, x = build(name, device)
    # Warm-up, which also gives the layers (c) loops over.
    floor(lm.model, x)
    ex = ours(lm, x)
    layers = list(ex.chosen)
    target = ex.targets[0]
    row = Row(name=name, layers=len(layers))
    for _ in range(args.repeats):  # interleaved, so load from other jobs hits both alike
        row.a_runs.append(timed(lambda: floor(lm.model, x), device))
        row.b_runs.append(timed(lambda: ours(lm, x), device))
    print(f"  (a) runs {[round(t, 3) for t in row.a_runs]} s; (b) runs {[round(t, 3) for t in row.b_runs]} s")
    print(f"  {row.layers} spatial layers, {len(ex.methods)} methods: {', '.join(ex.methods)}")

    n = args.loop_layers if args.loop_layers != "default" else DEFAULT_LOOP[name]
    if n != 0:
        idx = subset(len(layers), n)
        print(f"  (c) grad-cam loop over {len(idx)} of {len(layers)} layers ...", flush=True)
        gradcam_loop(lm, x, layers, idx[:1], target, device)  # warm-up
        row.c_measured, row.c_failures = gradcam_loop(lm, x, layers, idx, target, device)
        row.c_layers = len(idx)
        row.c_seconds = row.c_measured * len(layers) / len(idx)
        note = f" (extrapolated from {row.c_measured:.1f} s)" if row.extrapolated else ""
        print(f"  (c) {row.c_seconds:.1f} s{note}")

    if args.profile:
        print("  profile of one (b) run:\n" + profile_ours(lm, x))
    if device.startswith("cuda"):
        row.mem_a = cuda_memory(lambda: floor(lm.model, x))
        row.mem_b = cuda_memory(lambda: ours(lm, x))
        args.mem_method = "torch.cuda.max_memory_allocated over the allocation before the call (same process)"
    elif not args.no_memory:
        del lm, x, ex
        gc.collect()
        row.mem_a, row.mem_b, args.mem_method = cpu_memory(name, device, PINNED_MALLOC)
        row.mem_a_default, row.mem_b_default, _ = cpu_memory(name, device)
        args.mem_method += "; glibc's mmap threshold pinned at 128 KiB (see the script's docstring)"
    print(f"  peak extra memory (a) {row.mem_a:.1f} MiB, (b) {row.mem_b:.1f} MiB")
    return row


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def table(rows: list[Row]) -> str:
    lines = [
        "| model | spatial layers | (a) fwd+bwd [s] | (b) all layers, 9 methods [s] | (b)/(a) "
        "| (c) grad-cam loop [s] | (c)/(b) | peak extra mem (a) [MiB] | (b) [MiB] | mem (b)/(a) "
        "| mem (b)/(a), default malloc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = _fmt(r.c_seconds, 1) + ("*" if r.extrapolated else "")
        c_over_b = _fmt(r.c_seconds / r.b, 0) + ("*" if r.extrapolated else "")
        lines.append(
            f"| {LABELS[r.name]} | {r.layers} | {_fmt(r.a, 3)} ({_fmt(min(r.a_runs), 3)}) "
            f"| {_fmt(r.b, 3)} ({_fmt(min(r.b_runs), 3)}) | {_fmt(r.b / r.a, 1)} ({_fmt(r.best_ratio, 1)}) "
            f"| {c} | {c_over_b} | {_fmt(r.mem_a, 0)} | {_fmt(r.mem_b, 0)} | {_fmt(_ratio(r.mem_b, r.mem_a), 2)} "
            f"| {_fmt(_ratio(r.mem_b_default, r.mem_a_default), 2)} |"
        )
    notes = [
        f"\\* extrapolated: {LABELS[r.name]} grad-cam loop measured on {r.c_layers} evenly spaced of "
        f"{r.layers} layers ({r.c_measured:.1f} s), scaled by {r.layers}/{r.c_layers}."
        for r in rows
        if r.extrapolated
    ]
    notes.insert(
        0, "(a), (b): median (fastest) of the timed runs; (b)/(a): ratio of medians (of the fastest runs)."
    )
    notes += [f"grad-cam failed on {r.c_failures} layers of {LABELS[r.name]}." for r in rows if r.c_failures]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def verdicts(rows: list[Row]) -> list[str]:
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'MET' if ok else ('NOT MET' if ok is not None else 'NOT MEASURED')}: {text}")

    for r in rows:
        label = LABELS[r.name]
        ratio = r.b / r.a
        line(
            ratio <= MAX_B_OVER_A,
            f"{label} (b)/(a) = {ratio:.1f} (fastest runs: {r.best_ratio:.1f}) (target <= {MAX_B_OVER_A})",
        )
        if r.name in MIN_C_OVER_B:
            c = r.c_seconds / r.b
            star = " (extrapolated)" if r.extrapolated else ""
            line(
                None if c != c else c >= MIN_C_OVER_B[r.name],
                f"{label} (c)/(b) = {_fmt(c, 0)}{star} (target >= {MIN_C_OVER_B[r.name]:.0f})",
            )
        m = _ratio(r.mem_b, r.mem_a)
        line(None if m != m else m <= MAX_MEM_RATIO, f"{label} peak memory (b)/(a) = {_fmt(m)} (target <= 2)")
    return out


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name()}"
    try:
        from importlib.metadata import version

        text += f", grad-cam {version('grad-cam')}"
    except ImportError:  # PackageNotFoundError is an ImportError
        pass
    return text


def section(rows: list[Row], args: argparse.Namespace, loads: list[float]) -> str:
    today = datetime.date.today().isoformat()
    cmd = "python benchmarks/bench_engine.py " + " ".join(args.argv)
    return "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine(args.device)}, device `{args.device}`; {today}. Command: `{cmd.strip()}`.",
            f"The machine is shared with other jobs (1-min load average {min(loads):.1f} to {max(loads):.1f}, "
            f"sampled before and after each model, on {os.cpu_count()} cores), so timings are noisy: (a) and (b) "
            f"are medians of {args.repeats} interleaved runs after a warm-up.",
            *(
                [
                    "",
                    "The load exceeded the core count: with several intra-op threads, every small kernel waits for "
                    "descheduled worker threads, which slows (b) (thousands of small per-layer kernels) far more "
                    "than (a) or (c) (large convolutions). Compare with a `--threads 1` run.",
                ]
                if args.device == "cpu" and max(loads) > (os.cpu_count() or 1) and torch.get_num_threads() > 1
                else []
            ),
            "",
            "(a) one forward + `torch.autograd.grad` of the top-1 logit w.r.t. the input (the floor); "
            '(b) `camanim.explain(model, x, methods="all", layers="all")`: every spatial layer, 9 one-pass '
            "methods, one capture; (c) grad-cam's `GradCAM(model, target_layers=[module])` run once per layer, "
            "as the CAManim reference code loops (module-addressed: the k-th call of a reused module is timed "
            "with the module). Models: torchvision ResNet-50 and DenseNet-161 (random weights, seed 0) and "
            "the default EfficientNet-Lite0, eval mode, `chelsea` at 1x3x224x224.",
            "",
            table(rows),
            "",
            f"Peak memory: {args.mem_method}.",
            "",
            "Targets:",
            "",
            *verdicts(rows),
            "",
        ]
    )


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the Engine section of RESULTS.md, leaving other sections as they are.

    ``###`` subsections already in the Engine section (notes added by hand) are kept after the new text.
    """
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


def _loop_arg(v: str) -> int | None | str:
    if v == "all":
        return None
    if v == "default":
        return v
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError("--loop-layers takes 'all', 'default' or N >= 0 (0 skips the loop)")
    return n


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--loop-layers",
        type=_loop_arg,
        default="default",
        help="grad-cam loop over N evenly spaced layers, extrapolated to all ('all': every layer; 0: skip; "
        "default: all for ResNet-50 and EfficientNet-Lite0, 60 for DenseNet-161)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of (a) and (b) (median reported)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (CPU)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of one (b) run per model")
    p.add_argument("--write", action="store_true", help=f"update the Engine section of {RESULTS}")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "OP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.mem_method = "not measured"

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.device)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

    loads = [os.getloadavg()[0]]
    print(f"{machine(args.device)}; 1-min load average {loads[0]:.1f}")
    t0 = time.perf_counter()
    rows = []
    for n in names:
        rows.append(run_model(n, args))
        loads.append(os.getloadavg()[0])
    text = section(rows, args, loads)
    print("\n" + text)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.write:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
