"""Checks of the converter test oracle itself (tiny original checkpoints + the plain-torch original forward).

None of these depend on the converter: the LLM decoder is checked against transformers' Qwen2 / LLaMA, the ViT
against torch.nn modules, and pixel shuffle, the InternLM2 wqkv split and the LoRA merge against expectations
written out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from internvl_tune.constants import IMG_CONTEXT_TOKEN
from internvl_tune.testing.original_checkpoint import build_original_checkpoint, read_original_checkpoint
from internvl_tune.testing.original_forward import (
    extract_feature,
    llm_embed,
    llm_logits,
    merge_lora,
    original_logits,
    pixel_shuffle,
    split_internlm2_wqkv,
    vision_hidden_states,
)

TOKENS_PER_TILE = 4  # a 56 px tile: (56 / 14)^2 = 16 patches, 4 after the 0.5 pixel shuffle


def _subdict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def context_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


# ---------------------------------------------------------------- (a) LLM decoder == transformers


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_llm_decoder_matches_transformers(tmp_path, tokenizer, context_id, llm):
    """RoPE, GQA, biases and the padding mask agree with Qwen2ForCausalLM / LlamaForCausalLM in fp32."""
    build_original_checkpoint(tmp_path, llm=llm, vit="300m", tokenizer=tokenizer)
    state_dict, config = read_original_checkpoint(tmp_path)
    hf_model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**config["llm_config"]), attn_implementation="eager"
    )
    hf_model.load_state_dict(_subdict(state_dict, "language_model."), strict=True)
    hf_model.float().eval()

    input_ids = torch.randint(0, context_id, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = original_logits(
        state_dict, config, input_ids, None, img_context_token_id=context_id, attention_mask=attention_mask
    )
    valid = attention_mask.bool()
    torch.testing.assert_close(logits[valid].float(), expected[valid], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- (b) pixel shuffle


def test_pixel_shuffle_block_order_and_channel_layout():
    """4x4 grid, C=2, pixel (r, c) = [10r + c, 100 + 10r + c].

    v2: token (i, j) is block rows 2i..2i+1, cols 2j..2j+1 with channels [TL, TR, BL, BR]; tokens are row-major
    over blocks. v1 puts block (i, j) at (j, i), i.e. column-major block order.
    """
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    label = (10 * rows + cols).float()
    x = torch.stack([label, 100 + label], dim=-1)[None]  # [1, 4, 4, 2]
    block_00 = [0, 100, 1, 101, 10, 110, 11, 111]
    block_01 = [2, 102, 3, 103, 12, 112, 13, 113]
    block_10 = [20, 120, 21, 121, 30, 130, 31, 131]
    block_11 = [22, 122, 23, 123, 32, 132, 33, 133]

    v2 = pixel_shuffle(x, 0.5, "v2")
    assert v2.shape == (1, 2, 2, 8)
    assert v2[0].reshape(4, 8).tolist() == [block_00, block_01, block_10, block_11]

    v1 = pixel_shuffle(x, 0.5, "v1")
    assert v1[0].reshape(4, 8).tolist() == [block_00, block_10, block_01, block_11]


# ---------------------------------------------------------------- (c) InternLM2 grouped wqkv


def test_internlm2_wqkv_grouped_split():
    """H=4, KV=2 (2 query heads per group), hd=2. Row (g, slot, d) holds 100g + 10slot + d.

    Group g's rows are [q_{2g}, q_{2g+1}, k_g, v_g], so query head h = 2g + slot, key/value head g.
    """
    labels = [100 * g + 10 * slot + d for g in range(2) for slot in range(4) for d in range(2)]
    wqkv = torch.tensor(labels, dtype=torch.float64)[:, None].expand(16, 3)  # [(H + 2KV) * hd, D=3]
    q, k, v = split_internlm2_wqkv(wqkv, num_heads=4, num_kv_heads=2)
    assert q[:, 0].tolist() == [0, 1, 10, 11, 100, 101, 110, 111]  # q0 q1 (group 0), q2 q3 (group 1)
    assert k[:, 0].tolist() == [20, 21, 120, 121]  # k0 (group 0), k1 (group 1)
    assert v[:, 0].tolist() == [30, 31, 130, 131]
    assert q.shape == (8, 3)
    bias_q, _, bias_v = split_internlm2_wqkv(torch.tensor(labels, dtype=torch.float64), 4, 2)
    assert bias_q.tolist() == q[:, 0].tolist() and bias_v.tolist() == v[:, 0].tolist()


def test_internlm2_decoder_equals_llama_with_fused_weights(tmp_path, tokenizer, context_id):
    """A LLaMA LLM rewritten with InternLM2 names and a grouped wqkv gives the same logits."""
    llama_sd = build_original_checkpoint(tmp_path, llm="llama", tokenizer=tokenizer)
    llama_config = json.loads((tmp_path / "config.json").read_text())["llm_config"]
    internlm2_config = {**llama_config, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"}
    num_heads, num_kv_heads = llama_config["num_attention_heads"], llama_config["num_key_value_heads"]
    head_dim = llama_config["hidden_size"] // num_heads
    renames = {
        "model.embed_tokens.": "model.tok_embeddings.",
        "self_attn.o_proj.": "attention.wo.",
        "mlp.gate_proj.": "feed_forward.w1.",
        "mlp.up_proj.": "feed_forward.w3.",
        "mlp.down_proj.": "feed_forward.w2.",
        "input_layernorm.": "attention_norm.",
        "post_attention_layernorm.": "ffn_norm.",
        "lm_head.": "output.",
    }
    llama = {k: v.double() for k, v in _subdict(llama_sd, "language_model.").items()}
    internlm2 = {}
    for key, value in llama.items():
        if "self_attn." in key and "o_proj" not in key:
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        internlm2[key] = value
    for i in range(llama_config["num_hidden_layers"]):
        q, k, v = (llama[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv")
        grouped = torch.cat(
            [
                q.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, -1),
                k.reshape(num_kv_heads, 1, head_dim, -1),
                v.reshape(num_kv_heads, 1, head_dim, -1),
            ],
            dim=1,
        )
        internlm2[f"model.layers.{i}.attention.wqkv.weight"] = grouped.reshape(-1, q.shape[-1])

    input_ids = torch.randint(0, context_id, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = llm_logits(llama, llama_config, llm_embed(llama, llama_config, input_ids))
    logits = llm_logits(internlm2, internlm2_config, llm_embed(internlm2, internlm2_config, input_ids))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- (d) LoRA layout and merge


def test_lora_checkpoint_layout_and_merge(tmp_path, tokenizer, context_id):
    plain = build_original_checkpoint(tmp_path / "plain", llm="qwen2", tokenizer=tokenizer)
    lora = build_original_checkpoint(
        tmp_path / "lora", llm="qwen2", tokenizer=tokenizer, llm_lora_rank=2, vit_lora_rank=2
    )
    q_proj = "language_model.base_model.model.model.layers.0.self_attn.q_proj"
    qkv = "vision_model.base_model.model.encoder.layers.1.attn.qkv"
    assert lora[f"{q_proj}.lora_A.default.weight"].shape == (2, 64)
    assert lora[f"{q_proj}.lora_B.default.weight"].shape == (64, 2)
    assert lora[f"{q_proj}.lora_B.default.weight"].abs().min() > 0
    assert f"{q_proj}.base_layer.bias" in lora
    assert lora[f"{qkv}.lora_A.default.weight"].shape == (2, 32)
    assert "language_model.base_model.model.lm_head.weight" in lora
    assert "language_model.base_model.model.model.embed_tokens.weight" in lora
    assert "vision_model.base_model.model.embeddings.class_embedding" in lora
    assert "mlp1.1.weight" in lora
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert (config["use_llm_lora"], config["use_backbone_lora"]) == (2, 2)

    merged = merge_lora(lora)
    assert set(merged) == set(plain)
    for prefix, name in [
        (q_proj, "language_model.model.layers.0.self_attn.q_proj"),
        (qkv, "vision_model.encoder.layers.1.attn.qkv"),
    ]:
        a, b = lora[f"{prefix}.lora_A.default.weight"], lora[f"{prefix}.lora_B.default.weight"]
        torch.testing.assert_close(merged[f"{name}.weight"], plain[f"{name}.weight"] + 2 * b @ a)
        torch.testing.assert_close(merged[f"{name}.bias"], plain[f"{name}.bias"], atol=0, rtol=0)
    for key in ("language_model.lm_head.weight", "vision_model.embeddings.position_embedding", "mlp1.3.bias"):
        torch.testing.assert_close(merged[key], plain[key], atol=0, rtol=0)  # same seed, same base weights

    input_ids = torch.tensor([[5, 6, *[context_id] * TOKENS_PER_TILE, 7]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    lora_logits, plain_logits = (
        original_logits(sd, config, input_ids, pixels, img_context_token_id=context_id) for sd in (lora, plain)
    )
    assert (lora_logits - plain_logits).abs().max() > 1e-2  # the LoRA factors are big enough to matter


def test_internlm2_lora_keys(tmp_path, tokenizer):
    lora = build_original_checkpoint(tmp_path, llm="internlm2", vit="6b", tokenizer=tokenizer, llm_lora_rank=3)
    assert "language_model.base_model.model.output.weight" in lora
    assert "language_model.base_model.model.model.layers.1.attention.wqkv.lora_A.default.weight" in lora
    assert "language_model.base_model.model.model.layers.1.attention_norm.weight" in lora
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in lora  # the ViT is not wrapped
    merged = merge_lora(lora)
    assert not any("lora_" in k or "base_model" in k or "base_layer" in k for k in merged)
    assert "language_model.model.layers.1.feed_forward.w2.weight" in merged


# ---------------------------------------------------------------- ViT against torch.nn modules


def test_internvit_300m_matches_torch_nn_modules(tmp_path, tokenizer):
    """The 300M ViT layer rebuilt from nn.LayerNorm / nn.MultiheadAttention (in_proj = qkv thirds) / nn.GELU."""
    state_dict = build_original_checkpoint(tmp_path, vit="300m", tokenizer=tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    vit = {k: v.double() for k, v in _subdict(state_dict, "vision_model.").items()}
    pixel_values = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    c, eps = config["hidden_size"], config["layer_norm_eps"]
    conv = nn.Conv2d(3, c, 14, stride=14).double()
    conv.load_state_dict(
        {"weight": vit["embeddings.patch_embedding.weight"], "bias": vit["embeddings.patch_embedding.bias"]}
    )
    with torch.no_grad():
        x = conv(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([vit["embeddings.class_embedding"].expand(2, 1, c), x], 1) + vit["embeddings.position_embedding"]
        for i in range(config["num_hidden_layers"]):
            w = _subdict(vit, f"encoder.layers.{i}.")
            norm1, norm2 = nn.LayerNorm(c, eps=eps).double(), nn.LayerNorm(c, eps=eps).double()
            norm1.load_state_dict({"weight": w["norm1.weight"], "bias": w["norm1.bias"]})
            norm2.load_state_dict({"weight": w["norm2.weight"], "bias": w["norm2.bias"]})
            attn = nn.MultiheadAttention(c, config["num_attention_heads"], batch_first=True).double()
            attn.load_state_dict(
                {
                    "in_proj_weight": w["attn.qkv.weight"],
                    "in_proj_bias": w["attn.qkv.bias"],
                    "out_proj.weight": w["attn.proj.weight"],
                    "out_proj.bias": w["attn.proj.bias"],
                }
            )
            mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)).double()
            mlp.load_state_dict(
                {"0.weight": w["mlp.fc1.weight"], "0.bias": w["mlp.fc1.bias"]}
                | {"2.weight": w["mlp.fc2.weight"], "2.bias": w["mlp.fc2.bias"]}
            )
            h = norm1(x)
            x = x + w["ls1"] * attn(h, h, h, need_weights=False)[0]
            x = x + w["ls2"] * mlp(norm2(x))
    torch.testing.assert_close(vision_hidden_states(vit, config, pixel_values)[-1], x, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- whole model


@pytest.mark.parametrize("llm", ["qwen2", "llama", "internlm2"])
@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_image_features_fill_context_tokens(tmp_path, tokenizer, context_id, llm, vit):
    """Pixels change logits from the first <IMG_CONTEXT> on, never before; flagged-out tiles are skipped."""
    state_dict = build_original_checkpoint(tmp_path, llm=llm, vit=vit, tokenizer=tokenizer, seed=3)
    config = json.loads((tmp_path / "config.json").read_text())
    text = tokenizer("What colour is the shape?")["input_ids"]
    ids = [*text[:3], *[context_id] * (2 * TOKENS_PER_TILE), *text[3:]]
    input_ids = torch.tensor([ids, ids])  # 2 samples x 2 tiles
    generator = torch.Generator().manual_seed(4)
    pixels = torch.randn(4, 3, 56, 56, generator=generator)

    logits = original_logits(state_dict, config, input_ids, pixels, img_context_token_id=context_id)
    assert logits.shape == (2, len(ids), len(tokenizer)) and logits.dtype == torch.float64
    assert torch.isfinite(logits).all()

    other = pixels.clone()
    other[3] = torch.randn(3, 56, 56, generator=generator)  # the second sample's second tile
    changed = original_logits(state_dict, config, input_ids, other, img_context_token_id=context_id)
    torch.testing.assert_close(changed[0], logits[0], atol=0, rtol=0)
    first_changed = 3 + TOKENS_PER_TILE
    torch.testing.assert_close(changed[1, :first_changed], logits[1, :first_changed], atol=0, rtol=0)
    assert (changed[1, first_changed:] - logits[1, first_changed:]).abs().amax(-1).min() > 1e-4

    with_extra = torch.cat([pixels[:2], torch.randn(1, 3, 56, 56, generator=generator), pixels[2:]])
    flags = torch.tensor([1, 1, 0, 1, 1])
    skipped = original_logits(state_dict, config, input_ids, with_extra, flags, img_context_token_id=context_id)
    # 5 tiles through the ViT instead of 4 changes the matmul blocking: equal to float64 rounding, not bitwise
    torch.testing.assert_close(skipped, logits, atol=1e-12, rtol=0)

    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        original_logits(state_dict, config, input_ids, pixels[:3], img_context_token_id=context_id)


def test_select_layer_and_position_interpolation(tmp_path, tokenizer):
    build_original_checkpoint(tmp_path, vit="6b", tokenizer=tokenizer, select_layer=-2, vision_layers=3)
    state_dict, config = read_original_checkpoint(tmp_path)
    pixels = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # select_layer -2 of 3 layers == the last layer of the first 2 layers
    two_layers = {**config, "select_layer": -1, "vision_config": {**config["vision_config"], "num_hidden_layers": 2}}
    weights = {k: v.double() for k, v in state_dict.items()}
    torch.testing.assert_close(
        extract_feature(weights, config, pixels), extract_feature(weights, two_layers, pixels), atol=0, rtol=0
    )
    # 84 px tiles: the 4x4 position grid is bicubically resized to 6x6, giving 36 / 4 = 9 tokens per tile
    features = extract_feature(weights, config, torch.randn(1, 3, 84, 84, dtype=torch.float64))
    assert features.shape == (1, 9, config["llm_config"]["hidden_size"])


# ---------------------------------------------------------------- files on disk


@pytest.mark.parametrize("weight_format", ["safetensors", "bin"])
@pytest.mark.parametrize("num_shards", [1, 2])
def test_checkpoint_files(tmp_path, tokenizer, context_id, weight_format, num_shards):
    state_dict = build_original_checkpoint(
        tmp_path, llm="internlm2", tokenizer=tokenizer, weight_format=weight_format, num_shards=num_shards
    )
    base = "model" if weight_format == "safetensors" else "pytorch_model"
    index = tmp_path / f"{base}.{weight_format}.index.json"
    if num_shards == 1:
        assert (tmp_path / f"{base}.{weight_format}").exists() and not index.exists()
    else:
        names = [f"{base}-00001-of-00002.{weight_format}", f"{base}-00002-of-00002.{weight_format}"]
        index_data = json.loads(index.read_text())
        assert sorted(set(index_data["weight_map"].values())) == names
        assert set(index_data["weight_map"]) == set(state_dict)
        assert index_data["metadata"]["total_size"] == sum(4 * t.numel() for t in state_dict.values())
    read, config = read_original_checkpoint(tmp_path)
    assert read.keys() == state_dict.keys()
    assert all(read[k].dtype == torch.float32 and torch.equal(read[k], v) for k, v in state_dict.items())
    assert config["architectures"] == ["InternVLChatModel"] and config["ps_version"] == "v2"
    assert config["llm_config"]["vocab_size"] == len(tokenizer)
    assert config["vision_config"]["norm_type"] == "layer_norm" and config["vision_config"]["qkv_bias"] is True
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids(IMG_CONTEXT_TOKEN) == context_id
