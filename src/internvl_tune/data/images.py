"""Image loading, InternVL dynamic tiling and the per-tile tensor transform (docs/original-differences.md §3.2, §3.3).

An image becomes a grid of `image_size` x `image_size` tiles (plus an optional thumbnail), and each tile becomes a
normalised `[3, S, S]` tensor worth 256 vision tokens. The grid depends only on the image size, so the data checker
can count tokens with `num_tiles` without touching pixels.

Example:
    >>> image = load_image("cat.jpg")  # doctest: +SKIP
    >>> tiles = dynamic_preprocess(image, max_num=tiles_budget(12, num_images=1), use_thumbnail=True)  # doctest: +SKIP
    >>> pixel_values = ImageTransform(normalize_type="imagenet").stack(tiles)  # [N, 3, 448, 448]  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from internvl_tune.constants import DEFAULT_MAX_DYNAMIC_PATCH, NORMALIZATION
from internvl_tune.data.errors import DataError

if TYPE_CHECKING:
    from transformers import InternVLConfig

# Quality range of the original JPEG re-encoding augmentation (26 values, uniform).
JPEG_QUALITY_MIN = 75
JPEG_QUALITY_MAX = 100

_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageGeometry:
    """Tile size and image tokens per tile, derived from the model config (never hard-coded)."""

    image_size: int
    patch_size: int
    downsample_ratio: float

    @property
    def num_image_token(self) -> int:
        """`int((image_size // patch_size)^2 * downsample_ratio^2)`: 256 for 448 px, patch 14, ratio 0.5."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)


def image_geometry(config: InternVLConfig) -> ImageGeometry:
    vision = config.vision_config
    image_size, patch_size = vision.image_size, vision.patch_size
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"only square tiles are supported, got image_size={image_size}, patch_size={patch_size}")
    return ImageGeometry(int(image_size[0]), int(patch_size[0]), float(config.downsample_ratio))


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file fully into memory as an RGB image.

    Transparent images (RGBA, LA, PA, palette with a transparent colour) are composited onto white: the colour stored
    under a transparent pixel is arbitrary (often black, which would hide black text on a transparent background).
    16-bit greyscale is scaled to 8 bits instead of clipped (PIL's own conversion would turn most of it white). CMYK and
    the other modes use PIL's conversion. EXIF orientation is not applied, as in the original, so tile grids and token
    counts match what the original code would train on.

    Args:
        path: Image file.

    Returns:
        The decoded image in mode "RGB", detached from the file.

    Raises:
        DataError: The file is missing or cannot be decoded; the message names the path and the reason.

    Example:
        >>> load_image("photo.png").mode  # doctest: +SKIP
        'RGB'
        >>> load_image("missing.png")  # doctest: +SKIP
        DataError: missing.png: image file not found
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports undecodable data as OSError (UnidentifiedImageError, truncated file), SyntaxError (some broken
        # headers) or ValueError (unsupported mode conversion).
        raise DataError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels (for length estimates).

    Raises:
        DataError: as `load_image`, for a missing file or one PIL cannot identify.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image).astype(np.float64)
        # "I" is also used for 8-bit data by some decoders; only rescale when the values need more than 8 bits.
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 / 255
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # The original builds a *set* and sorts it by tile count only, so grids with the same count come out in CPython's
    # set iteration order (e.g. (1, 2) before (2, 1) but (3, 1) before (1, 3)). That order decides ties between equal
    # counts, and it depends on how the set was built (its table size), not only on its elements. Hashes of small-int
    # tuples are not randomised (PYTHONHASHSEED only affects str/bytes), so building the very same set with the very
    # same expression and sorting it the same stable way reproduces the original order exactly.
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return tuple(sorted(grids, key=lambda x: x[0] * x[1]))


def find_grid(
    width: int, height: int, min_num: int = 1, max_num: int = DEFAULT_MAX_DYNAMIC_PATCH, image_size: int = 448
) -> tuple[int, int]:
    """Pick the tile grid for an image exactly as the original `dynamic_preprocess` does.

    Candidates are all grids (cols, rows) with `min_num <= cols * rows <= max_num`, in ascending order of tile count.
    The grid whose `cols / rows` is closest to `width / height` wins. When a later candidate has exactly the same
    ratio difference as the current best, it replaces the best only if the image has more than half the pixels of
    that grid (`width * height > 0.5 * image_size**2 * cols * rows`), so large images get more tiles and small ones
    are not blown up.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        min_num: Fewest tiles allowed.
        max_num: Most tiles allowed (before the thumbnail).
        image_size: Tile side in pixels.

    Returns:
        `(cols, rows)`: cols multiplies the width, rows the height.

    Example:
        448x448: ratio 1; (1, 1) has difference 0. (2, 2) ties, but 448*448 = 200704 is not above
        0.5 * 448**2 * 4 = 401408, so (1, 1) stays.

        >>> find_grid(448, 448)
        (1, 1)

        800x600: ratio 4/3. No grid with fewer than 12 tiles has ratio 4/3; (4, 3) matches it exactly, with 12 tiles.
        So a small 800x600 photo is resized to 1792x1344 and cut into 12 tiles (13 with the thumbnail).

        >>> find_grid(800, 600, max_num=12)
        (4, 3)
        >>> find_grid(800, 600, max_num=6)  # 4/3 is out of reach; 1.5 (3, 2) is closer than 1.0 (1, 1), 2.0 (2, 1)
        (3, 2)

        Square images and the tie-break: (1, 1), (2, 2) and (3, 3) all have difference 0. 0.5 * 448**2 * 4 = 401408
        and 0.5 * 448**2 * 9 = 903168, so 500x500 (250000 px) keeps (1, 1), 900x900 (810000 px) moves to (2, 2),
        and 1000x1000 (1000000 px) moves on to (3, 3).

        >>> find_grid(500, 500), find_grid(900, 900), find_grid(1000, 1000)
        ((1, 1), (2, 2), (3, 3))
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_DYNAMIC_PATCH,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> int:
    """Number of tiles `dynamic_preprocess` returns for an image of this size, without any pixel work.

    Example:
        >>> num_tiles(800, 600, 1, 12, 448, use_thumbnail=True)  # 4 x 3 grid + thumbnail
        13
        >>> num_tiles(448, 448, 1, 12, 448, use_thumbnail=True)  # a single tile gets no thumbnail
        1
    """
    cols, rows = find_grid(width, height, min_num, max_num, image_size)
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks > 1 else blocks


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_DYNAMIC_PATCH,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Cut an image into the tiles of its grid (see `find_grid`), row by row, plus an optional thumbnail.

    The image is resized to `(image_size * cols, image_size * rows)` with PIL's default filter (bicubic for RGB), as
    the original does, then cropped left to right, top to bottom. With `use_thumbnail` and more than one tile, the
    whole image resized to `image_size` x `image_size` is appended as the last tile.

    Args:
        image: Input image (RGB expected).
        min_num: Fewest tiles allowed.
        max_num: Most tiles allowed (before the thumbnail); see `tiles_budget` for several images.
        image_size: Tile side in pixels.
        use_thumbnail: Append a whole-image thumbnail when there is more than one tile.

    Returns:
        `cols * rows` tiles (+1 thumbnail), each `image_size` x `image_size`.

    Example:
        An 896x448 image with 448-pixel tiles: grid (2, 1), so two tiles, the left and the right half, then the
        thumbnail (the whole image squeezed to 448x448).

        >>> tiles = dynamic_preprocess(Image.new("RGB", (896, 448)), use_thumbnail=True)
        >>> [t.size for t in tiles]
        [(448, 448), (448, 448), (448, 448)]
    """
    cols, rows = find_grid(image.width, image.height, min_num, max_num, image_size)
    # No resample argument on purpose: the original relies on PIL's default filter.
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for row in range(rows):
        for col in range(cols):
            box = (col * image_size, row * image_size, (col + 1) * image_size, (row + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def tiles_budget(max_dynamic_patch: int, num_images: int) -> int:
    """Most tiles per image when a sample has several images: the budget is shared, but each image gets at least one.

    Example:
        >>> tiles_budget(12, 1), tiles_budget(12, 5), tiles_budget(12, 20)
        (12, 2, 1)
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    return max(1, max_dynamic_patch // num_images)


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """Round-trip an image through JPEG at the given quality (the original's only data augmentation).

    Example:
        >>> jpeg_reencode(Image.new("RGB", (8, 8), (200, 10, 10)), quality=75).size
        (8, 8)
    """
    with io.BytesIO() as buffer:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = Image.open(buffer)
        decoded.load()
    return decoded


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side with `fill` so the image is centred in a square (offset rounded down, like the original).

    Example:
        A 4x2 image becomes 4x4 with the image pasted at row (4 - 2) // 2 = 1: one row of fill above, one below.

        >>> expand_to_square(Image.new("RGB", (4, 2)), (123, 116, 103)).size
        (4, 4)
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@dataclass
class ImageTransform:
    """Tile -> normalised tensor, the original `build_transform` without torchvision.

    Steps: convert to RGB; with `data_augment`, JPEG re-encode at a quality drawn uniformly from 75..100; with
    `pad2square`, pad to a square with the mean colour; resize to `image_size` x `image_size` (bicubic); scale to
    [0, 1]; normalise with the mean and std of `normalize_type`.

    The original only pads when it does not augment (its two options sit in different branches); here the two are
    independent, and with both on the JPEG step comes first.

    Attributes:
        image_size: Output side in pixels.
        normalize_type: "imagenet", "clip" or "siglip" (statistics in `internvl_tune.constants.NORMALIZATION`).
        data_augment: JPEG re-encoding augmentation.
        pad2square: Pad to a square with the mean colour instead of stretching.

    Example:
        A solid (255, 0, 0) tile with imagenet statistics: channel 0 is (1 - 0.485) / 0.229 = 2.2489..., channel 1 is
        (0 - 0.456) / 0.224 = -2.0357...

        >>> pixels = ImageTransform(image_size=4)(Image.new("RGB", (10, 10), (255, 0, 0)))
        >>> tuple(pixels.shape), round(pixels[0, 0, 0].item(), 4), round(pixels[1, 0, 0].item(), 4)
        ((3, 4, 4), 2.2489, -2.0357)
    """

    image_size: int = 448
    normalize_type: str = "imagenet"
    data_augment: bool = False
    pad2square: bool = False

    def __post_init__(self) -> None:
        if self.normalize_type not in NORMALIZATION:
            raise ValueError(f"normalize_type must be one of {sorted(NORMALIZATION)}, got {self.normalize_type!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Transform one tile into a float32 tensor `[3, S, S]`; `rng` draws the JPEG quality (default: `random`)."""
        mean, std = NORMALIZATION[self.normalize_type]
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.data_augment:
            quality = (rng if rng is not None else random).randint(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX)
            image = jpeg_reencode(image, quality)
        if self.pad2square:
            image = expand_to_square(image, tuple(int(m * 255) for m in mean))
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        # Same arithmetic as torchvision's ToTensor + Normalize: uint8 -> float32, / 255, then (x - mean) / std.
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, S, S]
        pixels = pixels.to(torch.float32).div(255)
        mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
        return pixels.sub(mean_t).div(std_t)

    def stack(self, tiles: list[Image.Image], rng: random.Random | None = None) -> torch.Tensor:
        """Transform each tile (each with its own JPEG quality draw) and stack them into `[N, 3, S, S]`.

        Example:
            >>> ImageTransform(image_size=8).stack([Image.new("RGB", (8, 8))] * 3).shape
            torch.Size([3, 3, 8, 8])
        """
        if not tiles:
            raise ValueError("no tiles to stack")
        return torch.stack([self(tile, rng) for tile in tiles])


def blank_tile(image_size: int, normalize_type: str) -> torch.Tensor:
    """The dummy tile of text-only batches: a white image, normalised like real tiles
    (docs/original-differences.md §3.4)."""
    return ImageTransform(image_size, normalize_type)(Image.new("RGB", (image_size, image_size), (255, 255, 255)))
