"""Model sources, checkpoints, bundles and the command line."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from camanim.cli import main
from camanim.compute.models import Preprocessing, load_model
from camanim.errors import BundleExistsError, ModelNotFoundError, WeightsError
from camanim.outputs.bundle import open_bundle, read_manifest, staging_path


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelNotFoundError) as e:
        load_model("resnet5")
    assert "resnet50" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="prefixes"):
        load_model("keras:resnet50")


def test_torchvision_and_timm_random_weights():
    tv = load_model("resnet18", "none")
    assert tv.name == "torchvision:resnet18" and tv.weights.startswith("random")
    assert tv.preprocessing.size == (224, 224) and len(tv.class_names) == 1000
    tm = load_model("timm:resnet10t", "none", num_classes=7)
    assert tm.name == "timm:resnet10t" and tm.class_names == tuple(f"class {i}" for i in range(7))
    # The same seed gives the same random weights.
    again = load_model("resnet18", "none")
    assert all(
        torch.equal(a, b)
        for a, b in zip(tv.model.state_dict().values(), again.model.state_dict().values(), strict=True)
    )


def test_no_network_gives_a_clear_error(monkeypatch):
    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="--weights none"):
        load_model("resnet18", "default")


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(5)
    src = load_model("resnet18", "none", num_classes=3, seed=5)
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, path)
    loaded = load_model("resnet18", path, num_classes=3)
    assert loaded.weights == f"checkpoint {path}"
    assert all(
        torch.equal(a, b)
        for a, b in zip(src.model.state_dict().values(), loaded.model.state_dict().values(), strict=True)
    )
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_model("resnet18", path)  # 1000-class head against a 3-class checkpoint
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(3, 512)}, bad)
    with pytest.raises(WeightsError, match="missing keys"):
        load_model("resnet18", bad, num_classes=3)
    # A pickled object is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    torch.save({"x": object.__new__(Preprocessing)}, evil)
    with pytest.raises(WeightsError, match="weights_only"):
        load_model("resnet18", evil)


def test_preprocessing_center_crop_and_roundtrip():
    prep = Preprocessing(size=(8, 8), crop_pct=0.5, interpolation="bilinear")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    x = prep(img)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(prep.normalize(prep.denormalize(x)), x, atol=1e-6)


def test_bundle_atomic_refuse_force(tmp_path):
    out = tmp_path / "b"
    with open_bundle(out) as b:
        b.write_text("a.txt", "one")
    assert read_manifest(out)["files"] == {"a.txt": ""}
    with pytest.raises(BundleExistsError, match="--force"):
        with open_bundle(out):
            pass
    with pytest.raises(RuntimeError):
        with open_bundle(out, force=True) as b:
            b.write_text("a.txt", "two")
            raise RuntimeError("failed half way")
    assert (out / "a.txt").read_text() == "one"  # the old bundle survives a failed replacement
    assert not staging_path(out.absolute()).exists()
    with open_bundle(out, force=True) as b:
        b.write_text("c.txt", "three")
    assert not (out / "a.txt").exists() and (out / "c.txt").read_text() == "three"


def test_bundle_resumable_keeps_staging(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        with open_bundle(out, resumable=True) as b:
            b.write_text("done.txt", "x")
            raise KeyboardInterrupt
    assert not out.exists() and (staging_path(out.absolute()) / "done.txt").exists()
    with open_bundle(out, resume=True) as b:
        assert b.exists("done.txt")
        b.file("done.txt", "kept from the interrupted run")
    assert (out / "done.txt").exists() and (out / "manifest.json").exists()


def test_cli_explain_writes_bundle(tmp_path, capsys):
    out = tmp_path / "ex"
    rc = main(
        [
            "explain",
            "--image",
            "coffee",
            "--method",
            "gradcam,hirescam",
            "--layers",
            "first,last",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "espresso" in printed and str(out) in printed
    manifest = read_manifest(out)
    assert manifest["targets"][0]["class"] == 967
    assert [m["name"] for m in manifest["methods"]] == ["gradcam", "hirescam"]
    assert manifest["model"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    x = np.load(out / "input.npy")
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    with np.load(out / "maps.npz") as z:
        keys = sorted(z.files)
        assert len(keys) == 4 and all(z[k].ndim == 3 for k in keys)
    pngs = sorted(p.name for p in (out / "overlays" / "gradcam").iterdir())
    assert len(pngs) == 2
    # A second run into the same folder is refused.
    assert main(["explain", "--image", "coffee", "--layers", "last", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["explain", "--model", "resnet5"], "resnet50"),
        (["explain", "--method", "gradcm"], "gradcam"),
        (["explain", "--layers", "blocks.99"], "unknown layer"),
        (["explain", "--target", "tiger kat"], "tiger cat"),
        (["explain", "--image", "chelsae"], "chelsea"),
    ],
)
def test_cli_bad_input_exit_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_layers_json(capsys):
    assert main(["layers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "conv_stem" and rows[-1]["name"] == "classifier"
    assert {"index", "name", "type", "shape", "params", "kind"} <= set(rows[0])
