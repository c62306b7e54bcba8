"""Frame index rules (docs/original-differences.md §3.5) by hand, and reading real tiny videos, GIFs and frame folders
written by the tests."""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from internvl_tune.data.errors import DataError
from internvl_tune.data.video import get_frame_indices, read_video_frames, video_prompt

NUM_VIDEO_FRAMES = 40
GREY_STEP = 6  # frame k is a flat grey of level 6k (0..234), so its index can be read back from the pixels
FPS = 10


def _write_video(path: Path) -> Path:
    codec = next(c for c in ("mpeg4", "libx264", "mjpeg") if c in av.codecs_available)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate = 4_000_000  # flat frames at a high rate keep the grey level within about one unit
        for k in range(NUM_VIDEO_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), GREY_STEP * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _grey_index(image: Image.Image) -> int:
    return round(float(np.asarray(image, dtype=np.float64).mean()) / GREY_STEP)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "grey.mp4")


def test_middle_indices_by_hand() -> None:
    # vlen=10, T=5: edges [0,2,4,6,8,10] -> intervals (0,1) (2,3) (4,5) (6,7) (8,9) -> (a+b)//2 = 0,2,4,6,8.
    assert get_frame_indices(5, 10, "middle") == [0, 2, 4, 6, 8]
    # vlen=100, T=4: edges [0,25,50,75,100] -> (0,24) (25,49) (50,74) (75,99) -> 12, 37, 62, 87.
    assert get_frame_indices(4, 100, "middle") == [12, 37, 62, 87]
    # vlen=7, T=3: linspace(0,7,4) = [0, 2.33, 4.67, 7] -> [0,2,4,7] -> (0,1) (2,3) (4,6) -> 0, 2, 5.
    assert get_frame_indices(3, 7, "middle") == [0, 2, 5]


def test_padding_with_last_index_when_video_is_shorter() -> None:
    # vlen=3 < T=6: three one-frame intervals, then the last index repeated up to T.
    assert get_frame_indices(6, 3, "middle") == [0, 1, 2, 2, 2, 2]
    # "rand" on one-frame intervals: range(a, a) is empty, so the fallback takes a random subset of all 3 frames
    # (here all of them), sorted, then pads.
    assert get_frame_indices(6, 3, "rand", rng=random.Random(0)) == [0, 1, 2, 2, 2, 2]


def test_rand_draws_one_frame_per_interval_excluding_its_last() -> None:
    # vlen=40, T=8: intervals of 5 frames (0..4), (5..9), ...; the original draws from range(start, start + 4),
    # so the last frame of each interval is never picked.
    seen: set[int] = set()
    for seed in range(200):
        indices = get_frame_indices(8, 40, "rand", rng=random.Random(seed))
        assert len(indices) == 8
        for k, index in enumerate(indices):
            assert 5 * k <= index <= 5 * k + 3
        seen.update(indices)
    assert not seen & {4, 9, 14, 19, 24, 29, 34, 39} and len(seen) == 32

    # Reproducible with the same seed.
    assert get_frame_indices(8, 40, rng=random.Random(1)) == get_frame_indices(8, 40, rng=random.Random(1))


def test_rand_falls_back_to_sorted_random_subset() -> None:
    # vlen=10, T=8: edges [0,1,2,3,5,6,7,8,10] contain one-frame intervals, so the draw falls back to 8 distinct
    # frames out of 10, sorted.
    indices = get_frame_indices(8, 10, "rand", rng=random.Random(5))
    assert indices == sorted(indices) and len(set(indices)) == 8 and all(0 <= i < 10 for i in indices)


def test_fps_sampling_and_cap() -> None:
    # 50 frames at 10 fps = 5 s; "fps1": centres at 0.5 s, 1.5 s, ... -> frames 5, 15, 25, 35, 45. No padding.
    assert get_frame_indices(8, 50, "fps1.0", fps=10.0) == [5, 15, 25, 35, 45]
    assert get_frame_indices(8, 50, "fps1.0", fps=10.0, max_num_frames=3) == [5, 15, 25]
    # "fps2" at 10 fps: every 0.5 s from 0.25 s -> 2.5 rounds to 2 (half to even), 7.5 -> 8, 12.5 -> 12, ...
    assert get_frame_indices(1, 20, "fps2", fps=10.0) == [2, 8, 12, 18]
    # Unknown input fps counts as 1 fps: 4 frames = 4 s, "fps1" -> 0.5, 1.5, 2.5, 3.5 s -> 0, 2, 2, 4 -> 4 dropped.
    assert get_frame_indices(1, 4, "fps1") == [0, 2, 2]


def test_bad_sampling_arguments() -> None:
    with pytest.raises(ValueError, match="unknown frame sampling"):
        get_frame_indices(4, 10, "uniform")
    with pytest.raises(ValueError, match="fps"):
        get_frame_indices(4, 10, "fpsx")
    with pytest.raises(ValueError):
        get_frame_indices(4, 0)


def test_video_prompt() -> None:
    assert video_prompt(3) == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\n"
    # It replaces "<video>\n" in the first turn, so the question follows the last frame line.
    assert "<video>\nWhat?".replace("<video>\n", video_prompt(2)) == "Frame-1: <image>\nFrame-2: <image>\nWhat?"


def test_read_video_returns_the_requested_frames(video_path: Path) -> None:
    expected_rng = random.Random(7)
    num_frames = expected_rng.randint(4, 12)  # T is drawn first, then the indices, from the same rng
    expected = get_frame_indices(num_frames, NUM_VIDEO_FRAMES, "rand", float(FPS), 12, expected_rng)

    frames = read_video_frames(video_path, 4, 12, "rand", rng=random.Random(7))
    assert len(frames) == num_frames
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [_grey_index(f) for f in frames] == expected


def test_read_video_middle_pads_and_clips(video_path: Path) -> None:
    # T = 50 > 40 frames: every frame once, then the last repeated.
    frames = read_video_frames(video_path, 50, 50, "middle")
    assert [_grey_index(f) for f in frames] == list(range(40)) + [39] * 10

    # Clip 1.0-2.0 s at 10 fps: frames 10..19; "middle" with T=5 -> 10 + [0, 2, 4, 6, 8].
    frames = read_video_frames(video_path, 5, 5, "middle", clip=(1.0, 2.0))
    assert [_grey_index(f) for f in frames] == [10, 12, 14, 16, 18]

    # "fps2" over the 4 s video: 0.25 s, 0.75 s, ... -> frames 2, 8, 12, 18, ... capped at max_num_frames=3.
    frames = read_video_frames(video_path, 1, 3, "fps2", rng=random.Random(0))
    assert [_grey_index(f) for f in frames] == [2, 8, 12]

    with pytest.raises(DataError, match="grey.mp4: no frames"):
        read_video_frames(video_path, 4, 4, "middle", clip=(10.0, 12.0))


def test_read_video_without_frame_count_in_container(tmp_path: Path) -> None:
    # Matroska stores no frame count (stream.frames == 0), so the reader counts packets first.
    path = _write_video(tmp_path / "grey.mkv")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    # 40 frames, T=5: edges [0,8,16,24,32,40] -> (0,7) (8,15) ... -> 3, 11, 19, 27, 35.
    frames = read_video_frames(path, 5, 5, "middle")
    assert [_grey_index(f) for f in frames] == [3, 11, 19, 27, 35]


def test_read_gif(tmp_path: Path) -> None:
    colours = [(20 * k, 255 - 20 * k, 0) for k in range(12)]
    path = tmp_path / "anim.gif"
    first, *rest = [Image.new("RGB", (32, 24), c) for c in colours]
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0)

    # 12 frames, T=4, middle: edges [0,3,6,9,12] -> (0,2) (3,5) (6,8) (9,11) -> 1, 4, 7, 10.
    frames = read_video_frames(path, 4, 4, "middle")
    assert [f.getpixel((0, 0)) for f in frames] == [colours[i] for i in (1, 4, 7, 10)]


def test_read_frame_folder_sorted_by_number(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(12):  # name order would be frame_0, frame_1, frame_10, frame_11, frame_2, ...
        Image.new("RGB", (16, 16), (GREY_STEP * k,) * 3).save(folder / f"frame_{k}.png")
    (folder / "notes.txt").write_text("not a frame")

    frames = read_video_frames(folder, 6, 6, "middle")
    # 12 frames, T=6: intervals of two, (a + a + 1) // 2 = a -> 0, 2, 4, 6, 8, 10.
    assert [_grey_index(f) for f in frames] == [0, 2, 4, 6, 8, 10]

    # Fewer frames than T: padded like a video.
    frames = read_video_frames(folder, 14, 14, "middle")
    assert [_grey_index(f) for f in frames] == list(range(12)) + [11, 11]

    with pytest.warns(UserWarning, match="clip"):
        read_video_frames(folder, 2, 2, "middle", clip=(0.0, 1.0))


def test_read_frame_folder_without_numbers_uses_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "named"
    folder.mkdir()
    for k, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        Image.new("RGB", (16, 16), (GREY_STEP * 10 * k,) * 3).save(folder / name, quality=100)
    frames = read_video_frames(folder, 3, 3, "middle")
    assert [round(_grey_index(f) / 10) for f in frames] == [0, 1, 2]


def test_missing_and_undecodable_inputs_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.mp4: video not found"):
        read_video_frames(tmp_path / "nowhere.mp4")

    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    with pytest.raises(DataError, match="broken.mp4"):
        read_video_frames(garbage, 2, 2)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_folder: no frame images"):
        read_video_frames(empty, 2, 2)

    folder = tmp_path / "bad_frames"
    folder.mkdir()
    (folder / "frame_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="frame_1.jpg: cannot read image"):
        read_video_frames(folder, 1, 1)


def test_recipes_import_without_pyav():
    """PyAV is needed only to read a video file: the GPU check machine has none."""
    import subprocess
    import sys

    code = "import sys; sys.modules['av'] = None; import internvl_tune.recipes.mpo, internvl_tune.recipes.sft, internvl_tune.cli"
    subprocess.run([sys.executable, "-c", code], check=True)
