"""Content digests computed again only when their files changed, told by a stamp that costs a `stat`, not a read.

A file's stamp is its size, mtime and ctime, and for a safetensors file the SHA-256 of its header (every tensor's
name, dtype, shape and offsets: one small read). ctime changes on every write and cannot be set back by the tools
that preserve mtime (`cp -p`, `rsync -t`, `touch -r`), so a file rewritten under the same name always gets a new
stamp; a copied or moved file gets one too and is hashed once more. `StampedDigests` keeps `{key: [*stamp, digest]}`
and trusts a recorded digest while the stamp it was recorded with still holds.

Two users: the media keys of the precomputed reference (`model/reference.py`, stamps stored in its cache) and the
weights fingerprint of a model folder (`checkpoints/read.py`, stamps stored in the user cache, `user_cache_dir`).

    >>> digests = StampedDigests()  # doctest: +SKIP
    >>> digests("model", [[name, *file_stamp(f)] for f in files], lambda: hash_of(files))  # hashed: nothing known
    >>> StampedDigests(digests.stamps)("model", same_stamp, hash_of)  # the recorded digest, nothing read
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Stamp = list[Any]


def user_cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/internvl_tune/<name>` (`~/.cache/...` by default): what is cached outside the data."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "internvl_tune" / name


def file_stamp(path: str | Path) -> Stamp:
    """[size, mtime_ns, ctime_ns], plus the header's SHA-256 for a `.safetensors` file (module docstring).

    Raises:
        OSError: the file cannot be stat'ed or read.
    """
    stat = os.stat(path)
    stamp: Stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    if str(path).endswith(".safetensors"):
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            # A length past the end is no safetensors header: the stamp then holds the digest of nothing.
            header = f.read(length) if length <= stat.st_size - 8 else b""
        stamp.append(hashlib.sha256(header).hexdigest()[:32])
    return stamp


def hash_files(
    paths: Iterable[str | Path], *, names: bool = False, progress: Callable[[int], object] | None = None
) -> str:
    """SHA-256 of the files' bytes, one after the other (each preceded by its name with `names`), as hex.

    `progress` is called with the number of bytes of each chunk read (a tqdm bar's `update`).
    """
    digest = hashlib.sha256()
    for path in paths:
        if names:
            digest.update(Path(path).name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return digest.hexdigest()


class StampedDigests:
    """Digests by key, each recomputed only when its stamp differs from the one recorded with it.

    `known`: `{key: [*stamp, digest]}` from an earlier run (a cache file); `stamps` collects the same for every key
    digested in this one, to be stored for the next.
    """

    def __init__(self, known: dict[str, Stamp] | None = None):
        self.known = known or {}
        self.stamps: dict[str, Stamp] = {}

    def __call__(self, key: str, stamp: Stamp, compute: Callable[[], str]) -> str:
        known = self.known.get(key)
        digest = known[-1] if known is not None and list(known[:-1]) == stamp else compute()
        self.stamps[key] = [*stamp, digest]
        return digest
