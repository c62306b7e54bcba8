import pytest
import torch

from internvl_tune.model.reference import ReferenceCache, weights_fingerprint


def test_cache_round_trip_and_refusals(tmp_path):
    settings = {"template": "internvl2_5", "max_dynamic_patch": 6}
    ReferenceCache("abc", settings, {"k1": (-1.5, -2.5), "k2": (-3.0, -4.0)}).save(tmp_path / "ref.pt")
    cache = ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings=settings)
    chosen, rejected = cache({"keys": ["k2", "k1"]}, "cpu")
    assert chosen.tolist() == [-3.0, -1.5] and rejected.tolist() == [-4.0, -2.5]
    with pytest.raises(ValueError, match="incomplete reference cache: 1 pair"):
        cache({"keys": ["k1", "k3"]}, "cpu")
    with pytest.raises(ValueError, match="other reference weights"):
        ReferenceCache.load(tmp_path / "ref.pt", fingerprint="xyz", settings=settings)
    with pytest.raises(ValueError, match=r"data settings changed \(max_dynamic_patch\)"):
        ReferenceCache.load(tmp_path / "ref.pt", fingerprint="abc", settings={**settings, "max_dynamic_patch": 12})
    with pytest.raises(ValueError, match="run `internvl-tune precompute-ref`"):
        ReferenceCache.load(tmp_path / "missing.pt", fingerprint="abc", settings=settings)


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
