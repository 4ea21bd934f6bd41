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
    assert tokens and all(layer.map_size == (4, 4) for layer in tokens)
    # the patch embedding has no class token yet (16 tokens); every block after it has one (17 tokens)
    embed = {layer.name: layer.prefix_tokens for layer in tokens if layer.name.startswith("patch_embed")}
    assert embed == {"patch_embed.norm": 0, "patch_embed": 0}
    tokens = [layer for layer in tokens if layer.prefix_tokens == 1]
    assert tokens and all(layer.shape[1] == 17 for layer in tokens)
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


def test_windows_and_attention_are_not_maps_and_a_patch_embedding_is():
    """The kind rule on the shapes that broke it: window partitions, attention probabilities, tokens."""
    ln = nn.LayerNorm(64)
    # torchvision MaxViT stage 0 at 224: 49 windows x 64 tokens x 64 channels
    assert classify_output(torch.zeros(1, 49, 64, 64), nn.Identity(), 1, (224, 224))[0] == "nonspatial"
    # timm Swin's last stage: one window, 24 heads x 49 x 49 attention probabilities
    assert classify_output(torch.zeros(1, 24, 49, 49), nn.Softmax(-1), 1, (224, 224))[0] == "nonspatial"
    # a ViT's patch embedding (no class token yet), even when the model declares one prefix token
    assert classify_output(torch.zeros(1, 196, 384), ln, 1, (224, 224), prefix_tokens=1) == (
        "token",
        (14, 14),
        0,
    )
    assert classify_output(torch.zeros(1, 197, 384), ln, 1, (224, 224), prefix_tokens=1) == (
        "token",
        (14, 14),
        1,
    )
    assert classify_output(torch.zeros(1, 198, 192), ln, 1, (224, 224)) == ("token", (14, 14), 2)  # DeiT
    # a non-square input: 12 x 20 patches of 16 px
    assert classify_output(torch.zeros(1, 241, 64), ln, 1, (192, 320), prefix_tokens=1) == (
        "token",
        (12, 20),
        1,
    )
    # attention heads (B, heads, N, d) are not a grid
    assert classify_output(torch.zeros(1, 6, 197, 64), ln, 1, (224, 224))[0] == "nonspatial"


def test_the_second_input_size_decides_what_one_size_cannot():
    """An unpadded convolution's 147 x 147 grid at 299 is no integer stride, but it grows with the input;
    a fixed adaptive-pooling grid stays and is still a map; a window count that grows is not a grid axis."""
    conv = nn.Conv2d(3, 3, 1)
    other = ((1, 32, 163, 179), (331, 363))
    assert classify_output(torch.zeros(1, 32, 147, 147), conv, 1, (299, 299))[0] == "nonspatial"
    assert classify_output(torch.zeros(1, 32, 147, 147), conv, 1, (299, 299), other=other)[0] == "spatial"
    fixed = ((1, 512, 7, 7), (256, 288))
    assert classify_output(torch.zeros(1, 512, 7, 7), conv, 1, (224, 224), other=fixed)[0] == "spatial"
    windows = ((1, 72, 64, 64), (256, 288))  # 49 -> 72 windows: the count scales with H * W, not with H
    assert classify_output(torch.zeros(1, 49, 64, 64), conv, 1, (224, 224), other=windows)[0] == "nonspatial"
    channels_change = ((1, 48, 8, 9), (256, 288))
    assert (
        classify_output(torch.zeros(1, 32, 7, 7), conv, 1, (224, 224), other=channels_change)[0]
        == "nonspatial"
    )


def test_every_maxvit_and_swin_layer_follows_the_rule():
    """torchvision's MaxViT and timm's Swin at 224: no window partition or attention tensor is a map."""
    import torchvision

    torch.manual_seed(0)
    maxvit = torchvision.models.maxvit_t().eval()
    kinds = {layer.name: layer for layer in list_layers(maxvit, (1, 3, 224, 224), cache=False)}
    partitions = [n for n in kinds if n.endswith(("partition_op", "partition_swap", "departition_swap"))]
    assert partitions and all(not kinds[n].is_spatial for n in partitions if "departition_op" not in n)
    assert all(kinds[n].is_spatial for n in kinds if n.endswith("departition_op"))
    timm = pytest.importorskip("timm")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    layers = list_layers(swin, (1, 3, 224, 224), cache=False)
    attention = [la for la in layers if la.name.endswith(("attn.softmax", "attn_drop"))]
    assert attention and not any(la.is_spatial for la in attention)
    assert all(
        la.kind == "channels_last" and la.map_size == la.shape[1:3]
        for la in layers
        if la.name.endswith("norm1")
    )
