"""CAManim animations: exact local/global normalisation, videos, strip, layer table, resume, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import camanim
from camanim.compute.layers import Layer
from camanim.compute.models import Preprocessing
from camanim.compute.normalize import Range, map_range, normalize
from camanim.errors import BundleExistsError, CamanimError
from camanim.outputs import animation as animation_mod
from camanim.outputs.animation import animate
from camanim.outputs.animation.figures import PERCENTILES
from camanim.outputs.bundle import staging_path
from camanim.outputs.render import colormap_lut
from camanim.outputs.video import count_frames, read_frames
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import Explanation, explain

from .conftest import CountingCNN, TinyCNN

SIZE = 32


def _layer(index: int, name: str, hw: tuple[int, int] | None, kind: str = "spatial") -> Layer:
    shape = (1, 4, *hw) if hw else (1, 5)
    return Layer(index, name, name, "Conv2d" if hw else "Linear", kind, shape, 10 * (index + 1), hw)


@pytest.fixture
def hand_ex() -> Explanation:
    """Five hand-made raw maps: ``big`` holds the global maximum, ``half`` is exactly half of it, ``quarter``
    a quarter, ``flat`` is constant, ``mixed`` has negative values (removed by ReLU)."""
    rng = np.random.default_rng(0)
    pattern = rng.random((8, 8)).astype(np.float32)
    pattern[0, 0] = 0.0
    raw = {
        "half": pattern,
        "quarter": 0.25 * pattern,
        "flat": np.full((4, 4), 0.3, np.float32),
        "big": 2.0 * pattern,
        "mixed": rng.normal(0.0, 0.3, (16, 16)).astype(np.float32),
    }
    chosen = [_layer(i, name, m.shape) for i, (name, m) in enumerate(raw.items())]
    layers = [*chosen, _layer(5, "head", None, kind="nonspatial")]
    x = torch.from_numpy(rng.normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32))
    display = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    return Explanation(
        model_name="hand",
        weights="none",
        preprocessing=Preprocessing(size=(SIZE, SIZE)),
        input=x,
        display=display,
        probabilities=torch.tensor([[0.25, 0.75]]),
        targets=(1,),
        target_names=("dog",),
        class_names=("cat", "dog"),
        layers=tuple(layers),
        chosen=tuple(chosen),
        methods=("gradcam",),
        maps={"gradcam": {k: torch.from_numpy(v)[None] for k, v in raw.items()}},
        flags={"gradcam": {k: () for k in raw}},
    )


def _lut_index(norm: np.ndarray, n: int = 256) -> np.ndarray:
    return np.clip(np.floor(norm * n), 0, n - 1).astype(int)


def test_ranges_are_exact_after_relu_and_upsampling(hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex)
    ups = {layer.name: hand_ex.upsampled("gradcam", layer.name)[0].numpy() for layer in hand_ex.chosen}
    for p, layer in enumerate(anim.layers):
        assert anim.stats["gradcam"][p].range == map_range(ups[layer.name])
        np.testing.assert_array_equal(anim.normalized("gradcam", "local", [p])[0], normalize(ups[layer.name]))
    want = Range(min(u.min() for u in ups.values()), max(u.max() for u in ups.values()))
    assert anim.global_ranges["gradcam"] == want
    assert want.low == 0.0 and want.high == ups["big"].max()
    assert ups["mixed"].min() == 0.0 and hand_ex.raw("gradcam", "mixed").min() < 0  # ReLU before the range
    glob = anim.normalized("gradcam", "global")
    np.testing.assert_array_equal(glob, np.stack([normalize(u, want) for u in ups.values()]))


def test_only_the_global_max_layer_reaches_the_top_colour(hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex, alpha=1.0)
    names = [layer.name for layer in anim.layers]
    lut = colormap_lut("jet")
    top = lut[-1]
    glob = anim.normalized("gradcam", "global")
    tiles = anim.overlays("gradcam", "global")
    reach = [bool((tile == top).all(axis=-1).any()) for tile in tiles]
    assert reach == [name == "big" for name in names]
    assert _lut_index(glob[names.index("big")]).max() == 255
    half = glob[names.index("half")]
    assert half.max() == pytest.approx(0.5, abs=1e-6)
    assert _lut_index(half).max() <= 128  # never above mid-scale
    assert _lut_index(glob[names.index("quarter")]).max() <= 64
    # and in the overlays: the half layer's colours all come from the lower half of the table
    upper = {tuple(c) for c in lut[129:]} - {tuple(c) for c in lut[:129]}
    assert not any(tuple(c) in upper for c in tiles[names.index("half")].reshape(-1, 3))


def test_local_frames_span_the_full_range_and_flat_layers_render_flat(hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex, alpha=1.0)
    local = anim.normalized("gradcam", "local")
    assert np.isfinite(local).all()
    for p, layer in enumerate(anim.layers):
        if layer.name == "flat":
            assert anim.flags("gradcam", p) == ("flat",)
            assert (local[p] == 0).all()  # bottom colour, no NaN, no division by zero
            tile = anim.overlays("gradcam", "local", [p])[0]
            assert (tile == colormap_lut("jet")[0]).all()
        else:
            assert anim.flags("gradcam", p) == ()
            assert local[p].min() == 0.0 and local[p].max() == pytest.approx(1.0, abs=1e-6)
            assert _lut_index(local[p]).max() == 255
    frame = anim.frame(2, layout="side-by-side")  # the flat layer composes without error
    assert frame.dtype == np.uint8 and frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0


def test_caption_colour_bars_and_road(hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex, road={"gradcam": [0.1, 0.2, float("nan"), 0.5, 0.4]})
    cap = anim.caption("gradcam", 3)
    assert cap[0] == "layer 4/5: big"
    assert cap[1] == "Conv2d · map 8x8"
    assert "gradcam" in cap[2] and "dog" in cap[2] and "p=0.750" in cap[2]
    assert "ROAD 0.500" in cap[3]
    assert "flat" in anim.caption("gradcam", 2)[3]
    with pytest.raises(CamanimError, match="scores for 5"):
        Animation.from_explanation(hand_ex, road={"gradcam": [0.1]})


def test_global_differs_from_local_on_a_real_network(tmp_path: Path, tiny_model: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 48, 48)
    anim = animate(tiny_model, x, layout=("local", "global"))
    maxima = np.array([s.max for s in anim.stats["gradcam"]])
    assert maxima.max() > 2 * maxima.min()  # the layers differ in magnitude
    local, glob = anim.normalized("gradcam", "local"), anim.normalized("gradcam", "global")
    weak = int(np.argmin(maxima))
    assert local[weak].max() == pytest.approx(1.0, abs=1e-6)
    assert glob[weak].max() < 0.6
    frames_local = np.stack(list(anim.frames(layout="local")))
    frames_global = np.stack(list(anim.frames(layout="global")))
    differ = [not np.array_equal(a, b) for a, b in zip(frames_local, frames_global, strict=True)]
    assert sum(differ) >= len(anim) - 1  # only the strongest layer may look alike
    out = anim.save(tmp_path / "b")
    decoded_local = read_frames(out / "gradcam_local.mp4").astype(int)
    decoded_global = read_frames(out / "gradcam_global.mp4").astype(int)
    assert np.abs(decoded_local[weak] - decoded_global[weak]).mean() > 5


def test_video_frame_counts_and_manifest(tmp_path: Path, tiny_model: nn.Module) -> None:
    x = torch.randn(1, 3, 48, 48)
    anim = animate(
        tiny_model, x, methods="gradcam,hirescam", layout="side-by-side,grid", norm="local,global,global-all"
    )
    n = len(anim.layers)
    assert n == 9
    out = anim.save(tmp_path / "b", formats="mp4,gif,frames")
    man = json.loads((out / "manifest.json").read_text())
    videos = man["animation"]["videos"]
    assert {v["file"] for v in videos} == {
        f"{stem}{ext}"
        for stem in ("gradcam_side-by-side", "hirescam_side-by-side", "grid")
        for ext in (".mp4", ".gif", "_frames")
    }
    for v in videos:
        assert count_frames(out / v["file"]) == n, v["file"]
        assert v["file"] in man["files"]
    per_frame = man["animation"]["per_frame"]
    assert len(per_frame) == n
    r = anim.global_ranges["hirescam"]
    assert per_frame[3]["ranges"]["hirescam"]["global"] == [r.low, r.high]
    assert per_frame[3]["ranges"]["hirescam"]["local"] == [
        anim.stats["hirescam"][3].min,
        anim.stats["hirescam"][3].max,
    ]
    assert per_frame[0]["ranges"]["gradcam"]["global-all"] == [anim.global_all.low, anim.global_all.high]
    assert anim.global_all == anim.global_ranges["gradcam"].union(anim.global_ranges["hirescam"])
    assert {"strip.png", "layers.csv", "params.png", "maps.npz", "input.npy"} <= set(man["files"])
    assert not staging_path(out).exists()
    grid_frame = read_frames(out / "grid_frames")[0]
    side = read_frames(out / "gradcam_side-by-side_frames")[0]
    assert grid_frame.shape[0] > side.shape[0]  # one row of tiles per method


def _runs(mask: np.ndarray) -> int:
    padded = np.concatenate([[False], mask, [False]])
    return int((np.diff(padded.astype(int)) == 1).sum())


def test_strip_has_eleven_columns_per_row(tmp_path: Path, hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex, norm="local,global")
    strip = anim.strip()  # what save() writes: 112-pixel tiles
    assert strip.n_columns == 11 and strip.percentiles == PERCENTILES
    assert strip.positions == tuple(round(p / 100 * 4) for p in PERCENTILES)
    assert strip.rows == ("gradcam · local", "gradcam · global")
    out = anim.save(tmp_path / "b")
    from PIL import Image

    img = np.asarray(Image.open(out / "strip.png").convert("RGB"))
    np.testing.assert_array_equal(img, strip.image)
    ink = (img != 255).any(axis=2)  # jet overlays are never pure white; the background is
    tile_h = 112 * len(strip.rows)
    assert _runs(ink.sum(axis=0) >= tile_h) == 11
    assert _runs(ink.sum(axis=1) >= 11 * 112) == len(strip.rows)


class DeadBranch(TinyCNN):
    """TinyCNN plus a branch multiplied by zero: its gradient, hence its Grad-CAM map, is exactly zero."""

    def __init__(self) -> None:
        super().__init__(classes=5)
        self.dead = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        d = self.dead(f)
        return self.fc(torch.flatten(self.pool(f + 0 * d.sum(1, keepdim=True)), 1))


def test_layers_csv_rows_and_flags(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeadBranch().eval()
    anim = animate(model, torch.randn(1, 3, 48, 48))
    out = anim.save(tmp_path / "b")
    with open(out / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r["kept"] == "1"]
    assert [r["name"] for r in kept] == [layer.name for layer in anim.layers]
    # the dead branch is the last spatial layer and its gradient is zero everywhere: passed over, with why
    assert len(kept) == count_frames(out / "gradcam_side-by-side.mp4") == 9
    by_name = {r["name"]: r for r in rows}
    assert by_name["dead"]["kept"] == "0" and "zero at every position" in by_name["dead"]["skipped"]
    assert all("flat" not in r["gradcam_flags"] for r in kept)
    named = animate(model, torch.randn(1, 3, 48, 48), layers="features.8,dead")  # asked for by name: kept
    assert [layer.name for layer in named.layers] == ["features.8", "dead"]
    assert named.flags("gradcam", 1)[:1] == ("flat",) and "zero_gradient" in named.flags("gradcam", 1)
    for name in ("pool", "fc"):
        assert by_name[name]["kept"] == "0" and by_name[name]["frame"] == ""
        assert by_name[name]["skipped"].startswith("non-spatial")
    assert by_name["features"]["skipped"] == "same tensor as features.8"
    assert by_name["features.3"]["map_size"] == "24x24" and by_name["features.3"]["params"] == "4640"
    assert [int(r["index"]) for r in rows] == sorted(int(r["index"]) for r in rows)


def test_resume_reuses_maps_and_renders_only_missing_videos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = CountingCNN().eval()
    x = torch.randn(1, 3, 48, 48)
    out = tmp_path / "b"
    kw = {"methods": "gradcam,hirescam", "layout": ("side-by-side", "local")}
    anim = animate(model, x, **kw)

    def boom(self, tile=112):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as mp:
        mp.setattr(Animation, "strip", boom)
        with pytest.raises(RuntimeError, match="interrupted"):
            anim.save(out)
    stage = staging_path(out.absolute())
    assert not out.exists() and stage.is_dir()
    videos = sorted(p.name for p in stage.glob("*.mp4"))
    assert len(videos) == 4
    (stage / "hirescam_local.mp4").unlink()

    written: list[str] = []
    real_open = animation_mod.open_writer

    def spy(path, *args, **kwargs):
        written.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(animation_mod, "open_writer", spy)
    model.calls = 0
    again = animate(model, x, reuse=out, **kw)
    assert model.calls == 0  # explain was not run
    assert again.fingerprint() == anim.fingerprint()
    again.save(out, resume=True)
    assert written == ["hirescam_local.mp4"]
    assert not stage.exists()
    assert sorted(p.name for p in out.glob("*.mp4")) == videos
    assert all(count_frames(out / v) == len(anim) for v in videos)
    man = json.loads((out / "manifest.json").read_text())
    assert man["animation"]["frames"] == man["animation"]["frames_rendered"] == len(anim)
    assert {v["file"] for v in man["animation"]["videos"]} == set(videos)

    # a run that asks for another target does not reuse the maps
    model.calls = 0
    animate(model, x, reuse=out, target=2, **kw)
    assert model.calls >= 1


def test_existing_output_refused_without_force(tmp_path: Path, hand_ex: Explanation) -> None:
    anim = Animation.from_explanation(hand_ex, layout="local")
    out = anim.save(tmp_path / "b")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BundleExistsError):
        anim.save(out)
    assert (out / "manifest.json").read_bytes() == before
    anim.save(out, force=True)
    assert json.loads((out / "manifest.json").read_text())["animation"]["layouts"] == ["local"]


def test_from_explanation_matches_animate_and_notebook_html(
    hand_ex: Explanation, tiny_model: nn.Module
) -> None:
    x = torch.randn(1, 3, 48, 48)
    ex = explain(tiny_model, x, methods="gradcam")
    a, b = Animation.from_explanation(ex), animate(tiny_model, x)
    assert a.global_ranges == b.global_ranges and a.stats == b.stats
    assert camanim.animate is animate and camanim.Animation is Animation
    anim = Animation.from_explanation(hand_ex)
    html = anim.video_html()
    assert html.count("<video") == 1 and "data:video/mp4;base64," in html
    viewer = anim._repr_html_()
    assert "<iframe" in viewer and hand_ex.chosen[-1].name in viewer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mnv3.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), path)
    return path


def test_cli_default_run_then_animate(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    from camanim.cli import main

    out = tmp_path / "cli"
    model = ["--model", "mobilenet_v3_small", "--checkpoint", str(checkpoint), "--num-classes", "3"]
    # the default job (`camanim` alone runs `run`): explain + animate every layer into one bundle
    assert main(["--quiet", *model, "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    n = man["animation"]["frames"]
    assert n == len(man["chosen_layers"]) > 20
    assert count_frames(out / "gradcam_side-by-side.mp4") == n
    assert {"strip.png", "layers.csv", "params.png", "maps.npz"} <= set(man["files"])
    assert "bundle:" in capsys.readouterr().out

    args = ["animate", *model, "--layers", "3", "--size", "64", "--format", "mp4,frames", "--out", str(out)]
    assert main([*args, "--quiet"]) == 2  # the folder exists: refused, before the model runs
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--quiet", "--force", "--layout", "local"]) == 0
    assert count_frames(out / "gradcam_local.mp4") == count_frames(out / "gradcam_local_frames") == 3
    assert not (out / "gradcam_side-by-side.mp4").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["animation"]["tile_size"] == [64, 64] and len(man["chosen_layers"]) == 3
