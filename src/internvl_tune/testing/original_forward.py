"""An independent forward pass of the ORIGINAL InternVL model (`InternVLChatModel`).

Written from docs/original-differences.md §4. Converter tests compare transformers'
`InternVLForConditionalGeneration` after conversion against this oracle. It takes the original-layout state dict and
the `config.json` dict as they are, uses plain torch ops only (no transformers model classes) and computes in
float64, so its own rounding is far below any test tolerance.

The image-context token id is not in the original `config.json` (the original sets it from the tokenizer,
docs/original-differences.md §4.3), so `original_logits` takes it as a required keyword argument
`img_context_token_id`, e.g. `tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")`.

Example:
    >>> state_dict, config = read_original_checkpoint(path)
    >>> ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    >>> input_ids = torch.tensor([[5, 6, *[ctx] * 4, 7]])  # one 56 px tile -> 4 image tokens
    >>> original_logits(state_dict, config, input_ids, torch.randn(1, 3, 56, 56), img_context_token_id=ctx).shape
    torch.Size([1, 7, 493])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LORA_SCALING = 2.0  # alpha = 2r in the original (docs/original-differences.md §4.6)
PEFT_PREFIX = "base_model.model."
PROJECTOR_NORM_EPS = 1e-5  # mlp1.0 is nn.LayerNorm with its default eps
_LLM_FAMILIES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}


def original_logits(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_flags: torch.Tensor | None = None,
    *,
    img_context_token_id: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of the original InternVL chat model (docs/original-differences.md §4.3), in float64.

    Args:
        state_dict: original-layout weights (`vision_model.*`, `mlp1.*`, `language_model.*`), any float dtype;
            unmerged PEFT LoRA keys are merged first.
        config: the original `config.json` as a dict.
        input_ids: [B, T] token ids; each `img_context_token_id` takes one image feature.
        pixel_values: [N, 3, S, S] tiles, or None for text only.
        image_flags: [N] (or [N, 1]) flags; only tiles flagged 1 fill `<IMG_CONTEXT>` slots. Default: all tiles.
        img_context_token_id: id of `<IMG_CONTEXT>` in the tokenizer.
        attention_mask: optional [B, T] padding mask (1 = token). Positions stay 0..T-1, as when the original
            is called without position_ids; logits at padded positions are meaningless.

    Returns:
        [B, T, V] float64 logits.

    Raises:
        ValueError: if the number of `<IMG_CONTEXT>` tokens differs from the number of image features (the
            original only warns and fills what it can, docs/original-differences.md §4.3; an oracle should not).
    """
    weights = merge_lora({k: v.to(torch.float64) for k, v in state_dict.items()})
    llm_weights = _subdict(weights, "language_model.")
    embeds = llm_embed(llm_weights, config["llm_config"], input_ids)  # [B, T, D]
    if pixel_values is not None and pixel_values.shape[0] > 0:
        features = extract_feature(weights, config, pixel_values.to(torch.float64))  # [N, tokens, D]
        if image_flags is not None:
            features = features[image_flags.reshape(-1).bool()]
        features = features.reshape(-1, embeds.shape[-1])
    else:
        features = embeds.new_zeros(0, embeds.shape[-1])
    is_context = input_ids == img_context_token_id
    if int(is_context.sum()) != features.shape[0]:
        raise ValueError(
            f"{int(is_context.sum())} <IMG_CONTEXT> tokens (id {img_context_token_id}) but "
            f"{features.shape[0]} image features"
        )
    embeds = embeds.clone()
    embeds[is_context] = features  # row-major over [B, T], the order of the original's flattened assignment
    return llm_logits(llm_weights, config["llm_config"], embeds, attention_mask)


def merge_lora(state_dict: dict[str, torch.Tensor], scaling: float = LORA_SCALING) -> dict[str, torch.Tensor]:
    """Merge unmerged PEFT LoRA weights (W + scaling * B @ A) and strip the PEFT prefixes.

    Example: `language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` with its
    `lora_A.default.weight` [r, in] and `lora_B.default.weight` [out, r] becomes
    `language_model.model.layers.0.self_attn.q_proj.weight`; `.base_layer.bias` becomes `.bias`, and
    `vision_model.base_model.model.embeddings.class_embedding` becomes `vision_model.embeddings.class_embedding`.
    A state dict without PEFT keys comes back unchanged. The sum is computed in float64 and cast back.
    """
    merged = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            module, _, param = key.partition(".base_layer.")
            if param == "weight":
                lora_a = state_dict[f"{module}.lora_A.default.weight"].to(torch.float64)  # [r, in]
                lora_b = state_dict[f"{module}.lora_B.default.weight"].to(torch.float64)  # [out, r]
                value = (value.to(torch.float64) + scaling * lora_b @ lora_a).to(value.dtype)
            key = f"{module}.{param}"
        for tower in ("language_model.", "vision_model."):
            if key.startswith(tower + PEFT_PREFIX):
                key = tower + key[len(tower + PEFT_PREFIX) :]
        merged[key] = value
    return merged


# ---------------------------------------------------------------- vision path (docs/original-differences.md §4.2)


def vision_hidden_states(
    vision_weights: dict[str, torch.Tensor], vision_config: dict, pixel_values: torch.Tensor
) -> list[torch.Tensor]:
    """InternViT hidden states: [embedding output, layer 1 output, ..., layer L output], each [N, 1 + h*w, C].

    `vision_weights` are keyed relative to `vision_model.` (`embeddings.class_embedding`, `encoder.layers.0...`).
    Each layer is `x + ls1 * attn(norm1(x))` then `x + ls2 * mlp(norm2(x))`; there is no final norm.
    """
    hidden = vision_config["hidden_size"]
    patch = vision_config["patch_size"]
    x = F.conv2d(
        pixel_values,
        vision_weights["embeddings.patch_embedding.weight"],
        vision_weights["embeddings.patch_embedding.bias"],
        stride=patch,
    )  # [N, C, h, w]
    num_tiles, _, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
    position = vision_weights["embeddings.position_embedding"]  # [1, 1 + g*g, C]
    patch_position = position[:, 1:]
    grid = math.isqrt(patch_position.shape[1])
    if (grid, grid) != (grid_h, grid_w):
        # The original interpolates on every forward; at the stored grid bicubic interpolation is the identity.
        patch_position = patch_position.reshape(1, grid, grid, hidden).permute(0, 3, 1, 2)
        patch_position = F.interpolate(patch_position, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_position = patch_position.reshape(1, hidden, grid_h * grid_w).permute(0, 2, 1)
    cls = vision_weights["embeddings.class_embedding"].expand(num_tiles, 1, hidden)
    x = torch.cat([cls, x], dim=1) + torch.cat([position[:, :1], patch_position], dim=1)

    states = [x]
    for i in range(vision_config["num_hidden_layers"]):
        layer = _subdict(vision_weights, f"encoder.layers.{i}.")
        x = x + layer["ls1"] * _vit_attention(_vit_norm(x, layer, "norm1", vision_config), layer, vision_config)
        h = _gelu(F.linear(_vit_norm(x, layer, "norm2", vision_config), layer["mlp.fc1.weight"], layer["mlp.fc1.bias"]))
        x = x + layer["ls2"] * F.linear(h, layer["mlp.fc2.weight"], layer["mlp.fc2.bias"])
        states.append(x)
    return states


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """The original `pixel_shuffle` (docs/original-differences.md §4.2): [N, H, W, C] -> [N, H*s, W*s, C/s^2].

    v2 with s = 0.5: output token (i, j) is the 2x2 block at rows 2i..2i+1, columns 2j..2j+1, with channels
    [TL, TR, BL, BR] (each C wide). v1 skips the last permute, so the block at (i, j) lands at (j, i).
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale_factor), int(c / scale_factor))  # merge horizontal neighbours
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(w * scale_factor), int(h * scale_factor), int(c / scale_factor**2))  # merge vertical ones
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3)
    elif ps_version != "v1":
        raise ValueError(f"ps_version={ps_version!r}: expected 'v1' or 'v2'")
    return x


def extract_feature(weights: dict[str, torch.Tensor], config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """The original `extract_feature`: ViT, drop CLS, pixel shuffle, `mlp1`. Returns [N, tokens, D].

    `weights` are the full (merged) original state dict; `config` the original `config.json` dict, whose absent
    fields take the `InternVLChatConfig` defaults (select_layer -1, downsample_ratio 0.5, ps_version v1;
    docs/original-differences.md §4.1).
    """
    vision_weights = _subdict(weights, "vision_model.")
    states = vision_hidden_states(vision_weights, config["vision_config"], pixel_values)
    x = states[config.get("select_layer", -1)][:, 1:]  # index 0 is the embedding output; -1 the last layer
    side = math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], side, side, x.shape[-1])
    x = pixel_shuffle(x, config.get("downsample_ratio", 0.5), config.get("ps_version", "v1"))
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, tokens, 4C]
    x = _layer_norm(x, weights["mlp1.0.weight"], weights["mlp1.0.bias"], PROJECTOR_NORM_EPS)
    x = _gelu(F.linear(x, weights["mlp1.1.weight"], weights["mlp1.1.bias"]))
    return F.linear(x, weights["mlp1.3.weight"], weights["mlp1.3.bias"])


def _vit_norm(x: torch.Tensor, layer: dict[str, torch.Tensor], name: str, vision_config: dict) -> torch.Tensor:
    eps = vision_config["layer_norm_eps"]
    if vision_config["norm_type"] == "layer_norm":
        return _layer_norm(x, layer[f"{name}.weight"], layer[f"{name}.bias"], eps)
    if vision_config["norm_type"] == "rms_norm":
        return _rms_norm(x, layer[f"{name}.weight"], eps)
    raise ValueError(f"vision_config.norm_type={vision_config['norm_type']!r}: expected layer_norm or rms_norm")


def _vit_attention(x: torch.Tensor, layer: dict[str, torch.Tensor], vision_config: dict) -> torch.Tensor:
    """Self-attention over all tokens; q, k, v are the thirds of `attn.qkv`; qk RMSNorm over the full C."""
    n, t, c = x.shape
    num_heads = vision_config["num_attention_heads"]
    head_dim = c // num_heads
    q, k, v = F.linear(x, layer["attn.qkv.weight"], layer.get("attn.qkv.bias")).chunk(3, dim=-1)  # 3 x [N, T, C]
    if vision_config.get("qk_normalization", False):
        q = _rms_norm(q, layer["attn.q_norm.weight"], vision_config["layer_norm_eps"])
        k = _rms_norm(k, layer["attn.k_norm.weight"], vision_config["layer_norm_eps"])
    q, k, v = (y.reshape(n, t, num_heads, head_dim).transpose(1, 2) for y in (q, k, v))  # [N, heads, T, hd]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(n, t, c)
    return F.linear(out, layer["attn.proj.weight"], layer["attn.proj.bias"])


# ---------------------------------------------------------------- LLM decoder


def llm_family(llm_config: dict) -> str:
    """The LLM family ("qwen2", "llama" or "internlm2") named by `llm_config.architectures`."""
    architecture = llm_config["architectures"][0]
    if architecture not in _LLM_FAMILIES:
        raise ValueError(f"llm_config.architectures={architecture!r}: expected one of {sorted(_LLM_FAMILIES)}")
    return _LLM_FAMILIES[architecture]


def llm_embed(llm_weights: dict[str, torch.Tensor], llm_config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, T, D]; `llm_weights` are keyed relative to `language_model.`."""
    name = "model.tok_embeddings.weight" if llm_family(llm_config) == "internlm2" else "model.embed_tokens.weight"
    return llm_weights[name][input_ids]


def llm_logits(
    llm_weights: dict[str, torch.Tensor],
    llm_config: dict,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LLM decoder from `inputs_embeds` [B, T, D] to logits [B, T, V], for every family InternVL uses.

    Per layer: `x + o(attn(rms(x)))`, then `x + mlp(rms(x))`; final RMSNorm; LM head (the embeddings when
    `tie_word_embeddings`). RoPE rotates the two halves of each head (rotate_half) at positions 0..T-1, with
    inv_freq = 1 / theta^(arange(0, hd, 2) / hd), or YaRN's (`_rope_frequencies`). Attention is causal GQA: query
    head h reads kv head h // (H / KV). Family differences, as the original builds each LLM:

    - Qwen3, Qwen3-MoE: an RMSNorm over each head's q and k (`q_norm`, `k_norm`, weight [hd]) before RoPE.
    - Qwen3-MoE: layer i is sparse unless it is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0. The
      router takes softmax(x W_g^T) over all experts, keeps the top k, renormalises them when `norm_topk_prob`; the
      output is the weighted sum of the chosen experts' SwiGLU MLPs.
    - GPT-OSS: biases on q, k, v, o; one learned sink logit per head joins every softmax row and is dropped after
      it; layers listed `sliding_attention` in `layer_types` see only the last `sliding_window` keys (q - k <
      window). The router takes the top k of x W_r^T + b and a softmax over those k; an expert computes
      gu = x W_gu + b_gu with gate = gu[0::2], up = gu[1::2], gate clamped above at `swiglu_limit`, up clamped to
      +-limit, and returns ((up + 1) * gate * sigmoid(alpha * gate)) W_down + b_down (alpha = `swiglu_alpha`).

    `llm_weights` are keyed relative to `language_model.` (`model.layers.0...`, `lm_head.weight` or InternLM2's
    `output.weight`).
    """
    family = llm_family(llm_config)
    if llm_config.get("use_sliding_window"):
        raise ValueError("llm_config.use_sliding_window: Qwen-style sliding windows are not implemented here")
    num_heads, num_kv_heads = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // num_heads
    eps = llm_config["rms_norm_eps"]
    batch, length, _ = inputs_embeds.shape

    positions = torch.arange(length, dtype=torch.float64)
    inv_freq, attention_factor = _rope_frequencies(llm_config, head_dim)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # [T, hd]
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor

    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]  # [1, 1, Tq, Tk]
    offsets = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # q - k
    layer_types = llm_config.get("layer_types") or ["full_attention"] * llm_config["num_hidden_layers"]

    x = inputs_embeds
    for i in range(llm_config["num_hidden_layers"]):
        allowed = causal
        if layer_types[i] == "sliding_attention":
            allowed = allowed & (offsets < llm_config["sliding_window"])[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A large finite negative (not -inf) keeps fully masked rows (left padding) free of NaN.
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
        layer = _decoder_layer(llm_weights, family, i, num_heads, num_kv_heads)
        h = _rms_norm(x, layer["attn_norm"], eps)
        q = F.linear(h, layer["q"], layer["q_bias"]).reshape(batch, length, num_heads, head_dim)
        k = F.linear(h, layer["k"], layer["k_bias"]).reshape(batch, length, num_kv_heads, head_dim)
        v = F.linear(h, layer["v"], layer["v_bias"]).reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        if layer["q_norm"] is not None:
            q, k = _rms_norm(q, layer["q_norm"], eps), _rms_norm(k, layer["k_norm"], eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, T, hd]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        if layer["sinks"] is not None:
            sinks = layer["sinks"].reshape(1, num_heads, 1, 1).expand(batch, num_heads, length, 1)
            probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, num_heads * head_dim)
        x = x + F.linear(out, layer["o"], layer["o_bias"])
        h = _rms_norm(x, layer["ffn_norm"], eps)
        x = x + _mlp(h, llm_weights, family, i, llm_config)
    x = _rms_norm(x, llm_weights["model.norm.weight"], eps)
    if llm_config.get("tie_word_embeddings") and family != "internlm2":
        return F.linear(x, llm_weights["model.embed_tokens.weight"])
    return F.linear(x, llm_weights["output.weight" if family == "internlm2" else "lm_head.weight"])


def _rope_frequencies(llm_config: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [hd / 2] and the factor on cos and sin: plain, or YaRN (GPT-OSS).

    YaRN (arXiv 2309.00071): dimension pair d keeps its frequency theta^(-2d/hd) where it rotates fast (more than
    `beta_fast` turns over `original_max_position_embeddings`), is divided by `factor` where it rotates slowly (fewer
    than `beta_slow`), with a linear ramp between those two dimensions; cos and sin are scaled by
    0.1 ln(factor) + 1. Without `truncate` the ramp ends are not rounded to whole dimensions.
    """
    theta = float(llm_config["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    plain = 1.0 / theta**exponents
    scaling = llm_config.get("rope_scaling")
    if not scaling:
        return plain, 1.0
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "yarn":
        raise ValueError(f"llm_config.rope_scaling={scaling!r}: only plain RoPE and YaRN are implemented")
    factor = float(scaling["factor"])
    original_length = scaling["original_max_position_embeddings"]

    def dimension_of(turns: float) -> float:  # the dimension index whose pair turns `turns` times in that length
        return head_dim * math.log(original_length / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(scaling.get("beta_fast") or 32), dimension_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: scale
    inv_freq = plain * (1 - ramp) + plain / factor * ramp
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, float(attention_factor)


def _mlp(h: torch.Tensor, llm_weights: dict[str, torch.Tensor], family: str, index: int, llm_config: dict):
    """The layer's feed-forward on [B, T, D]: SwiGLU, or a mixture of experts (see `llm_logits`)."""
    w = _subdict(llm_weights, f"model.layers.{index}.")
    if family == "internlm2":
        return F.linear(
            _silu(F.linear(h, w["feed_forward.w1.weight"])) * F.linear(h, w["feed_forward.w3.weight"]),
            w["feed_forward.w2.weight"],
        )
    sparse = family == "gpt_oss" or (
        family == "qwen3_moe"
        and index not in llm_config.get("mlp_only_layers", [])
        and (index + 1) % llm_config.get("decoder_sparse_step", 1) == 0
    )
    if not sparse:
        return F.linear(
            _silu(F.linear(h, w["mlp.gate_proj.weight"])) * F.linear(h, w["mlp.up_proj.weight"]),
            w["mlp.down_proj.weight"],
        )
    top_k = llm_config["num_experts_per_tok"]
    tokens = h.reshape(-1, h.shape[-1])
    out = torch.zeros_like(tokens)
    if family == "qwen3_moe":
        probs = torch.softmax(F.linear(tokens, w["mlp.gate.weight"]), dim=-1)
        weights, experts = probs.topk(top_k, dim=-1)
        if llm_config.get("norm_topk_prob", False):
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        logits, experts = F.linear(tokens, w["mlp.router.weight"], w["mlp.router.bias"]).topk(top_k, dim=-1)
        weights = torch.softmax(logits, dim=-1)
    for t in range(tokens.shape[0]):
        for slot in range(top_k):
            e = int(experts[t, slot])
            x = tokens[t]
            if family == "qwen3_moe":
                prefix = f"mlp.experts.{e}."
                y = F.linear(
                    _silu(F.linear(x, w[prefix + "gate_proj.weight"])) * F.linear(x, w[prefix + "up_proj.weight"]),
                    w[prefix + "down_proj.weight"],
                )
            else:
                gate_up = x @ w["mlp.experts.gate_up_proj"][e] + w["mlp.experts.gate_up_proj_bias"][e]  # [2I]
                limit, alpha = llm_config["swiglu_limit"], llm_config.get("swiglu_alpha", 1.702)
                gate, up = gate_up[0::2].clamp(max=limit), gate_up[1::2].clamp(-limit, limit)
                y = ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ w["mlp.experts.down_proj"][e]
                y = y + w["mlp.experts.down_proj_bias"][e]
            out[t] = out[t] + weights[t, slot] * y
    return out.reshape(h.shape)


def split_internlm2_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused `attention.wqkv` rows into (q, k, v) in the usual head-major layout.

    The rows are grouped per kv head: viewed as [KV, H/KV + 2, hd, ...], group g holds its H/KV query heads, then
    its key head, then its value head (InternLM2's `rearrange('b q (h gs d) -> b q h gs d', gs=2 + groups)`).
    Query head g * H/KV + s is slot s of group g, so the result matches GQA's h // (H / KV) kv mapping.
    Example with H=4, KV=2: rows [q0 q1 k0 v0 | q2 q3 k1 v1] -> q = [q0 q1 q2 q3], k = [k0 k1], v = [v0 v1].
    Works on weights [rows, D] and biases [rows].
    """
    groups = num_heads // num_kv_heads
    rest = wqkv.shape[1:]
    head_dim = wqkv.shape[0] // (num_kv_heads * (groups + 2))
    grouped = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def _decoder_layer(
    llm_weights: dict[str, torch.Tensor], family: str, index: int, num_heads: int, num_kv_heads: int
) -> dict[str, torch.Tensor | None]:
    """One decoder layer's attention and norm weights under family-neutral names (None where the family has none;
    the feed-forward is `_mlp`'s)."""
    w = _subdict(llm_weights, f"model.layers.{index}.")
    if family == "internlm2":
        q, k, v = split_internlm2_wqkv(w["attention.wqkv.weight"], num_heads, num_kv_heads)
        q_bias = k_bias = v_bias = None
        if "attention.wqkv.bias" in w:
            q_bias, k_bias, v_bias = split_internlm2_wqkv(w["attention.wqkv.bias"], num_heads, num_kv_heads)
        return {
            "q": q,
            "k": k,
            "v": v,
            "q_bias": q_bias,
            "k_bias": k_bias,
            "v_bias": v_bias,
            "o": w["attention.wo.weight"],
            "o_bias": w.get("attention.wo.bias"),
            "q_norm": None,
            "k_norm": None,
            "sinks": None,
            "attn_norm": w["attention_norm.weight"],
            "ffn_norm": w["ffn_norm.weight"],
        }
    return {
        "q": w["self_attn.q_proj.weight"],
        "k": w["self_attn.k_proj.weight"],
        "v": w["self_attn.v_proj.weight"],
        "q_bias": w.get("self_attn.q_proj.bias"),
        "k_bias": w.get("self_attn.k_proj.bias"),
        "v_bias": w.get("self_attn.v_proj.bias"),
        "o": w["self_attn.o_proj.weight"],
        "o_bias": w.get("self_attn.o_proj.bias"),
        "q_norm": w.get("self_attn.q_norm.weight"),
        "k_norm": w.get("self_attn.k_norm.weight"),
        "sinks": w.get("self_attn.sinks"),
        "attn_norm": w["input_layernorm.weight"],
        "ffn_norm": w["post_attention_layernorm.weight"],
    }


# ---------------------------------------------------------------- elementwise pieces, written out


def _subdict(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact (erf) GELU, as nn.GELU() and ACT2FN["gelu"]


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
