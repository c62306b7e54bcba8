"""The policy model of a run: load, then the original order of DropPath, freezing, LoRA and checkpointing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from internvl_tune.checkpoints.metadata import checkpoint_settings
from internvl_tune.config import ConfigError, DataArgs, ModelArgs, PipelineSettings
from internvl_tune.data.images import image_geometry
from internvl_tune.data.transform import SampleSettings
from internvl_tune.model.drop_path import add_drop_path
from internvl_tune.model.freeze import apply_freezing
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import apply_lora


def prepare_policy(m: ModelArgs) -> tuple[nn.Module, object]:
    """Load `m.model_name_or_path` (either layout) and set it up for training as the flags say."""
    model, tokenizer = load_model(m.model_name_or_path, attn_implementation=m.attn_implementation)
    add_drop_path(model, m.drop_path_rate)
    apply_freezing(
        model,
        freeze_backbone=m.freeze_backbone,
        freeze_mlp=m.freeze_mlp,
        freeze_llm=m.freeze_llm,
        unfreeze_vit_layers=m.unfreeze_vit_layers,
        unfreeze_lm_head=m.unfreeze_lm_head,
    )
    model = apply_lora(
        model,
        use_llm_lora=m.use_llm_lora,
        use_backbone_lora=m.use_backbone_lora,
        lora_dropout=m.lora_dropout,
        unfreeze_lm_head=m.unfreeze_lm_head,
    )
    if m.grad_checkpoint:
        enable_activation_checkpointing(model)
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass, non-reentrant (works with frozen inputs and LoRA).

    transformers 5.23 renamed `gradient_checkpointing_enable` (deprecated there, removed in v6) to
    `activation_checkpointing_enable`; the 5.x releases before it have only the old name.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # a PeftModel forwards to its base model
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers hooks every tower's input embeddings (`enable_input_require_grads`), the ViT's patch embeddings
    # too, which makes a frozen ViT run its whole backward and recomputation for nothing: keep the LLM's only.
    model.disable_input_require_grads()
    model.get_input_embeddings().register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, inputs, output) -> None:
    output.requires_grad_(True)


def check_template(d: DataArgs, checkpoint: str | Path) -> None:
    """`data.conv_style` must be the template the checkpoint was trained with (recorded in it:
    `checkpoints/metadata.py`), or its tokens and stop rule are not the ones the model knows. Reads JSON only, so a
    run checks it before loading the model."""
    trained_with = checkpoint_settings(checkpoint)["template"]
    if trained_with != d.conv_style:
        raise ConfigError(
            f"data.conv_style={d.conv_style} but {checkpoint} was trained with the {trained_with} template; "
            f"set data.conv_style={trained_with}"
        )


def sample_settings(d: DataArgs, model_config) -> SampleSettings:
    """Data settings for this model: tile size and image tokens come from the model config."""
    geometry = image_geometry(model_config)
    if d.force_image_size is not None and d.force_image_size != geometry.image_size:
        raise ConfigError(
            f"data.force_image_size={d.force_image_size} but the model's vision image_size is {geometry.image_size}; "
            "resizing the ViT position embeddings is not supported: leave force_image_size unset"
        )
    if d.v2pe != "off" and d.v2pe_stride > geometry.num_image_token:
        # A tile spanning more positions than it has tokens would stretch images, the opposite of V2PE's purpose.
        raise ConfigError(
            f"data.v2pe_stride={d.v2pe_stride} is more than the model's {geometry.num_image_token} image tokens per "
            f"tile; use 1 to {geometry.num_image_token} ({geometry.num_image_token} = plain positions)"
        )
    pipeline = {f.name: getattr(d, f.name) for f in dataclasses.fields(PipelineSettings)}
    return SampleSettings(
        **pipeline,
        template=d.conv_style,
        image_size=geometry.image_size,
        num_image_token=geometry.num_image_token,
    )
