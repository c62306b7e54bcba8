"""LoRA on the LLM and on the ViT through PEFT, with the original ranks and alpha = 2 x rank.

See docs/original-differences.md §4.6.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from internvl_tune.losses.router import MOE_LLMS

logger = logging.getLogger(__name__)

# Regexes on full module names: plain names like "q_proj" would also hit the ViT (design "known facts").
LLM_LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VIT_LORA_TARGETS = (
    r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.fc1|mlp\.fc2)"
)


def apply_lora(
    model: nn.Module,
    *,
    use_llm_lora: int = 0,
    use_backbone_lora: int = 0,
    lora_dropout: float = 0.05,
    unfreeze_lm_head: bool = False,
) -> nn.Module:
    """Wrap `model` with LoRA adapters of rank `use_llm_lora` on the LLM and `use_backbone_lora` on the ViT.

    As in the original, LoRA freezes the base weights of the component it adapts; the other components keep the
    trainability the freezing flags gave them (PEFT alone would freeze everything else). The ViT's attention has
    separate q/k/v projections here where the original has a fused `qkv`; both are adapted.

    Returns:
        `model` unchanged when both ranks are 0, else a `PeftModel`.
    """
    if not use_llm_lora and not use_backbone_lora:
        return model
    patterns = []
    if use_llm_lora:
        patterns.append(LLM_LORA_TARGETS)
    if use_backbone_lora:
        patterns.append(VIT_LORA_TARGETS)
    # One adapter with per-component ranks: rank_pattern keys are matched against module names.
    rank = use_llm_lora or use_backbone_lora
    rank_pattern, alpha_pattern = {}, {}
    if use_llm_lora and use_backbone_lora:
        rank_pattern = {VIT_LORA_TARGETS: use_backbone_lora}
        alpha_pattern = {VIT_LORA_TARGETS: 2 * use_backbone_lora}
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=lora_dropout,
        target_modules="^(" + "|".join(patterns) + ")$",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    text = getattr(getattr(model, "config", None), "text_config", None)
    if use_llm_lora and getattr(text, "model_type", None) in MOE_LLMS:
        # transformers holds each MoE layer's experts as 3-D parameters, not Linear modules; PEFT adapts those only
        # through `target_parameters`, whose merge our exports do not reproduce exactly. So the experts and the
        # routers stay frozen, as the rest of the LLM under LoRA, and the attention projections (and any dense MLP
        # layers) are adapted.
        logger.info(
            "LoRA on a %s LLM: attention (and dense MLP) layers adapted; experts and routers frozen", text.model_type
        )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    adapted = []
    if use_llm_lora:
        adapted += ["model.language_model.", "lm_head."]
    if use_backbone_lora:
        adapted.append("model.vision_tower.")
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        keeps_flag = not any(name.startswith(prefix) for prefix in adapted)
        if keeps_flag:
            p.requires_grad_(trainable_before.get(name, False))
        if unfreeze_lm_head and name.startswith("lm_head."):
            p.requires_grad_(True)
    return peft_model


def load_adapter(model: nn.Module, folder: str | Path) -> PeftModel:
    """`model` with the LoRA adapter saved in `folder` (by `PeftModel.save_pretrained`)."""
    with _quiet_peft():
        return PeftModel.from_pretrained(model, folder)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # PeftModel() reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on every LoRA run
    # that tells the user nothing they can act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


_PEFT_PREFIX = "base_model.model."


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict with LoRA merged, computed from a full `state_dict` of `model`.

    Works from a gathered state dict (`accelerator.get_state_dict`), so it is right under ZeRO-3 / FSDP, where
    the local parameters are shards (the original saved lora_B as zeros there). W = W0 + scaling * B @ A in fp32,
    with each layer's own scaling (alpha / r, rank patterns included).
    """
    if not isinstance(model, PeftModel):
        return dict(state_dict)
    merged = {}
    for name, tensor in state_dict.items():
        if ".lora_" not in name:
            merged[name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = tensor
    for name, lora_a in state_dict.items():
        if ".lora_A.default.weight" not in name:
            continue
        module = name.split(".lora_A.")[0]
        lora_b = state_dict[f"{module}.lora_B.default.weight"]
        scaling = model.get_submodule(module).scaling["default"]
        target = module.removeprefix(_PEFT_PREFIX) + ".weight"
        base = merged[target]
        merged[target] = (base.float() + scaling * (lora_b.float() @ lora_a.float())).to(base.dtype)
    return merged
