"""Layer enumeration by dry run: execution order, kinds, reused modules, duplicates, selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camanim.compute.layers import as_bchw, classify_output, list_layers, select_layers
from camanim.errors import LayerNotFoundError, LayerSelectionError


class Reordered(nn.Module):
    """Modules declared in one order and called in another; ``act`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.unused = nn.Conv2d(4, 4, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.early(x))
        x = self.act(self.late(x))
        return self.head(x)


def test_execution_order_not_declaration_order():
    layers = list_layers(Reordered(), (1, 3, 16, 16), cache=False)
    names = [layer.name for layer in layers]
    assert names[:4] == ["early", "act", "late", "act#2"]
    assert "unused" not in names
    assert [layer.index for layer in layers] == list(range(len(layers)))


def test_kinds_and_shapes():
    layers = {layer.name: layer for layer in list_layers(Reordered(), (2, 3, 16, 16), cache=False)}
    assert layers["early"].kind == "spatial" and layers["early"].map_size == (16, 16)
    assert layers["early"].shape == (2, 4, 16, 16)
    assert layers["early"].params == 3 * 4 * 9 + 4
    assert layers["head.0"].kind == "nonspatial"  # 1x1
    assert layers["head.2"].kind == "nonspatial"  # (B, 3)
    assert layers["head"].same_as == "head.2"  # a container returning its last child's tensor


def test_resnet_reused_relu_named_per_call(resnet18):
    names = [layer.name for layer in list_layers(resnet18, (1, 3, 64, 64))]
    assert "layer1.0.relu" in names and "layer1.0.relu#2" in names
    assert names.index("layer1.0.relu") < names.index("layer1.0.conv2") < names.index("layer1.0.relu#2")


def test_inplace_relu_is_not_a_duplicate(resnet18):
    layers = {layer.name: layer for layer in list_layers(resnet18, (1, 3, 64, 64))}
    # bn1 and the in-place relu share a tensor object, but relu changed it: two different maps.
    assert layers["relu"].same_as is None
    # layer1.0 returns relu#2's tensor unchanged: a duplicate.
    assert layers["layer1.0"].same_as == "layer1.0.relu#2"


def test_channels_last_and_token_kinds():
    timm = pytest.importorskip("timm")
    convnext = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()
    kinds = {layer.kind for layer in list_layers(convnext, (1, 3, 64, 64))}
    assert "channels_last" in kinds
    cl = [layer for layer in list_layers(convnext, (1, 3, 64, 64)) if layer.kind == "channels_last"][0]
    assert cl.map_size == cl.shape[1:3]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    tokens = [layer for layer in list_layers(vit, (1, 3, 64, 64)) if layer.kind == "token"]
    assert tokens and all(layer.map_size == (4, 4) and layer.prefix_tokens == 1 for layer in tokens)
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = as_bchw(t, tokens[0])
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, 2, 0, 1], t[1, 1 + 1, 2])  # token 1 after the class token -> row 0, column 1


def test_classify_output_prefers_nchw_when_both_fit():
    conv = nn.Conv2d(3, 3, 1)
    assert classify_output(torch.zeros(1, 56, 56, 56), conv, 1, (224, 224))[0] == "spatial"
    assert classify_output(torch.zeros(1, 56, 56, 96), nn.LayerNorm(96), 1, (224, 224))[0] == "channels_last"
    assert classify_output(torch.zeros(4, 7, 7, 96), nn.LayerNorm(96), 1, (224, 224))[0] == "nonspatial"


@pytest.fixture
def table(resnet18):
    return list_layers(resnet18, (1, 3, 64, 64))


def test_selection_forms(table):
    spatial = select_layers(table, "all")
    assert spatial and all(layer.is_spatial and layer.same_as is None for layer in spatial)
    assert select_layers(table, 3) == spatial[-3:]
    assert [layer.name for layer in select_layers(table, "first,middle,last")] == [
        spatial[0].name,
        spatial[(len(spatial) - 1) // 2].name,
        spatial[-1].name,
    ]
    assert [layer.name for layer in select_layers(table, "layer4.1.conv*")] == [
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    idx = table[5].index
    assert select_layers(table, [idx, "conv1"])[0].name == "conv1"
    # Explicit names are honoured even for a duplicate.
    assert select_layers(table, "layer1.0")[0].same_as is not None
    assert select_layers(table, [-1 - (len(table) - 1 - idx)]) == [table[idx]]


def test_selection_errors(table):
    with pytest.raises(LayerNotFoundError) as e:
        select_layers(table, "layer4.1.conv3")
    assert "layer4.1.conv2" in str(e.value)
    with pytest.raises(LayerSelectionError, match=r"valid indices are -\d+\.\.\d+"):
        select_layers(table, [10_000])
    with pytest.raises(LayerSelectionError, match="has \\d+ spatial layers"):
        select_layers(table, 10_000)
    with pytest.raises(LayerSelectionError, match="at least 1"):
        select_layers(table, 0)
    with pytest.raises(LayerSelectionError, match="non-spatial"):
        select_layers(table, "fc")


def test_dry_run_restores_training_flags(resnet18):
    resnet18.train()
    try:
        list_layers(resnet18, (1, 3, 32, 32), cache=False)
        assert all(m.training for m in resnet18.modules())
    finally:
        resnet18.eval()
