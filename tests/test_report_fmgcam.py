"""report.html of an FM-G-CAM animation bundle: the viewer fuses the stored base maps again and draws every
kept layer as the animation does, each class in its hue, with the class legend from the manifest."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camanim.animation import Animation, animate
from camanim.methods.fused import fmgcam_sweep, fused_overlay
from camanim.report import render_report, write_report
from tests.conftest import TinyCNN, synthetic_batch
from tests.test_report import _artifacts, _json_block, browser  # noqa: F401 (browser: a fixture)

K = 3


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyCNN(classes=5).eval(), synthetic_batch(1, seed=3)[0]


@pytest.fixture(scope="module")
def fm_bundle(tiny, tmp_path_factory) -> tuple[Path, Animation]:
    """An FM-G-CAM animation bundle (top 3 classes) of a tiny CNN, with its report."""
    model, x = tiny
    anim = animate(model, x, methods="fmgcam", top_k=K, alpha=0.6)
    out = anim.save(tmp_path_factory.mktemp("fmgcam") / "bundle")
    write_report(out)
    return out, anim


def _sheet(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def _tiles(sheets: dict, data: dict, norm: str) -> np.ndarray:
    """Every tile of ``norm``, in frame order, cut from the sprite sheets: ``(n, h, w, 3)``."""
    h, w = data["tile"]
    per, cols = data["perSheet"], data["columns"]
    out = []
    for k in range(len(data["frames"])):
        sheet = _sheet(sheets["fmgcam"][norm][k // per])
        r, c = divmod(k % per, cols)
        out.append(sheet[r * h : (r + 1) * h, c * w : (c + 1) * w])
    return np.stack(out)


def test_one_tile_per_kept_layer_and_normalisation(fm_bundle) -> None:
    out, anim = fm_bundle
    page = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    data = _json_block(page, "report-data")
    sheets = _json_block(page, "report-frames")
    n = len(anim.layers)
    assert [f["name"] for f in data["frames"]] == [la.name for la in anim.layers]
    assert [f["layer"] for f in manifest["animation"]["per_frame"]] == [la.name for la in anim.layers]
    assert data["methods"] == ["fmgcam"] and data["norms"] == ["local", "global"]
    assert list(sheets) == ["fmgcam"] and list(sheets["fmgcam"]) == ["local", "global"]
    h, w = data["tile"]
    cols = data["columns"]
    for norm in ("local", "global"):
        assert len(sheets["fmgcam"][norm]) == -(-n // data["perSheet"])
        sheet = _sheet(sheets["fmgcam"][norm][0])
        assert sheet.shape == (-(-n // cols) * h, min(n, cols) * w, 3)  # exactly n cells, the rest black
        cells = [
            sheet[r * h : (r + 1) * h, c * w : (c + 1) * w]
            for r, c in map(lambda k: divmod(k, cols), range(n))
        ]
        assert all(cell.max() > 0 for cell in cells)
        r = data["ranges"]["fmgcam"][norm]
        expected = [manifest["animation"]["per_frame"][p]["ranges"]["fmgcam"][norm] for p in range(n)]
        assert r == expected
    assert 'id="figure-fmgcam"' not in page  # the animation has no separate FM-G-CAM figure
    assert "has no layer maps" not in page and "holds no map" not in page


@pytest.mark.parametrize("norm", ["local", "global"])
def test_tiles_equal_the_animation_tiles(fm_bundle, norm) -> None:
    """Lossless frames equal the animation's own tiles; the default WebP ones are close to them."""
    out, anim = fm_bundle
    page = render_report(out, fmt="png")
    data = _json_block(page, "report-data")
    want = anim.overlays("fmgcam", norm, size=tuple(data["tile"]))
    np.testing.assert_array_equal(_tiles(_json_block(page, "report-frames"), data, norm), want)

    page = (out / "report.html").read_text()
    lossy = _tiles(_json_block(page, "report-frames"), _json_block(page, "report-data"), norm).astype(int)
    diff = np.abs(lossy - want.astype(int))  # WebP q70 on a noisy 48x48 picture: about 5 levels on average
    assert diff.mean() < 8 and np.percentile(diff, 99) < 40, (diff.mean(), np.percentile(diff, 99))


def test_local_tile_is_the_fused_overlay_of_an_independent_sweep(fm_bundle, tiny) -> None:
    """At the input size, a local tile is fused_overlay of FM-G-CAM computed without the bundle."""
    from camanim.explanation import explain

    out, anim = fm_bundle
    model, x = tiny
    page = render_report(out, fmt="png", tile=48)
    data = _json_block(page, "report-data")
    assert data["tile"] == [48, 48]
    tiles = _tiles(_json_block(page, "report-frames"), data, "local")
    ex = explain(model, x, methods="gradcam", layers="all", top_k=K)
    sweep = fmgcam_sweep(ex, "gradcam")
    for p, layer in enumerate(anim.layers):
        ref = fused_overlay(sweep[layer.name], ex.display[0], alpha=0.6)
        assert np.abs(tiles[p].astype(int) - ref.astype(int)).max() <= 1, layer.name


def test_gelu_frames_equal_the_animation(tiny, tmp_path) -> None:
    """ELU/GELU negatives are set to 0 as the animation does (its NORMALISATION)."""
    model, x = tiny
    anim = animate(model, x, methods="fmgcam", top_k=2, activation="gelu", norm="local,global,global-all")
    out = anim.save(tmp_path / "gelu")
    page = render_report(out, fmt="png")
    data = _json_block(page, "report-data")
    assert data["norms"] == ["local", "global", "global-all"] and data["fusion"]["activation"] == "gelu"
    sheets = _json_block(page, "report-frames")
    for norm in data["norms"]:
        want = anim.overlays("fmgcam", norm, size=tuple(data["tile"]))
        np.testing.assert_array_equal(_tiles(sheets, data, norm), want)


def test_ranges_computed_when_the_manifest_lacks_them(fm_bundle, tmp_path) -> None:
    """Without the recorded per-frame ranges the viewer measures them as the animation does."""
    import shutil

    out, anim = fm_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for f in manifest["animation"]["per_frame"]:
        f.pop("ranges")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data = _json_block(render_report(copy, fmt="png"), "report-data")
    np.testing.assert_allclose(
        data["ranges"]["fmgcam"]["local"], [[r.low, r.high] for r in anim.local_ranges("fmgcam")], rtol=1e-6
    )
    g = anim.global_ranges["fmgcam"]
    np.testing.assert_allclose(data["ranges"]["fmgcam"]["global"], [[g.low, g.high]] * len(anim), rtol=1e-6)


def test_legend_lists_the_classes(fm_bundle) -> None:
    out, anim = fm_bundle
    page = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    classes = manifest["animation"]["fmgcam"]["classes"]
    legend = re.search(r'<ul id="legend"[^>]*>(.*?)</ul>', page, re.S)
    assert legend is not None
    items = re.findall(r"<li>(.*?)</li>", legend.group(1), re.S)
    assert len(items) == K == len(classes)
    for item, c in zip(items, classes, strict=True):
        name = html.unescape(re.search(r'<span class="name">(.*?)</span>', item).group(1))
        assert name == c["name"]
        assert f"p = {c['probability']:.4f}" in item
        assert 'fill="#{:02x}{:02x}{:02x}"'.format(*c["color"]) in item
    assert [c["name"] for c in classes] == list(anim.fusion.names)
    data = _json_block(page, "report-data")
    assert [c["name"] for c in data["fusion"]["classes"]] == list(anim.fusion.names)
    assert 'class="cbar" hidden' in page  # the hue is the class: no colour bar


def test_report_is_self_contained(fm_bundle) -> None:
    out, _ = fm_bundle
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert not re.search(r"url\(", page)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp and html.unescape(csp.group(1)).startswith("default-src 'none'; img-src data:;")
    assert ' style="' not in page  # the CSP allows no inline style attribute: swatches are SVG fills


def test_ordinary_report_has_no_legend(tiny, tmp_path) -> None:
    model, x = tiny
    out = animate(model, x, methods="gradcam").save(tmp_path / "plain")
    page = render_report(out)
    assert 'id="legend"' not in page and "fusion" not in _json_block(page, "report-data")
    assert '<div class="cbar"><span id="cbar-lo">' in page


def test_in_memory_fmgcam_animation(fm_bundle) -> None:
    """The notebook display of an FM-G-CAM animation (nothing written) runs the same viewer."""
    from camanim.report import animation_html

    _, anim = fm_bundle
    frame = animation_html(anim)
    page = html.unescape(frame.split('srcdoc="', 1)[1].rsplit('" style=', 1)[0])
    data = _json_block(page, "report-data")
    assert data["methods"] == ["fmgcam"] and len(data["frames"]) == len(anim.layers)
    assert [c["name"] for c in data["fusion"]["classes"]] == list(anim.fusion.names)


def test_fmgcam_report_in_browser(browser, fm_bundle, tmp_path) -> None:  # noqa: F811
    out, anim = fm_bundle
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto((out / "report.html").as_uri())

    def wait_shown(value: str) -> None:
        page.wait_for_function(
            "v => document.getElementById('view').dataset.shown === v", arg=value, timeout=5000
        )

    last = len(anim) - 1
    wait_shown(f"fmgcam|local|{last}")
    assert page.text_content("#layer-name") == anim.layers[last].name
    local = page.eval_on_selector("#view", "c => c.toDataURL()")
    page.click("#norms button[data-norm=global]")
    wait_shown(f"fmgcam|global|{last}")
    page.click("h1")
    page.keyboard.press("Home")
    wait_shown("fmgcam|global|0")
    assert page.eval_on_selector("#view", "c => c.toDataURL()") != local
    assert page.is_visible("#legend") and not page.is_visible(".cbar")
    assert page.locator("#legend li").count() == K
    page.screenshot(path=str(_artifacts(tmp_path) / "report_fmgcam.png"), full_page=True)
    assert not errors, errors
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()
