"""Trust: no data camanim did not write is ever touched, a published bundle is complete, and every mistake
gets one ``camanim: error:`` line (exit code 2, no traceback, nothing left behind)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camanim.cli.commands
import camanim.pipelines.animate
from camanim.cli import main
from camanim.compute.models import Preprocessing, wrap_model
from camanim.errors import BundleExistsError, OutputError
from camanim.outputs.bundle import (
    MANIFEST,
    STAGING_MARK,
    check_output,
    open_bundle,
    read_manifest,
    staging_path,
)
from camanim.outputs.report import write_report

from .conftest import TinyCNN


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-1), folders included as ``name/``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel + ("/" if p.is_dir() else "")] = (
            "" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        )
    return out


def user_folder(root: Path) -> Path:
    """A folder of a user's own: a thesis and a sub-folder of CSVs."""
    root.mkdir(parents=True)
    (root / "thesis.tex").write_text("\\chapter{Results}\n")
    (root / "csv").mkdir()
    (root / "csv" / "runs.csv").write_text("epoch,acc\n1,0.5\n")
    return root


@pytest.fixture
def tiny_cli(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The CLI's model loader replaced by a seeded 5-class TinyCNN at 48x48 (fast, offline)."""
    asked: list[str] = []

    def fake(name="efficientnet_lite0", weights="default", **_):
        asked.append(name)
        torch.manual_seed(0)
        return wrap_model(TinyCNN(classes=5).eval(), name=name, preprocessing=Preprocessing(size=(48, 48)))

    monkeypatch.setattr(camanim.cli.commands, "load_model", fake)
    return asked


def assert_complete(folder: Path) -> dict:
    """The bundle's manifest lists every file in it, and every listed file exists."""
    manifest = read_manifest(folder)
    listed = set(manifest["files"]) | {MANIFEST}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    inside_listed_dirs = {f for f in on_disk if any(f.startswith(d + "/") for d in listed)}
    assert on_disk - inside_listed_dirs == {f for f in listed if (folder / f).is_file()}, on_disk ^ listed
    assert all((folder / f).exists() for f in listed)
    return manifest


# -------------------------------------------------------------------------------- 1. never lose data


def test_force_refuses_a_folder_that_is_not_a_bundle(tmp_path, tiny_cli, capsys):
    thesis = user_folder(tmp_path / "thesis")
    before = snapshot(thesis)
    rc = main(["explain", "--layers", "last", "--force", "--out", str(thesis)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("camanim: error:") and "not a camanim bundle" in err
    assert "--force" not in err.split("error:", 1)[1].split(";")[-1]  # the refusal no longer suggests it
    assert snapshot(thesis) == before
    assert tiny_cli == []  # refused before any model was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_force_refuses_a_bundle_holding_files_camanim_did_not_write(tmp_path, tiny_cli, capsys):
    out = tmp_path / "b"
    assert main(["explain", "--layers", "last", "--out", str(out)]) == 0
    (out / "my-notes.txt").write_text("do not lose me")
    (out / "overlays" / "mine").mkdir()
    before = snapshot(out)
    assert main(["explain", "--layers", "last", "--force", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "my-notes.txt" in err
    assert snapshot(out) == before


def test_force_replaces_a_clean_bundle_and_removes_only_what_it_listed(tmp_path, tiny_cli):
    out = tmp_path / "b"
    assert main(["explain", "--method", "gradcam,hirescam", "--layers", "last", "--out", str(out)]) == 0
    assert (out / "overlays" / "hirescam").is_dir()
    assert main(["explain", "--method", "gradcam", "--layers", "last", "--force", "--out", str(out)]) == 0
    assert not (out / "overlays" / "hirescam").exists()  # the old bundle's own files are gone
    assert_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging or old folder left behind


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
@pytest.mark.parametrize("force", [False, True])
def test_protected_folders_are_refused(where, force, tmp_path, monkeypatch, tiny_cli, capsys):
    work = user_folder(tmp_path / "home" / "project")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    out = {"cwd": ".", "parent": "..", "home": "~", "root": "/"}[where]
    before = snapshot(tmp_path)
    rc = main(["explain", "--layers", "last", "--out", out] + (["--force"] if force else []))
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to write into" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before and tiny_cli == []


def test_a_foreign_staging_folder_is_never_removed(tmp_path):
    out = tmp_path / "run"
    foreign = staging_path(out)
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(BundleExistsError, match="not made by camanim"):
        with open_bundle(out):
            pass
    assert (foreign / "data.bin").read_bytes() == b"x"


def test_a_failed_replacement_keeps_the_old_bundle(tmp_path):
    out = tmp_path / "b"
    with open_bundle(out) as b:
        b.write_text("a.txt", "one")
    with pytest.raises(OSError), open_bundle(out, force=True) as b:
        b.write_text("a.txt", "two")
        raise OSError(28, "No space left on device")
    assert (out / "a.txt").read_text() == "one" and not staging_path(out).exists()


# ------------------------------------------------------------------- 2. a published bundle is complete


def test_interrupt_while_writing_the_report_publishes_nothing_and_resume_finishes(
    tmp_path, tiny_cli, monkeypatch
):
    out = tmp_path / "anim"
    args = ["--quiet", "animate", "--size", "48", "--layers", "3", "--out", str(out)]

    def interrupted(folder, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(camanim.cli.commands, "write_report", interrupted)
    assert main(args) == 130
    stage = staging_path(out)
    assert not out.exists() and (stage / STAGING_MARK).is_file() and (stage / "maps.npz").is_file()
    monkeypatch.setattr(camanim.cli.commands, "write_report", write_report)
    monkeypatch.setattr(
        camanim.pipelines.animate, "explain", lambda *a, **k: pytest.fail("the model ran again")
    )
    assert main([*args, "--resume"]) == 0
    manifest = assert_complete(out)
    assert "report.html" in manifest["files"] and (out / "report.html").stat().st_size > 0
    assert not stage.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["explain", "--layers", "first,last"],
        ["animate", "--size", "48", "--layers", "3", "--road", "--format", "mp4,frames"],
        ["road", "--layers", "3", "--percentages", "50"],
        ["fmgcam", "--top-k", "2", "--layers", "2"],
        ["compare", "--methods", "gradcam,hirescam"],
    ],
)
def test_every_command_lists_every_file_it_writes(command, tmp_path, tiny_cli):
    out = tmp_path / "b"
    assert main(["--quiet", *command, "--out", str(out)]) == 0
    manifest = assert_complete(out)
    if command[0] in ("animate", "fmgcam"):
        assert "report.html" in manifest["files"]


def test_report_command_lists_the_report_and_never_overwrites_a_foreign_file(tmp_path, tiny_cli, capsys):
    out = tmp_path / "b"
    assert main(["explain", "--layers", "last", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    assert "report.html" in assert_complete(out)["files"]
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my page</html>")
    assert main(["report", str(out), "--out", str(mine)]) == 2
    assert "not a camanim report" in capsys.readouterr().err
    assert mine.read_text() == "<html>my page</html>"


def test_files_honour_the_umask(tmp_path, tiny_cli):
    old = os.umask(0o027)
    try:
        out = tmp_path / "b"
        assert main(["explain", "--layers", "last", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes


# ------------------------------------------------------------------------- 3. one line per mistake

BAD = [
    (["explain", "--num-classes", "0"], "--num-classes"),
    (["explain", "--num-classes", "-5"], "--num-classes"),
    (["animate", "--fps", "-5"], "--fps"),
    (["animate", "--size", "0"], "--size"),
    (["animate", "--format", ""], "--format"),
    (["animate", "--format", "mp5"], "'mp4'"),
    (["animate", "--layout", "sidebyside"], "'side-by-side'"),
    (["animate", "--norm", "globl"], "'global'"),
    (["animate", "--cmap", "jett"], "'jet'"),
    (["explain", "--batch-size", "0"], "--batch-size"),
    (["explain", "--max-channels", "0"], "--max-channels"),
    (["road", "--percentages", "0,150"], "(0, 100]"),
    (["road", "--percentages", "a,b"], "--percentages"),
    (["road", "--imputer", "linear"], "noisy_linear"),
    (["explain", "--device", "gpu0"], "devices here: cpu"),
    (["explain", "--device", "cuda:7"], "devices here"),
    (["explain", "--layers", ""], "--layers"),
    (["road", "--layers", ","], "--layers"),
    (["compare", "--layers", ""], "--layers"),
    (["fmgcam", "--layers", " "], "--layers"),
    (["explain", "--method", ""], "--method"),
    (["explain", "--top-k", "3", "--target", "5"], "give one of them"),
    (["compare", "--road", "/no/such/road"], "does not exist"),
    (["animate", "--method", "fmgcam", "--road"], "fmgcam"),
    (["fmgcam", "--base", "eigencam"], "eigencam"),
    (["explain", "--image", "no-such-file.png"], "no-such-file.png"),
    (["report", "/no/such/bundle"], "not a camanim bundle"),
    (["report", ".", "--quality", "0"], "--quality"),
    (["study", "--images", ".", "--percentages", "0"], "--percentages"),
    (["study", "--images", ".", "--workers", "0"], "--workers"),
]


@pytest.mark.parametrize("argv, hint", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_get_one_line_and_leave_nothing(argv, hint, tmp_path, monkeypatch, tiny_cli, capsys):
    if "cuda" in " ".join(argv) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "out")] if argv[0] != "report" else []
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camanim: error: ") and hint in lines[0], err
    assert list(tmp_path.iterdir()) == [], "something was left behind"
    assert tiny_cli == [], "a model was loaded before the options were checked"


def test_debug_shows_the_traceback(tmp_path, tiny_cli):
    with pytest.raises(Exception, match="top-k"):
        main(["--debug", "explain", "--top-k", "2", "--target", "1", "--out", str(tmp_path / "x")])


def test_out_below_a_file_and_mount_points_are_refused(tmp_path, tiny_cli, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["explain", "--out", str(tmp_path / "notes.txt" / "run")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["explain", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    mount = next(p for p in ("/dev/shm", "/proc", "/sys") if os.path.ismount(p))
    with pytest.raises(OutputError, match="mount point"):
        check_output(mount, force=True)
    assert tiny_cli == []


def test_unwritable_location_is_refused_before_any_work(tmp_path, tiny_cli, capsys):
    # /sys refuses new entries even to root: a place where nothing can be created.
    assert main(["explain", "--out", "/sys/camanim-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot write in '/sys'" in err and len(err.strip().splitlines()) == 1
    assert tiny_cli == []


def _cli(args: list[str], cwd: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "camanim", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **popen,
    )


def test_a_write_that_fails_half_way_leaves_the_old_bundle_and_one_line(tmp_path):
    """A file size limit (the kernel's EFBIG, like a disk filling up) makes the maps fail to write."""
    out = tmp_path / "b"
    base = ["explain", "--model", "resnet18", "--weights", "none", "--layers", "last", "--out", str(out)]
    first = _cli(base, tmp_path)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    res = _cli([*base[:-2], "--layers", "all", "--force", "--out", str(out)], tmp_path, preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("camanim: error: could not write") and "File too large" in res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A fresh private mount namespace where a 4 MB tmpfs can be mounted (skips where that is not allowed)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("user and mount namespaces are not available (unshare -rm)")
    return tmp_path


def test_full_and_read_only_file_systems(small_tmpfs):
    """On a real 4 MB tmpfs: refused for lack of space before any work; remounted read-only: refused."""
    mnt = small_tmpfs / "mnt"
    mnt.mkdir()
    cmd = (
        f"mount -t tmpfs -o size=4m tmpfs {mnt} && "
        f"{sys.executable} -m camanim explain --layers last --out {mnt}/full; echo rc=$?; "
        f"mount -o remount,ro {mnt} && "
        f"{sys.executable} -m camanim explain --layers last --out {mnt}/ro; echo rc=$?"
    )
    res = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("camanim: error:")]
    assert res.stdout.count("rc=2") == 2, res.stdout + res.stderr
    assert "MB free" in errors[0] and "Read-only file system" in errors[1], errors
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------ 4. results are not mixed


def test_compare_refuses_road_values_of_another_image(tmp_path, tiny_cli, capsys):
    road = tmp_path / "road"
    assert (
        main(
            [
                "--quiet",
                "road",
                "--image",
                "coffee",
                "--layers",
                "3",
                "--percentages",
                "50",
                "--out",
                str(road),
            ]
        )
        == 0
    )
    assert main(["compare", "--image", "astronaut", "--road", str(road), "--out", str(tmp_path / "c1")]) == 2
    assert "another input image" in capsys.readouterr().err and not (tmp_path / "c1").exists()
    assert main(
        ["compare", "--image", "coffee", "--road", str(road), "--target", "1", "--out", str(tmp_path / "c2")]
    ) in (0, 2)
    target = read_manifest(road)["targets"][0]["class"]
    other = (target + 1) % 5
    assert (
        main(
            [
                "compare",
                "--image",
                "coffee",
                "--road",
                str(road),
                "--target",
                str(other),
                "--out",
                str(tmp_path / "c3"),
            ]
        )
        == 2
    )
    assert "target class" in capsys.readouterr().err
    out = tmp_path / "c4"
    assert (
        main(
            [
                "compare",
                "--image",
                "coffee",
                "--methods",
                "gradcam",
                "--layers",
                "last",
                "--road",
                str(road),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    shown = read_manifest(out)["compare"]["road"]
    values = read_manifest(road)["road"]["results"]
    assert shown and all(values[k] == pytest.approx(v) for k, v in shown.items())


# ------------------------------------------------------------------------------- 6. smaller things


def test_mostly_blank_maps_are_reported_on_the_console(tmp_path, monkeypatch, caplog):
    def dead(name="x", weights="default", **_):
        torch.manual_seed(0)
        model = TinyCNN(classes=5).eval()
        torch.nn.init.zeros_(model.fc.weight)  # no class depends on any feature: every gradient is 0
        return wrap_model(model, name=name, preprocessing=Preprocessing(size=(48, 48)))

    monkeypatch.setattr(camanim.cli.commands, "load_model", dead)
    with caplog.at_level("WARNING", logger="camanim"):
        assert main(["explain", "--layers", "all", "--out", str(tmp_path / "b")]) == 0
    warned = [r.getMessage() for r in caplog.records if "maps are zero" in r.getMessage()]
    n = len(json.loads((tmp_path / "b" / MANIFEST).read_text())["chosen_layers"])
    assert warned == [
        f"{n} of {n} maps are zero, constant or non-finite: random weights, or layers with no gradient path to the target? (per-map flags are in manifest.json)"
    ]
    assert np.load(tmp_path / "b" / "maps.npz")  # the bundle is still written


class OnlyAt48(torch.nn.Module):
    """A model that, like a ViT with a fixed position embedding, takes one input size only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        assert x.shape[-1] == 48, f"Input width ({x.shape[-1]}) doesn't match model (48)."
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_a_model_that_refuses_the_input_gets_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        camanim.cli.commands,
        "load_model",
        lambda *a, **k: wrap_model(OnlyAt48(), preprocessing=Preprocessing(size=(48, 48))),
    )
    assert main(["layers", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "camanim: error: the model's forward pass failed on an input of shape (1, 3, 16, 16)"
    )
    assert "doesn't match model (48)" in err and len(err.strip().splitlines()) == 1
    assert main(["layers", "--size", "48"]) == 0
