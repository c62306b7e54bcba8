"""Tiling, transforms and image loading (docs/original-differences.md §3.2, §3.3), against numbers worked out by hand
and a brute-force rule."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_tune.constants import NORMALIZATION
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import (
    ImageTransform,
    dynamic_preprocess,
    expand_to_square,
    find_grid,
    jpeg_reencode,
    load_image,
    num_tiles,
    tiles_budget,
)

S = 448
HALF_TILE_AREA = 0.5 * S * S  # 100352: the tie-break threshold per tile


@pytest.mark.parametrize(
    ("width", "height", "max_num", "expected"),
    [
        # ratio 1: (1,1), (2,2), (3,3) all have difference 0; 448*448 = 200704 <= 100352*4, so (1,1) stays.
        (448, 448, 12, (1, 1)),
        # ratio 2: (2,1) exact; (4,2) ties but 896*448 = 401408 <= 100352*8 = 802816.
        (896, 448, 12, (2, 1)),
        # ratio 4/3: first reached exactly by (4,3) (12 tiles); nothing with 12 tiles or fewer comes later with it.
        (800, 600, 12, (4, 3)),
        # max 6: candidates near 1.333 are 1.0 (1,1) diff .333, 1.5 (3,2) diff .167, 2.0 (2,1) diff .667 -> (3,2).
        (800, 600, 6, (3, 2)),
        # ratio 1/4: (1,4) exact; (2,8) has 16 tiles, out of range.
        (300, 1200, 12, (1, 4)),
        # Tie-break on squares: 250000 px <= 401408, so (1,1).
        (500, 500, 12, (1, 1)),
        # 810000 px > 401408 (take (2,2)) but <= 903168 = 100352*9 (keep it over (3,3)).
        (900, 900, 12, (2, 2)),
        # 1000000 px > 903168, so (3,3); (4,4) would be 16 tiles.
        (1000, 1000, 12, (3, 3)),
        # ratio 3: (3,1) exact; (6,2) ties, but 1344*448 = 602112 <= 100352*12 = 1204224 -> stays (3,1).
        (1344, 448, 12, (3, 1)),
        # ratio 3, larger: 4032*1344 = 5419008 > 1204224 -> (6,2).
        (4032, 1344, 12, (6, 2)),
    ],
)
def test_find_grid_worked_examples(width: int, height: int, max_num: int, expected: tuple[int, int]) -> None:
    assert find_grid(width, height, 1, max_num, S) == expected


def test_find_grid_equal_tile_counts_follow_the_original_set_order() -> None:
    """With min_num = max_num = 8 the candidates are (2,4), (1,8), (4,2), (8,1) in the original's set order.

    1000x3200 has ratio 0.3125, exactly halfway between 0.5 (2,4) and 0.125 (1,8): both differences are 0.1875 (exact
    in binary). (2,4) comes first and wins outright; (1,8) ties, and 3200000 px > 100352 * 8 = 802816, so (1,8)
    replaces it. Ordering the candidates by (tiles, cols) instead would give (2,4). A 100x320 image (32000 px) keeps
    (2,4).
    """
    assert find_grid(1000, 3200, 8, 8, S) == (1, 8)
    assert find_grid(100, 320, 8, 8, S) == (2, 4)


def _brute_force_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The rule restated: among the grids with the smallest ratio difference, take the last one whose pixel area
    (image_size**2 * cols * rows) is below twice the image's, or the first one if no later one is.

    Grids with equal tile counts are listed by cols here, not in the original's set order; with min_num=1 two of them
    are never both closest, so the order cannot matter (the set-order test covers a case where it does).
    """
    candidates = [
        (cols, rows)
        for count in range(min_num, max_num + 1)
        for cols in range(1, count + 1)
        for rows in range(1, count + 1)
        if cols * rows == count
    ]
    diffs = [abs(width / height - cols / rows) for cols, rows in candidates]
    best = min(diffs)
    tied = [grid for grid, diff in zip(candidates, diffs, strict=True) if diff == best]
    upgrades = [(c, r) for c, r in tied[1:] if width * height > 0.5 * image_size * image_size * c * r]
    return upgrades[-1] if upgrades else tied[0]


@pytest.mark.parametrize("max_num", [6, 12, 24])
def test_find_grid_matches_brute_force(max_num: int) -> None:
    rng = random.Random(max_num)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(1500)]
    # Multiples of half a tile hit exact ratio ties, where the area rule decides.
    sizes += [(224 * a, 224 * b) for a in range(1, 15) for b in range(1, 15)]
    for width, height in sizes:
        assert find_grid(width, height, 1, max_num, S) == _brute_force_grid(width, height, 1, max_num, S), (
            width,
            height,
        )


def test_find_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        find_grid(0, 10)
    with pytest.raises(ValueError):
        find_grid(10, 10, min_num=5, max_num=4)


def test_num_tiles_and_budget() -> None:
    assert num_tiles(800, 600, 1, 12, S, use_thumbnail=True) == 13
    assert num_tiles(800, 600, 1, 12, S, use_thumbnail=False) == 12
    assert num_tiles(448, 448, 1, 12, S, use_thumbnail=True) == 1  # no thumbnail for a single tile
    assert [tiles_budget(12, n) for n in (1, 2, 5, 12, 13)] == [12, 6, 2, 1, 1]


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def test_dynamic_preprocess_tiles_reassemble_the_resized_image() -> None:
    tile = 32
    image = _noise_image(100, 70)  # ratio 1.43 -> (3,2) with max 6: 1.5 is closest
    assert find_grid(100, 70, 1, 6, tile) == (3, 2)
    tiles = dynamic_preprocess(image, 1, 6, tile, use_thumbnail=False)
    assert len(tiles) == 6 and all(t.size == (tile, tile) for t in tiles)

    canvas = Image.new("RGB", (3 * tile, 2 * tile))
    for k, t in enumerate(tiles):  # row-major: k -> (col k % 3, row k // 3)
        canvas.paste(t, ((k % 3) * tile, (k // 3) * tile))
    expected = np.asarray(image.resize((3 * tile, 2 * tile), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.asarray(canvas), expected)


def test_dynamic_preprocess_thumbnail_is_last_and_only_with_several_tiles() -> None:
    tile = 32
    image = _noise_image(64, 32)  # (2,1)
    tiles = dynamic_preprocess(image, 1, 12, tile, use_thumbnail=True)
    assert len(tiles) == 3 == num_tiles(64, 32, 1, 12, tile, use_thumbnail=True)
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((tile, tile))))
    np.testing.assert_array_equal(np.asarray(tiles[0]), np.asarray(image.crop((0, 0, 32, 32))))

    single = dynamic_preprocess(_noise_image(32, 32), 1, 12, tile, use_thumbnail=True)
    assert len(single) == 1


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_transform_solid_colour_matches_hand_computation(normalize_type: str) -> None:
    colour = (10, 128, 250)
    pixels = ImageTransform(image_size=16, normalize_type=normalize_type)(Image.new("RGB", (40, 30), colour))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    mean, std = NORMALIZATION[normalize_type]
    for c in range(3):
        expected = (colour[c] / 255 - mean[c]) / std[c]  # e.g. imagenet red: (10/255 - 0.485) / 0.229 = -1.9467
        torch.testing.assert_close(pixels[c], torch.full((16, 16), expected), atol=1e-5, rtol=0)


def test_transform_converts_non_rgb_and_rejects_unknown_normalisation() -> None:
    grey = ImageTransform(image_size=8, normalize_type="siglip")(Image.new("L", (8, 8), 255))
    torch.testing.assert_close(grey, torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="normalize_type"):
        ImageTransform(normalize_type="openai")


def test_jpeg_augment_changes_pixels_and_is_reproducible() -> None:
    image = _noise_image(32, 32)
    plain = ImageTransform(image_size=32)(image)
    augmented = ImageTransform(image_size=32, data_augment=True)
    first = augmented(image, random.Random(3))
    again = augmented(image, random.Random(3))
    assert not torch.equal(first, plain)  # even quality 100 subsamples chroma, so noise never survives intact
    assert torch.equal(first, again)

    # Each tile gets its own quality draw, in order, from the same rng.
    draws = random.Random(0)
    qualities = [draws.randint(75, 100) for _ in range(3)]
    assert len(set(qualities)) > 1
    stacked = augmented.stack([image] * 3, random.Random(0))
    assert stacked.shape == (3, 3, 32, 32)
    for tile, quality in zip(stacked, qualities, strict=True):
        torch.testing.assert_close(tile, ImageTransform(image_size=32)(jpeg_reencode(image, quality)), atol=0, rtol=0)


def test_pad2square_pads_with_the_mean_colour_centred() -> None:
    red = Image.new("RGB", (4, 2), (255, 0, 0))
    fill = tuple(int(m * 255) for m in NORMALIZATION["imagenet"][0])  # (123, 116, 103)
    assert fill == (123, 116, 103)
    square = np.asarray(expand_to_square(red, fill))
    assert square.shape == (4, 4, 3)
    assert (square[0] == fill).all() and (square[3] == fill).all()  # (4 - 2) // 2 = 1 row above, 1 below
    assert (square[1:3] == (255, 0, 0)).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (1, 4), (0, 0, 0)), fill))
    assert (tall[:, 0] == fill).all() and (tall[:, 1] == 0).all() and (tall[:, 2:] == fill).all()  # (4-1)//2 = 1

    # Through the transform at the same size the resize is the identity, so rows 0 and 3 are the fill exactly.
    pixels = ImageTransform(image_size=4, pad2square=True)(red)
    mean, std = NORMALIZATION["imagenet"]
    for c in range(3):
        torch.testing.assert_close(pixels[c, 0], torch.full((4,), (fill[c] / 255 - mean[c]) / std[c]))
        torch.testing.assert_close(pixels[c, 1], torch.full((4,), ((255 if c == 0 else 0) / 255 - mean[c]) / std[c]))


def test_load_image_modes(tmp_path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("LA", (4, 4), (10, 255)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (10, 10, 10)

    deep = np.full((4, 4), 257 * 200, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (200, 200, 200)

    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_load_image_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match="missing.png: image file not found"):
        load_image(missing)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 4)
    with pytest.raises(DataError, match="corrupt.jpg: cannot read image"):
        load_image(corrupt)

    good = tmp_path / "good.png"
    _noise_image(64, 64).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(truncated)
