import json
import os

import pytest
import torch
from conftest import draw_image, write_jsonl, write_meta

import internvl_tune.model.reference as reference_module
from internvl_tune.checkpoints.read import weights_fingerprint
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.model.reference import MediaDigests, ReferenceCache, pair_keys

SETTINGS = {"template": "internvl2_5", "max_dynamic_patch": 6}


def _pairs(root, num=3):
    """`num` one-image pairs; pair 0 uses a.png, the others b.png (an image shared by pairs, as in MMPR)."""
    (root / "images").mkdir(exist_ok=True)
    draw_image(root / "images" / "a.png", (56, 56), "red")
    draw_image(root / "images" / "b.png", (56, 56), "blue")
    records = [
        {"image": "a.png" if i == 0 else "b.png", "question": f"q{i}", "chosen": "yes", "rejected": "no"}
        for i in range(num)
    ]
    write_jsonl(root / "pairs.jsonl", records)
    meta = write_meta(root / "meta.json", {"d": {"root": "images", "annotation": "pairs.jsonl"}})
    return RecordDataset(meta, builder=None, require_data_augment=False)


def _cache_for(dataset, digests=None):
    digests = digests or MediaDigests()
    keys = pair_keys(dataset, digests)
    logps = {pair: (-1.0 - i, -2.0 - i) for i, (_, pair, _) in enumerate(keys)}
    record_keys = {pair: key for key, pair, _ in keys}
    return ReferenceCache("abc", SETTINGS, logps, record_keys=record_keys, media=digests.stamps), keys


def test_cache_round_trip_and_refusals(tmp_path):
    dataset = _pairs(tmp_path)
    cache, keys = _cache_for(dataset)
    cache.save(tmp_path / "ref.pt")
    assert sorted(os.listdir(tmp_path)) == ["images", "meta.json", "pairs.jsonl", "ref.pt"]  # no temporary left
    loaded = ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings=SETTINGS)
    loaded.check(dataset)
    chosen, rejected = loaded({"keys": [keys[2][0], keys[0][0]]}, "cpu")
    assert chosen.tolist() == [-3.0, -1.0] and rejected.tolist() == [-4.0, -2.0]
    with pytest.raises(DataError, match="other reference weights"):
        ReferenceCache.load(tmp_path / "ref.pt", fingerprint="xyz", settings=SETTINGS)
    with pytest.raises(DataError, match=r"data settings changed \(max_dynamic_patch\)"):
        ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings={**SETTINGS, "max_dynamic_patch": 12})
    with pytest.raises(DataError, match="run `internvl-tune precompute-ref`"):
        ReferenceCache.load(tmp_path / "missing.pt", fingerprint="abc", settings=SETTINGS)


def test_new_image_content_under_the_same_name_is_refused_before_training(tmp_path):
    dataset = _pairs(tmp_path)
    cache, keys = _cache_for(dataset)
    cache.save(tmp_path / "ref.pt")
    draw_image(tmp_path / "images" / "b.png", (56, 56), "green")  # same name, same size, new pixels
    reloaded = RecordDataset(tmp_path / "meta.json", builder=None, require_data_augment=False)
    assert [k for k, _, _ in pair_keys(reloaded, MediaDigests())] == [k for k, _, _ in keys]  # records unchanged
    loaded = ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings=SETTINGS)
    with pytest.raises(DataError) as error:
        loaded.check(reloaded)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'ref.pt'}: stale reference cache: 2 of 3 pairs")
    assert f"pairs.jsonl:2 (image or video content changed), {tmp_path / 'pairs.jsonl'}:3 (image" in message


def test_incomplete_cache_is_refused_and_names_the_first_pairs(tmp_path):
    dataset = _pairs(tmp_path, num=6)
    cache, keys = _cache_for(dataset)
    for _, pair, _ in keys[1:]:
        del cache.logps[pair]
    cache.save(tmp_path / "ref.pt")
    loaded = ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings=SETTINGS)
    with pytest.raises(
        DataError,
        match=r"5 of 6 pairs do not match it: .*pairs.jsonl:2 \(not in the cache\), .*"
        r"pairs.jsonl:4 \(not in the cache\) and 2 more; recompute it",
    ):
        loaded.check(dataset)


def test_media_digests_read_only_what_changed(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"not an image at all")  # digests read bytes; nothing is decoded
    digests = MediaDigests()
    first = digests(str(path))
    size, mtime_ns, ctime_ns, digest = digests.stamps[str(path)]
    assert digest == first and size == 19
    # A matching stamp is trusted without reading the file.
    assert MediaDigests({str(path): [size, mtime_ns, ctime_ns, "from-the-cache"]})(str(path)) == "from-the-cache"
    # Same size, mtime put back (as cp -p or rsync -t do): ctime moved, so the file is read again.
    path.write_bytes(b"NOT an image at all")
    os.utime(path, ns=(mtime_ns, mtime_ns))
    assert MediaDigests(digests.stamps)(str(path)) != first
    assert MediaDigests()(str(tmp_path / "gone.png")) == "missing"
    # A folder of video frames: its files' names and bytes.
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "f_1.jpg").write_bytes(b"1")
    folder = MediaDigests()(str(tmp_path / "frames"))
    (tmp_path / "frames" / "f_1.jpg").write_bytes(b"2")
    assert MediaDigests()(str(tmp_path / "frames")) != folder


def test_cache_file_is_written_atomically(tmp_path, monkeypatch):
    dataset = _pairs(tmp_path)
    cache, _ = _cache_for(dataset)
    cache.save(tmp_path / "ref.pt")

    def crash_midway(obj, f):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")  # noqa: SIM115
        f.write(b"half a cache")
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(reference_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ReferenceCache("abc", SETTINGS, {}).save(tmp_path / "ref.pt")
    monkeypatch.undo()
    loaded = ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings=SETTINGS)  # the old one, whole
    assert loaded.logps == cache.logps
    assert sorted(os.listdir(tmp_path)) == ["images", "meta.json", "pairs.jsonl", "ref.pt"]
    assert json.loads(torch.load(tmp_path / "ref.pt", weights_only=True)["settings"]) == SETTINGS


def test_weights_fingerprint_changes_with_the_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    original = weights_fingerprint(tiny_model_dir)
    assert original == weights_fingerprint(tiny_model_dir)
    (tmp_path / "m").mkdir()
    tensors = load_file(tiny_model_dir / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + torch.randn_like(tensors[name])
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(tmp_path / "m") != original


def test_weights_fingerprint_reads_the_weights_only_when_their_stamps_changed(tmp_path, tiny_model_dir, monkeypatch):
    """It hashed every weight byte at every call (16 GB for an 8B model at each MPO start and LoRA save). Now the
    fingerprint recorded in the user cache is trusted while each shard's size, mtime, ctime and safetensors header
    are those it was recorded with; a shard rewritten under the same name (mtime put back) is hashed again. The value
    is still the SHA-256 of the names and bytes, so fingerprints recorded before stay valid."""
    import hashlib
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    expected = hashlib.sha256(b"model.safetensors" + weights.read_bytes()).hexdigest()[:32]
    assert weights_fingerprint(model) == expected
    (record,) = (tmp_path / "cache" / "internvl_tune" / "fingerprints").glob("v1-*.json")
    stamps = json.loads(record.read_text())
    assert stamps[str(model.resolve())][-1] == expected

    stamps[str(model.resolve())][-1] = "from-the-record"  # what a call that reads nothing can only have from there
    record.write_text(json.dumps(stamps))
    assert weights_fingerprint(model) == "from-the-record"

    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight byte: same size, same header
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = hashlib.sha256(b"model.safetensors" + bytes(data)).hexdigest()[:32]
    assert weights_fingerprint(model) == changed != expected
    assert weights_fingerprint(model) == changed  # and recorded again


def test_weights_fingerprint_without_a_writable_user_cache(tmp_path, tiny_model_dir, monkeypatch):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert weights_fingerprint(tiny_model_dir) == weights_fingerprint(tiny_model_dir)
