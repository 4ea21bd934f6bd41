"""The methods' options (seed, grad-cam's smoothings, per-method options) reach ``camanim animate`` as they
reach ``camanim explain``, are recorded in the manifest, and reproduce the maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import camanim
from camanim.cli import main
from camanim.compute.models import load_model

MODEL = ["--model", "timm:test_efficientnet", "--weights", "none", "--num-classes", "3", "--input-size", "48"]


def _maps(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "maps.npz") as z:
        return {k: z[k] for k in z.files}


def _animate(out: Path, *extra: str) -> dict:
    argv = ["animate", *MODEL, "--method", "smoothgradcam++", "--layers", "2", "--format", "frames"]
    assert main([*argv, "--size", "16", "--out", str(out), "--quiet", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_animate_takes_the_method_options_records_and_reproduces_them(tmp_path: Path) -> None:
    manifest = _animate(tmp_path / "a", "--samples", "2", "--seed", "3", "--aug-smooth")
    assert manifest["method_options"] == {
        "seed": 3, "eigen_smooth": False, "aug_smooth": True, "options": {"samples": 2},
    }  # fmt: skip
    lm = load_model("timm:test_efficientnet", "none", num_classes=3)
    ex = camanim.explain(
        lm, "chelsea", methods="smoothgradcam++", layers=2, input_size=48, seed=3, aug_smooth=True,
        options={"samples": 2},
    )  # fmt: skip
    ours = _maps(tmp_path / "a")
    assert ours and all(
        np.allclose(ours[f"smoothgradcam++/{name}"], ex.raw("smoothgradcam++", name).numpy(), atol=1e-6)
        for name in (la.name for la in ex.chosen)
    )
    _animate(tmp_path / "b", "--samples", "2", "--seed", "4", "--aug-smooth")
    other = _maps(tmp_path / "b")
    assert any(not np.allclose(ours[k], other[k]) for k in ours), "another seed drew the same noise"


def test_explain_records_default_method_options(tmp_path: Path) -> None:
    out = tmp_path / "e"
    assert main(["explain", *MODEL, "--method", "gradcam", "--layers", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_options"] == {
        "seed": 0,
        "eigen_smooth": False,
        "aug_smooth": False,
        "options": {},
    }


def test_bad_method_option_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["animate", *MODEL, "--samples", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "--samples" in err[-1] and not (tmp_path / "x").exists()
