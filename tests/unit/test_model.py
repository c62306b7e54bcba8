"""Model components: geometry, freezing, LoRA, DropPath, the training forward, loading."""

import math

import pytest
import torch
from transformers import InternVLConfig

from internvl_tune.data.images import image_geometry
from internvl_tune.model.drop_path import DropPath, add_drop_path
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.freeze import apply_freezing
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import apply_lora, merged_state_dict
from internvl_tune.testing.tiny import build_tiny_model


@pytest.fixture
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)[0]


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_num_image_token_derives_from_config():
    config = InternVLConfig(vision_config={"image_size": 448, "patch_size": 14}, downsample_ratio=0.5)
    assert image_geometry(config).num_image_token == 256  # (448/14)^2 * 0.25
    config = InternVLConfig(vision_config={"image_size": 56, "patch_size": 14}, downsample_ratio=0.5)
    assert image_geometry(config).num_image_token == 4


def test_freeze_backbone_and_llm(model):
    apply_freezing(model, freeze_backbone=True, freeze_llm=True)
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector")}


def test_unfreeze_lm_head_takes_effect(model):
    apply_freezing(model, freeze_llm=True, unfreeze_lm_head=True)
    assert "lm_head.weight" in _trainable(model)
    assert not any(n.startswith("model.language_model") for n in _trainable(model))


@pytest.mark.parametrize("k, layers", [(-1, {1}), (1, {1}), (-2, {0, 1})])
def test_unfreeze_vit_layers(model, k, layers):
    apply_freezing(model, freeze_backbone=True, unfreeze_vit_layers=k)
    vit = {n for n in _trainable(model) if n.startswith("model.vision_tower")}
    assert {int(n.split(".")[4]) for n in vit} == layers
    assert all(n.startswith("model.vision_tower.encoder.layer.") for n in vit)


def test_llm_lora_targets_only_the_llm_and_keeps_other_flags(model):
    apply_freezing(model, freeze_backbone=True)
    peft_model = apply_lora(model, use_llm_lora=4)
    trainable = _trainable(peft_model)
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    # 2 layers x 7 projections x (A, B)
    assert len(lora) == 2 * 7 * 2
    assert {n for n in trainable if "lora_" not in n} == {
        n for n, _ in peft_model.named_parameters() if "multi_modal_projector" in n
    }  # the projector stays trainable, the frozen ViT stays frozen, the LLM base is frozen by LoRA
    module = peft_model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    assert module.r["default"] == 4 and module.lora_alpha["default"] == 8


def test_backbone_and_llm_lora_ranks(model):
    peft_model = apply_lora(model, use_llm_lora=4, use_backbone_lora=2, unfreeze_lm_head=True)
    base = peft_model.get_base_model()
    assert base.model.vision_tower.encoder.layer[0].attention.q_proj.r["default"] == 2
    assert base.model.vision_tower.encoder.layer[0].mlp.fc1.lora_alpha["default"] == 4
    assert base.model.language_model.layers[1].mlp.down_proj.r["default"] == 4
    assert "base_model.model.lm_head.weight" in _trainable(peft_model)


def test_merged_state_dict_equals_peft_merge(model):
    peft_model = apply_lora(model, use_llm_lora=4, use_backbone_lora=2)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # PEFT starts B at zero; make the adapters matter
    merged = merged_state_dict(peft_model, peft_model.state_dict())
    expected = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    x = torch.ones(2000, 3, 4)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped whole
    assert abs(per_sample[:, 0].mean().item() - 1.0) < 0.1
    assert torch.equal(drop.eval()(x), x)


def test_drop_path_in_vit_matches_the_original_block(model):
    """x + DropPath(ls1 * attn(norm1(x))), then x + DropPath(ls2 * mlp(norm2(x))), rates linspace(0, r, L)."""
    add_drop_path(model, 0.4)
    layers = model.model.vision_tower.encoder.layer
    assert [layers[i].dropout.rate for i in range(2)] == pytest.approx([0.0, 0.4])
    layer = layers[1].train()
    x = torch.randn(6, 5, model.config.vision_config.hidden_size)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    keep = 0.6
    attn_mask = torch.empty(6, 1, 1).bernoulli_(keep) / keep
    mlp_mask = torch.empty(6, 1, 1).bernoulli_(keep) / keep
    h = x + attn_mask * (
        layer.lambda_1 * layer.attention.projection_layer(_attn_core(layer, layer.layernorm_before(x)))
    )
    expected = h + mlp_mask * (layer.lambda_2 * layer.mlp(layer.layernorm_after(h)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _attn_core(layer, x):
    attention = layer.attention
    b, n, c = x.shape
    heads = attention.num_heads
    q, k, v = (
        proj(x).view(b, n, heads, c // heads).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def test_training_forward_matches_stock_forward_with_images(model, tokenizer):
    model.eval()
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 2, image_id, image_id, image_id, image_id, 3, 4]])
    pixels = torch.randn(1, 3, 56, 56)
    mask = torch.ones_like(ids)
    positions = torch.arange(8)[None]
    ours = InternVLTrainingForward(model)(ids, mask, positions, pixels, torch.tensor([True]))
    stock = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=1e-6)


def test_text_only_batch_with_dummy_tile_equals_text_forward_and_keeps_vit_in_graph(model):
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    mask, positions = torch.ones_like(ids), torch.arange(4)[None]
    forward = InternVLTrainingForward(model)
    logits = forward(ids, mask, positions, torch.randn(1, 3, 56, 56), torch.tensor([False]))
    torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask, position_ids=positions).logits)
    logits.sum().backward()
    vit_grad = model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad
    assert vit_grad is not None and torch.count_nonzero(vit_grad) == 0


def test_training_forward_rejects_a_token_feature_mismatch(model):
    ids = torch.tensor([[1, model.config.image_token_id, 3]])
    with pytest.raises(ValueError, match="1 <IMG_CONTEXT> tokens but 4 image features"):
        InternVLTrainingForward(model)(ids, torch.ones_like(ids), torch.arange(3)[None], torch.randn(1, 3, 56, 56))


def test_load_model_roundtrip_and_errors(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}')
    with pytest.raises(ValueError, match="model_type is 'llava', expected an InternVL checkpoint"):
        load_model(tmp_path)
