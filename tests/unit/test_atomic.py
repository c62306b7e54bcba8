"""Atomic writes: the target holds the old whole or the new whole, never a partial one."""

from __future__ import annotations

import pytest

from internvl_tune.atomic import atomic_dir, atomic_write_text, remove_stale_temporaries


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "checkpoint-8"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("old")
        assert not target.exists()  # invisible until complete
    assert (target / "weights.bin").read_text() == "old"

    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (target / "weights.bin").read_text() == "old"  # the old whole one is kept
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-8"]  # no leftovers

    with atomic_dir(target) as tmp:
        (tmp / "other.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]


def test_atomic_dir_refuses_overwrite_when_asked(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "a").write_text("x")
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_write_text_and_stale_cleanup(tmp_path):
    atomic_write_text(tmp_path / "cache.json", "{}")
    assert (tmp_path / "cache.json").read_text() == "{}"
    (tmp_path / ".checkpoint-4.tmp-123").mkdir()  # left by a killed process
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint-4.tmp-123"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]
