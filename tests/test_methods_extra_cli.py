"""``camanim animate --method M --layers all`` for every method from grad-cam 1.5.7 and torchcam 0.5, on tiny
timm networks (random weights, 32x32 inputs), and ``camanim explain``'s method options.

``animate`` passes no method options yet, so the sampling methods run with smaller defaults here (one sample,
two SESS scales: the class attributes the options default to); their cost with the real defaults is what
``camanim explain --help`` and the README state, and ``benchmarks/bench_methods.py`` measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camanim.cli import main
from camanim.compute.methods import sampling, scale, score

CNN = ["--model", "timm:test_efficientnet", "--weights", "none", "--num-classes", "3", "--input-size", "32"]
VIT = ["--model", "timm:test_vit", "--weights", "none", "--num-classes", "3", "--input-size", "48"]
RENDER = ["--size", "16", "--format", "frames", "--layout", "local"]
CNN_METHODS = (
    "cam", "fem", "segeigencam", "kpcacam", "dff", "fullgrad", "smoothgradcam++", "sscam", "iscam",
    "refinecam", "sess",
)  # fmt: skip


@pytest.fixture
def small_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score.SSCAM, "default_samples", 1)
    monkeypatch.setattr(score.ISCAM, "default_samples", 1)
    monkeypatch.setattr(sampling.SmoothGradCAMPlusPlus, "default_samples", 1)
    monkeypatch.setattr(scale.SESS, "default_num_scales", 2)


def _frames(out: Path, method: str) -> int:
    return len(list((out / f"{method}_local_frames").glob("*.png")))


@pytest.mark.usefixtures("small_defaults")
@pytest.mark.parametrize("method", CNN_METHODS)
def test_animate_every_layer(tmp_path: Path, method: str) -> None:
    out = tmp_path / method.replace("+", "p")
    size = ["--input-size", "48"] if method == "cam" else []  # at 32x32 the head's layer is 1x1: no map
    args = ["--quiet", "animate", *CNN, *size, *RENDER, "--layers", "all", "--method", method]
    assert main([*args, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(manifest["chosen_layers"])
    assert n > 10 and _frames(out, method) == n
    assert manifest["methods"][0]["cost"] in ("one_pass", "one_pass_quadratic", "multi_pass")


def test_animate_legrad_on_a_vit_and_its_error_on_a_cnn(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "legrad"
    assert (
        main(
            ["--quiet", "animate", *VIT, *RENDER, "--layers", "all", "--method", "legrad", "--out", str(out)]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert _frames(out, "legrad") == len(manifest["chosen_layers"]) > 10
    capsys.readouterr()
    args = ["--quiet", "animate", *CNN, *RENDER, "--method", "legrad", "--out", str(tmp_path / "no")]
    assert main(args) == 2
    assert "self-attention" in capsys.readouterr().err


def test_explain_method_options_and_help(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["explain", "--help"]) == 0
    text = capsys.readouterr().out
    for name in CNN_METHODS + ("legrad",):
        assert f"\n  {name} " in text
    assert "one_pass_quadratic" in text and "--samples" in text and "--option KEY=VALUE" in text
    base = ["--quiet", "explain", *CNN, "--layers", "last", "--no-overlays", "--samples", "2", "--seed", "4"]
    out1, out2 = tmp_path / "a", tmp_path / "b"
    for out in (out1, out2):
        args = [*base, "--method", "smoothgradcam++,kpcacam", "--option", "kernel=rbf", "--out", str(out)]
        assert main(args) == 0
    assert (out1 / "maps.npz").read_bytes() == (out2 / "maps.npz").read_bytes()  # seeded: the same maps
    assert main([*base, "--method", "kpcacam", "--option", "kernel", "--out", str(tmp_path / "c")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*base, "--method", "kpcacam", "--option", "kernel=nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown kernel" in capsys.readouterr().err
