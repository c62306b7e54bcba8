"""Video frame sampling and reading: video files and GIFs through PyAV, folders of frame images
(docs/original-differences.md §3.5).

A video item becomes `T ~ randint(min_num_frames, max_num_frames)` frames, each one 448 tile (no dynamic tiling), and
`<video>\\n` in the first turn becomes one `Frame-k: <image>` line per frame (`video_prompt`).

Example:
    >>> frames = read_video_frames("clip.mp4", min_num_frames=8, max_num_frames=32)  # doctest: +SKIP
    >>> prompt = "<video>\\nWhat happens?".replace("<video>\\n", video_prompt(len(frames)))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import load_image
from internvl_tune.errors import UserError

FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_FRAME_NUMBER = re.compile(r"_(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def get_frame_indices(
    num_frames: int,
    vlen: int,
    sample: str = "rand",
    fps: float | None = None,
    max_num_frames: int = -1,
    rng: random.Random | None = None,
) -> list[int]:
    """Choose which frames of a `vlen`-frame video to use, exactly as the original `get_frame_indices`.

    - "rand" / "middle": split `[0, vlen)` into `min(num_frames, vlen)` intervals at the integer edges
      `linspace(0, vlen, n + 1)`, each interval `(start, end)` running to one before the next edge. "middle" takes
      `(start + end) // 2`. "rand" draws from `range(start, end)`, which (as in the original) leaves out the last
      frame of each interval; when an interval has a single frame that range is empty, and the whole draw falls back
      to a sorted random subset of all frames. Both then pad with the last index up to `num_frames`.
    - "fpsX" (e.g. "fps0.5"): one frame every `1 / X` seconds at the centre of each step, using the video's own
      `fps` (1 when unknown, as in the original), capped at `max_num_frames` when that is positive. No padding.

    Args:
        num_frames: Frames wanted (T) for "rand" and "middle".
        vlen: Frames in the video (or in the clip).
        sample: "rand", "middle" or "fps<float>".
        fps: Frame rate of the video, used by "fpsX" only.
        max_num_frames: Cap for "fpsX"; -1 for none.
        rng: Random source for "rand"; when None, one seeded from the global `random` state.

    Returns:
        Frame indices in `[0, vlen)`, non-decreasing.

    Example:
        vlen=10, T=5, "middle": edges [0, 2, 4, 6, 8, 10], intervals (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
        centres rounded down:

        >>> get_frame_indices(5, 10, "middle")
        [0, 2, 4, 6, 8]

        vlen=3, T=5, "middle": three one-frame intervals (0, 0), (1, 1), (2, 2), then padding with the last:

        >>> get_frame_indices(5, 3, "middle")
        [0, 1, 2, 2, 2]

        "fps1" on 50 frames at 10 fps (5 s): seconds 0.5, 1.5, ..., 4.5, so frames 5, 15, 25, 35, 45:

        >>> get_frame_indices(8, 50, "fps1", fps=10.0)
        [5, 15, 25, 35, 45]
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if vlen < 1:
        raise ValueError(f"a video needs at least one frame, got vlen={vlen}")
    rand = _rng_or_global(rng)
    if sample in ("rand", "middle"):
        num_intervals = min(num_frames, vlen)
        edges = np.linspace(0, vlen, num_intervals + 1).astype(int)
        ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(num_intervals)]
        if sample == "rand":
            try:
                indices = [rand.choice(range(start, end)) for start, end in ranges]
            except IndexError:  # an empty range(start, end): some interval holds a single frame
                indices = sorted(rand.sample(range(vlen), num_intervals))
        else:
            indices = [(start + end) // 2 for start, end in ranges]
        return indices + [indices[-1]] * (num_frames - len(indices))
    if sample.startswith("fps"):
        try:
            output_fps = float(sample[3:])
        except ValueError:
            output_fps = 0.0
        if not output_fps > 0:
            raise UserError(f"sample {sample!r}: expected 'fps' followed by a positive number, e.g. 'fps1.0'")
        input_fps = fps if fps else 1.0
        delta = 1 / output_fps
        seconds = np.arange(delta / 2, vlen / input_fps + delta / 2, delta)
        indices = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        return indices[:max_num_frames] if max_num_frames > 0 else indices
    raise UserError(f"unknown frame sampling {sample!r}: expected 'rand', 'middle' or 'fps<float>'")


def read_video_frames(
    path: str | os.PathLike[str],
    min_num_frames: int = 8,
    max_num_frames: int = 32,
    sample: str = "rand",
    clip: tuple[float, float] | None = None,
    rng: random.Random | None = None,
) -> list[Image.Image]:
    """Read the sampled frames of a video file, a GIF or a folder of frame images as RGB images.

    The frame count is `T = rng.randint(min_num_frames, max_num_frames)` (both inclusive), drawn before the frame
    indices (`get_frame_indices`). Files are decoded once, front to back, keeping only the chosen frames; the frame
    count comes from the container when it has one, else from a pass over the packets. `clip=(start_s, end_s)`
    restricts sampling to that stretch of a video file (by its frame rate). A folder's frames are ordered by the
    number in `name_<n>.jpg` / `.png`, other names first and by name, as the original's sort.

    All three sources return exactly the frames at the chosen indices, padding included (a video shorter than T
    repeats its last frame). The original does this for video files only: its GIF reader drops repeated indices and
    its folder reader returns every frame when there are no more than T.

    Args:
        path: Video file (anything FFmpeg reads, GIF included) or a folder of frame images.
        min_num_frames: Fewest frames to sample.
        max_num_frames: Most frames to sample (also the cap for "fpsX" sampling).
        sample: "rand", "middle" or "fps<float>" (see `get_frame_indices`).
        clip: Optional `(start_s, end_s)` in seconds, video files only.
        rng: Random source; when None, one seeded from the global `random` state.

    Returns:
        The frames in order, T of them for "rand" and "middle".

    Raises:
        DataError: The path is missing, has no video stream or frames, or cannot be decoded; names the path.

    Example:
        >>> frames = read_video_frames("clip.mp4", 8, 32, rng=random.Random(0))  # doctest: +SKIP
        >>> len(frames)  # random.Random(0).randint(8, 32)  # doctest: +SKIP
        20
    """
    if not 1 <= min_num_frames <= max_num_frames:
        raise ValueError(f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames}, {max_num_frames}")
    rand = _rng_or_global(rng)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: video not found")
    num_frames = rand.randint(min_num_frames, max_num_frames)
    if path.is_dir():
        if clip is not None:
            warnings.warn(f"{path}: clip {clip} is ignored for a folder of frames (it has no frame rate)", stacklevel=2)
        return _read_folder(path, num_frames, sample, max_num_frames, rand)
    av = _pyav()
    try:
        return _read_container(path, num_frames, sample, max_num_frames, clip, rand)
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot decode video: {type(e).__name__}: {e}") from e


def video_prompt(num_frames: int) -> str:
    """The text that replaces `<video>\\n` in the first turn: one `Frame-k: <image>` line per frame.

    Example:
        >>> video_prompt(2)
        'Frame-1: <image>\\nFrame-2: <image>\\n'
    """
    return "".join(f"Frame-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, num_frames + 1))


def _rng_or_global(rng: random.Random | None) -> random.Random:
    # Seeded from the global generator, so `random.seed(...)` still makes runs without an explicit rng repeatable.
    return rng if rng is not None else random.Random(random.getrandbits(64))


def _read_folder(
    path: Path, num_frames: int, sample: str, max_num_frames: int, rand: random.Random
) -> list[Image.Image]:
    names = [
        entry.name
        for entry in os.scandir(path)
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(FRAME_IMAGE_SUFFIXES)
    ]
    if not names:
        raise DataError(f"{path}: no frame images ({', '.join(FRAME_IMAGE_SUFFIXES)}) in the video folder")

    def frame_number(name: str) -> tuple[int, str]:
        match = _FRAME_NUMBER.search(name)
        return (int(match.group(1)) if match else -1, name)

    names.sort(key=frame_number)
    # A folder has no frame rate; the original samples "fpsX" as if it were 1 fps.
    indices = get_frame_indices(num_frames, len(names), sample, None, max_num_frames, rand)
    loaded = {i: load_image(path / names[i]) for i in sorted(set(indices))}
    return [loaded[i] for i in indices]


def _read_container(
    path: Path, num_frames: int, sample: str, max_num_frames: int, clip: tuple[float, float] | None, rand: random.Random
) -> list[Image.Image]:
    with _pyav().open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        total = stream.frames
        if total <= 0:
            # No count in the container (common for WebM/MKV and some GIFs): count packets, which is much cheaper
            # than decoding; a wrong count is caught after decoding below.
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
    for _attempt in range(2):
        start, vlen = _clip_range(path, total, fps, clip)
        if vlen < 1:
            raise DataError(f"{path}: no frames to sample (video has {total} frames, clip {clip})")
        wanted = [start + i for i in get_frame_indices(num_frames, vlen, sample, fps, max_num_frames, rand)]
        if not wanted:
            raise DataError(f"{path}: {sample!r} selects no frame from {vlen} frames at {fps} fps")
        decoded, num_decoded = _decode(path, set(wanted), max(wanted))
        if len(decoded) == len(set(wanted)):
            return [decoded[i] for i in wanted]
        # The container promised more frames than it holds: sample again within the frames that really exist.
        total = num_decoded
    raise DataError(f"{path}: frame count changed between two decoding passes")


def _clip_range(path: Path, total: int, fps: float | None, clip: tuple[float, float] | None) -> tuple[int, int]:
    """`(first frame, number of frames)` of the clip, or the whole video without one."""
    if clip is None:
        return 0, total
    start_s, end_s = clip
    if not 0 <= start_s < end_s:
        raise DataError(f"{path}: clip must be (start_s, end_s) with 0 <= start_s < end_s, got {clip}")
    if not fps:
        raise DataError(f"{path}: clip {clip} needs the video's frame rate, which is unknown")
    start = int(start_s * fps)
    # The original does not bound the clip by the video; here a clip running past the end is cut at the last frame.
    return start, min(int((end_s - start_s) * fps), total - start)


def _decode(path: Path, wanted: set[int], last: int) -> tuple[dict[int, Image.Image], int]:
    """Decode front to back up to frame `last`, keeping the `wanted` frames; also return how many were decoded."""
    frames: dict[int, Image.Image] = {}
    num_decoded = 0
    with _pyav().open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            num_decoded = index + 1
            if index in wanted:
                frames[index] = frame.to_image()  # RGB; alpha (e.g. in GIFs) is dropped as in the original
            if index >= last:
                break
    return frames, num_decoded


def _pyav():
    """PyAV, imported when a video file is read: image-only training (and the GPU check) runs without it."""
    try:
        import av
    except ImportError as e:
        raise DataError("reading video files needs PyAV: pip install av") from e
    return av
