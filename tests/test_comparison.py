"""Side-by-side comparison: convolution-layer choice, one capture, grid layout, tiles, ROAD, figure, CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import camanim
from camanim.compute.layers import list_layers
from camanim.compute.normalize import normalize
from camanim.outputs.compare import load_road
from camanim.outputs.render import overlay
from camanim.pipelines.compare import compare, conv_layers, select_conv_layers

from .conftest import no_hooks

METHODS = ("gradcam", "gradcam++", "eigencam", "xgradcam")


@pytest.fixture
def tiny(tiny_model):
    torch.manual_seed(2)
    return tiny_model, torch.randn(1, 3, 48, 48)


def _uninitialised(name: str):
    """A torchvision model with all-zero weights (fast to build and to run; only its structure is used)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    model = model.to_empty(device="cpu").eval()
    for t in [*model.parameters(), *model.buffers()]:
        t.data.zero_()  # garbage memory could hold denormals, which are slow
    return model


def test_conv_layers_are_counted_as_in_the_report():
    model = _uninitialised("resnet50")
    table = list_layers(model, (1, 3, 64, 64))
    convs = conv_layers(model, table)
    assert len(convs) == 53  # every nn.Conv2d of ResNet-50, downsampling convolutions included
    assert all(layer.type == "Conv2d" for layer in convs)
    picked = select_conv_layers(model, table, "first,middle,last")
    assert [layer.name for layer in picked] == ["conv1", convs[26].name, "layer4.2.conv3"]
    assert [layer.name for layer in select_conv_layers(model, table, [0, -1])] == ["conv1", "layer4.2.conv3"]
    model = _uninitialised("resnet152")
    assert len(conv_layers(model, list_layers(model, (1, 3, 64, 64)))) == 155  # the report's count


def test_containers_are_not_conv_layers():
    from torch import nn

    class ConvBlock(nn.Module):  # a container whose class name contains "Conv"
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    model = nn.Sequential(
        ConvBlock(3, 4), ConvBlock(4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    names = [layer.name for layer in conv_layers(model, list_layers(model, (1, 3, 16, 16)))]
    assert names == ["0.conv", "1.conv"]


def test_grid_is_methods_by_layers_from_one_capture(tiny, monkeypatch):
    import camanim.pipelines.explain as explanation

    model, x = tiny
    calls = []
    original = explanation.capture
    monkeypatch.setattr(explanation, "capture", lambda *a, **k: calls.append(1) or original(*a, **k))
    c = compare(model, x, methods=METHODS)
    assert len(calls) == 1  # every method and layer of the grid from one capture
    assert c.shape == (4, 3) and c.methods == METHODS
    assert [layer.name for layer in c.layers] == ["features.0", "features.3", "features.7"]
    assert len(c.tiles) == len(c.boxes) == 12
    rows = sorted({box[0] for box in c.boxes.values()})
    cols = sorted({box[1] for box in c.boxes.values()})
    assert len(rows) == 4 and len(cols) == 3  # a real grid: 4 distinct tops, 3 distinct lefts
    for m in METHODS:
        tops = {c.boxes[(m, layer.name)][0] for layer in c.layers}
        assert len(tops) == 1  # one row per method
    assert no_hooks(model)


def test_tiles_equal_single_method_overlays(tiny):
    model, x = tiny
    c = compare(model, x, methods=METHODS)
    for m in METHODS:
        for layer in c.layers:
            single = camanim.explain(model, x, methods=m, layers=[layer.name])
            expected = overlay(
                single.display[0], normalize(single.upsampled(m, layer.name)[0].numpy()), "jet"
            )
            tile = c.tiles[(m, layer.name)]
            np.testing.assert_array_equal(tile, expected)
            top, left, bottom, right = c.boxes[(m, layer.name)]
            np.testing.assert_array_equal(c.image[top:bottom, left:right], tile)


def test_global_norm_shares_one_range_per_method(tiny):
    model, x = tiny
    local = compare(model, x, methods="gradcam,eigencam", norm="local")
    glob = compare(model, x, methods="gradcam,eigencam", norm="global")
    for m in ("gradcam", "eigencam"):
        ranges = {glob.ranges[(m, layer.name)] for layer in glob.layers}
        assert len(ranges) == 1
        (shared,) = ranges
        assert shared.low == min(local.ranges[(m, layer.name)].low for layer in local.layers)
        assert shared.high == max(local.ranges[(m, layer.name)].high for layer in local.layers)
    assert glob.ranges[("gradcam", "features.0")] != glob.ranges[("eigencam", "features.0")]


def test_road_shown_and_read(tiny, tmp_path):
    model, x = tiny
    c = compare(model, x, methods="gradcam", road={("gradcam", "features.7"): 0.25})
    assert c.title("gradcam", "features.7") == ["gradcam", "features.7", "ROAD 0.250"]
    assert c.title("gradcam", "features.0") == ["gradcam", "features.0"]
    assert c.image.shape[0] > compare(model, x, methods="gradcam").image.shape[0]  # a third title line
    ybroad_like = SimpleNamespace(results={"gradcam": SimpleNamespace(as_dict=lambda: {"features.0": 0.125})})
    assert compare(model, x, methods="gradcam", road=ybroad_like).road == {("gradcam", "features.0"): 0.125}
    f = tmp_path / "road.json"
    f.write_text(json.dumps({"gradcam/features.7": 0.5, "hirescam/features.0": {"road": 0.1}}))
    assert load_road(f) == {("gradcam", "features.7"): 0.5, ("hirescam", "features.0"): 0.1}
    bundle = tmp_path / "b"  # a ybROAD bundle, as `camanim road` writes it
    bundle.mkdir()
    (bundle / "manifest.json").write_text(
        json.dumps({"road": {"layers": 3, "results": {"gradcam/features.3": 0.7}}})
    )
    assert load_road(bundle) == {("gradcam", "features.3"): 0.7}
    listed = [{"method": "gradcam", "layer": "features.3", "score": 0.6}]
    f.write_text(json.dumps({"results": listed}))
    assert load_road(f) == {("gradcam", "features.3"): 0.6}


def test_figure_and_save(tiny, tmp_path):
    from PIL import Image

    model, x = tiny
    c = compare(model, x, methods="gradcam,layercam", layers="first,last")
    fig = c.figure()
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title() == "gradcam\nfeatures.0"
    path = c.save(tmp_path / "compare.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), c.image)


def test_cli_compare(tmp_path, capsys):
    from camanim.cli import main
    from camanim.outputs.bundle import read_manifest

    out = tmp_path / "cmp"
    args = ["compare", "--model", "resnet18", "--weights", "none", "--methods", "gradcam,eigencam"]
    assert main([*args, "--norm", "global", "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert (out / "compare.png").is_file()
    assert manifest["compare"]["rows"] == ["gradcam", "eigencam"]
    columns = manifest["compare"]["columns"]
    assert len(columns) == 3 and columns[0] == "conv1" and columns[-1] == "layer4.1.conv2"
    assert "prediction" in capsys.readouterr().out
