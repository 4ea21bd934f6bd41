"""Every method from grad-cam 1.5.7 and torchcam 0.5 in every command: ``explain``, ``animate``, ``road``,
``compare``, ``fmgcam --base`` and ``study``, through the CLI entry point on tiny timm networks (random
weights, 48x48 inputs, the last layers).

The sampling methods run with smaller defaults here (one sample, two SESS scales), as in
``test_methods_extra_cli.py``. ``fmgcam --base`` takes every class-discriminative method; the others are
refused with one ``camanim: error:`` line that names the accepted methods.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camanim.cli import main
from camanim.compute.methods import method_class, sampling, scale, score

CNN = ["--model", "timm:test_efficientnet", "--weights", "none", "--num-classes", "3", "--input-size", "48"]
VIT = ["--model", "timm:test_vit", "--weights", "none", "--num-classes", "3", "--input-size", "48"]
METHODS = (
    "cam", "fem", "kpcacam", "shapleycam", "finercam", "refinecam", "segeigencam", "sess", "dff",
    "guidedbackprop", "guidedgradcam", "fullgrad", "smoothgradcam++", "sscam", "iscam", "legrad",
)  # fmt: skip
COMMANDS = ("explain", "animate", "road", "compare", "fmgcam", "study")
LAYERS = "2"  # the last two layers (bn2.drop and bn2.act: the head's input, where CAM is defined)


@pytest.fixture(autouse=True)
def small_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score.SSCAM, "default_samples", 1)
    monkeypatch.setattr(score.ISCAM, "default_samples", 1)
    monkeypatch.setattr(sampling.SmoothGradCAMPlusPlus, "default_samples", 1)
    monkeypatch.setattr(scale.SESS, "default_num_scales", 2)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _maps(out: Path, method: str) -> dict[str, np.ndarray]:
    with np.load(out / "maps.npz") as z:
        found = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{method}/")}
    assert found, f"no {method} maps in {sorted(np.load(out / 'maps.npz').files)}"
    assert all(np.isfinite(m).all() for m in found.values())
    return found


def _manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in manifest.get("files", {}):
        assert (out / rel).exists(), rel
    return manifest


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("command", COMMANDS)
def test_command_with_method(
    command: str, method: str, tmp_path: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    model = VIT if method == "legrad" else CNN
    layers = "1" if method in ("sscam", "iscam") else LAYERS  # per-channel scoring: one layer is enough
    out = tmp_path / "out"
    args = {
        "explain": ["explain", *model, "--layers", layers, "--method", method, "--no-overlays"],
        "animate": ["animate", *model, "--layers", layers, "--method", method, "--format", "frames",
                    "--size", "16", "--layout", "local"],
        "road": ["road", *model, "--layers", layers, "--method", method, "--percentages", "50"],
        "compare": ["compare", *model, "--layers", "last", "--method", method],
        "fmgcam": ["fmgcam", *model, "--layers", "last", "--top-k", "2", "--base", method, "--no-panels"],
        "study": ["study", "--images", str(images), "--models", model[1], "--weights", "none",
                  "--num-classes", "3", "--input-size", "48", "--layers", layers, "--method", method,
                  "--percentages", "50", "--no-figures"],
    }[command]  # fmt: skip
    if command == "compare" and method == "legrad":
        args[args.index("last")] = "blocks.1"  # compare's default pool is the convolutions: name a block
    if command == "compare" and method == "cam":
        args[args.index("last")] = "bn2.act"  # the only layer where CAM is defined
    if command == "fmgcam" and method == "legrad":
        args[args.index("last")] = "blocks.1"
    code = main(["--quiet", *args, "--out", str(out)] if command in ("animate", "road", "study") else
                [*args, "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    if command == "fmgcam" and not method_class(method).class_discriminative:
        assert code == 2
        lines = [ln for ln in err.splitlines() if ln.startswith("camanim: error:")]
        assert len(lines) == 1 and "class-discriminative" in lines[0] and "Accepted: gradcam," in lines[0]
        return
    assert code == 0, err
    if command == "study":
        rows = list(csv.DictReader((out / "summary.csv").open()))
        assert len(rows) == 2 and {r["method"] for r in rows} == {method}
        assert all(math.isfinite(float(r["max_ybroad"])) for r in rows)
        return
    manifest = _manifest(out)
    chosen = manifest["chosen_layers"]
    if command == "fmgcam":
        maps = _maps(out, "fmgcam")
        assert set(maps) == set(chosen) and all(m.shape[0] == 2 for m in maps.values())
        return
    maps = _maps(out, method)
    assert set(maps) == set(chosen)
    if command in ("explain", "animate", "road"):
        assert len(chosen) == int(layers)
    if command == "animate":
        assert len(list((out / f"{method}_local_frames").glob("*.png"))) == len(chosen)
    elif command == "road":
        rows = list(csv.DictReader((out / "ybroad.csv").open()))
        assert [r["name"] for r in rows] == chosen
        assert all(math.isfinite(float(r["road"])) for r in rows)
    elif command == "compare":
        assert (out / "compare.png").stat().st_size > 0
