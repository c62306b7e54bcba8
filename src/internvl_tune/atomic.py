"""Crash-safe writes: a file or folder appears under its final name only once it is complete.

Every checkpoint, export, conversion and cache goes through here, so a crash at any moment (SIGKILL, power loss,
a full disk) leaves either the old complete one or the new complete one, never a half-written one that a resume or
a loader would pick up.

    with atomic_dir("runs/a/checkpoint-8") as tmp:   # tmp = runs/a/.checkpoint-8.tmp-<pid>
        save_everything_into(tmp)
    # now runs/a/checkpoint-8 exists and is whole
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """`dir/.name.tmp-<pid>`: hidden, beside the target (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (an existing folder there is
    removed only after the new one is complete). On an exception the temporary folder is removed and `path` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            # Two renames: the old folder leaves under a temporary name, the new one takes its place, then the
            # old one is deleted. Between the two renames `path` is briefly absent, never partial.
            old = path.with_name(f".{path.name}.old{TMP_MARK}{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes in `folder` (not recursive); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if is_temporary(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
