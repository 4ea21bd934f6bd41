"""One option for the input size, in every command and pipeline: N, HxW or the image's native size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import camanim
import camanim.cli.commands
from camanim.cli import main
from camanim.compute.images import load_image
from camanim.compute.models import Preprocessing, parse_input_size, wrap_model
from camanim.errors import OptionError

from .conftest import TinyCNN


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return wrap_model(TinyCNN(classes=5).eval(), preprocessing=Preprocessing(size=(48, 48)))


def test_parse_input_size():
    assert parse_input_size(None) is None and parse_input_size("default") is None
    assert parse_input_size(64) == (64, 64) and parse_input_size("480x640") == (480, 640)
    assert parse_input_size((32, 40)) == (32, 40) and parse_input_size(" Native ") == "native"
    for bad in ("3", "0x64", "abc", "64x64x3", (7, 64), 100000):
        with pytest.raises(OptionError):
            parse_input_size(bad)


def test_native_keeps_the_image_as_it_is(tiny):
    img = load_image("coffee")
    w, h = img.image.size
    ex = camanim.explain(tiny, img, layers="last", input_size="native")
    assert tuple(ex.input.shape[-2:]) == (h, w) and ex.display.shape[1:3] == (h, w)
    expected = np.asarray(img.image.convert("RGB"), np.float32) / 255.0
    pixels = ex.preprocessing.denormalize(ex.input[0]).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pixels, expected, atol=1e-5)  # no resampling at all
    assert ex.preprocessing.size == (h, w) and ex.preprocessing.resize == "none"
    assert ex.image_info["input_size"] == f"{h}x{w} (native)"


def test_a_given_size_everywhere(tiny):
    ex = camanim.explain(tiny, "astronaut", layers="last", input_size="64x80")
    assert tuple(ex.input.shape[-2:]) == (64, 80) and ex.preprocessing.size == (64, 80)
    anim = camanim.animate(tiny, "astronaut", layers="last", input_size=72)
    assert tuple(anim.explanation.input.shape[-2:]) == (72, 72)
    res = camanim.ybroad(tiny, "astronaut", layers="last", percentages=(50,), input_size=40)
    assert tuple(res.explanation.input.shape[-2:]) == (40, 40)
    fm = camanim.fmgcam(tiny, "astronaut", k=2, input_size=56)
    assert tuple(fm.explanation.input.shape[-2:]) == (56, 56)
    cmp = camanim.compare(tiny, "astronaut", methods="gradcam", layers="last", input_size=60)
    assert tuple(cmp.explanation.input.shape[-2:]) == (60, 60)
    with pytest.raises(OptionError, match="preprocessed tensor"):
        camanim.explain(tiny, torch.zeros(1, 3, 48, 48), input_size=64)


def test_cli_records_the_input_size(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(camanim.cli.commands, "load_model", lambda *a, **k: tiny)
    out = tmp_path / "a"
    args = ["--quiet", "animate", "--image", "coffee", "--layers", "2", "--input-size", "native"]
    assert main([*args, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    h, w = load_image("coffee").image.size[::-1]
    assert manifest["input"]["shape"] == [1, 3, h, w]
    assert manifest["model"]["preprocessing"]["resize"] == "none"
    assert manifest["image"]["input_size"] == f"{h}x{w} (native)"
    assert main(["--quiet", *args[1:-1], "12x", "--out", str(tmp_path / "b")]) == 2
