"""report.html of an FM-G-CAM bundle: the viewer fuses the stored base maps again and draws every kept layer
as the animation does, each class in its hue, with the class legend from the manifest. Animation bundles
(``camanim animate --method fmgcam``) first, then result bundles (``camanim fmgcam``, ``FMGCAMResult.save``)."""

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

from camanim.compute.fusion import fmgcam_sweep
from camanim.outputs.animation import animate
from camanim.outputs.fmgcam import fused_overlay
from camanim.outputs.report import render_report, write_report
from camanim.pipelines.animate import Animation
from camanim.pipelines.fmgcam import FMGCAMResult, fmgcam
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


def _first_sheets(data: dict, sheets: dict, n: int) -> dict[str, np.ndarray]:
    """Checks an FM-G-CAM report's sprite sheets (local and global, n cells each) and returns the first
    sheet of each normalisation, decoded."""
    assert data["methods"] == ["fmgcam"] and data["norms"] == ["local", "global"]
    assert list(sheets) == ["fmgcam"] and list(sheets["fmgcam"]) == ["local", "global"]
    h, w = data["tile"]
    cols = data["columns"]
    first = {}
    for norm in ("local", "global"):
        assert len(sheets["fmgcam"][norm]) == -(-n // data["perSheet"])
        first[norm] = _sheet(sheets["fmgcam"][norm][0])
        assert first[norm].shape == (
            -(-n // cols) * h,
            min(n, cols) * w,
            3,
        )  # exactly n cells, the rest black
    return first


def test_one_tile_per_kept_layer_and_normalisation(fm_bundle) -> None:
    out, anim = fm_bundle
    page = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    data = _json_block(page, "report-data")
    sheets = _json_block(page, "report-frames")
    n = len(anim.layers)
    assert [f["name"] for f in data["frames"]] == [la.name for la in anim.layers]
    assert [f["layer"] for f in manifest["animation"]["per_frame"]] == [la.name for la in anim.layers]
    first = _first_sheets(data, sheets, n)
    h, w = data["tile"]
    cols = data["columns"]
    for norm in ("local", "global"):
        sheet = first[norm]
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
    from camanim.pipelines.explain import explain

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


def _assert_self_contained(page: str) -> None:
    """No external resource; the CSP allows only inline, hashed assets and ``data:`` images."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert not re.search(r"url\(", page)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp and html.unescape(csp.group(1)).startswith("default-src 'none'; img-src data:;")
    assert ' style="' not in page  # the CSP allows no inline style attribute: swatches are SVG fills


def test_report_is_self_contained(fm_bundle) -> None:
    out, _ = fm_bundle
    _assert_self_contained((out / "report.html").read_text())


def test_ordinary_report_has_no_legend(tiny, tmp_path) -> None:
    model, x = tiny
    out = animate(model, x, methods="gradcam").save(tmp_path / "plain")
    page = render_report(out)
    assert 'id="legend"' not in page and "fusion" not in _json_block(page, "report-data")
    assert '<div class="cbar"><span id="cbar-lo">' in page


def test_in_memory_fmgcam_animation(fm_bundle) -> None:
    """The notebook display of an FM-G-CAM animation (nothing written) runs the same viewer."""
    from camanim.outputs.report.notebook import animation_html

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


# ------------------------------------------------- result bundles: camanim fmgcam, FMGCAMResult.save


@pytest.fixture(scope="module")
def result_bundle(tiny, tmp_path_factory) -> tuple[Path, FMGCAMResult, Animation]:
    """An FM-G-CAM result bundle (top 3 classes, every layer) of a tiny CNN with its report, and the
    FM-G-CAM animation of the same model, image and K (default options: opacity 0.5, input-size tiles)."""
    model, x = tiny
    res = fmgcam(model, x, k=K, layers="all")
    out = res.save(tmp_path_factory.mktemp("fmgcam-result") / "bundle")
    write_report(out)
    return out, res, animate(model, x, methods="fmgcam", top_k=K)


def test_result_bundle_one_tile_per_layer_and_normalisation(result_bundle) -> None:
    out, res, anim = result_bundle
    page = (out / "report.html").read_text()
    data = _json_block(page, "report-data")
    sheets = _json_block(page, "report-frames")
    n = len(res.layers)
    assert n > 1 and [la.name for la in anim.layers] == list(res.layers)
    assert [f["name"] for f in data["frames"]] == list(res.layers)
    _first_sheets(data, sheets, n)
    # No ranges in the manifest: measured as the animation measures them.
    np.testing.assert_allclose(
        data["ranges"]["fmgcam"]["local"], [[r.low, r.high] for r in anim.local_ranges("fmgcam")], rtol=1e-6
    )
    g = anim.global_ranges["fmgcam"]
    np.testing.assert_allclose(data["ranges"]["fmgcam"]["global"], [[g.low, g.high]] * n, rtol=1e-6)
    raw = [[float(res.fused[name].min()), float(res.fused[name].max())] for name in res.layers]
    np.testing.assert_allclose(data["raw"]["fmgcam"], raw, rtol=1e-6)  # fused maps, not the base method's


@pytest.mark.parametrize("norm", ["local", "global"])
def test_result_tiles_equal_the_animation_tiles(result_bundle, norm) -> None:
    """Lossless frames equal the FM-G-CAM animation's tiles; the default WebP ones are close to them."""
    out, _, anim = result_bundle
    page = render_report(out, fmt="png")
    data = _json_block(page, "report-data")
    want = anim.overlays("fmgcam", norm, size=tuple(data["tile"]))
    np.testing.assert_array_equal(_tiles(_json_block(page, "report-frames"), data, norm), want)

    page = (out / "report.html").read_text()
    lossy = _tiles(_json_block(page, "report-frames"), _json_block(page, "report-data"), norm).astype(int)
    diff = np.abs(lossy - want.astype(int))
    assert diff.mean() < 8 and np.percentile(diff, 99) < 40, (diff.mean(), np.percentile(diff, 99))


def test_result_tiles_are_fused_overlays_of_an_independent_sweep(result_bundle, tiny) -> None:
    """At the input size, local tiles are fused_overlay of an FM-G-CAM sweep computed without the bundle,
    global tiles the same with one scale for every layer (the largest upsampled value of the sweep)."""
    from camanim.compute.resize import resize_maps
    from camanim.pipelines.explain import explain

    out, res, _ = result_bundle
    model, x = tiny
    page = render_report(out, fmt="png", tile=48)
    data = _json_block(page, "report-data")
    assert data["tile"] == [48, 48]
    sheets = _json_block(page, "report-frames")
    ex = explain(model, x, methods="gradcam", layers="all", top_k=K)
    sweep = fmgcam_sweep(ex, "gradcam")
    scale = max(float(resize_maps(sweep[name], (48, 48)).max()) for name in res.layers)
    for norm, kwargs in (("local", {}), ("global", {"scale": scale})):
        tiles = _tiles(sheets, data, norm)
        for p, name in enumerate(res.layers):
            ref = fused_overlay(sweep[name], ex.display[0], alpha=0.5, **kwargs)
            assert np.abs(tiles[p].astype(int) - ref.astype(int)).max() <= 1, (norm, name)


def test_result_legend_lists_the_classes(result_bundle) -> None:
    out, res, _ = result_bundle
    page = (out / "report.html").read_text()
    legend = re.search(r'<ul id="legend"[^>]*>(.*?)</ul>', page, re.S)
    assert legend is not None
    items = re.findall(r"<li>(.*?)</li>", legend.group(1), re.S)
    assert len(items) == K == len(res.classes)
    for item, c, name, p, color in zip(
        items, res.classes, res.names, res.probabilities, res.colors, strict=True
    ):
        assert html.unescape(re.search(r'<span class="name">(.*?)</span>', item).group(1)) == name
        assert f"(class {c})" in item and f"p = {p:.4f}" in item
        assert 'fill="#{:02x}{:02x}{:02x}"'.format(*color) in item
    assert 'class="cbar" hidden' in page
    assert f"Explained classes: the top {K}, fused by FM-G-CAM" in page and "Explained class:" not in page
    prov = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", page))
    assert prov["FM-G-CAM"] == f"k {K}, base gradcam, activation relu, norm stack, probability softmax"


def test_result_report_shows_the_figure_and_is_self_contained(result_bundle) -> None:
    out, _, _ = result_bundle
    page = (out / "report.html").read_text()
    _assert_self_contained(page)
    fig = re.search(r'<section id="figure-fmgcam">.*?<img src="([^"]+)"', page, re.S)
    assert fig is not None
    with Image.open(out / "fmgcam.png") as want:
        assert _sheet(fig.group(1)).shape == (want.height, want.width, 3)


def test_figure_only_fmgcam_section_keeps_the_ordinary_viewer(tiny, tmp_path) -> None:
    """An explanation bundle whose ``fmgcam`` section only names a figure (no class table) is not fused."""
    from camanim.outputs.explanation import save_explanation
    from camanim.pipelines.explain import explain

    model, x = tiny
    out = save_explanation(explain(model, x, layers="last"), tmp_path / "b", overlays=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fmgcam"] = {"figure": "fmgcam.png"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = render_report(out)
    data = _json_block(page, "report-data")
    assert data["methods"] == ["gradcam"] and "fusion" not in data
    assert 'id="legend"' not in page and '<div class="cbar"><span id="cbar-lo">' in page


def test_cli_fmgcam_then_report(tmp_path, capsys) -> None:
    """``camanim fmgcam`` writes its report; ``camanim report`` on its bundle draws the same fused viewer."""
    from camanim.cli import main
    from camanim.outputs.bundle import load_maps, read_manifest
    from camanim.outputs.report.source import from_bundle

    out = tmp_path / "fm"
    args = ["fmgcam", "--model", "resnet18", "--weights", "none", "--top-k", "2", "--no-panels"]
    assert main([*args, "--out", str(out)]) == 0
    assert _json_block((out / "report.html").read_text(), "report-data")["methods"] == ["fmgcam"]
    assert main(["report", str(out), "--format", "png"]) == 0
    page = (out / "report.html").read_text()
    manifest = read_manifest(out)
    layer = manifest["fmgcam"]["layers"][-1]
    data = _json_block(page, "report-data")
    assert data["methods"] == ["fmgcam"] and [f["name"] for f in data["frames"]] == [layer]
    assert [c["name"] for c in data["fusion"]["classes"]] == [
        c["name"] for c in manifest["fmgcam"]["classes"]
    ]
    assert len(re.findall(r'<li><svg class="swatch"', page)) == 2 and 'id="figure-fmgcam"' in page
    assert data["tile"] == [224, 224]
    tile = _tiles(_json_block(page, "report-frames"), data, "local")[0]
    ref = fused_overlay(load_maps(out)[f"fmgcam/{layer}"], from_bundle(out).display, alpha=0.5)
    assert np.abs(tile.astype(int) - ref.astype(int)).max() <= 1
