"""What fingerprinting a model folder's weights costs: every byte hashed (as before) vs stamps that still match.

`weights_fingerprint` (internvl_tune.checkpoints.read) runs at every `precompute-ref`, MPO start with
`mpo.reference=precomputed`, LoRA save and `export --merge-lora`. It used to hash every weight byte each time; now
it hashes them once and afterwards returns the fingerprint recorded in the user cache while each shard's size,
mtime, ctime and safetensors header match (internvl_tune.digests). This script writes a folder of safetensors shards
(`--gb` GB in all, an index file as a sharded checkpoint has) and times:

- before: every byte read and SHA-256'd (what each call cost), cold (shards evicted from the page cache) and warm;
- now: the first call (nothing recorded: the same hash, plus the record) and a later call (stamps match), cold.

Cold reads evict each shard with posix_fadvise(DONTNEED) after a sync (no root needed). The folder is deleted at
the end unless `--keep`.

    .venv/bin/python benchmarks/weights_fingerprint.py                 # 2 GB in /tmp/weights_fingerprint
    .venv/bin/python benchmarks/weights_fingerprint.py --gb 16 --dir /data/scratch/fp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from internvl_tune.checkpoints.convert import weight_files
from internvl_tune.checkpoints.read import weights_fingerprint
from internvl_tune.digests import hash_files

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)

timed = partial(common.timed, precision=3)  # a stamp check takes milliseconds

SHARD_BYTES = 512 << 20


def make_folder(folder: Path, total_bytes: int) -> None:
    """Shards of 512 MB (8 fp32 tensors of 64 MB each, random) and `model.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, round(total_bytes / SHARD_BYTES))
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {f"layers.{s}.w{t}": torch.rand(16 << 20, generator=generator) for t in range(8)}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the weights, GB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/weights_fingerprint"), help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    args = parser.parse_args()

    model = args.dir / "model"
    os.environ["XDG_CACHE_HOME"] = str(args.dir / "cache")  # the records of this run only
    try:
        make_folder(model, int(args.gb * (1 << 30)))
        files = weight_files(model)
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} shards, {size / (1 << 30):.2f} GiB; load average {os.getloadavg()[0]:.1f}")
        print("before (every byte hashed at every call):")
        common.evict(files)
        old = timed("cold page cache", lambda: hash_files(files, names=True)[:32])
        timed("warm page cache", lambda: hash_files(files, names=True)[:32])
        print("now (weights_fingerprint):")
        common.evict(files)
        first = timed("first call, cold: hashed and recorded", lambda: weights_fingerprint(model))
        common.evict(files)
        again = timed("later call, cold: stamps match", lambda: weights_fingerprint(model))
        assert old == first == again, (old, first, again)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
