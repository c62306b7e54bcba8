"""Tiny random checkpoints in the ORIGINAL InternVL remote-code layout (`InternVLChatModel`), for converter tests.

The folder looks like one written by the original tools (docs/original-differences.md §4.1, §4.4): a
`config.json` with `vision_config` and `llm_config`, float32 weights named `vision_model.*`, `mlp1.*` and
`language_model.*` (sharded with an index file, or in a single file), and the tokenizer files. With
`llm_lora_rank` / `vit_lora_rank` the weights stay in the unmerged PEFT layout that the original SFT scripts save,
e.g.
`language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` plus `...q_proj.lora_A.default.weight`
[r, in] and `...q_proj.lora_B.default.weight` [out, r], with alpha = 2r (docs/original-differences.md §4.6).

Base weights come from one generator seeded with `seed` and the LoRA factors from a second one, so a LoRA build
and a plain build with the same seed share their base weights.

Example:
    >>> state_dict = build_original_checkpoint(tmp_path, llm="internlm2", vit="6b", num_shards=2)
    >>> sorted(p.name for p in tmp_path.glob("model*"))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> state_dict["language_model.model.layers.0.attention.wqkv.weight"].shape  # (H + 2 KV) * hd = (4 + 4) * 16
    torch.Size([128, 64])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from internvl_tune.constants import DEFAULT_MAX_DYNAMIC_PATCH
from internvl_tune.testing.tiny import build_tiny_tokenizer

LLM_FAMILIES = ("qwen2", "llama", "internlm2", "qwen3", "qwen3_moe", "gpt_oss")
INTERNVL3_5_FAMILIES = ("qwen3", "qwen3_moe", "gpt_oss")  # built as the InternVL3.5 code saves them
VIT_STYLES = ("300m", "6b")
WEIGHT_FORMATS = ("safetensors", "bin")

# PEFT target modules of the original training entry (docs/original-differences.md §4.6); alpha = 2r, so the merge
# scaling alpha/r is 2.
LLM_LORA_TARGETS = {
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "internlm2": ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "qwen3": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
VIT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_ALPHA_PER_RANK = 2
PEFT_PREFIX = "base_model.model."

# Weight statistics. Linear and conv weights have std 1/sqrt(fan_in) (not 0.02) and the class and position
# embeddings std 0.5: with 0.02 the tiny ViT's attention is almost uniform, and a converter that swaps the q and
# k thirds of `attn.qkv`, drops the class embedding or a norm weight moves the logits by less than 1e-4, below
# any fp32 tolerance. Biases, norm weights, layer scales and LoRA factors are large enough to matter as well.
_EMBEDDING_STD = 0.02  # token embeddings and the LM head
_VIT_EMBEDDING_STD = 0.5  # class and position embeddings
_LINEAR_BIAS_STD = 0.2
_NORM_STD = 0.1
_LORA_STD = 0.1
_LORA_SEED_OFFSET = 1_000_003

_LLM_CONFIG_BASE = {
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "internlm2": {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "bias": False,
        "attn_implementation": "eager",
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        # YaRN as GPT-OSS ships it, on a short original length so that the ramp covers the tiny head dims.
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "attention_bias": True,
        "sliding_window": 4,  # GPT-OSS: 128; tiny, so that the window cuts the test sequences
        "swiglu_limit": 1.0,  # GPT-OSS: 7.0; tiny, so that the clamps act on the tiny activations
        "output_router_logits": False,
        "router_aux_loss_coef": 0.9,
    },
}


def build_original_checkpoint(
    path: str | Path,
    *,
    llm: str = "qwen2",
    vit: str = "300m",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    ps_version: str = "v2",
    select_layer: int = -1,
    num_shards: int = 2,
    weight_format: str = "safetensors",
    llm_lora_rank: int = 0,
    vit_lora_rank: int = 0,
    downsample_ratio: float = 0.5,
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    llm_kv_heads: int = 2,
    template: str = "internvl2_5",
    num_experts: int = 4,
    experts_per_token: int = 2,
    tie_word_embeddings: bool = False,
) -> dict[str, torch.Tensor]:
    """Write a tiny random `InternVLChatModel` checkpoint folder in the original layout.

    Args:
        path: output folder (created if missing).
        llm: LLM family, one of `LLM_FAMILIES`.
        vit: ViT style: "300m" (layer_norm, qkv bias, no qk-norm) or "6b" (rms_norm, qk-norm, no qkv bias).
        seed: seed of the random weights.
        tokenizer: tokenizer saved next to the weights; `vocab_size` is its length. Default: the tiny tokenizer.
        ps_version, select_layer, downsample_ratio, template: written to `config.json` as they are.
        num_shards: number of weight files; 1 writes a single file and no index.
        weight_format: "safetensors" (`model*.safetensors`) or "bin" (`pytorch_model*.bin` via `torch.save`).
        llm_lora_rank, vit_lora_rank: rank r > 0 leaves that tower in the unmerged PEFT layout (alpha = 2r).
        image_size, patch_size, vision_hidden, vision_layers, vision_heads: ViT shape.
        llm_hidden, llm_layers, llm_heads, llm_kv_heads: LLM shape (head dim = llm_hidden // llm_heads).
        num_experts, experts_per_token: the MoE shape of qwen3_moe and gpt_oss (expert width = llm_hidden; for
            qwen3_moe with 2+ layers, layer 0 is dense: `mlp_only_layers` [0]).
        tie_word_embeddings: for the InternVL3.5 families (qwen3, qwen3_moe, gpt_oss), an LLM whose head is its
            embedding matrix; no `lm_head` weight is written, as transformers saves tied models.

    The InternVL3.5 families are written as the 3.5 code saves them: `tie_word_embeddings` copied from the LLM
    config to the top level, no `pad2square`, and the projector `mlp1` in bf16 (the 3.5 constructor casts it).

    Returns:
        The float32 state dict exactly as written (original key names, LoRA keys unmerged).
    """
    if llm not in LLM_FAMILIES:
        raise ValueError(f"llm={llm!r}: expected one of {LLM_FAMILIES}")
    if vit not in VIT_STYLES:
        raise ValueError(f"vit={vit!r}: expected one of {VIT_STYLES}")
    if tie_word_embeddings and llm not in INTERNVL3_5_FAMILIES:
        raise ValueError("tie_word_embeddings: InternVL 2.5 / 3 never tie (only the 3.5 families)")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}: expected one of {WEIGHT_FORMATS}")
    if vision_hidden % vision_heads or llm_hidden % llm_heads or llm_heads % llm_kv_heads:
        raise ValueError("hidden sizes must divide by the head counts, and llm_heads by llm_kv_heads")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    vocab_size = len(tokenizer)

    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": DEFAULT_MAX_DYNAMIC_PATCH,  # what the released InternVL configs say
        "min_dynamic_patch": 1,
        "ps_version": ps_version,
        "select_layer": select_layer,
        "template": template,
        "use_thumbnail": True,
        "use_backbone_lora": vit_lora_rank,
        "use_llm_lora": llm_lora_rank,
        "pad2square": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision_hidden,
            "num_attention_heads": vision_heads,
            "num_hidden_layers": vision_layers,
            "intermediate_size": 4 * vision_hidden,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": 3,
            "qkv_bias": vit == "300m",
            "qk_normalization": vit == "6b",
            "norm_type": "layer_norm" if vit == "300m" else "rms_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": 1.0,
            "drop_path_rate": 0.0,
            "use_flash_attn": True,
        },
        "llm_config": {
            **_LLM_CONFIG_BASE[llm],
            "hidden_size": llm_hidden,
            "intermediate_size": 4 * llm_hidden,
            "num_hidden_layers": llm_layers,
            "num_attention_heads": llm_heads,
            "num_key_value_heads": llm_kv_heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "tie_word_embeddings": tie_word_embeddings,
            **_moe_config(llm, llm_hidden, llm_layers, llm_heads, num_experts, experts_per_token),
        },
    }
    if llm in INTERNVL3_5_FAMILIES:
        config.pop("pad2square")
        config["tie_word_embeddings"] = tie_word_embeddings

    generator = torch.Generator().manual_seed(seed)
    projector_in = vision_hidden * int(1 / downsample_ratio) ** 2
    state_dict = {
        **_vision_weights(generator, vit, vision_hidden, vision_layers, image_size, patch_size),
        "mlp1.0.weight": _norm_weight(generator, projector_in),
        "mlp1.0.bias": _randn(generator, projector_in, std=_NORM_STD),
        **_linear(generator, "mlp1.1", llm_hidden, projector_in),
        **_linear(generator, "mlp1.3", llm_hidden, llm_hidden),
        **_llm_weights(generator, llm, config["llm_config"], vocab_size),
    }
    if llm in INTERNVL3_5_FAMILIES:
        state_dict |= {k: v.to(torch.bfloat16) for k, v in state_dict.items() if k.startswith("mlp1.")}
    if tie_word_embeddings:
        del state_dict["language_model.lm_head.weight"]
    lora_generator = torch.Generator().manual_seed(seed + _LORA_SEED_OFFSET)
    if vit_lora_rank > 0:
        state_dict = _to_peft_layout(state_dict, "vision_model.", VIT_LORA_TARGETS, vit_lora_rank, lora_generator)
    if llm_lora_rank > 0:
        state_dict = _to_peft_layout(
            state_dict, "language_model.", LLM_LORA_TARGETS[llm], llm_lora_rank, lora_generator
        )

    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_weights(path, state_dict, num_shards, weight_format)
    tokenizer.save_pretrained(path)
    return state_dict


def read_original_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read back a checkpoint folder in the original layout: (state dict, `config.json` as a dict).

    It reads safetensors before bin, and an index file (any number of shards) before a single file.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for base, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = path / f"{base}.{ext}.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / f"{base}.{ext}").exists():
            files = [f"{base}.{ext}"]
        else:
            continue
        state_dict = {}
        for name in files:
            state_dict.update(_load_file(path / name))
        return state_dict, config
    raise ValueError(f"{path}: no model*.safetensors or pytorch_model*.bin weights")


def _randn(generator: torch.Generator, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
    return mean + std * torch.randn(*shape, generator=generator)


def _norm_weight(generator: torch.Generator, size: int) -> torch.Tensor:
    return _randn(generator, size, std=_NORM_STD, mean=1.0)


def _linear(
    generator: torch.Generator, name: str, out_features: int, in_features: int, bias: bool = True
) -> dict[str, torch.Tensor]:
    weights = {f"{name}.weight": _randn(generator, out_features, in_features, std=in_features**-0.5)}
    if bias:
        weights[f"{name}.bias"] = _randn(generator, out_features, std=_LINEAR_BIAS_STD)
    return weights


def _vision_weights(
    generator: torch.Generator, vit: str, hidden: int, num_layers: int, image_size: int, patch_size: int
) -> dict[str, torch.Tensor]:
    num_positions = (image_size // patch_size) ** 2 + 1
    weights = {
        "vision_model.embeddings.class_embedding": _randn(generator, 1, 1, hidden, std=_VIT_EMBEDDING_STD),
        "vision_model.embeddings.patch_embedding.weight": _randn(
            generator, hidden, 3, patch_size, patch_size, std=(3 * patch_size**2) ** -0.5
        ),
        "vision_model.embeddings.patch_embedding.bias": _randn(generator, hidden, std=_LINEAR_BIAS_STD),
        "vision_model.embeddings.position_embedding": _randn(
            generator, 1, num_positions, hidden, std=_VIT_EMBEDDING_STD
        ),
    }
    for i in range(num_layers):
        layer = f"vision_model.encoder.layers.{i}"
        weights |= _linear(generator, f"{layer}.attn.qkv", 3 * hidden, hidden, bias=vit == "300m")
        weights |= _linear(generator, f"{layer}.attn.proj", hidden, hidden)
        if vit == "6b":
            weights[f"{layer}.attn.q_norm.weight"] = _norm_weight(generator, hidden)
            weights[f"{layer}.attn.k_norm.weight"] = _norm_weight(generator, hidden)
        for norm in ("norm1", "norm2"):
            weights[f"{layer}.{norm}.weight"] = _norm_weight(generator, hidden)
            if vit == "300m":
                weights[f"{layer}.{norm}.bias"] = _randn(generator, hidden, std=_NORM_STD)
        weights[f"{layer}.ls1"] = _randn(generator, hidden, std=0.05, mean=0.1)
        weights[f"{layer}.ls2"] = _randn(generator, hidden, std=0.05, mean=0.1)
        weights |= _linear(generator, f"{layer}.mlp.fc1", 4 * hidden, hidden)
        weights |= _linear(generator, f"{layer}.mlp.fc2", hidden, 4 * hidden)
    return weights


def _moe_config(llm: str, hidden: int, num_layers: int, num_heads: int, num_experts: int, top_k: int) -> dict:
    """The llm_config keys of the MoE (and GPT-OSS attention) shape; {} for dense families."""
    # Head dims other than hidden / heads, as the real models have (Qwen3-0.6B: 1024 / 16 heads, head_dim 128;
    # GPT-OSS-20B: 2880 / 64, head_dim 64), so that a converter that derives it from the hidden size breaks here.
    if llm == "qwen3_moe":
        return {
            "head_dim": 2 * hidden // num_heads,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": hidden,
            "mlp_only_layers": [0] if num_layers > 1 else [],  # one dense layer, as a model may have
        }
    if llm == "gpt_oss":
        return {
            "head_dim": 3 * hidden // (2 * num_heads),
            "num_local_experts": num_experts,
            "num_experts_per_tok": top_k,
            "experts_per_token": top_k,
            "intermediate_size": hidden,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        }
    if llm == "qwen3":
        return {"head_dim": 2 * hidden // num_heads}
    return {}


def _llm_weights(generator: torch.Generator, llm: str, llm_config: dict, vocab: int) -> dict[str, torch.Tensor]:
    hidden, num_layers = llm_config["hidden_size"], llm_config["num_hidden_layers"]
    num_heads, num_kv_heads = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    head_dim = llm_config.get("head_dim") or hidden // num_heads
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if llm == "internlm2":
        embed, head = "language_model.model.tok_embeddings.weight", "language_model.output.weight"
    else:
        embed, head = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    weights = {embed: _randn(generator, vocab, hidden, std=_EMBEDDING_STD)}
    for i in range(num_layers):
        layer = f"language_model.model.layers.{i}"
        if llm == "internlm2":
            # Grouped rows: for each kv group, its query heads, then its key head, then its value head.
            weights |= _linear(generator, f"{layer}.attention.wqkv", q_size + 2 * kv_size, hidden, bias=False)
            weights |= _linear(generator, f"{layer}.attention.wo", hidden, q_size, bias=False)
            weights |= _linear(generator, f"{layer}.feed_forward.w1", 4 * hidden, hidden, bias=False)
            weights |= _linear(generator, f"{layer}.feed_forward.w3", 4 * hidden, hidden, bias=False)
            weights |= _linear(generator, f"{layer}.feed_forward.w2", hidden, 4 * hidden, bias=False)
            weights[f"{layer}.attention_norm.weight"] = _norm_weight(generator, hidden)
            weights[f"{layer}.ffn_norm.weight"] = _norm_weight(generator, hidden)
            continue
        qkv_bias = llm in ("qwen2", "gpt_oss")
        weights |= _linear(generator, f"{layer}.self_attn.q_proj", q_size, hidden, bias=qkv_bias)
        weights |= _linear(generator, f"{layer}.self_attn.k_proj", kv_size, hidden, bias=qkv_bias)
        weights |= _linear(generator, f"{layer}.self_attn.v_proj", kv_size, hidden, bias=qkv_bias)
        weights |= _linear(generator, f"{layer}.self_attn.o_proj", hidden, q_size, bias=llm == "gpt_oss")
        if llm in ("qwen3", "qwen3_moe"):
            weights[f"{layer}.self_attn.q_norm.weight"] = _norm_weight(generator, head_dim)
            weights[f"{layer}.self_attn.k_norm.weight"] = _norm_weight(generator, head_dim)
        if llm == "gpt_oss":
            weights[f"{layer}.self_attn.sinks"] = _randn(generator, num_heads, std=1.0)
        weights |= _feed_forward(generator, llm, llm_config, i, layer)
        weights[f"{layer}.input_layernorm.weight"] = _norm_weight(generator, hidden)
        weights[f"{layer}.post_attention_layernorm.weight"] = _norm_weight(generator, hidden)
    weights["language_model.model.norm.weight"] = _norm_weight(generator, hidden)
    weights[head] = _randn(generator, vocab, hidden, std=_EMBEDDING_STD)
    return weights


def _feed_forward(generator: torch.Generator, llm: str, llm_config: dict, index: int, layer: str) -> dict:
    """A layer's MLP weights: SwiGLU, Qwen3-MoE's router and experts one by one (as transformers saves them), or
    GPT-OSS's router and 3-D expert tensors (gate and up interleaved along the last dimension)."""
    hidden = llm_config["hidden_size"]
    if llm == "gpt_oss":
        experts, width = llm_config["num_local_experts"], llm_config["intermediate_size"]
        return {
            **_linear(generator, f"{layer}.mlp.router", experts, hidden),
            f"{layer}.mlp.experts.gate_up_proj": _randn(generator, experts, hidden, 2 * width, std=hidden**-0.5),
            f"{layer}.mlp.experts.gate_up_proj_bias": _randn(generator, experts, 2 * width, std=_LINEAR_BIAS_STD),
            f"{layer}.mlp.experts.down_proj": _randn(generator, experts, width, hidden, std=width**-0.5),
            f"{layer}.mlp.experts.down_proj_bias": _randn(generator, experts, hidden, std=_LINEAR_BIAS_STD),
        }
    if llm == "qwen3_moe" and index not in llm_config["mlp_only_layers"]:
        experts, width = llm_config["num_experts"], llm_config["moe_intermediate_size"]
        weights = _linear(generator, f"{layer}.mlp.gate", experts, hidden, bias=False)
        for e in range(experts):
            weights |= _linear(generator, f"{layer}.mlp.experts.{e}.gate_proj", width, hidden, bias=False)
            weights |= _linear(generator, f"{layer}.mlp.experts.{e}.up_proj", width, hidden, bias=False)
            weights |= _linear(generator, f"{layer}.mlp.experts.{e}.down_proj", hidden, width, bias=False)
        return weights
    width = llm_config["intermediate_size"]
    return {
        **_linear(generator, f"{layer}.mlp.gate_proj", width, hidden, bias=False),
        **_linear(generator, f"{layer}.mlp.up_proj", width, hidden, bias=False),
        **_linear(generator, f"{layer}.mlp.down_proj", hidden, width, bias=False),
    }


def _to_peft_layout(
    state_dict: dict[str, torch.Tensor],
    tower: str,
    targets: tuple[str, ...],
    rank: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Rename the `tower` keys the way a PEFT-wrapped tower saves them, adding random non-zero LoRA factors.

    `language_model.model.layers.0.self_attn.q_proj.weight` becomes
    `language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`, next to
    `...q_proj.lora_A.default.weight` [r, in] and `...q_proj.lora_B.default.weight` [out, r]; a key outside the
    targets only gains the `base_model.model.` prefix.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(tower):
            out[key] = value
            continue
        module, _, param = key[len(tower) :].rpartition(".")
        peft_module = f"{tower}{PEFT_PREFIX}{module}"
        if not any(module == t or module.endswith(f".{t}") for t in targets):
            out[f"{peft_module}.{param}"] = value
            continue
        out[f"{peft_module}.base_layer.{param}"] = value
        if param == "weight":
            out_features, in_features = value.shape
            out[f"{peft_module}.lora_A.default.weight"] = _randn(generator, rank, in_features, std=_LORA_STD)
            out[f"{peft_module}.lora_B.default.weight"] = _randn(generator, out_features, rank, std=_LORA_STD)
    return out


def _write_weights(path: Path, state_dict: dict[str, torch.Tensor], num_shards: int, weight_format: str) -> None:
    """Write `num_shards` files of consecutive keys plus an index, or one file and no index when num_shards is 1."""
    keys = list(state_dict)
    if not 1 <= num_shards <= len(keys):
        raise ValueError(f"num_shards={num_shards}: expected 1..{len(keys)}")
    base, ext = ("model", "safetensors") if weight_format == "safetensors" else ("pytorch_model", "bin")
    if num_shards == 1:
        _save_file({k: state_dict[k] for k in keys}, path / f"{base}.{ext}")
        return
    weight_map = {}
    for i in range(num_shards):
        chunk = keys[i * len(keys) // num_shards : (i + 1) * len(keys) // num_shards]
        name = f"{base}-{i + 1:05d}-of-{num_shards:05d}.{ext}"
        _save_file({k: state_dict[k] for k in chunk}, path / name)
        weight_map |= dict.fromkeys(chunk, name)
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_file(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if file.suffix == ".safetensors":
        save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch.save(tensors, file)


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)
