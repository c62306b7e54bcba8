"""What keying the precomputed reference cache costs: content hashes of every image vs stat only.

`mpo` with `mpo.reference=precomputed` keys every pair by its record and the SHA-256 of its images' bytes
(`internvl_tune.model.reference.MediaDigests`, `pair_keys`) and checks all keys before the first step. A file whose
size, mtime and ctime match the stamps stored in the cache is not read again. This script times, on N generated
JPEG/PNG files of realistic size (about 50-200 KB; a quarter PNG):

- media only: read + SHA-256 with the files evicted from the page cache (cold), the same again (warm), and stat only;
- the whole start-up check (`pair_keys`: records read and validated, keys hashed), cold and stat only.

Cold reads evict each file with posix_fadvise(DONTNEED) after a sync (no root needed); `fincore` confirms it.

    .venv/bin/python benchmarks/reference_keys.py                  # 10k images in /tmp/reference_keys (~1 GB)
    .venv/bin/python benchmarks/reference_keys.py --num 1000 --dir /data/scratch/keys
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from internvl_tune.data.dataset import RecordDataset
from internvl_tune.model.reference import MediaDigests, pair_keys

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)


def make_images(folder: Path, num: int) -> list[Path]:
    """Gradients plus noise (so they compress like photos), 420-820 x 340-640; every 4th a half-size PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num):
        width, height = int(rng.integers(420, 820)), int(rng.integers(340, 640))
        path = folder / f"{i:06d}.{'png' if i % 4 == 0 else 'jpg'}"
        paths.append(path)
        if path.exists():
            continue
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
        pixels = np.clip(base + rng.normal(0, float(rng.uniform(6, 22)), (height, width, 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        if path.suffix == ".png":
            image.resize((width // 2, height // 2)).save(path)
        else:
            image.save(path, quality=int(rng.integers(80, 95)))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=10_000, help="images (one pair each)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reference_keys"), help="where the images go")
    args = parser.parse_args()

    paths = make_images(args.dir / "images", args.num)
    sizes = np.array([p.stat().st_size for p in paths]) / 1024
    print(
        f"{len(paths)} files, {sizes.sum() / 1024:.0f} MiB; KB p5 {np.percentile(sizes, 5):.0f}, "
        f"median {np.median(sizes):.0f}, p95 {np.percentile(sizes, 95):.0f}; load average {os.getloadavg()[0]:.1f}"
    )
    with open(args.dir / "pairs.jsonl", "w") as f:
        for i, path in enumerate(paths):
            f.write(json.dumps({"image": path.name, "question": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n")
    meta = args.dir / "meta.json"
    meta.write_text(json.dumps({"bench": {"root": "images", "annotation": "pairs.jsonl"}}))
    dataset = RecordDataset(meta, builder=None, require_data_augment=False)
    names = [str(p) for p in paths]

    def digest_all(digests: MediaDigests) -> MediaDigests:
        for name in names:
            digests(name)
        return digests

    print("media only (MediaDigests over the files):")
    common.evict(paths)
    stamps = common.timed("cold: read + SHA-256", lambda: digest_all(MediaDigests())).stamps
    common.timed("warm: read + SHA-256 (page cache)", lambda: digest_all(MediaDigests()))
    common.evict(paths)
    common.timed("stat only (size, mtime, ctime match)", lambda: digest_all(MediaDigests(stamps)))
    print("start-up check (pair_keys over the dataset):")
    common.evict(paths)
    common.timed("cold: read + SHA-256", lambda: pair_keys(dataset, MediaDigests(), progress=False))
    common.evict(paths)
    common.timed("stat only", lambda: pair_keys(dataset, MediaDigests(stamps), progress=False))


if __name__ == "__main__":
    main()
