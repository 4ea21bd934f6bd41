"""Regenerate the README's gallery (docs/gallery/) from the default run.

Runs, on the embedded default model and image: the default run (``camanim``), ybROAD (``camanim road``,
merged into the default run's bundle when that run did not score the layers itself), FM-G-CAM
(``camanim fmgcam``) and the layer-wise embeddings of scikit-learn's digits (``camanim embed``, about 5 of
the script's minutes); writes the reports and takes screenshots of them in headless Chromium (Playwright
with Debian's ``chromium``; skipped with a message when absent). The images are shrunk so the gallery stays
under 1.5 MB.

Usage:
    python scripts/make_gallery.py [--out docs/gallery] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from camanim.cli import main as camanim
from camanim.outputs.bundle import open_bundle, read_manifest
from camanim.outputs.report import write_report

logger = logging.getLogger("make_gallery")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CAMANIM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ROAD_FILES = ("ybroad.csv", "ybroad.json", "ybroad.png", "summary.csv")
BUDGET = 1_500_000


def run(*argv: str) -> None:
    """Run one camanim command in this process; stop on failure."""
    code = camanim(["--quiet", *argv])
    if code != 0:
        raise SystemExit(f"camanim {' '.join(argv)} failed with exit code {code}")


def add_road(bundle: Path, road: Path) -> None:
    """Copy a ybROAD bundle's files and manifest section into ``bundle`` (same model, image and layers)."""
    section = read_manifest(road)["road"]
    with open_bundle(bundle, resume=True, command=read_manifest(bundle).get("command", "")) as b:
        for rel in ROAD_FILES:
            if (road / rel).is_file():
                b.write_bytes(rel, (road / rel).read_bytes(), "ybROAD (camanim road)")
        b.manifest["road"] = section


def shrink(src: Path, dst: Path, width: int, quality: int = 82) -> None:
    """Save ``src`` at most ``width`` pixels wide: PNG for plots (few colours), JPEG for photographs."""
    with Image.open(src) as img:
        img = img.convert("RGB")
        if img.width > width:
            img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
        if dst.suffix == ".png":
            img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
        else:
            img.save(dst, quality=quality, optimize=True, progressive=True)


def screenshot(report: Path, dst: Path) -> bool:
    """The report's viewer and ybROAD curve as a PNG; False when no browser is available."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        logger.warning("playwright is not installed: no report screenshot (pip install playwright)")
        return False
    if not os.path.isfile(CHROMIUM):
        logger.warning("no chromium at %s: no report screenshot (apt-get install -y chromium)", CHROMIUM)
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_function("() => document.getElementById('view').dataset.shown !== undefined")
        best = page.query_selector("#ybroad circle.best")
        if best is not None:
            best.click()  # show the layer that best explains the prediction
        page.locator("#layers").screenshot(path=str(dst))
        browser.close()
    return True


def embed_screenshot(report: Path, dst: Path) -> bool:
    """The embedding report's scatter (best layer, one point hovered) as a PNG; False without a browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        logger.warning("playwright is not installed: no embedding report screenshot")
        return False
    if not os.path.isfile(CHROMIUM):
        logger.warning("no chromium at %s: no embedding report screenshot", CHROMIUM)
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_function("() => document.getElementById('scatter').dataset.layer !== undefined")
        # hover the drawn point nearest the canvas centre, to show its thumbnail
        at = page.evaluate(
            """() => {
              const c = document.getElementById('scatter'), box = c.getBoundingClientRect();
              const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, s = c.width / box.width;
              let best = null, bestD = Infinity;
              for (let y = 0; y < c.height; y += 2) for (let x = 0; x < c.width; x += 2) {
                const o = 4 * (y * c.width + x);
                if (px[o + 3] > 200 && px[o] + px[o + 1] + px[o + 2] < 600) {
                  const d = (x - c.width / 2) ** 2 + (y - c.height / 2) ** 2;
                  if (d < bestD) { bestD = d; best = [box.left + x / s, box.top + y / s]; }
                }
              }
              return best;
            }"""
        )
        if at is not None:
            page.mouse.move(at[0], at[1])
        page.locator("#scatter-section").screenshot(path=str(dst))
        browser.close()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "gallery"), help="gallery folder")
    parser.add_argument("--work", default=None, help="keep the bundles here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="camanim-gallery-"))
    try:
        default, road, fused = work / "default", work / "road", work / "fmgcam"
        run("run", "--out", str(default), "--force")
        if "road" not in read_manifest(default):
            run("road", "--out", str(road), "--force")
            add_road(default, road)
        run("fmgcam", "--out", str(fused), "--force")
        digits = work / "embed"
        run("embed", "--images", "digits", "--out", str(digits), "--force", "--no-video")
        write_report(default)
        shrink(default / "strip.png", out / "strip.jpg", 1000)
        shrink(default / "ybroad.png", out / "ybroad.png", 900)
        shrink(fused / "fmgcam.png", out / "fmgcam.jpg", 800)
        shrink(digits / "separability.png", out / "separability.png", 900)
        shot = work / "report.png"
        if screenshot(default / "report.html", shot):
            shrink(shot, out / "report.jpg", 900, quality=78)
        shot = work / "embed.png"
        if embed_screenshot(digits / "report.html", shot):
            shrink(shot, out / "embed.jpg", 900, quality=80)
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        total = sum(sizes.values())
        print(json.dumps({"gallery": str(out), "bytes": sizes, "total": total}, indent=1))
        if total > BUDGET:
            logger.warning("the gallery is %.2f MB, over its %.1f MB budget", total / 1e6, BUDGET / 1e6)
        return 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
