"""Streamed MP4 / GIF / PNG-frames writers, atomic output, decoding back."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from camanim.errors import BundleExistsError, MissingExtraError, UnknownNameError
from camanim.outputs.video import VideoError, count_frames, default_fps, open_writer, read_frames


def _flat(h: int, w: int, colour: tuple[int, int, int]) -> np.ndarray:
    frame = np.empty((h, w, 3), np.uint8)
    frame[...] = colour
    return frame


COLOURS = [(200, 40, 40), (40, 160, 60), (30, 60, 220), (240, 200, 20), (128, 128, 128)]


def test_mp4_round_trip_frames_size_and_colours(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    frames = [_flat(48, 64, c) for c in COLOURS]
    with open_writer(path, fps=5) as w:
        for f in frames:
            w.write(f)
    assert count_frames(path) == len(frames)
    back = read_frames(path)
    assert back.shape == (len(frames), 48, 64, 3)
    for got, want in zip(back, frames, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # temporary file renamed away
    assert path.read_bytes()[4:8] == b"ftyp"


def test_mp4_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    with open_writer(path, fps=10, fmt="mp4") as w:
        for c in COLOURS[:3]:
            w.write(_flat(31, 45, c))
    back = read_frames(path)
    assert back.shape == (3, 32, 46, 3)
    assert np.abs(back[0].astype(int) - np.array(COLOURS[0])).mean() < 3  # edge padding keeps the colour


def test_gif_frame_count_and_colours(tmp_path: Path) -> None:
    path = tmp_path / "v.gif"
    frames = [_flat(40, 50, c) for c in [*COLOURS, COLOURS[-1]]]  # a repeated frame must not be dropped
    with open_writer(path, fps=10) as w:
        for f in frames:
            w.write(f)
    assert path.read_bytes()[:6] == b"GIF89a"
    assert count_frames(path) == len(frames)
    back = read_frames(path)
    assert back.shape == (len(frames), 40, 50, 3)
    assert np.abs(back.astype(int) - np.stack(frames).astype(int)).mean() < 3


def test_frames_folder_writes_numbered_pngs(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 10, 12, 3), dtype=np.uint8)
    with open_writer(out, fps=3, fmt="frames") as w:
        for f in frames:
            w.write(f)
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{k:05d}.png" for k in range(4)]
    assert count_frames(out) == 4
    np.testing.assert_array_equal(read_frames(out), frames)  # PNG is lossless
    # A second run replaces the earlier frames folder completely.
    with open_writer(out, fps=3, fmt="frames") as w:
        w.write(frames[0])
    assert count_frames(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_frames_refuses_to_replace_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleExistsError):
        open_writer(tmp_path / "mine", fps=3, fmt="frames")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "frames"])
def test_exception_inside_with_leaves_nothing_behind(tmp_path: Path, name: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(tmp_path / name, fps=5) as w:
            w.write(_flat(16, 16, COLOURS[0]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old")
    with pytest.raises(KeyError):
        with open_writer(path, fps=5) as w:
            w.write(_flat(16, 16, COLOURS[0]))
            raise KeyError("x")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_no_frames_and_size_mismatch_are_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no frames"):
        with open_writer(tmp_path / "empty.mp4", fps=5):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="differs"):
        with open_writer(tmp_path / "v.mp4", fps=5, size=(16, 16)) as w:
            w.write(_flat(16, 18, COLOURS[0]))
    with pytest.raises(ValueError, match="uint8"):
        with open_writer(tmp_path / "v.mp4", fps=5) as w:
            w.write(np.zeros((16, 16, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failure_raises_and_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="ffmpeg"):
        with open_writer(tmp_path / "v.mp4", fps=5, preset="no-such-preset") as w:
            for _ in range(3):
                w.write(_flat(16, 16, COLOURS[0]))
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError) as info:
        open_writer(tmp_path / "v.mp4", fps=5, fmt="mp5")  # type: ignore[arg-type]
    assert "mp4" in info.value.matches
    with pytest.raises(UnknownNameError):
        open_writer(tmp_path / "v.avi", fps=5)


def test_missing_ffmpeg_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import now raises ImportError
    monkeypatch.setenv("PATH", str(tmp_path))  # and no ffmpeg on PATH
    with pytest.raises(MissingExtraError, match="imageio-ffmpeg"):
        open_writer(tmp_path / "v.mp4", fps=5)
    assert isinstance(MissingExtraError("x"), ImportError)


@pytest.mark.parametrize(
    ("n", "fps"), [(150, 15), (8, 2), (1000, 30), (0, 2), (45, 4)]
)  # fmt: skip
def test_default_fps(n: int, fps: int) -> None:
    assert default_fps(n) == fps
