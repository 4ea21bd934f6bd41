"""Coverage, measured: layers + a one-capture explain over every torchvision classifier and one model of every
timm architecture family, each checked against an independent copy-at-hook-time reference.

Per model (random weights, seed 0, eval mode, a random input ``(1, 3, s, s)`` at the smallest size ``s`` the
model takes among 64, 96, 128, 160, 224 and, for timm, its ``pretrained_cfg["input_size"]``):

* ``camanim.compute.layers.list_layers`` (the dry run, timed, not cached), the count of each layer kind;
* ``camanim.explain(lm, x, methods="gradcam,hirescam", layers=["first", "middle", "last"])`` (timed): the
  first, middle and last spatial layer (``last`` as camanim resolves it: the last whose gradient is not zero
  everywhere; what it passed over is recorded);
* the reference, written here and independent of the engine: forward hooks on the chosen modules (the k-th
  call of a module is the layer ``name#k``), ``output.detach().clone()`` at hook time, a tensor hook for the
  gradient, one ``torch.autograd.grad`` of the explained class's logit, then Grad-CAM
  (``sum_c mean_hw(G_c) A_c``) and HiResCAM (``sum_c G_c A_c``) in float64 after the layer's reshape
  (``channels_last`` permuted; ``token``: the first ``prefix_tokens`` tokens dropped, the rest read as the
  ``(h, w)`` grid); the Pearson correlation of the raw maps (before ReLU) per layer and method.

A parity pair is compared where the reference map is not all zero (nor constant) and camanim did not flag
the map ``"cancelled"`` (HiResCAM below the rounding level of its terms before a LayerNorm, shown as zero):
those pairs are counted apart, with the reference's own cancellation level ``max|sum_c G A| / (C eps32 max sum_c |G A|)``.

Each model runs in its own subprocess with a time limit (``--max-seconds``); every finished row is written
to ``<state>/rows/<source>__<name>.json`` (with the model's full layer table) so that a rerun continues
where the last one stopped (``--retry-failed`` reruns the failures). timm families are the modules of
``timm.list_modules()``; each is represented by its smallest model by parameter count (counted on the
``meta`` device, cached in ``<state>/timm_families.json``), preferring models with a classifier head and
leaving out timm's ``test_*`` models (CI runs those).

Usage:
    python benchmarks/zoo.py                       # run what is missing, print the summary
    python benchmarks/zoo.py --only 'resnet|vit'   # a subset (regular expression on "source:name")
    python benchmarks/zoo.py --no-run --write      # summary of the rows so far into benchmarks/RESULTS.md
    python benchmarks/zoo.py --kinds               # the shape audit of the layer kinds (printed)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Zoo: every torchvision classifier and one model per timm family"
DEFAULT_STATE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camanim-bench" / "zoo"
SIZES = (64, 96, 128, 160, 224)
PARITY = 0.9999
METHODS = ("gradcam", "hirescam")
FLOAT32_EPS = 2.0**-23
#: What a failure means, where it was looked into.
WHY_FAILED = {
    "vit_h_14": "632 M parameters at 224x224 (its only size): building it, the dry run, the capture and the "
    "reference did not fit in 600 s on 2 shared cores; no error was raised",
    "crossvit_tiny_240": "CrossViT rescales its input to its own 240 and 224 pixels inside the model, so at the "
    "probe size (64) no output is a grid of the input and the kind rule finds no map; at 240 x 240 its two "
    "patch-embedding convolutions are maps, but its token grids (one per branch, each rescaled) still are not",
}
# Module names or types that would hold windows, attention probabilities or heads if they were kept as maps.
SUSPECT = re.compile(r"attn|attention|softmax|window|partition|qkv|heads|rel_pos|attend", re.I)


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


# ---------------------------------------------------------------------------------------------- model list


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _count_family(module: str) -> list[dict]:
    """Parameter count and head size of every (non-test) timm model of ``module``, built on the meta device."""
    import timm
    import torch

    out = []
    for name in timm.list_models(module=module):
        if name.startswith("test_"):
            continue
        row = {"name": name, "module": module}
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            row["params"] = int(sum(p.numel() for p in m.parameters()))
            row["num_classes"] = int(getattr(m, "num_classes", 0) or 0)
            row["input_size"] = list(getattr(m, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        except Exception as exc:  # noqa: BLE001 - recorded; the family falls back to another model
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(row)
    return out


def timm_families(state: Path) -> dict[str, dict]:
    """``{module: the chosen model's row}``: per timm module, the smallest model (params) with a head."""
    path = state / "timm_families.json"
    if path.exists():
        return json.loads(path.read_text())
    import timm

    fams: dict[str, dict] = {}
    for module in timm.list_modules():
        rows = _count_family(module)
        ok = [r for r in rows if "params" in r]
        if not ok:
            first = rows[0] if rows else {"name": None, "module": module}
            fams[module] = {**first, "candidates": len(rows), "choice": "no model built on meta"}
            continue
        headed = [r for r in ok if r["num_classes"] > 0] or ok
        best = min(headed, key=lambda r: (r["params"], r["name"]))
        fams[module] = {**best, "candidates": len(rows), "choice": "smallest by parameters"}
        print(f"  timm {module}: {best['name']} ({best['params']:,} params, of {len(rows)})", flush=True)
    state.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fams, indent=1))
    return fams


def all_models(state: Path) -> list[tuple[str, str, str]]:
    """``(source, name, family)`` for every model of the zoo."""
    out = [("torchvision", n, "torchvision") for n in torchvision_names()]
    for module, row in sorted(timm_families(state).items()):
        if row.get("name"):
            out.append(("timm", row["name"], module))
    return out


# ---------------------------------------------------------------------------------------------- the child


def build(source: str, name: str):
    import torch

    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def candidate_sizes(source: str, model) -> list[int]:
    sizes = list(SIZES)
    if source == "timm":
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        _, h, w = cfg.get("input_size", (3, 224, 224))
        if h == w and h not in sizes:
            sizes.append(int(h))
    return sizes


def first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "logits"):
        return out.logits
    for v in out:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"no tensor in the model output ({type(out).__name__})")


def choose_size(source: str, model) -> tuple[int, list[str]]:
    """The smallest candidate size the model's forward takes, and why the smaller ones failed."""
    import torch

    tried = []
    for s in candidate_sizes(source, model):
        try:
            with torch.no_grad():
                first_tensor(model(torch.zeros(1, 3, s, s)))
            return s, tried
        except Exception as exc:  # noqa: BLE001 - the next size is tried
            tried.append(
                f"{s}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
            )
    raise RuntimeError("no candidate input size works: " + " | ".join(tried))


def split_name(name: str) -> tuple[str, int]:
    """``"a.b#3"`` -> ``("a.b", 3)``; ``"a.b"`` -> ``("a.b", 1)``."""
    base, sep, k = name.rpartition("#")
    if sep and k.isdigit():
        return base, int(k)
    return name, 1


def to_bchw(t, kind: str, map_size, prefix: int):
    """The reference's own reading of a layer output as ``(B, C, h, w)``, as camanim documents the kinds."""
    if kind == "spatial":
        return t
    if kind == "channels_last":
        return t.permute(0, 3, 1, 2)
    if kind == "token":
        h, w = map_size
        return t[:, prefix:, :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    raise ValueError(f"kind {kind} has no map")


def reference_maps(model, x, layers, target: int) -> tuple[dict, int]:
    """Grad-CAM and HiResCAM (float64, before ReLU) at ``layers`` from an independent copy-at-hook-time capture.

    Returns ``({layer name: {"gradcam": map (h, w), "hirescam": map, "cancel": level} or None}, top-1 class)``;
    ``None`` where no gradient reached the layer.
    """
    import torch

    wanted: dict[tuple[str, int], object] = {split_name(la.name): la for la in layers}
    modules = dict(model.named_modules())
    calls: collections.Counter = collections.Counter()
    store: dict[str, dict] = {}
    handles = []

    def make_hook(module_name: str):
        def hook(_m, _inp, out):
            calls[module_name] += 1
            layer = wanted.get((module_name, calls[module_name]))
            if layer is None or not isinstance(out, torch.Tensor):
                return
            entry = {"A": out.detach().clone()}
            store[layer.name] = entry
            if out.requires_grad:

                def grad_hook(g, entry=entry):
                    entry.setdefault("G", g.detach().clone())

                out.register_hook(grad_hook)

        return hook

    for module_name in {m for m, _ in wanted}:
        handles.append(modules[module_name].register_forward_hook(make_hook(module_name)))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        inp = x.detach().clone().requires_grad_(True)
        out = first_tensor(model(inp))
        top1 = int(out[0].detach().argmax())
        torch.autograd.grad(out[0, target], inp, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    maps: dict[str, dict | None] = {}
    for la in layers:
        entry = store.get(la.name)
        if entry is None or "G" not in entry:
            maps[la.name] = None
            continue
        a = to_bchw(entry["A"], la.kind, la.map_size, la.prefix_tokens).double()
        g = to_bchw(entry["G"], la.kind, la.map_size, la.prefix_tokens).double()
        ga = g * a
        terms = ga.abs().sum(1)[0]
        hires = ga.sum(1)[0]
        maps[la.name] = {
            "gradcam": (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)[0],
            "hirescam": hires,
            # how far below its terms the HiResCAM sum is, in units of the float32 worst-case rounding level
            "cancel": float(hires.abs().max() / (a.shape[1] * FLOAT32_EPS * terms.max()).clamp_min(1e-300)),
        }
    return maps, top1


def softmax_audit(model, x, table) -> list[list]:
    """Layers camanim reads as maps whose output looks like attention probabilities: non-negative and
    summing to one along its last axis or its channel axis (a check by content, independent of shapes)."""
    import torch

    kinds = {la.name: la for la in table if la.kind != "nonspatial"}
    names = {m: n for n, m in model.named_modules() if n}
    calls: collections.Counter = collections.Counter()
    found: list[list] = []

    def hook(module, _inp, out):
        n = names[module]
        calls[n] += 1
        name = n if calls[n] == 1 else f"{n}#{calls[n]}"
        la = kinds.get(name)
        if la is None or not isinstance(out, torch.Tensor) or out.dim() < 3 or not out.is_floating_point():
            return
        t = out.detach().float()
        if float(t.min()) < 0:
            return
        for dim in (-1, 1):
            if t.shape[dim] > 1 and torch.allclose(t.sum(dim), torch.ones(()), atol=1e-3):
                found.append([name, la.type, la.kind, list(t.shape), dim])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def pearson(a, b) -> float:
    a = a.flatten().double()
    b = b.flatten().double()
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def run_one(source: str, name: str, threads: int | None) -> dict:
    """Everything measured for one model (runs in the child process)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import camanim
    from camanim.compute.layers import default_layers, list_layers
    from camanim.compute.models import wrap_model

    row: dict = {"source": source, "name": name, "ok": False, "stage": "build", "camanim": camanim_source()}
    t0 = time.perf_counter()
    model = build(source, name)
    row["build_s"] = time.perf_counter() - t0
    row["params"] = int(sum(p.numel() for p in model.parameters()))
    row["stage"] = "input size"
    size, tried = choose_size(source, model)
    row["size"] = size
    row["smaller_sizes_failed"] = tried
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g)
    lm = wrap_model(model, name=f"{source}:{name}")

    row["stage"] = "list_layers"
    t = time.perf_counter()
    table = list_layers(lm.model, x, cache=False)
    row["layers_s"] = time.perf_counter() - t
    list_layers(lm.model, x)  # fills the cache the way explain() would, untimed
    pool = default_layers(table)
    row["n_layers"] = len(table)
    row["kinds"] = dict(collections.Counter(la.kind for la in table))
    row["swept"] = len(pool)
    row["swept_kinds"] = dict(collections.Counter(la.kind for la in pool))
    row["same_as"] = sum(la.same_as is not None for la in table)
    row["table"] = [
        [
            la.name,
            la.type,
            la.kind,
            list(la.shape),
            list(la.map_size) if la.map_size else None,
            la.prefix_tokens,
        ]
        for la in table
    ]

    row["stage"] = "explain"
    t = time.perf_counter()
    ex = camanim.explain(lm, x, methods=",".join(METHODS), layers=["first", "middle", "last"])
    row["explain_s"] = time.perf_counter() - t
    row["chosen"] = [la.name for la in ex.chosen]
    row["chosen_kinds"] = [la.kind for la in ex.chosen]
    row["chosen_shapes"] = [list(la.shape) for la in ex.chosen]
    row["passed_over"] = [la.name for la, _ in ex.passed_over]
    row["target"] = int(ex.targets[0])
    row["flags"] = {m: {k: list(v) for k, v in ex.flags[m].items() if v} for m in ex.methods}

    row["stage"] = "reference"
    t = time.perf_counter()
    ref, top1 = reference_maps(model, x, list(ex.chosen), ex.targets[0])
    row["reference_s"] = time.perf_counter() - t
    row["reference_top1"] = top1
    parity = []
    for la in ex.chosen:
        for m in METHODS:
            ours = ex.raw(m, la.name)[0]
            flags = list(ex.flags[m].get(la.name, ()))
            entry = {"layer": la.name, "method": m, "flags": flags}
            r = ref[la.name]
            if r is None:
                entry["status"] = (
                    "no_gradient (reference)" if "no_gradient" in flags else "MISMATCH: no reference gradient"
                )
                parity.append(entry)
                continue
            rm = r[m]
            entry["ref_absmax"] = float(rm.abs().max())
            if m == "hirescam":
                entry["cancel_level"] = r["cancel"]
            if tuple(ours.shape) != tuple(rm.shape):
                entry["status"] = f"MISMATCH: shape {list(ours.shape)} vs reference {list(rm.shape)}"
            elif "cancelled" in flags:
                entry["status"] = "cancelled"
            elif entry["ref_absmax"] == 0:
                entry["status"] = "reference zero"
            elif float(rm.max() - rm.min()) <= 1e-12 * entry["ref_absmax"]:
                entry["status"] = "reference flat"
            else:
                entry["r"] = pearson(ours, rm)
                entry["status"] = "ok" if entry["r"] >= PARITY else "MISMATCH: r below 0.9999"
            parity.append(entry)
    row["parity"] = parity
    row["stage"] = "softmax audit"
    row["softmax_like"] = softmax_audit(model, x, table)
    compared = [p["r"] for p in parity if "r" in p]
    row["parity_min"] = min(compared) if compared else None
    row["ok"] = True
    row["stage"] = "done"
    row["total_s"] = time.perf_counter() - t0
    return row


def child_main(source: str, name: str, out: Path, threads: int | None) -> None:
    row: dict = {"source": source, "name": name, "ok": False}
    try:
        row = run_one(source, name, threads)
    except BaseException as exc:  # noqa: BLE001 - the row records it
        row.setdefault("stage", "?")
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        row["traceback"] = traceback.format_exc()[-3000:]
    out.write_text(json.dumps(row, default=str))


# ---------------------------------------------------------------------------------------------- driver


def row_path(state: Path, source: str, name: str) -> Path:
    return state / "rows" / f"{source}__{name}.json"


def run_all(models, args) -> None:
    (args.state / "rows").mkdir(parents=True, exist_ok=True)
    todo = []
    for source, name, family in models:
        p = row_path(args.state, source, name)
        if p.exists():
            old = json.loads(p.read_text())
            if old.get("ok") or not args.retry_failed:
                continue
        todo.append((source, name, family))
    print(f"{len(models)} models, {len(todo)} to run", flush=True)
    for i, (source, name, family) in enumerate(todo, 1):
        p = row_path(args.state, source, name)
        tmp = p.with_suffix(".partial")
        tmp.unlink(missing_ok=True)
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", source, name, str(tmp)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds)
            if tmp.exists():
                row = json.loads(tmp.read_text())
            else:
                tail = (proc.stderr or proc.stdout).strip()[-400:]
                row = {
                    "source": source,
                    "name": name,
                    "ok": False,
                    "error": f"child exit {proc.returncode}: {tail}",
                }
        except subprocess.TimeoutExpired:
            row = {
                "source": source,
                "name": name,
                "ok": False,
                "error": f"timeout after {args.max_seconds} s",
            }
        row["family"] = family
        row["wall_s"] = time.perf_counter() - t
        row["load"] = [load0, os.getloadavg()[0]]
        row["date"] = datetime.date.today().isoformat()
        p.write_text(json.dumps(row, default=str))
        tmp.unlink(missing_ok=True)
        status = "ok" if row.get("ok") else f"FAILED ({row.get('error', '')[:120]})"
        pm = row.get("parity_min")
        print(
            f"[{i}/{len(todo)}] {source}:{name} {status} {row['wall_s']:.0f}s"
            + (f" parity_min={pm:.6f}" if pm is not None else ""),
            flush=True,
        )


def load_rows(state: Path, models) -> list[dict]:
    rows = []
    for source, name, family in models:
        p = row_path(state, source, name)
        if p.exists():
            row = json.loads(p.read_text())
            row.setdefault("family", family)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- audit


def kind_audit(rows: list[dict]) -> dict:
    """Layers whose kind deserves a look: maps from modules named or typed like attention/windows, and
    4-D or 3-D nonspatial outputs with the batch axis (1x1 maps left out); plus, per module type, the kinds
    it was given."""
    suspects, nonspatial_nd, by_type = [], [], collections.defaultdict(collections.Counter)
    for row in rows:
        for name, typ, kind, shape, map_size, prefix in row.get("table", []):
            by_type[typ][kind] += 1
            model = f"{row['source']}:{row['name']}"
            if kind != "nonspatial" and (SUSPECT.search(name.rsplit(".", 1)[-1]) or SUSPECT.search(typ)):
                suspects.append((model, row.get("size"), name, typ, kind, shape, map_size, prefix))
            trivial = len(shape) == 4 and (shape[2] * shape[3] == 1 or shape[1] * shape[2] == 1)
            if kind == "nonspatial" and len(shape) in (3, 4) and shape[0] == 1 and not trivial:
                nonspatial_nd.append((model, row.get("size"), name, typ, shape))
    return {"suspects": suspects, "nonspatial_nd": nonspatial_nd, "by_type": by_type}


def print_audit(rows: list[dict], sample: int = 60) -> None:
    import random

    audit = kind_audit(rows)
    print(f"\n== maps from modules named/typed like attention or windows: {len(audit['suspects'])}")
    for s in audit["suspects"]:
        print("  ", s)
    nd = audit["nonspatial_nd"]
    print(
        f"\n== nonspatial 3-D/4-D outputs with the batch axis: {len(nd)}; a sample of {min(sample, len(nd))}"
    )
    for s in random.Random(0).sample(nd, min(sample, len(nd))):
        print("  ", s)
    print("\n== kinds per module type (types given more than one kind)")
    for typ, c in sorted(audit["by_type"].items()):
        if len(c) > 1:
            print(f"   {typ}: {dict(c)}")


# ---------------------------------------------------------------------------------------------- report


def _fmt_kinds(kinds: dict) -> str:
    order = ("spatial", "channels_last", "token", "nonspatial")
    return " / ".join(str(kinds.get(k, 0)) for k in order)


def _parity_note(row: dict) -> str:
    notes = collections.Counter()
    for p in row.get("parity", []):
        if p["status"] != "ok":
            notes[f"{p['method']} {p['status']}"] += 1
    return "; ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(notes.items()))


def summary(rows: list[dict], expected: int) -> str:
    ok = [r for r in rows if r.get("ok")]
    failed = [r for r in rows if not r.get("ok")]
    pairs = [p for r in ok for p in r.get("parity", [])]
    compared = [p for p in pairs if "r" in p]
    below = [p for p in compared if p["r"] < PARITY]
    statuses = collections.Counter(p["status"] for p in pairs)
    mism = [(r, p) for r in ok for p in r.get("parity", []) if p["status"].startswith("MISMATCH")]
    loads = [v for r in rows for v in r.get("load", [])]
    audit = kind_audit(rows)
    lines = [
        SECTION,
        "",
        f"`python benchmarks/zoo.py --write` ({datetime.date.today().isoformat()}): {len(rows)} of {expected} "
        f"models recorded, **{len(ok)} ran, {len(failed)} failed**; "
        + ", ".join(sorted({r.get("camanim", "camanim ?") for r in rows}))
        + f". Machine: {os.cpu_count()} shared CPU cores; "
        + (f"1-min load average {min(loads):.1f} to {max(loads):.1f} during the runs. " if loads else "")
        + "Random weights (seed 0), eval mode, a random input `(1, 3, s, s)` at the smallest size the model "
        "takes among 64, 96, 128, 160, 224 (timm: and its own `input_size`); each model in its own "
        'subprocess. Seconds: `list_layers` (the dry run, uncached) and `explain(methods="gradcam,hirescam", '
        'layers=["first", "middle", "last"])`.',
        "",
        "Parity: camanim's raw maps against a reference written in the benchmark (forward hooks on the chosen "
        "modules, `output.detach().clone()` at hook time, a tensor hook for the gradient, one "
        "`autograd.grad` of the explained logit, Grad-CAM and HiResCAM in float64 after the kind's reshape), "
        f"Pearson r per (model, layer, method) before ReLU. **{len(compared)} pairs compared, "
        f"{len(below)} below {PARITY}**"
        + (f", min r = {min(p['r'] for p in compared):.6f}" if compared else "")
        + ". Not compared: "
        + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items()) if k != "ok")
        + " (`cancelled`: HiResCAM at a layer feeding a LayerNorm, zero by invariance and flagged by camanim; the "
        "reference's own sum is there within "
        + (
            f"{max(p.get('cancel_level', 0) for p in pairs if p['status'] == 'cancelled'):.2g}"
            if statuses.get("cancelled")
            else "n/a"
        )
        + "x the float32 rounding level of its terms; `reference zero`: every gradient there is zero, e.g. a "
        "final norm reaching the head only through the class token).",
        "",
        f"Kinds: {len(audit['suspects'])} layers named or typed like attention/windows "
        "(`attn|attention|softmax|window|partition|qkv|heads|rel_pos|attend`) were kept as maps; "
        "see the shape audit below. By content (rows with the audit: "
        f"{sum('softmax_like' in r for r in rows)}): "
        f"{sum(len(r.get('softmax_like') or ()) for r in rows)} layers kept as maps hold rows of probabilities "
        "(non-negative, summing to one along an axis)"
        + (
            ": " + ", ".join(sorted({f"{r['source']}:{r['name']}" for r in rows if r.get("softmax_like")}))
            if any(r.get("softmax_like") for r in rows)
            else ""
        )
        + ".",
        "",
    ]
    if mism:
        lines += ["Mismatches:", ""]
        lines += [
            f"- {r['source']}:{r['name']} `{p['layer']}` {p['method']}: {p['status']}"
            + (f" (r = {p['r']:.6f})" if "r" in p else "")
            for r, p in mism
        ]
        lines.append("")
    if failed:
        lines += ["Failures:", ""]
        lines += [
            f"- {r['source']}:{r['name']} (stage {r.get('stage', '?')}): {r.get('error', '')[:300]}"
            + (f". {WHY_FAILED[r['name']]}" if r["name"] in WHY_FAILED else "")
            for r in failed
        ]
        lines.append("")
    lines += [
        "| model | family | params | input | layers: spatial / channels_last / token / nonspatial | swept "
        "| list_layers [s] | explain [s] | parity min r | not compared / notes |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        model = f"{r['source']}:{r['name']}"
        if not r.get("ok"):
            lines.append(
                f"| {model} | {r.get('family', '')} | {r.get('params', '')} | {r.get('size', '')} | "
                f"FAILED | | | | | {r.get('error', '')[:120].replace('|', '/')} |"
            )
            continue
        pm = r.get("parity_min")
        note = _parity_note(r)
        if r.get("passed_over"):
            note = (note + "; " if note else "") + f"last passed over {len(r['passed_over'])}"
        lines.append(
            f"| {model} | {r['family']} | {r['params']:,} | {r['size']} | {_fmt_kinds(r['kinds'])} | {r['swept']} "
            f"| {r['layers_s']:.2f} | {r['explain_s']:.2f} | {'n/a' if pm is None else f'{pm:.6f}'} | {note} |"
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="folder of finished rows (resumable)")
    p.add_argument("--only", default=None, help="regular expression on 'source:name'")
    p.add_argument("--max-seconds", type=float, default=900, help="time limit per model")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each child")
    p.add_argument("--retry-failed", action="store_true", help="run failed rows again")
    p.add_argument("--no-run", action="store_true", help="only summarise the rows recorded so far")
    p.add_argument("--kinds", action="store_true", help="print the shape audit of the layer kinds")
    p.add_argument("--write", action="store_true", help=f"replace the zoo section of {RESULTS}")
    p.add_argument("--child", nargs=3, metavar=("SOURCE", "NAME", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1], Path(args.child[2]), args.threads)
        return
    models = all_models(args.state)
    if args.only:
        models = [m for m in models if re.search(args.only, f"{m[0]}:{m[1]}")]
    if not args.no_run:
        run_all(models, args)
    rows = load_rows(args.state, models)
    text = summary(rows, len(models))
    print("\n" + text)
    if args.kinds:
        print_audit(rows)
    if args.write:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
