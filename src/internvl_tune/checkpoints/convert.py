"""Lossless conversion between the original InternVL checkpoint layout and transformers' native InternVL.

The original remote-code layout (`InternVLChatModel`, docs/original-differences.md §4.4) names weights
`vision_model.*`, `mlp1.*` and `language_model.*`, fuses the ViT's q/k/v into one `attn.qkv`, and for InternLM2
LLMs fuses the LLM's q/k/v into `attention.wqkv` in a grouped order. transformers'
`InternVLForConditionalGeneration` has separate projections and a Llama/Qwen2 LLM. Every mapping here is a rename,
a split or a concatenation, so values are copied bit for bit in both directions.

Key table (original -> HF module names; `L` = a ViT layer, `N` = an LLM layer)::

    vision_model.embeddings.class_embedding          model.vision_tower.embeddings.cls_token
    vision_model.embeddings.patch_embedding.*        model.vision_tower.embeddings.patch_embeddings.projection.*
    vision_model.embeddings.position_embedding       model.vision_tower.embeddings.position_embeddings
    vision_model.encoder.layers.L.attn.qkv.*         model.vision_tower.encoder.layer.L.attention.{q,k,v}_proj.*
                                                     (split in equal thirds along dim 0)
    ....attn.proj.* / attn.q_norm / attn.k_norm      ....attention.projection_layer.* / attention.q_norm / k_norm
    ....norm1 / norm2 / ls1 / ls2 / mlp.fc1 / fc2    ....layernorm_before / layernorm_after / lambda_1 / lambda_2 /
                                                     mlp.fc1 / mlp.fc2
    mlp1.0 / mlp1.1 / mlp1.3                         model.multi_modal_projector.layer_norm / linear_1 / linear_2
    language_model.model.*   (Qwen2, Llama)          model.language_model.*
    language_model.lm_head.weight                    lm_head.weight
    InternLM2 (becomes a Llama LLM):
    language_model.model.tok_embeddings              model.language_model.embed_tokens
    ....layers.N.attention.wqkv                      ....layers.N.self_attn.{q,k,v}_proj (grouped split, below)
    ....attention.wo / feed_forward.w1 / w3 / w2     ....self_attn.o_proj / mlp.gate_proj / up_proj / down_proj
    ....attention_norm / ffn_norm                    ....input_layernorm / post_attention_layernorm
    language_model.output.weight                     lm_head.weight

InternVL3.5's LLMs (Qwen3, Qwen3-MoE, GPT-OSS) are transformers models in the original code too
(`AutoModelForCausalLM.from_config`), so their `language_model.model.*` names are transformers' own and only the
prefix changes, as for Qwen2 / LLaMA. What a checkpoint folder holds for them is what transformers' `save_pretrained`
writes (docs/internvl3_5.md): Qwen3-MoE experts one by one (`mlp.experts.E.{gate,up,down}_proj.weight`, which the
loaded model fuses into `mlp.experts.gate_up_proj` / `down_proj`), GPT-OSS experts as stored 3-D tensors
(`mlp.experts.gate_up_proj[_bias]`, `down_proj[_bias]`, gate and up interleaved), `mlp.router.*`, and one attention
sink per head (`self_attn.sinks`). An LLM whose config ties the LM head to the embeddings (the small Qwen3s) is
saved without `lm_head.weight`; InternVL3.5 takes `tie_word_embeddings` from the LLM config, where 2.5 / 3 forced it
off. 3.5 also builds its projector `mlp1` in bf16 whatever the rest is: conversion keeps every tensor's dtype.

InternLM2's `wqkv` rows are `[KV groups, G + 2, head_dim]` with G = heads / kv_heads: each group holds its G query
heads, then its key head, then its value head. Example with 4 heads, 2 kv heads (G = 2), rows in head units::

    wqkv: [q0 q1 k0 v0 | q2 q3 k1 v1]   ->   q_proj [q0 q1 q2 q3], k_proj [k0 k1], v_proj [v0 v1]
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from internvl_tune.errors import UserError

# InternVL 2.5 / 3 (Qwen2, LLaMA, InternLM2) and 3.5 (Qwen3, Qwen3-MoE, GPT-OSS).
LLM_FAMILIES = ("qwen2", "llama", "internlm2", "qwen3", "qwen3_moe", "gpt_oss")
MOE_FAMILIES = ("qwen3_moe", "gpt_oss")
ORIGINAL_ARCHITECTURE = "InternVLChatModel"
_LLM_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
# llm_config keys that are bookkeeping of the original code, not architecture.
_DROPPED_LLM_KEYS = {
    "architectures",
    "auto_map",
    "_name_or_path",
    "attn_implementation",
    "_attn_implementation",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "bias",
    "model_type",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
}


class ConversionError(UserError):
    """A checkpoint that cannot be converted exactly; the message says what and why."""


def is_original_checkpoint(path: str | Path) -> bool:
    config_file = Path(path) / "config.json"
    return config_file.is_file() and ORIGINAL_ARCHITECTURE in (
        json.loads(config_file.read_text()).get("architectures") or []
    )


def llm_family(llm_config: dict[str, Any]) -> str:
    family = llm_config.get("model_type")
    if family not in LLM_FAMILIES:
        arch = (llm_config.get("architectures") or ["?"])[0]
        raise ConversionError(
            f"LLM {arch} (model_type {family!r}) is not supported; InternVL 2.5 / 3 / 3.5 use {', '.join(LLM_FAMILIES)}"
        )
    return family


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _rope(llm: dict[str, Any]) -> dict[str, Any]:
    """Legacy `rope_theta` / `rope_scaling` of an original llm_config as transformers' rope parameters."""
    params = {"rope_theta": float(llm.get("rope_theta", 10000.0)), "rope_type": "default"}
    scaling = llm.get("rope_scaling")
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"})
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def original_to_hf_config(original: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """The HF config of an original checkpoint config (the settings it has no place for: `checkpoint_settings`).

    Raises:
        ConversionError: for settings transformers' InternVL cannot reproduce exactly (ps_version v1, a
            non-negative select_layer, a qk-norm eps other than 1e-6, an unknown LLM).
    """
    vision, llm = dict(original["vision_config"]), dict(original["llm_config"])
    family = llm_family(llm)
    if original.get("ps_version", "v1") != "v2":
        raise ConversionError(
            f"ps_version {original.get('ps_version', 'v1')!r}: v1 (InternVL 1.x) orders image tokens column-major, "
            "which transformers' InternVL (v2 only) cannot express; these checkpoints are not supported"
        )
    select_layer = int(original.get("select_layer", -1))
    if select_layer >= 0:
        raise ConversionError(f"select_layer={select_layer}: only negative (from the end) layers are supported")
    qk_norm = bool(vision.get("qk_normalization", False))
    eps = float(vision.get("layer_norm_eps", 1e-6))
    if qk_norm and eps != 1e-6:
        raise ConversionError(f"qk_normalization with layer_norm_eps={eps}: transformers' ViT q/k norms use 1e-6")
    if vision.get("model_type") not in (None, "intern_vit_6b"):
        raise ConversionError(f"vision model_type {vision.get('model_type')!r} is not InternViT")
    image_size = int(original.get("force_image_size") or vision["image_size"])
    patch_size = int(vision["patch_size"])
    ratio = float(original.get("downsample_ratio", 0.5))

    text = {k: v for k, v in llm.items() if k not in _DROPPED_LLM_KEYS}
    text["model_type"] = "llama" if family == "internlm2" else family
    text["rope_parameters"] = _rope(llm)
    tied = tied_embeddings(original)
    text["tie_word_embeddings"] = tied
    if family == "internlm2":
        text["attention_bias"] = bool(llm.get("bias", False))  # InternLM2's `bias` covers wqkv and wo, as Llama's
        text["mlp_bias"] = False
        text["head_dim"] = llm["hidden_size"] // llm["num_attention_heads"]
    config = InternVLConfig(
        vision_config={
            "hidden_size": vision["hidden_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "intermediate_size": vision["intermediate_size"],
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": vision.get("num_channels", 3),
            "attention_bias": bool(vision.get("qkv_bias", False)),
            "use_qk_norm": qk_norm,
            "norm_type": vision.get("norm_type", "rms_norm"),
            "layer_norm_eps": eps,
            "hidden_act": vision.get("hidden_act", "gelu"),
            "use_mean_pooling": True,  # no final norm, as the original
        },
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch_size) ** 2 * ratio**2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
    )
    return config


def refuse_quantized(config: InternVLConfig, where: str | Path) -> None:
    """An HF-layout checkpoint whose config declares quantized weights (MXFP4 GPT-OSS) is refused, as an original
    one is: training, conversion and export read unquantized weights only."""
    for part in (config, config.text_config):
        quantization = getattr(part, "quantization_config", None)
        if quantization:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
            raise ConversionError(
                f"{where}: the LLM weights are quantized ({method}); internvl-tune reads unquantized checkpoints only "
                "(dequantize the LLM first)"
            )


def tied_embeddings(original: dict[str, Any]) -> bool:
    """Whether an original checkpoint ties its LM head to the token embeddings: the top-level
    `tie_word_embeddings`, which InternVL 2.5 / 3 write False for every LLM and 3.5 copies from `llm_config`."""
    return bool(original.get("tie_word_embeddings", False))


def hf_to_original_config(config: InternVLConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """The original `config.json` for an HF config (the inverse of `original_to_hf_config`); template, system
    message, tiling and LLM family from the checkpoint's `checkpoint_settings`."""
    vision, text = config.vision_config, config.text_config
    family = settings["llm_family"] or text.model_type
    if family not in LLM_FAMILIES:
        raise ConversionError(f"LLM model_type {text.model_type!r} has no original InternVL layout")
    image_size, patch_size = int(vision.image_size[0]), int(vision.patch_size[0])
    llm = {k: v for k, v in text.to_dict().items() if k not in _DROPPED_LLM_KEYS and k not in ("dtype",)}
    rope = dict(text.rope_parameters or {})
    llm["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    llm["rope_scaling"] = {"type": rope_type, **rope} if rope_type != "default" else None
    llm["architectures"] = [_LLM_ARCHITECTURES[family]]
    llm["model_type"] = family
    if family == "qwen3_moe" and "num_local_experts" in llm:
        # transformers 5 stores Qwen3-MoE's expert count as num_local_experts; the original's (4.x) config class
        # reads num_experts and would build its default 128 experts from the other spelling.
        llm["num_experts"] = llm.pop("num_local_experts")
    if family == "internlm2":
        llm["bias"] = bool(llm.pop("attention_bias", False))
        for key in ("mlp_bias", "head_dim"):
            llm.pop(key, None)
    return {
        "architectures": [ORIGINAL_ARCHITECTURE],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": settings["dynamic_image_size"],
        "force_image_size": image_size,
        "max_dynamic_patch": settings["max_dynamic_patch"],
        "min_dynamic_patch": settings["min_dynamic_patch"],
        "ps_version": "v2",
        "select_layer": config.vision_feature_layer,
        "template": settings["template"],
        **({"system_message": settings["system_message"]} if settings["system_message"] else {}),
        "use_thumbnail": settings["use_thumbnail"],
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "intermediate_size": vision.intermediate_size,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": vision.num_channels,
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
            "drop_path_rate": 0.0,
        },
        "llm_config": llm,
    }


# ----------------------------------------------------------------------------------------------------------------
# Weights

_VIT_LAYER_RENAMES = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_SCALE_RENAMES = {"ls1": "lambda_1", "ls2": "lambda_2"}
_EMBEDDING_RENAMES = {
    "class_embedding": "cls_token",
    "patch_embedding.weight": "patch_embeddings.projection.weight",
    "patch_embedding.bias": "patch_embeddings.projection.bias",
    "position_embedding": "position_embeddings",
}
_PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_INTERNLM2_LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def split_internlm2_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """Grouped fused `wqkv` [(H + 2KV) * d, D] -> q [H*d, D], k [KV*d, D], v [KV*d, D] (see the module docstring)."""
    groups = num_heads // num_kv_heads
    rows = wqkv.reshape(num_kv_heads, groups + 2, -1, *wqkv.shape[1:])  # [KV, G + 2, d, D]
    q = rows[:, :groups].reshape(num_heads * rows.shape[2], *wqkv.shape[1:])
    k = rows[:, groups].reshape(num_kv_heads * rows.shape[2], *wqkv.shape[1:])
    v = rows[:, groups + 1].reshape(num_kv_heads * rows.shape[2], *wqkv.shape[1:])
    return q.clone(), k.clone(), v.clone()


def fuse_internlm2_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int):
    """Inverse of `split_internlm2_wqkv`."""
    groups = num_heads // num_kv_heads
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_kv_heads, groups, head_dim, *rest)
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def original_to_hf_tensors(name: str, tensor: torch.Tensor, llm: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """HF (module-name) tensors for one original tensor; raises ConversionError for an unknown name."""
    if m := re.fullmatch(r"vision_model\.embeddings\.(.+)", name):
        if m.group(1) in _EMBEDDING_RENAMES:
            return [(f"model.vision_tower.embeddings.{_EMBEDDING_RENAMES[m.group(1)]}", tensor)]
    elif m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        layer, module, kind = m.groups()
        prefix = f"model.vision_tower.encoder.layer.{layer}"
        if module == "attn.qkv":
            return [
                (f"{prefix}.attention.{p}_proj.{kind}", t.clone()) for p, t in zip("qkv", tensor.chunk(3), strict=True)
            ]
        if module in _VIT_LAYER_RENAMES:
            return [(f"{prefix}.{_VIT_LAYER_RENAMES[module]}.{kind}", tensor)]
    elif m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(ls1|ls2)", name):
        return [(f"model.vision_tower.encoder.layer.{m.group(1)}.{_VIT_SCALE_RENAMES[m.group(2)]}", tensor)]
    elif m := re.fullmatch(r"mlp1\.(\d)\.(weight|bias)", name):
        if m.group(1) in _PROJECTOR_RENAMES:
            return [(f"model.multi_modal_projector.{_PROJECTOR_RENAMES[m.group(1)]}.{m.group(2)}", tensor)]
    elif name in ("language_model.lm_head.weight", "language_model.output.weight"):
        return [("lm_head.weight", tensor)]
    elif name.startswith("language_model.model."):
        rest = name[len("language_model.model.") :]
        if llm_family(llm) != "internlm2":
            return [(f"model.language_model.{rest}", tensor)]
        if rest == "tok_embeddings.weight":
            return [("model.language_model.embed_tokens.weight", tensor)]
        if rest == "norm.weight":
            return [("model.language_model.norm.weight", tensor)]
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest):
            layer, module, kind = m.groups()
            prefix = f"model.language_model.layers.{layer}"
            if module == "attention.wqkv":
                parts = split_internlm2_wqkv(tensor, llm["num_attention_heads"], llm["num_key_value_heads"])
                return [(f"{prefix}.self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", parts, strict=True)]
            if module in _INTERNLM2_LAYER_RENAMES:
                return [(f"{prefix}.{_INTERNLM2_LAYER_RENAMES[module]}.{kind}", tensor)]
    raise ConversionError(f"unknown weight {name!r} in an original InternVL checkpoint")


def hf_to_original_tensors(tensors: dict[str, torch.Tensor], llm: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Original tensors from a full HF (module-name) state dict; fused weights are concatenated back."""
    family = llm_family(llm)
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if m := re.fullmatch(r"model\.vision_tower\.embeddings\.(.+)", name):
            yield f"vision_model.embeddings.{_invert(_EMBEDDING_RENAMES)[m.group(1)]}", tensor
        elif m := re.fullmatch(
            r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", name
        ):
            layer, part, kind = m.groups()
            if part == "q":
                prefix = f"model.vision_tower.encoder.layer.{layer}.attention"
                fused = torch.cat([tensors[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"])
                yield f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}", fused
        elif m := re.fullmatch(r"model\.vision_tower\.encoder\.layer\.(\d+)\.(lambda_1|lambda_2)", name):
            yield f"vision_model.encoder.layers.{m.group(1)}.{_invert(_VIT_SCALE_RENAMES)[m.group(2)]}", tensor
        elif m := re.fullmatch(r"model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, module, kind = m.groups()
            yield f"vision_model.encoder.layers.{layer}.{_invert(_VIT_LAYER_RENAMES)[module]}.{kind}", tensor
        elif m := re.fullmatch(r"model\.multi_modal_projector\.(\w+)\.(weight|bias)", name):
            yield f"mlp1.{_invert(_PROJECTOR_RENAMES)[m.group(1)]}.{m.group(2)}", tensor
        elif name == "lm_head.weight":
            yield ("language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"), tensor
        elif name.startswith("model.language_model."):
            rest = name[len("model.language_model.") :]
            if family != "internlm2":
                yield f"language_model.model.{rest}", tensor
            elif rest == "embed_tokens.weight":
                yield "language_model.model.tok_embeddings.weight", tensor
            elif rest == "norm.weight":
                yield "language_model.model.norm.weight", tensor
            elif m := re.fullmatch(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", rest):
                layer, part, kind = m.groups()
                if part == "q":
                    prefix = f"model.language_model.layers.{layer}.self_attn"
                    q, k, v = (tensors[f"{prefix}.{p}_proj.{kind}"] for p in "qkv")
                    fused = fuse_internlm2_wqkv(q, k, v, llm["num_attention_heads"], llm["num_key_value_heads"])
                    yield f"language_model.model.layers.{layer}.attention.wqkv.{kind}", fused
            elif m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest):
                layer, module, kind = m.groups()
                yield f"language_model.model.layers.{layer}.{_invert(_INTERNLM2_LAYER_RENAMES)[module]}.{kind}", tensor
            else:
                raise ConversionError(f"no original name for {name!r}")
        else:
            raise ConversionError(f"no original name for {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Original LoRA (unmerged PEFT keys) and shard I/O

_PEFT_PREFIXES = (
    ("language_model.base_model.model.", "language_model."),
    ("vision_model.base_model.model.", "vision_model."),
)


def merge_original_lora(tensors: dict[str, torch.Tensor], *, llm_rank: int, vit_rank: int) -> dict[str, torch.Tensor]:
    """Merge unmerged PEFT LoRA weights of the original tools (`...base_layer.weight`, `lora_A/B.default`).

    W = W0 + (alpha / r) * B @ A with the original's alpha = 2r, so the scale is 2; computed in float32 and cast
    back to the base weight's dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for peft_prefix, plain in _PEFT_PREFIXES:
            if name.startswith(peft_prefix):
                name = plain + name[len(peft_prefix) :]
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        rank = llm_rank if name.startswith("language_model.") else vit_rank
        if not rank:
            raise ConversionError(f"{name}: LoRA weights present but use_llm_lora / use_backbone_lora is 0")
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        target = name.split(".lora_A.")[0] + ".weight"
        for peft_prefix, plain in _PEFT_PREFIXES:
            if target.startswith(peft_prefix):
                target = plain + target[len(peft_prefix) :]
        base = out[target]
        out[target] = (base.float() + 2.0 * (b.float() @ a.float())).to(base.dtype)
    return out


def weight_files(path: Path) -> list[Path]:
    """The weight shards of a checkpoint folder (safetensors preferred, then PyTorch .bin), via the index file."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ConversionError(f"{index}: shards missing: {missing}")
            return [path / f for f in files]
        if (path / single).is_file():
            return [path / single]
    raise ConversionError(f"{path}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return torch.load(file, map_location="cpu", weights_only=True)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], output_dir: Path, max_shard_bytes: int) -> None:
    """Write tensors to `model-XXXXX-of-YYYYY.safetensors` shards (+ index) as they come, one shard in memory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, written, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(written):05d}.tmp"
            save_file(shard, output_dir / name, metadata={"format": "pt"})
            written.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    flush()
    if len(written) == 1:
        (output_dir / written[0][0]).rename(output_dir / "model.safetensors")
        return
    for i, (tmp, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        (output_dir / tmp).rename(output_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def resize_position_embedding(position_embedding: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Bicubically resize a ViT position embedding [1, 1 + g*g, C] to the grid of `image_size`, as the original."""
    grid = image_size // patch_size
    cls, patches = position_embedding[:, :1], position_embedding[:, 1:]
    old = int(patches.shape[1] ** 0.5)
    if old == grid:
        return position_embedding
    patches = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.reshape(1, -1, grid * grid).permute(0, 2, 1).to(position_embedding.dtype)
    return torch.cat([cls, patches], dim=1)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def hf_disk_name(module_name: str) -> str:
    """The name `save_pretrained` writes for an HF module name (the released `*-hf` checkpoints' layout)."""
    if module_name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if module_name.startswith("model.language_model."):
        return "language_model.model." + module_name[len("model.language_model.") :]
    if module_name.startswith("model."):
        return module_name[len("model.") :]
    raise ConversionError(f"unexpected HF weight name {module_name!r}")


def hf_module_name(disk_name: str) -> str:
    """Inverse of `hf_disk_name`; names already in module form pass through."""
    if disk_name.startswith(("model.", "lm_head.")):
        return disk_name
    if disk_name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if disk_name.startswith("language_model.model."):
        return "model.language_model." + disk_name[len("language_model.model.") :]
    if disk_name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + disk_name
    raise ConversionError(f"unexpected weight name {disk_name!r} in an HF InternVL checkpoint")


def original_lora_ranks(original: dict[str, Any]) -> tuple[int, int]:
    """(LLM rank, ViT rank) of the unmerged LoRA weights an original-layout config declares; 0 for none."""
    return int(original.get("use_llm_lora", 0)), int(original.get("use_backbone_lora", 0))


def _original_tensors(path: Path, original: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Original-layout tensors of a checkpoint: shard by shard, or all at once when LoRA must be merged."""
    llm_rank, vit_rank = original_lora_ranks(original)
    files = weight_files(path)
    if llm_rank or vit_rank:
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(read_shard(file))
        yield from merge_original_lora(tensors, llm_rank=llm_rank, vit_rank=vit_rank).items()
        return
    for file in files:
        yield from read_shard(file).items()


_FUSED_QWEN3_MOE = re.compile(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def checkpoint_names(config: InternVLConfig) -> set[str]:
    """The weight names (module form) a checkpoint of the model `config` describes holds: the model's parameters,
    without `lm_head.weight` when it is tied to the embeddings, and Qwen3-MoE experts one by one, as transformers'
    `save_pretrained` writes them (the loaded model fuses them)."""
    with torch.device("meta"):
        expected = InternVLForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if config.text_config.model_type != "qwen3_moe":
        return set(expected)
    names = set()
    for name in expected:
        if m := _FUSED_QWEN3_MOE.fullmatch(name):
            parts = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            names |= {f"{m.group(1)}.{e}.{p}.weight" for e in range(config.text_config.num_experts) for p in parts}
        else:
            names.add(name)
    return names


def unfuse_qwen3_moe_experts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Qwen3-MoE experts as transformers' loaded model holds them (`gate_up_proj` [E, 2I, D] = gate rows then up
    rows, `down_proj` [E, D, I]) one by one, as checkpoints store them; any other tensor as it is."""
    m = _FUSED_QWEN3_MOE.fullmatch(name)
    if m is None:
        return [(name, tensor)]
    if m.group(2) == "down_proj":
        return [(f"{m.group(1)}.{e}.down_proj.weight", t.clone()) for e, t in enumerate(tensor)]
    out = []
    for e, t in enumerate(tensor):
        gate, up = t.chunk(2, dim=0)
        out += [(f"{m.group(1)}.{e}.gate_proj.weight", gate.clone()), (f"{m.group(1)}.{e}.up_proj.weight", up.clone())]
    return out


def check_complete(config: InternVLConfig, names, where: Path) -> None:
    """Raise ConversionError unless `names` are exactly the weight names of a checkpoint of the model `config`
    describes (`checkpoint_names`)."""
    expected = checkpoint_names(config)
    missing, unexpected = expected - set(names), set(names) - expected
    if missing or unexpected:
        raise ConversionError(
            f"{where}: converted weights do not match the model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )


def iter_original_as_hf(path: str | Path, original: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF module-name tensors of an original checkpoint, converted as they are read."""
    path = Path(path)
    vision = original["vision_config"]
    image_size = int(original.get("force_image_size") or vision["image_size"])
    if "quantization_config" in original["llm_config"]:
        raise ConversionError(
            f"{path}: the LLM weights are quantized ({original['llm_config']['quantization_config'].get('quant_method')}"
            "); internvl-tune reads unquantized checkpoints only (dequantize the LLM first)"
        )
    tied = tied_embeddings(original)
    for name, tensor in _original_tensors(path, original):
        if tied and name == "language_model.lm_head.weight":
            continue  # the original ties the head to the embeddings at load, so a stored copy is never used
        if name == "vision_model.embeddings.position_embedding":
            # force_image_size != the ViT's trained size: the original interpolates on every forward; once is equal.
            tensor = resize_position_embedding(tensor, image_size, int(vision["patch_size"]))
        yield from original_to_hf_tensors(name, tensor, original["llm_config"])


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
