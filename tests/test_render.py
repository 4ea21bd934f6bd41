"""Colour tables, overlays, resizing, frame composition, grids and PNG output."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from camanim.compute.normalize import Range
from camanim.compute.resize import resize_map, resize_maps
from camanim.errors import UnknownNameError
from camanim.outputs.render import (
    FrameComposer,
    FrameStyle,
    apply_colormap,
    colormap_lut,
    compose_frame,
    grid,
    overlay,
    overlay_batch,
    save_png,
)


def _image(h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["jet", "viridis", "inferno_r"])
def test_lut_matches_matplotlib_at_both_ends(name: str) -> None:
    lut = colormap_lut(name)
    cmap = matplotlib.colormaps[name]
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[0], cmap(0.0, bytes=True)[:3])
    np.testing.assert_array_equal(lut[-1], cmap(1.0, bytes=True)[:3])
    assert colormap_lut(name) is lut  # cached
    assert not lut.flags.writeable


def test_apply_colormap_equals_matplotlib() -> None:
    m = np.random.default_rng(1).random((17, 23)).astype(np.float32)
    m[0, 0], m[0, 1] = 0.0, 1.0
    expected = matplotlib.colormaps["jet"](m, bytes=True)[..., :3]
    np.testing.assert_array_equal(apply_colormap(m, colormap_lut("jet")), expected)


def test_unknown_colormap_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError) as info:
        colormap_lut("jte")
    assert "jet" in info.value.matches
    assert "colour map" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_overlay_alpha_endpoints() -> None:
    img = _image()
    m = np.random.default_rng(2).random(img.shape[:2]).astype(np.float32)
    lut = colormap_lut("jet")
    np.testing.assert_array_equal(overlay(img, m, lut, alpha=0.0), img)
    np.testing.assert_array_equal(overlay(img, m, lut, alpha=1.0), apply_colormap(m, lut))
    half = overlay(img, m, lut, alpha=0.5).astype(int)
    mean = (img.astype(int) + apply_colormap(m, lut).astype(int)) / 2
    assert np.abs(half - mean).max() <= 1


def test_overlay_batch_equals_one_by_one_and_accepts_torch() -> None:
    img = _image()
    maps = np.random.default_rng(3).random((4, *img.shape[:2])).astype(np.float32)
    batch = overlay_batch(img, torch.from_numpy(maps), "viridis", alpha=0.3)
    assert batch.shape == (4, *img.shape) and batch.dtype == np.uint8
    for k in range(4):
        np.testing.assert_array_equal(batch[k], overlay(img, maps[k], "viridis", alpha=0.3))


def test_overlay_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="resize_map"):
        overlay(_image(), np.zeros((7, 7)), "jet")


def test_resize_map_bilinear_numpy_and_torch() -> None:
    m = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = resize_map(m, (6, 8))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (6, 8)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(m).float()[None, None], size=(6, 8), mode="bilinear", align_corners=False
    )[0, 0]
    np.testing.assert_allclose(out, expected.numpy())
    t = resize_map(torch.from_numpy(m), (6, 8))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    stack = resize_maps(np.stack([m, 2 * m]), (6, 8))
    np.testing.assert_allclose(stack[1], 2 * out, rtol=1e-6)
    same = resize_map(m, (3, 4))
    same[0, 0] = 99  # a copy, never a view of the input
    assert m[0, 0] == 0


def test_composed_frame_is_even_and_holds_tiles() -> None:
    h, w = 223, 111  # odd on purpose
    a, b = _image(h, w, 4), _image(h, w, 5)
    lut = colormap_lut("jet")
    frame = compose_frame(
        [a, b],
        ["local: layer range", "global"],
        ["layer 3/10 features.3", "Conv2d 56x56", "gradcam", "tabby p=0.91"],
        colorbars=[(Range(0.0, 1.5), lut), (Range(0.0, 4.0), lut)],
        progress=0.3,
        progress_curve=np.array([0.1, np.nan, 0.4, 0.2]),
    )
    assert frame.dtype == np.uint8 and frame.ndim == 3
    assert frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0
    style = FrameStyle()
    composer = FrameComposer((h, w), ["local: layer range", "global"], [lut, lut])
    y, xa, xb = composer.tile_y, composer.tile_x[0], composer.tile_x[1]
    assert xa == style.padding and xb == style.padding + w + style.gap
    np.testing.assert_array_equal(frame[y : y + h, xa : xa + w], a)
    np.testing.assert_array_equal(frame[y : y + h, xb : xb + w], b)


def test_composer_draws_text_progress_and_colorbar() -> None:
    tile = np.zeros((64, 64, 3), np.uint8)
    lut = colormap_lut("jet")
    comp = FrameComposer((64, 64), ["a", "b"], [lut, lut])
    blank = comp([tile, tile], [], None, None)
    full = comp([tile, tile], ["layer 1/2"], [Range(0, 1), Range(0, 2)], 1.0)
    assert full.shape == blank.shape
    caption = slice(comp.caption_y, comp.caption_y + comp.text.line_height)
    assert (blank[caption] == 255).all() and (full[caption] < 128).any()  # dark text on white
    strip = slice(comp.strip_y, comp.strip_y + comp.strip_h)
    assert not np.array_equal(blank[strip], full[strip])
    bar = full[comp.bar_y, comp.tile_x[0] : comp.tile_x[0] + 64]
    np.testing.assert_array_equal(bar[0], lut[0])
    np.testing.assert_array_equal(bar[-1], lut[-1])
    with pytest.raises(ValueError):
        comp([tile], [], None, None)


def test_composer_resizes_tiles_to_style_size() -> None:
    comp = FrameComposer(
        (32, 32), ["x"], style=FrameStyle(tile_size=(64, 48), colorbar=False, progress=False)
    )
    frame = comp([np.full((32, 32, 3), 77, np.uint8)], ["c"])
    y, x = comp.tile_y, comp.tile_x[0]
    assert (frame[y : y + 64, x : x + 48] == 77).all()
    assert frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0


def test_grid_places_tiles_and_is_even() -> None:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]  # never produced by grey text on white
    t1, t2, t3 = (np.full((20, 30, 3), c, np.uint8) for c in colours)
    out = grid([[t1, t2], [t3, None]], ["gradcam", "hirescam"], ["local", "global"], "title")
    assert out.shape[0] % 2 == 0 and out.shape[1] % 2 == 0
    boxes = []
    for c in colours:
        ys, xs = np.nonzero((out == c).all(axis=2))
        assert ys.size == 20 * 30  # whole tile present, nothing drawn over it
        boxes.append((ys.min(), xs.min()))
    assert boxes[0][0] == boxes[1][0] < boxes[2][0]  # t1, t2 on one row, t3 below
    assert boxes[0][1] == boxes[2][1] < boxes[1][1]  # t1, t3 in one column, t2 right of them
    with pytest.raises(ValueError):
        grid([[t1]], row_titles=["a", "b"])


def test_save_png_round_trip_atomic(tmp_path: Path) -> None:
    img = _image()
    path = save_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    assert os.listdir(tmp_path) == ["a.png"]  # no temporary file left over
    with pytest.raises(ValueError):
        save_png(tmp_path / "b.png", img.astype(np.float32))
    assert os.listdir(tmp_path) == ["a.png"]
