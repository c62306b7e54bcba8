"""Which parameters train: the original freezing flags, with `unfreeze_lm_head` that works.

See docs/original-differences.md §4.5.
"""

from __future__ import annotations

from torch import nn


def apply_freezing(
    model: nn.Module,
    *,
    freeze_backbone: bool = False,
    freeze_mlp: bool = False,
    freeze_llm: bool = False,
    unfreeze_vit_layers: int = 0,
    unfreeze_lm_head: bool = False,
) -> None:
    """Set `requires_grad` on an InternVLForConditionalGeneration, in the original order.

    `unfreeze_vit_layers=k` makes ViT layers `[k:]` trainable: -2 means the last two layers, 2 all but the first
    two (Python slicing, as the original). Unlike the original, `unfreeze_lm_head` sets `requires_grad` on the
    head's parameters, so it takes effect. A frozen ViT stays in train mode (DropPath still fires when set), as in
    the original; that is documented, not changed (docs/original-differences.md §4.5).
    """
    core = model.model
    if freeze_backbone:
        core.vision_tower.requires_grad_(False)
    if freeze_llm:
        core.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if freeze_mlp:
        core.multi_modal_projector.requires_grad_(False)
    if unfreeze_vit_layers:
        for layer in core.vision_tower.encoder.layer[unfreeze_vit_layers:]:
            layer.requires_grad_(True)
    if unfreeze_lm_head:
        model.lm_head.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def active_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameter counts: a MoE layer's experts count k / E of their weights, since each
    token runs k of its E experts (the router, attention and everything else count whole). Equal for dense LLMs."""
    text = model.config.text_config
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
    share = text.num_experts_per_tok / experts if experts else 1.0
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        active += p.numel() * share if ".mlp.experts." in name else p.numel()
    return total, round(active)
