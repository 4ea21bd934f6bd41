"""report.html: rendered from a bundle's files only, self-contained, escaped, and driven in a real browser.

The browser test uses Playwright (the Python package) with Debian's ``chromium``; it skips with a reason
where either is missing. Its screenshot is kept under ``$CAMANIM_ARTIFACTS`` (or the test's tmp folder).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camanim.cli import main
from camanim.compute.models import wrap_model
from camanim.compute.normalize import Range
from camanim.outputs.bundle import open_bundle
from camanim.outputs.explanation import save_explanation
from camanim.outputs.report import render_report, write_report
from camanim.outputs.report import tiles as T
from camanim.outputs.ybroad import write_ybroad
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import explain
from camanim.pipelines.ybroad import ybroad
from tests.conftest import TinyCNN, synthetic_batch

CHROMIUM = os.environ.get("CAMANIM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
EVIL = "</script><img src=x onerror=alert(1)>"


def _json_block(page: str, block: str) -> dict:
    m = re.search(rf'<script type="application/json" id="{block}">(.*?)</script>', page, re.S)
    assert m is not None, f"no {block} block"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyCNN(classes=5).eval(), synthetic_batch(1, seed=3)[0]


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory) -> tuple[Path, Animation, object]:
    """An animation bundle of a tiny CNN with ybROAD, a comparison grid and an FM-G-CAM figure added."""
    from camanim.outputs.render import save_png
    from camanim.pipelines.compare import compare
    from camanim.pipelines.fmgcam import fmgcam

    model, x = tiny
    ex = explain(model, x, methods="gradcam,hirescam", layers="all")
    res = ybroad(model, explanation=ex, percentages=(25, 50, 75))
    anim = Animation.from_explanation(ex, road=res.road())
    out = tmp_path_factory.mktemp("report") / "bundle"
    anim.save(out)
    with open_bundle(out, resume=True) as b:  # add the other results to the same bundle, as a run would
        write_ybroad(res, b)
        cmp = compare(model, x, methods="gradcam,hirescam", layers="first,last")
        cmp.save(b.file("compare.png", "methods x layers grid"))
        b.manifest["compare"] = {"figure": "compare.png"}
        save_png(b.file("fmgcam.png", "FM-G-CAM figure"), fmgcam(model, x, k=2, layers="last").render())
        b.manifest["fmgcam"] = {"figure": "fmgcam.png"}
    write_report(out)
    return out, anim, res


def test_report_is_self_contained_and_complete(bundle) -> None:
    out, anim, _ = bundle
    page = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    # No external resource of any kind; the CSP forbids everything but inline, hashed assets and data: images.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp and html.unescape(csp.group(1)).startswith("default-src 'none'; img-src data:;")
    for section in ("prediction", "layers", "figure-strip", "figure-fmgcam", "figure-compare", "provenance"):
        assert f'id="{section}"' in page, section
    data = _json_block(page, "report-data")
    assert [f["name"] for f in data["frames"]] == [f["layer"] for f in manifest["animation"]["per_frame"]]
    assert data["methods"] == ["gradcam", "hirescam"] and data["norms"] == ["local", "global"]
    # ROAD comes from the manifest's ybROAD section, the best layer from its summary.
    for m in data["methods"]:
        best = manifest["road"]["methods"][m]["best_layer"]["name"]
        assert data["frames"][data["roadBest"][m]]["name"] == best
        expected = [manifest["road"]["results"][f"{m}/{f['name']}"] for f in data["frames"]]
        np.testing.assert_allclose(data["road"][m], expected)
    # Ranges are the animation's (manifest first).
    first = manifest["animation"]["per_frame"][0]["ranges"]["gradcam"]
    assert data["ranges"]["gradcam"]["local"][0] == first["local"]
    assert data["ranges"]["gradcam"]["global"][0] == first["global"]
    # Top-5 and provenance.
    for row in manifest["top5"][0]:
        assert f"<td>{row['name']}</td>" in page
    assert manifest["versions"]["torch"] in page and "report frames" in page


def test_tiles_equal_the_animation_overlays(bundle) -> None:
    """Lossless frames (png) decode to exactly the animation's tiles: packing and ranges are right."""
    out, anim, _ = bundle
    page = render_report(out, fmt="png")
    data = _json_block(page, "report-data")
    sheets = _json_block(page, "report-frames")
    h, w = data["tile"]
    for m in anim.methods:
        for norm in ("local", "global"):
            uri = sheets[m][norm][0]
            assert uri.startswith("data:image/png;base64,")
            sheet = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
            want = anim.overlays(m, norm, size=(h, w))
            for k in range(len(anim)):
                r, c = divmod(k, data["columns"])
                np.testing.assert_array_equal(sheet[r * h : (r + 1) * h, c * w : (c + 1) * w], want[k])


def test_explain_bundle_without_animation(tiny, tmp_path) -> None:
    """A plain explain bundle (no animation section, no input.png) still gets a viewer; ranges computed."""
    model, x = tiny
    ex = explain(model, x, methods="gradcam", layers="all")
    out = save_explanation(ex, tmp_path / "ex", overlays=False)
    data = _json_block(render_report(out), "report-data")
    anim = Animation.from_explanation(ex)
    assert [f["name"] for f in data["frames"]] == [la.name for la in ex.chosen]
    np.testing.assert_allclose(
        data["ranges"]["gradcam"]["local"], [[r.low, r.high] for r in anim.local_ranges("gradcam")], rtol=1e-6
    )
    assert data["road"] == {}


def test_names_from_the_bundle_are_escaped(tmp_path) -> None:
    class Evil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module(EVIL, nn.Conv2d(3, 4, 3, padding=1))
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(getattr(self, EVIL)(x).mean((2, 3)))

    torch.manual_seed(0)
    lm = wrap_model(Evil().eval(), name=f"model{EVIL}", class_names=[f"class {i} {EVIL}" for i in range(3)])
    out = save_explanation(explain(lm, torch.randn(1, 3, 16, 16)), tmp_path / "evil", overlays=False)
    page = (write_report(out)).read_text()
    assert "<img src=x" not in page and "</script><img" not in page
    assert page.count("</script>") == 3  # the two JSON blocks and the viewer's script, nothing else
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # shown as text
    assert _json_block(page, "report-data")["frames"][0]["name"] == EVIL


def test_files_outside_the_bundle_are_not_read(tiny, tmp_path) -> None:
    """A manifest naming a file outside its folder (``../secret.png``) gets no figure from it."""
    model, x = tiny
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(secret)
    out = save_explanation(explain(model, x, layers="last"), tmp_path / "b", overlays=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["compare"] = {"figure": "../secret.png"}
    manifest["fmgcam"] = {"figure": str(secret)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = render_report(out)
    assert 'id="figure-compare"' not in page and 'id="figure-fmgcam"' not in page


def test_cli_report(bundle, tmp_path, capsys) -> None:
    out, _, _ = bundle
    target = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(target), "--format", "jpeg", "--tile", "32"]) == 0
    page = target.read_text()
    assert "data:image/jpeg;base64," in page and _json_block(page, "report-data")["tile"] == [32, 32]
    assert main(["report", str(tmp_path)]) == 2
    assert "not a camanim bundle" in capsys.readouterr().err


def test_animate_command_writes_the_report(tiny, tmp_path, monkeypatch) -> None:
    import camanim.cli.commands

    model, _ = tiny
    monkeypatch.setattr(camanim.cli.commands, "_load", lambda args: wrap_model(model))
    out = tmp_path / "anim"
    assert main(["--quiet", "animate", "--image", "coffee", "--size", "64", "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "manifest.json").is_file()
    assert "report-data" in (out / "report.html").read_text()


def test_frame_bytes_budget() -> None:
    """Frames stay small: DenseNet-161's 571 layers x 2 normalisations must fit in 25 MB, i.e. under about
    21 kB of base64 per 224x224 tile; overlays of smooth maps on a photograph encode far below that."""
    from skimage import data as samples

    from camanim.outputs.render import colormap_lut

    img = np.asarray(Image.fromarray(samples.chelsea()).resize((224, 224)))
    rng = np.random.default_rng(0)
    maps = T.upsampled([rng.random((7, 7), dtype=np.float32) for _ in range(T.PER_SHEET)], (224, 224), True)
    tiles = next(
        T.overlay_tiles(
            list(maps), {"local": [Range(0.0, 1.0)] * T.PER_SHEET}, in_hw=(224, 224), tile=(224, 224),
            display=img, lut=colormap_lut("jet"), alpha=0.5, relu=True,
        )
    )["local"]  # fmt: skip
    per_tile = len(base64.b64encode(T.encode(T.pack(tiles), "webp", 70))) / T.PER_SHEET
    assert per_tile < 21_000, per_tile


def test_notebook_displays(bundle) -> None:
    """Results display themselves: an explanation as an overlay grid, an animation as the report's viewer
    (in a sandboxed iframe), ybROAD as its plot."""
    from camanim.outputs.report.notebook import animation_html, ybroad_html

    _, anim, res = bundle
    ex = anim.explanation
    grid = ex._repr_html_()
    assert grid.count("<tr>") == 1 + len(ex.methods) and grid.count("data:image/jpeg;base64,") == len(
        ex.methods
    ) * len(ex.chosen)
    frame = animation_html(anim)
    assert frame.startswith('<div><iframe sandbox="allow-scripts" srcdoc="') and "<script" not in frame
    page = html.unescape(frame.split('srcdoc="', 1)[1].rsplit('" style=', 1)[0])
    assert [f["name"] for f in _json_block(page, "report-data")["frames"]] == [la.name for la in anim.layers]
    plot = ybroad_html(res)
    assert "data:image/png;base64," in plot and all(m in plot for m in res.methods)


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the Python package playwright is not installed (pip install playwright)",
    )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium browser at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CAMANIM_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_report_in_browser(browser, bundle, tmp_path) -> None:
    out, anim, _ = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    frames = [f["layer"] for f in manifest["animation"]["per_frame"]]
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda req: requests.append(req.url))
    page.goto((out / "report.html").as_uri())

    def shown() -> str:
        return page.eval_on_selector("#view", "c => c.dataset.shown || ''")

    def wait_shown(value: str) -> None:
        page.wait_for_function(
            "v => document.getElementById('view').dataset.shown === v", arg=value, timeout=5000
        )

    def pixels() -> str:
        return page.eval_on_selector("#view", "c => c.toDataURL()")

    last = len(frames) - 1
    wait_shown(f"gradcam|local|{last}")
    assert page.text_content("#layer-name") == frames[last]
    assert page.text_content("#layer-pos") == f"{last + 1} / {len(frames)}"
    final = pixels()

    # The slider (keyboard on the focused range input), then the page's own arrow keys.
    page.focus("#slider")
    page.keyboard.press("Home")
    wait_shown("gradcam|local|0")
    assert page.text_content("#layer-name") == frames[0]
    local0 = pixels()
    assert local0 != final
    page.click("h1")  # focus leaves the slider: arrows go to the page
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    wait_shown("gradcam|local|2")
    assert page.text_content("#layer-name") == frames[2]
    assert page.input_value("#slider") == "2"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    wait_shown("gradcam|local|0")
    assert pixels() == local0

    # Local -> global changes the picture, not the layer; the info shows the range used.
    page.click("#norms button[data-norm=global]")
    wait_shown("gradcam|global|0")
    assert pixels() != local0 and page.text_content("#layer-name") == frames[0]
    g = manifest["animation"]["global_ranges"]["gradcam"]
    assert "global" in page.text_content("#layer-scale") and f"{g[1]:.4g}" in page.text_content("#cbar-hi")
    global0 = pixels()

    # Another method.
    page.select_option("#method", "hirescam")
    wait_shown("hirescam|global|0")
    assert pixels() != global0

    # The ybROAD curve: best layer highlighted, a click jumps to that layer.
    best = manifest["road"]["methods"]["hirescam"]["best_layer"]["name"]
    assert frames[int(page.get_attribute("#ybroad circle.best", "data-frame"))] == best
    target = 3 if frames.index(best) != 3 else 4
    page.click(f"#ybroad circle[data-frame='{target}']")
    wait_shown(f"hirescam|global|{target}")
    assert page.text_content("#layer-name") == frames[target]
    assert page.get_attribute("#ybroad circle.current", "data-frame") == str(target)
    road = manifest["road"]["results"][f"hirescam/{frames[target]}"]
    assert float(page.text_content("#layer-road").split()[0]) == pytest.approx(road, rel=1e-3)

    # Play, then pause: frames advance, then stop.
    page.click("#play")
    page.wait_for_function(
        "v => document.getElementById('view').dataset.shown !== v",
        arg=f"hirescam|global|{target}",
        timeout=5000,
    )
    page.click("#play")
    stopped = shown()
    page.wait_for_timeout(400)
    assert shown() == stopped and page.text_content("#play") == "Play"

    page.screenshot(path=str(_artifacts(tmp_path) / "report.png"), full_page=True)
    assert not errors, errors
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()


def test_escaped_names_in_browser(browser, tmp_path) -> None:
    """A hostile layer name is displayed as text and runs nothing."""
    test_names_from_the_bundle_are_escaped(tmp_path)
    page = browser.new_page()
    events: list[str] = []
    page.on("dialog", lambda d: (events.append(d.message), d.dismiss()))
    page.on("pageerror", lambda exc: events.append(str(exc)))
    page.goto((tmp_path / "evil" / "report.html").as_uri())
    page.wait_for_function("() => document.getElementById('view').dataset.shown !== undefined")
    assert page.text_content("#layer-name") == EVIL
    assert page.locator("img[src=x]").count() == 0 and not events
    page.close()


def test_notebook_viewer_in_browser(browser, bundle) -> None:
    """The animation's notebook display (a sandboxed iframe) runs the same viewer."""
    from camanim.outputs.report.notebook import animation_html

    _, anim, _ = bundle
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_content(
        f"<!DOCTYPE html><html><body><h1>notebook</h1>{animation_html(anim, height=600)}</body></html>"
    )
    frame = page.frames[1]
    last = len(anim) - 1
    frame.wait_for_function(
        "v => document.getElementById('view').dataset.shown === v", arg=f"gradcam|local|{last}", timeout=5000
    )
    assert frame.text_content("#layer-name") == anim.layers[last].name and not errors, errors
    page.close()
