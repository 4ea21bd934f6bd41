"""FM-G-CAM as an animation method: one K-class capture, one frame per kept layer, exact ranges, CLI, resume."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camanim.compute.fusion import FusionError, fmgcam_sweep, fuse
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.normalize import Range
from camanim.compute.resize import resize_maps
from camanim.errors import CamanimError
from camanim.outputs import animation as animation_mod
from camanim.outputs.animation import animate
from camanim.outputs.bundle import staging_path
from camanim.outputs.fmgcam import class_colors, fused_overlay
from camanim.outputs.video import count_frames
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import explain

from .conftest import CountingCNN, TinyCNN

K = 3


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(1, 3, 48, 48)


def test_one_frame_per_kept_layer_from_one_k_class_capture(
    tmp_path: Path, tiny_model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import camanim.pipelines.explain as explanation

    calls = []
    real = explanation.capture

    def counting(net, inp, *args, **kwargs):
        calls.append(tuple(inp.shape))
        return real(net, inp, *args, **kwargs)

    monkeypatch.setattr(explanation, "capture", counting)
    anim = animate(tiny_model, x, methods="fmgcam", top_k=K)
    assert len(calls) == 1 and calls[0][1:] == (3, 48, 48)  # every layer's K class gradients: one capture
    monkeypatch.setattr(explanation, "capture", real)

    plain = animate(tiny_model, x, methods="gradcam")
    assert [la.name for la in anim.layers] == [la.name for la in plain.layers]  # the same kept layers
    assert [la.name for la, _ in anim.skipped] == [la.name for la, _ in plain.skipped]
    n = len(anim.layers)
    assert n == 9 and anim.methods == ("fmgcam",)
    probs = torch.softmax(tiny_model(x), dim=1)[0].detach()
    assert list(anim.fusion.classes) == probs.argsort(descending=True)[:K].tolist()

    out = anim.save(tmp_path / "b", formats="mp4,gif,frames")
    man = json.loads((out / "manifest.json").read_text())
    assert {v["file"] for v in man["animation"]["videos"]} == {
        f"fmgcam_side-by-side{ext}" for ext in (".mp4", ".gif", "_frames")
    }
    for v in man["animation"]["videos"]:
        assert count_frames(out / v["file"]) == n, v["file"]
    section = man["animation"]["fmgcam"]
    assert [c["class"] for c in section["classes"]] == list(anim.fusion.classes)
    assert section["base"] == "gradcam" and section["activation"] == "relu" and section["k"] == K
    assert [c["color"] for c in section["classes"]] == class_colors(K).tolist()
    assert len(man["animation"]["per_frame"]) == n
    r = anim.global_ranges["fmgcam"]
    assert man["animation"]["per_frame"][0]["ranges"]["fmgcam"]["global"] == [r.low, r.high]
    assert {"strip.png", "layers.csv", "params.png", "maps.npz", "input.npy"} <= set(man["files"])

    rows = list(csv.DictReader(io.StringIO((out / "layers.csv").read_text())))
    kept = [row for row in rows if row["kept"] == "1"]
    assert [row["name"] for row in kept] == [la.name for la in anim.layers]
    assert [float(row["fmgcam_max"]) for row in kept] == pytest.approx([s.max for s in anim.stats["fmgcam"]])
    assert anim.strip().image.shape[0] > plain.strip().image.shape[0]  # the legend under the strip


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_frame_shows_the_fused_map_of_an_independent_sweep(
    tiny_model: nn.Module, x: torch.Tensor, activation: str
) -> None:
    anim = animate(tiny_model, x, methods="fmgcam", top_k=K, activation=activation, alpha=0.6)
    ex = explain(tiny_model, x, methods="gradcam", layers="all", top_k=K)  # a separate capture
    sweep = fmgcam_sweep(ex, "gradcam", activation)
    assert list(sweep) == [la.name for la in anim.layers]
    p = 2
    name = anim.layers[p].name
    torch.testing.assert_close(anim.fusion.fused[name], sweep[name], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(anim.fusion.fused[name], fuse(ex.raw("gradcam", name), activation))

    up = resize_maps(sweep[name], (48, 48)).numpy().clip(min=0)  # (K, H, W)
    local = anim.normalized("fmgcam", "local", [p])[0]
    assert local.shape == (K, 48, 48)
    np.testing.assert_allclose(local, up / up.max(), atol=1e-6)  # local: the layer's own max
    tile = anim.overlays("fmgcam", "local", [p])[0]
    reference = fused_overlay(sweep[name], ex.display[0], alpha=0.6)  # fused_overlay's own scale: the max
    assert np.abs(tile.astype(int) - reference.astype(int)).max() <= 1

    frame = anim.frame(p, layout="local")
    (_, composer) = anim._composers("fmgcam", "local")[0]
    y, x0 = composer.tile_y, composer.tile_x[0]
    np.testing.assert_array_equal(frame[y : y + 48, x0 : x0 + 48], tile)  # the tile inside the frame
    legend = anim.fusion.legend_strip(frame.shape[1])
    np.testing.assert_array_equal(frame[-legend.shape[0] :], legend)  # class names and probabilities
    assert frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0


def test_global_normalisation_only_the_max_layer_reaches_full_intensity(
    tiny_model: nn.Module, x: torch.Tensor
) -> None:
    anim = animate(tiny_model, x, methods="fmgcam", top_k=K, alpha=1.0)
    maxima = np.array([s.max for s in anim.stats["fmgcam"]])
    sweep = fmgcam_sweep(explain(tiny_model, x, methods="gradcam", top_k=K), "gradcam")
    np.testing.assert_allclose(maxima, [resize_maps(f, (48, 48)).max() for f in sweep.values()], rtol=1e-6)
    top = int(np.argmax(maxima))
    assert np.sort(maxima)[-2] < 0.99 * maxima[top]  # the strongest layer is unambiguous
    assert all(s.min == 0.0 for s in anim.stats["fmgcam"])  # K >= 2: each position carries one class
    assert anim.global_ranges["fmgcam"] == Range(0.0, maxima[top])

    glob = anim.normalized("fmgcam", "global")  # (n, K, H, W)
    peaks = glob.reshape(len(anim), -1).max(axis=1)
    assert peaks[top] == pytest.approx(1.0, abs=1e-6)
    assert all(peaks[q] < 0.99 for q in range(len(anim)) if q != top)
    np.testing.assert_allclose(peaks, maxima / maxima[top], atol=1e-6)
    local = anim.normalized("fmgcam", "local").reshape(len(anim), -1).max(axis=1)
    np.testing.assert_allclose(local, 1.0, atol=1e-6)  # local: every layer reaches full intensity

    colors = {tuple(c) for c in anim.fusion.colors}  # alpha 1: full intensity is exactly the class hue
    for norm, want in (("global", [q == top for q in range(len(anim))]), ("local", [True] * len(anim))):
        tiles = anim.overlays("fmgcam", norm)
        reach = [any(tuple(px) in colors for px in tile.reshape(-1, 3)) for tile in tiles]
        assert reach == want, norm


def test_elu_negatives_show_the_bare_image(tiny_model: nn.Module, x: torch.Tensor) -> None:
    anim = animate(tiny_model, x, methods="fmgcam", top_k=K, activation="elu", alpha=0.8)
    p = int(np.argmin([float(anim.fusion.fused[la.name].min()) for la in anim.layers]))
    fused = anim.fusion.fused[anim.layers[p].name]
    up = resize_maps(fused, (48, 48)).numpy()
    empty = (up <= 0).all(axis=0)  # no class has positive evidence here
    assert float(fused.min()) < -0.01 and empty.any()  # ELU leaves real negatives
    assert all(s.min >= 0.0 for s in anim.stats["fmgcam"])  # negatives never enter a range
    for norm in ("local", "global"):
        tile = anim.overlays("fmgcam", norm, [p])[0]
        np.testing.assert_array_equal(tile[empty], anim.explanation.display[0][empty])


def test_one_class_local_frames_equal_the_base_methods(tiny_model: nn.Module, x: torch.Tensor) -> None:
    """K = 1: the fused map is the base map after ReLU over its L2 norm, so the local frames (scaled by the same
    kind of range) are the base method's; the global ones differ, since each layer was divided by its norm."""
    fused = animate(tiny_model, x, methods="fmgcam", top_k=1)
    plain = animate(tiny_model, x, methods="gradcam")
    local = fused.normalized("fmgcam", "local")
    assert local.shape == (len(plain), 1, 48, 48)
    np.testing.assert_allclose(local[:, 0], plain.normalized("gradcam", "local"), atol=1e-5)
    norms = [float(plain.explanation.raw("gradcam", la.name)[0].norm()) for la in plain.layers]
    want = [s.max / n for s, n in zip(plain.stats["gradcam"], norms, strict=True)]
    np.testing.assert_allclose([s.max for s in fused.stats["fmgcam"]], want, rtol=1e-4)


def test_mixing_with_other_methods_is_refused(tiny_model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(FusionError, match="cannot be mixed"):
        animate(tiny_model, x, methods="fmgcam,gradcam")
    with pytest.raises(FusionError, match="apply only"):
        animate(tiny_model, x, methods="gradcam", top_k=2)
    ex = explain(tiny_model, x, methods="gradcam,hirescam", top_k=2)
    with pytest.raises(CamanimError, match="cannot be mixed"):
        Animation.from_explanation(ex, methods="fmgcam,hirescam")
    assert Animation.from_explanation(ex, methods="fmgcam", base="hirescam").fusion.base == "hirescam"
    with pytest.raises(FusionError, match="top_k"):  # an explanation of two images is not a top-K capture
        Animation.from_explanation(explain(tiny_model, torch.cat([x, -x]), target=[0, 1]), methods="fmgcam")


def test_resume_reuses_the_k_class_capture(tmp_path: Path, x: torch.Tensor, monkeypatch) -> None:
    torch.manual_seed(0)
    model = CountingCNN().eval()
    out = tmp_path / "b"
    kw = {"methods": "fmgcam", "top_k": 2, "layout": ("side-by-side", "local")}
    anim = animate(model, x, **kw)

    def boom(self, tile=112):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as mp:
        mp.setattr(Animation, "strip", boom)
        with pytest.raises(RuntimeError, match="interrupted"):
            anim.save(out)
    stage = staging_path(out.absolute())
    (stage / "fmgcam_local.mp4").unlink()
    written: list[str] = []
    real_open = animation_mod.open_writer

    def spy(path, *args, **kwargs):
        written.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(animation_mod, "open_writer", spy)
    model.calls = 0
    again = animate(model, x, reuse=out, **kw)
    assert model.calls == 0  # the staged K-class maps were reused
    assert again.fingerprint() == anim.fingerprint() and again.fusion.classes == anim.fusion.classes
    again.save(out, resume=True)
    assert written == ["fmgcam_local.mp4"]
    assert all(count_frames(out / v) == len(anim) for v in ("fmgcam_local.mp4", "fmgcam_side-by-side.mp4"))
    model.calls = 0
    animate(model, x, reuse=out, **{**kw, "top_k": 3})  # another K: the model runs again
    assert model.calls >= 1


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``load_model`` replaced by a seeded 5-class TinyCNN at 48x48; returns the names it was asked for."""
    import camanim.cli.commands

    asked: list[str] = []

    def fake(name="efficientnet_lite0", weights="default", **_):
        asked.append(name)
        torch.manual_seed(0)
        return wrap_model(TinyCNN(classes=5).eval(), name=name, preprocessing=Preprocessing(size=(48, 48)))

    monkeypatch.setattr(camanim.cli.commands, "load_model", fake)
    return asked


def test_cli_animate_fmgcam_writes_the_video(tmp_path: Path, loads, capsys) -> None:
    from camanim.cli import main

    out = tmp_path / "cli"
    args = ["animate", "--method", "fmgcam", "--top-k", "2", "--base", "hirescam", "--activation", "elu"]
    assert main(["--quiet", *args, "--layers", "4", "--out", str(out)]) == 0
    assert loads == ["efficientnet_lite0"]
    assert count_frames(out / "fmgcam_side-by-side.mp4") == 4
    man = json.loads((out / "manifest.json").read_text())
    assert man["animation"]["frames"] == len(man["chosen_layers"]) == 4
    assert man["animation"]["fmgcam"]["base"] == "hirescam" and man["animation"]["fmgcam"]["k"] == 2
    assert (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "FM-G-CAM (hirescam, elu)" in printed and "bundle:" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "fmgcam,gradcam"], "cannot be mixed"),
        (["--method", "gradcam", "--top-k", "3"], "apply only to the method 'fmgcam'"),
        (["--method", "gradcam", "--activation", "gelu"], "apply only to the method 'fmgcam'"),
        (["--method", "fmgcam", "--target", "1"], "target does not apply"),
        (["--method", "fmgcam", "--road"], "--road and --layers best"),
        (["--method", "fmgcam", "--base", "eigencam"], "class-discriminative"),
        (["--method", "fmgcam", "--top-k", "0"], "at least 1"),
    ],
)
def test_cli_invalid_combination_exits_2(tmp_path: Path, loads, capsys, extra, message) -> None:
    from camanim.cli import main

    out = tmp_path / "bad"
    assert main(["animate", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("camanim: error:") and message in err and "Traceback" not in err
    assert loads == [] and not out.exists()  # refused before the model loads


def test_multilabel_legend_shows_sigmoid_scores(tiny_model: nn.Module, x: torch.Tensor) -> None:
    anim = animate(tiny_model, x, methods="fmgcam", top_k=2, score="sigmoid")
    logits = tiny_model(x)[0].detach()
    assert anim.fusion.multilabel
    assert list(anim.fusion.classes) == logits.argsort(descending=True)[:2].tolist()
    np.testing.assert_allclose(
        anim.fusion.probabilities, logits.sigmoid()[list(anim.fusion.classes)].numpy(), rtol=1e-5
    )
    plain = animate(tiny_model, x, methods="fmgcam", top_k=2)
    np.testing.assert_allclose(
        plain.fusion.probabilities, logits.softmax(0)[list(plain.fusion.classes)].numpy(), rtol=1e-5
    )
