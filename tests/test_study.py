"""Studies: the Parquet store, resume after a killed driver or worker, failures, local vs Ray, CLI, checkpoints.

Everything runs on a tiny synthetic set: 4 PNGs of 48 x 48 pixels, the TinyCNN of conftest (3 classes) named
by its import path ``tests.test_study:study_model``, the last 2 layers, p in {20, 80} %, one torch thread
per worker (the default: equal thread counts make stores bit-identical).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camanim.compute.models import Preprocessing, wrap_model
from camanim.outputs.study.runner import load_study, run_study
from camanim.pipelines.study.units import (
    ModelSpec,
    StudyError,
    Unit,
    build_model,
    expand_checkpoints,
    list_images,
    parse_layers,
    parse_models,
    unit_seed,
)
from tests.conftest import TinyCNN, synthetic_batch

pytest.importorskip("pyarrow", reason="studies store their results with pyarrow (pip install camanim[study])")

REPO = Path(__file__).resolve().parents[1]
MODEL = "tests.test_study:study_model"
STUDY = {
    "models": MODEL,
    "methods": "gradcam,hirescam",
    "layers": "last-2",
    "percentages": (20, 80),
    "figures": False,
}
UNITS = 4 * 2  # images x methods
KILL_ENV = "CAMANIM_TEST_STUDY_KILL"  # a marker path: the first non-driver process to run a forward dies
DRIVER_ENV = "CAMANIM_TEST_STUDY_DRIVER"  # pid of the driver, which is never killed
SLEEP_ENV = "CAMANIM_TEST_STUDY_SLEEP"  # seconds slept per forward (to kill a driver mid-study)


class StudyCNN(TinyCNN):
    """TinyCNN that refuses flat pictures (a unit that raises) and can kill its worker process once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(2).std(dim=2) == 0).all(dim=1).any()):
            raise RuntimeError("poisoned image: every pixel is the same")
        marker = os.environ.get(KILL_ENV)
        if marker and str(os.getpid()) != os.environ.get(DRIVER_ENV):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(SLEEP_ENV):
            time.sleep(float(os.environ[SLEEP_ENV]))
        return super().forward(x)


def study_model():
    """The study's model factory: an untrained StudyCNN (the study seeds it) at 48 x 48 pixels."""
    return wrap_model(StudyCNN(classes=3), preprocessing=Preprocessing(size=(48, 48), resize="squash"))


def write_images(folder: Path, n: int = 4, seed: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    x, _, _ = synthetic_batch(n, seed)
    paths = []
    for i in range(n):
        arr = (x[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """4 PNGs and a LIST.csv labelling two of them (an index and a class name)."""
    root = tmp_path_factory.mktemp("study_inputs")
    write_images(root / "imgs")
    lst = root / "list.csv"
    lst.write_text("path,label\nimgs/img0.png,2\nimgs/img1.png,\nimgs/img2.png,class 0\nimgs/img3.png,\n")
    return {"root": root, "list": lst, "dir": root / "imgs"}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted single-process study, with figures and report."""
    out = tmp_path_factory.mktemp("ref") / "study"
    res = run_study(inputs["list"], out, **(STUDY | {"figures": True}))
    return res, load_study(out)


def assert_same_store(root: Path, ref) -> None:
    got = load_study(root)
    assert got.summary.num_rows == ref.summary.num_rows
    assert got.summary.equals(ref.summary), "summary tables differ"
    assert got.layers.equals(ref.layers), "layer tables differ"


def committed(root: Path) -> int:
    """Units whose summary file is in place (temporary files are hidden: ``.tmp-*``)."""
    return sum(1 for p in (root / "summary").glob("*.parquet") if not p.name.startswith("."))


def unique_keys(study) -> bool:
    cols = [
        study.layers.column(c).to_pylist() for c in ("image", "model", "checkpoint", "method", "position")
    ]
    keys = list(zip(*cols, strict=True))
    return len(keys) == len(set(keys))


# ---------------------------------------------------------------------------------------------------------
# Units, inputs and seeds.
# ---------------------------------------------------------------------------------------------------------


def test_inputs_parsing(inputs, tmp_path):
    items = list_images(inputs["list"])
    assert [i.id for i in items] == [f"imgs/img{i}.png" for i in range(4)]
    assert [i.label for i in items] == ["2", None, "class 0", None]
    assert all(Path(i.path).is_absolute() and Path(i.path).is_file() for i in items)
    assert [i.id for i in list_images(inputs["dir"])] == [f"img{i}.png" for i in range(4)]
    with pytest.raises(StudyError, match="does not exist"):
        bad = tmp_path / "bad.csv"
        bad.write_text("image\nmissing.png\n")
        list_images(bad)
    assert parse_layers("last-3") == 3 and parse_layers("4") == 4 and parse_layers("layer4.*") == "layer4.*"
    for name in ("ep_10.pt", "ep_2.pt", "ep_1.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in expand_checkpoints(str(tmp_path / "ep_*.pt"))] == [
        "ep_1.pt",
        "ep_2.pt",
        "ep_10.pt",
    ]
    with pytest.raises(StudyError, match="matches no file"):
        expand_checkpoints(str(tmp_path / "nothing_*.pt"))


def test_model_specs():
    specs = parse_models("efficientnet_lite0,torchvision:resnet18,tests.conftest:TinyCNN")
    assert [s.is_factory for s in specs] == [False, False, True]
    lm = build_model(specs[2], seed=3)
    assert lm.name == "tests.conftest:TinyCNN" and isinstance(lm.module, TinyCNN) and not lm.module.training
    again = build_model(specs[2], seed=3)  # seeded: every worker builds the same random model
    assert all(
        torch.equal(a, b)
        for a, b in zip(lm.model.state_dict().values(), again.model.state_dict().values(), strict=True)
    )
    assert parse_models(study_model)[0].name == "tests.test_study:study_model"
    with pytest.raises(StudyError, match="cannot import"):
        build_model(ModelSpec("tests.nowhere:factory"))
    with pytest.raises(StudyError, match="listed twice"):
        parse_models("a,a")


def test_unit_seed_depends_on_image_only(inputs):
    img0, img1 = list_images(inputs["list"])[:2]
    a, b = ModelSpec("m1"), ModelSpec("m2")
    s = unit_seed(0, Unit(img0, a, "gradcam"))
    assert s == unit_seed(0, Unit(img0, b, "hirescam", "ep1.pt", 0, 1))  # common random numbers per image
    assert s != unit_seed(0, Unit(img1, a, "gradcam")) and s != unit_seed(1, Unit(img0, a, "gradcam"))
    assert Unit(img0, a, "gradcam").uid != Unit(img0, a, "hirescam").uid


# ---------------------------------------------------------------------------------------------------------
# The store.
# ---------------------------------------------------------------------------------------------------------


def test_reference_store(reference, inputs):
    res, study = reference
    assert (res.units, res.done, res.skipped, res.failed) == (UNITS, UNITS, 0, {})
    s, lay = study.summary.to_pylist(), study.layers.to_pylist()
    assert len(s) == UNITS and len(lay) == UNITS * 2 and unique_keys(study)
    by_image = {r["image"]: r for r in s if r["method"] == "gradcam"}
    assert (by_image["imgs/img0.png"]["target"], by_image["imgs/img0.png"]["target_source"]) == (2, "label")
    assert (by_image["imgs/img2.png"]["target"], by_image["imgs/img2.png"]["label"]) == (0, "class 0")
    r1 = by_image["imgs/img1.png"]
    assert r1["target_source"] == "top1" and r1["label"] is None and r1["target"] == r1["top1"]
    for r in s:  # the summary agrees with its layer rows
        rows = [x for x in lay if x["unit"] == r["unit"]]
        road = np.array([x["road"] for x in rows])
        assert [x["position"] for x in rows] == [0, 1] and [x["layer_name"] for x in rows] == [
            "features.7",
            "features.8",
        ]
        assert r["mean_layerwise_road"] == pytest.approx(road.mean(), abs=1e-12)
        assert r["max_ybroad"] == pytest.approx(road.max(), abs=1e-12)
        assert rows[r["best_position"]]["is_best"] and rows[r["final_position"]]["is_final"]
        assert r["difference"] == pytest.approx(r["max_ybroad"] - r["final_layer_road"], abs=1e-12)
        for x in rows:
            assert x["road"] == pytest.approx(
                np.mean([(x[f"lerf_p{p}"] - x[f"morf_p{p}"]) / 2 for p in (20, 80)])
            )
            assert (x["map_h"], x["map_w"], x["layer_kind"]) == (12, 12, "spatial")
            assert x["raw_min"] <= x["raw_mean"] <= x["raw_max"] and 0 <= x["raw_positive"] <= 1
    with (res.root / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == UNITS
    cfg = json.loads((res.root / "study.json").read_text())
    assert (
        cfg["settings"]["layers"] == 2 and cfg["inputs"]["labelled"] == 2 and cfg["inputs"]["units"] == UNITS
    )


def test_report_is_self_contained(reference):
    res, _ = reference
    figs = sorted(p.name for p in (res.root / "figures").glob("*.png"))
    assert figs == [
        "band_tests.test_study_study_model.png",
        "best_layers_tests.test_study_study_model.png",
        "claim_tests.test_study_study_model.png",
    ]
    page = (res.root / "study.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and not re.search(r'(src|href)="(?!data:)', page)
    assert "<td>gradcam</td>" in page and "hirescam" in page
    assert "Is the best layer the last?" in page and "held-out" in page  # the paper's claim over the images
    with open(res.root / "claim.csv", newline="") as f:
        claim = list(csv.DictReader(f))
    assert {r["method"] for r in claim} == {"gradcam", "hirescam"}
    assert {"difference_ci_low", "held_out_wilcoxon_p", "best_depth_mean"} <= set(claim[0])


def test_same_numbers_as_ybroad(reference, inputs):
    """A stored row is what camanim.road.ybroad gives for that image, target and the unit's seed."""
    from camanim.pipelines.study.units import build_model as build
    from camanim.pipelines.ybroad import ybroad

    _, study = reference
    row = next(
        r for r in study.summary.to_pylist() if r["image"] == "imgs/img2.png" and r["method"] == "hirescam"
    )
    lm = build(ModelSpec(MODEL), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = ybroad(lm, str(inputs["dir"] / "img2.png"), methods="hirescam", layers=2, target=0,
                        percentages=(20, 80), seed=row["seed"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert (
        direct["hirescam"].max == row["max_ybroad"] and direct["hirescam"].mean == row["mean_layerwise_road"]
    )


def test_resume_refuses_other_settings(reference, inputs, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(reference[0].root, out)
    with pytest.raises(StudyError, match="percentages"):
        run_study(inputs["list"], out, **(STUDY | {"percentages": (10, 90)}))
    assert_same_store(out, reference[1])


# ---------------------------------------------------------------------------------------------------------
# Interruptions and failures.
# ---------------------------------------------------------------------------------------------------------


def test_driver_exception_then_resume(reference, inputs, tmp_path):
    out = tmp_path / "study"

    def stop_after_three(done, failed, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(inputs["list"], out, progress=stop_after_three, **STUDY)
    assert committed(out) == 3
    res = run_study(inputs["list"], out, **STUDY)
    assert (res.skipped, res.done, res.failed) == (3, UNITS - 3, {})
    assert_same_store(out, reference[1])


def test_killed_driver_resumes(reference, inputs, tmp_path):
    """SIGKILL the `camanim study` process mid-study, re-run: the same store, no duplicate or missing row."""
    out = tmp_path / "study"
    cmd = [
        sys.executable, "-m", "camanim.cli", "--quiet", "study", "--images", str(inputs["list"]), "--models", MODEL,
        "--methods", "gradcam,hirescam", "--layers", "last-2", "--percentages", "20,80", "--threads", "1",
        "--no-figures", "--out", str(out),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), SLEEP_ENV: "0.1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if committed(out) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"the study ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    n = committed(out)
    assert 2 <= n < UNITS
    res = run_study(inputs["list"], out, **STUDY)
    assert res.skipped == n and res.complete
    assert not list(out.rglob(".tmp-*"))
    assert_same_store(out, reference[1])


def test_half_committed_unit_is_redone(reference, inputs, tmp_path):
    """A crash between a unit's two renames (layer file, no summary) and stray temporary files."""
    out = tmp_path / "study"
    shutil.copytree(reference[0].root, out)
    victim = sorted((out / "summary").glob("*.parquet"))[0]
    victim.unlink()
    (out / "layers" / ".tmp-deadbeef-1.parquet").write_bytes(b"partial")
    assert load_study(out).layers.num_rows == (UNITS - 1) * 2  # readers ignore the orphan layer file
    res = run_study(inputs["list"], out, **STUDY)
    assert (res.skipped, res.done) == (UNITS - 1, 1)
    assert not (out / "layers" / ".tmp-deadbeef-1.parquet").exists()
    assert_same_store(out, reference[1])


def test_killed_worker_is_retried(reference, inputs, tmp_path, monkeypatch):
    """Two local worker processes; one is SIGKILLed in its first forward: the pool restarts, units retry."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    monkeypatch.setenv(DRIVER_ENV, str(os.getpid()))
    out = tmp_path / "study"
    res = run_study(inputs["list"], out, workers=2, **STUDY)
    assert marker.exists() and res.restarts >= 1
    assert res.complete and res.failed == {} and not (out / "failures.json").exists()
    assert_same_store(out, reference[1])


def test_failing_unit_is_recorded(inputs, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(inputs["dir"], images)
    Image.new("RGB", (48, 48), (128, 128, 128)).save(images / "flat&<b>.png")
    out = tmp_path / "study"
    res = run_study(images, out, **(STUDY | {"figures": True}))
    assert res.units == 5 * 2 and res.done == UNITS and len(res.failed) == 2 and not res.complete
    failures = json.loads((out / "failures.json").read_text())
    assert {f["image"] for f in failures.values()} == {"flat&<b>.png"}
    assert all(f["attempts"] == 2 and "poisoned image" in f["error"] for f in failures.values())
    study = load_study(out)
    assert study.summary.num_rows == UNITS and "flat&<b>.png" not in study.summary.column("image").to_pylist()
    page = (out / "study.html").read_text()
    assert "flat&amp;&lt;b&gt;.png" in page and "flat&<b>" not in page
    again = run_study(images, out, **STUDY)  # failed units are tried again, finished ones skipped
    assert (again.skipped, again.done, len(again.failed)) == (UNITS, 0, 2)
    assert all(f["attempts"] == 4 for f in json.loads((out / "failures.json").read_text()).values())


# ---------------------------------------------------------------------------------------------------------
# Ray.
# ---------------------------------------------------------------------------------------------------------


def test_ray_matches_local(reference, inputs, tmp_path, monkeypatch):
    """A real local Ray instance (2 CPUs) started and stopped by the study; one actor is killed once."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'camanim[ray]')")
    assert not ray.is_initialized()
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    monkeypatch.setenv(DRIVER_ENV, str(os.getpid()))
    out = tmp_path / "study"
    res = run_study(inputs["list"], out, backend="ray", workers=2, **STUDY)
    assert not ray.is_initialized(), "the local Ray instance was not shut down"
    assert res.executor.startswith("ray (a local instance), 2 actors")
    assert marker.exists() and res.restarts == 1 and res.complete and res.failed == {}
    assert_same_store(out, reference[1])


# ---------------------------------------------------------------------------------------------------------
# CLI and checkpoints.
# ---------------------------------------------------------------------------------------------------------


def test_cli_checkpoints_epochwise(inputs, tmp_path, capsys):
    from camanim.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    for epoch in (1, 2, 10):
        torch.manual_seed(epoch)
        torch.save(StudyCNN(classes=3).state_dict(), runs / f"epoch_{epoch}.pt")
    out = tmp_path / "study"
    argv = [
        "--quiet", "study", "--images", str(inputs["dir"]), "--models", MODEL, "--methods", "gradcam",
        "--layers", "last-2", "--percentages", "20,80", "--threads", "1", "--checkpoints", str(runs / "epoch_*.pt"),
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "12 units; 0 already done, 12 run now, 0 failed" in capsys.readouterr().out
    study = load_study(out)
    s = study.summary.to_pylist()
    assert [(r["checkpoint_index"], r["epoch"]) for r in s[::4]] == [(0, 1), (1, 2), (2, 10)]
    assert len({r["max_ybroad"] for r in s if r["image"] == "img0.png"}) == 3  # three different networks
    assert (out / "figures" / "epochs_tests.test_study_study_model.png").stat().st_size > 1000
    assert main(argv) == 0 and "12 already done, 0 run now" in capsys.readouterr().out
    # The CLI refuses a second architecture with checkpoints (exit 2 with a message).
    assert (
        main([*argv[:-2], "--models", f"{MODEL},tests.conftest:TinyCNN", "--out", str(tmp_path / "x")]) == 2
    )
    assert "exactly one model" in capsys.readouterr().err
